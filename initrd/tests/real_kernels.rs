//! Module closures against the real module trees of Debian's cloud and generic kernels.
//!
//! The trees come from `KVMBUILD_KERNELS_DIR`, or else from the test-kernel cache
//! `${XDG_CACHE_HOME:-$HOME/.cache}/kvmbuild/kernels`: each `<pkg-version>/lib/modules/VERSION`
//! below it (with `depmod` run) is a candidate. Without them the tests print a note and pass,
//! except under `CI=true`, where they fail loudly.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::PathBuf;

use initrd::modules::{ModuleTree, DEFAULT_MODULES};

/// The directory holding the cached kernels.
fn kernels_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVMBUILD_KERNELS_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("kvmbuild/kernels")
}

/// The newest `lib/modules/VERSION` directory whose version satisfies `flavour`.
fn find_tree(flavour: fn(&str) -> bool) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .ok()?
        .flatten()
        .filter_map(|pkg| std::fs::read_dir(pkg.path().join("lib/modules")).ok())
        .flat_map(|versions| versions.flatten().map(|v| v.path()))
        .filter(|v| v.join("modules.dep").is_file())
        .filter(|v| v.file_name().and_then(|n| n.to_str()).is_some_and(flavour))
        .collect();
    found.sort();
    found.pop()
}

/// The tree, or `None` after a note (a panic under CI).
fn tree(what: &str, flavour: fn(&str) -> bool) -> Option<ModuleTree> {
    match find_tree(flavour) {
        Some(dir) => Some(ModuleTree::open(dir).unwrap()),
        None => {
            let msg = format!(
                "no Debian {what} kernel module tree under {}",
                kernels_dir().display()
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{msg} (run scripts/guest-kernels)"
            );
            eprintln!(
                "note: {msg}; skipping (set KVMBUILD_KERNELS_DIR or run scripts/guest-kernels)"
            );
            None
        }
    }
}

fn is_cloud(version: &str) -> bool {
    version.ends_with("-cloud-amd64")
}

fn is_generic(version: &str) -> bool {
    version.ends_with("-amd64") && !is_cloud(version)
}

fn position(order: &[initrd::modules::Module], name: &str) -> usize {
    order
        .iter()
        .position(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
}

#[test]
fn cloud_kernel_default_modules() {
    let Some(tree) = tree("cloud", is_cloud) else {
        return;
    };
    let order = tree.closure(DEFAULT_MODULES).unwrap();
    let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "virtio_ring",
            "virtio",
            "virtio_mmio",
            "virtio_blk",
            "virtio_console",
            "virtio_rng",
            "fuse",
            "virtiofs"
        ]
    );
    assert!(position(&order, "virtio_ring") < position(&order, "virtio_mmio"));
    assert!(position(&order, "virtio") < position(&order, "virtio_mmio"));
    assert!(position(&order, "fuse") < position(&order, "virtiofs"));
    for module in &order {
        assert!(
            tree.dir().join(&module.path).is_file(),
            "{} is not in the tree",
            module.path
        );
    }
}

#[test]
fn cloud_kernel_has_ext4_built_in() {
    let Some(tree) = tree("cloud", is_cloud) else {
        return;
    };
    assert!(tree.closure(&["ext4", "fs-ext4"]).unwrap().is_empty());
}

#[test]
fn generic_kernel_ext4_pulls_crc32c_first() {
    let Some(tree) = tree("generic", is_generic) else {
        return;
    };
    let order = tree.closure(&["ext4"]).unwrap();
    let ext4 = position(&order, "ext4");
    let crc32c = order
        .iter()
        .position(|m| m.name.starts_with("crc32c"))
        .expect("a crc32c module");
    assert!(crc32c < ext4, "{order:?}");
    assert!(position(&order, "jbd2") < ext4);
    assert!(position(&order, "mbcache") < ext4);
    assert_eq!(order.last().unwrap().name, "ext4");
}

#[test]
fn missing_module_error_names_the_kernel() {
    let Some(tree) = tree("cloud", is_cloud) else {
        return;
    };
    let err = tree.closure(&["no_such_module"]).unwrap_err().to_string();
    assert!(
        err.contains("no_such_module") && err.contains(tree.version()),
        "{err}"
    );
}
