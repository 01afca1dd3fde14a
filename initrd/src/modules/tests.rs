//! The module closure, the modules.* parsers and the load list, without a kernel.

use super::*;
use std::fs;

/// A small tree in the shape of Debian's generic kernel.
fn tree() -> (tempfile::TempDir, ModuleTree) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("6.1.0-test");
    fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| fs::write(dir.join(name), text).unwrap();
    write(
        "modules.dep",
        "kernel/drivers/virtio/virtio_ring.ko:\n\
         kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
         kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
         kernel/drivers/char/hw_random/virtio-rng.ko.zst: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
         kernel/fs/fuse/fuse.ko:\n\
         kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko\n\
         kernel/fs/mbcache.ko:\n\
         kernel/fs/jbd2/jbd2.ko:\n\
         kernel/lib/crc16.ko:\n\
         kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
         kernel/crypto/crc32c_generic.ko:\n\
         kernel/arch/x86/crypto/crc32c-intel.ko:\n\
         kernel/a.ko:\n\
         kernel/b.ko:\n",
    );
    write(
        "modules.softdep",
        "# Soft dependencies extracted from modules themselves.\n\
         softdep ext4 pre: crypto-crc32c\n\
         softdep jbd2 pre: crypto-crc32c\n\
         softdep cifs gcm\n\
         softdep a pre: b post: nonexistent\n\
         softdep b pre: a\n",
    );
    write(
        "modules.alias",
        "# Aliases extracted from modules themselves.\n\
         alias crypto-crc32c crc32c_intel\n\
         alias crypto-crc32c crc32c_generic\n\
         alias fs-ext4 ext4\n\
         alias virtio:d00000004v* virtio_rng\n\
         alias pci:v00001AF4d[0-9]* virtio_pci\n",
    );
    write(
        "modules.builtin",
        "kernel/fs/configfs/configfs.ko\nkernel/lib/zlib-inflate.ko\n",
    );
    fs::write(
        dir.join("modules.builtin.modinfo"),
        b"tmpfs.alias=fs-tmpfs\0tmpfs.description=x\0",
    )
    .unwrap();
    let tree = ModuleTree::open(&dir).unwrap();
    (root, tree)
}

fn names(modules: &[Module]) -> Vec<&str> {
    modules.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn dependencies_come_first_and_once() {
    let (_d, tree) = tree();
    let order = tree
        .closure(&["virtio_mmio", "virtio-rng", "virtiofs"])
        .unwrap();
    assert_eq!(
        names(&order),
        [
            "virtio_ring",
            "virtio",
            "virtio_mmio",
            "virtio_rng",
            "fuse",
            "virtiofs"
        ]
    );
    assert_eq!(order[2].path, "kernel/drivers/virtio/virtio_mmio.ko.xz");
    assert_eq!(
        order[3].path,
        "kernel/drivers/char/hw_random/virtio-rng.ko.zst"
    );
}

#[test]
fn soft_pre_dependencies_resolve_through_aliases() {
    let (_d, tree) = tree();
    let order = tree.closure(&["fs-ext4"]).unwrap();
    assert_eq!(
        names(&order),
        [
            "crc32c_generic",
            "crc32c_intel",
            "jbd2",
            "mbcache",
            "crc16",
            "ext4"
        ]
    );
}

#[test]
fn soft_cycles_end_and_missing_soft_deps_are_skipped() {
    let (_d, tree) = tree();
    assert_eq!(names(&tree.closure(&["a"]).unwrap()), ["b", "a"]);
}

#[test]
fn builtins_and_builtin_aliases_need_no_loading() {
    let (_d, tree) = tree();
    assert!(tree
        .closure(&["configfs", "zlib_inflate", "fs-tmpfs"])
        .unwrap()
        .is_empty());
}

#[test]
fn wildcard_aliases_match() {
    let (_d, tree) = tree();
    assert_eq!(
        names(&tree.closure(&["virtio:d00000004v00001AF4"]).unwrap()),
        ["virtio_ring", "virtio", "virtio_rng"]
    );
}

#[test]
fn missing_module_names_module_and_version() {
    let (_d, tree) = tree();
    let err = tree.closure(&["virtio_mmio", "nosuch"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "module \"nosuch\" not found for kernel 6.1.0-test"
    );
}

/// A tree whose modules.dep is `text`.
fn tree_with_dep(text: &str) -> (tempfile::TempDir, Result<ModuleTree, Error>) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("6.1.0-test");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("modules.dep"), text).unwrap();
    let tree = ModuleTree::open(&dir);
    (root, tree)
}

#[test]
fn module_paths_outside_the_tree_are_refused() {
    for entry in [
        "../../../../etc/shadow",
        "kernel/../../../etc/shadow.ko",
        "/etc/shadow",
        "/lib/modules/6.1.0/kernel/a.ko",
    ] {
        let (_d, tree) = tree_with_dep(&format!("kernel/ok.ko:\n{entry}: kernel/ok.ko\n"));
        let err = tree.unwrap_err();
        assert!(
            matches!(err, Error::OutsideTree { line: 2, .. }),
            "{entry}: {err}"
        );
        assert!(err.to_string().contains(entry), "{err}");
    }
    let (_d, tree) = tree_with_dep("./kernel/a.ko:\nkernel/b..c/b.ko:\n");
    assert!(tree.is_ok());
}

#[test]
fn a_very_deep_dependency_chain_does_not_overflow_the_stack() {
    const DEPTH: usize = 200_000;
    let mut text = String::from("m0.ko:\n");
    for i in 1..DEPTH {
        text += &format!("m{i}.ko: m{}.ko\n", i - 1);
    }
    let (_d, tree) = tree_with_dep(&text);
    let tree = tree.unwrap();
    // A thread with a small stack, so that recursion would certainly overflow it.
    let order = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || tree.closure(&[format!("m{}", DEPTH - 1)]))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(order.len(), DEPTH);
    assert_eq!(
        (order[0].name.as_str(), order[DEPTH - 1].path.as_str()),
        ("m0", "m199999.ko")
    );
}

#[test]
fn indexes_in_memory_give_the_same_tree_as_files() {
    let (_d, from_files) = tree();
    let dir = from_files.dir();
    let text = |name: &str| fs::read_to_string(dir.join(name)).unwrap();
    let (dep, softdep, alias, builtin) = (
        text("modules.dep"),
        text("modules.softdep"),
        text("modules.alias"),
        text("modules.builtin"),
    );
    let modinfo = fs::read(dir.join("modules.builtin.modinfo")).unwrap();
    let indexes = Indexes {
        dep: &dep,
        softdep: &softdep,
        alias: &alias,
        builtin: &builtin,
        builtin_modinfo: &modinfo,
    };
    let in_memory = ModuleTree::from_indexes(dir, &indexes).unwrap();
    assert_eq!(in_memory.version(), "6.1.0-test");
    let roots = ["fs-ext4", "virtio_mmio", "virtio-rng", "a", "fs-tmpfs"];
    assert_eq!(
        in_memory.closure(&roots).unwrap(),
        from_files.closure(&roots).unwrap()
    );
    let err = ModuleTree::from_indexes(
        "/x/6.1",
        &Indexes {
            dep: "no colon\n",
            ..Indexes::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "/x/6.1/modules.dep:1: malformed modules.dep line"
    );
}

#[test]
fn missing_modules_dep_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = ModuleTree::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
}

#[test]
fn names_from_paths() {
    assert_eq!(
        name_from_path("kernel/drivers/char/hw_random/virtio-rng.ko"),
        "virtio_rng"
    );
    assert_eq!(name_from_path("a/b/crc32c-intel.ko.zst"), "crc32c_intel");
    assert_eq!(name_from_path("x.ko.xz"), "x");
    assert_eq!(
        normalise_alias("pci:v00001AF4d[0-9]*-x"),
        "pci:v00001AF4d[0-9]*_x"
    );
}

#[test]
fn fnmatch_semantics() {
    assert!(fnmatch("abc", "abc"));
    assert!(!fnmatch("abc", "abd"));
    assert!(fnmatch("a*c", "abbbc"));
    assert!(fnmatch("a*", "a"));
    assert!(fnmatch("*", ""));
    assert!(fnmatch("a?c", "abc"));
    assert!(!fnmatch("a?c", "ac"));
    assert!(fnmatch("d[0-2]*", "d1x"));
    assert!(!fnmatch("d[0-2]*", "d3x"));
    assert!(fnmatch("[!a]x", "bx"));
    assert!(!fnmatch("[^a]x", "ax"));
    assert!(fnmatch("[]]", "]"));
    assert!(fnmatch("a[", "a["));
    assert!(fnmatch("usb:v*p*d*dc*", "usb:v1p2d3dc4"));
    assert!(!fnmatch("*x*y", "axbxc"));
    assert!(fnmatch("*x*y", "axbxcy"));
}

#[test]
fn load_list_round_trips() {
    let text = render_load_list(&[
        "/lib/modules/v/a.ko".into(),
        "/lib/modules/v/b.ko.xz".into(),
    ]);
    let parsed = parse_load_list(&format!("# comment\n{text}\n/c.ko  opt=1 x=2\n"));
    assert_eq!(parsed.len(), 3);
    assert_eq!(
        parsed[1],
        LoadEntry {
            path: "/lib/modules/v/b.ko.xz".into(),
            params: String::new()
        }
    );
    assert_eq!(
        parsed[2],
        LoadEntry {
            path: "/c.ko".into(),
            params: "opt=1 x=2".into()
        }
    );
}
