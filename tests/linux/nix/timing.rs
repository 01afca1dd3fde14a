//! The same trivial VM derivation (the guest's `uname -r` into `$out`) built by Nix through
//! the drop-in (a vmTools of nixpkgs' shape calling kvmbuild as `qemu-kvm`,
//! tests/linux/nix/vmtools.nix) and through the native runInLinuxVM, alternating, each build
//! a distinct derivation. The native builds start from the warm image, which is built first
//! (and timed apart); each native build's log must show the restore. Every build's `$out` is
//! checked; the wall times of `nix-store --realise` are printed with their medians (measured,
//! never asserted).

use std::path::{Path, PathBuf};

use initrd::modules::ModuleTree;

use super::super::guest::cloud_kernel;
use super::super::harness::repo_root;
use super::{nix_build_with_guard, package_set};

/// Builds of each kind.
const ROUNDS: usize = 5;

/// What stage 1 insmods, in load order, as paths under lib/modules/RELEASE.
fn stage1_modules(modules: &Path) -> Vec<String> {
    let tree = ModuleTree::open(modules).unwrap();
    tree.closure(&["virtio_mmio", "virtio_blk", "virtio_rng", "virtiofs"])
        .unwrap()
        .into_iter()
        .map(|m| m.path)
        .collect()
}

fn setup() -> PathBuf {
    let dir = package_set("nix-timing");
    let pkgs = dir.join("pkgs");
    std::os::unix::fs::symlink("kvmbuild", pkgs.join("kvmbuild/bin/qemu-kvm")).unwrap();
    let kernel = cloud_kernel();
    let modules = pkgs.join("modules/lib/modules").join(&kernel.release);
    let list: Vec<String> = stage1_modules(&modules)
        .iter()
        .map(|m| format!("\"{m}\""))
        .collect();
    let expr = format!(
        r#"
let add = path: name: builtins.path {{ inherit path name; }};
    set = import {fixture} {{
      lib = {lib};
      busybox = add {pkgs}/busybox "busybox";
      kvmbuild = add {pkgs}/kvmbuild "kvmbuild";
      kernel = add {kernel} "vmlinuz";
      modules = add {modules} "modules-{release}";
      moduleList = [ {list} ];
      virtiofsd = add {pkgs}/virtiofsd "virtiofsd";
    }};
in [ (set.native 0).kvmbuildWarmImage ]
   ++ builtins.concatLists (builtins.genList (i: [ (set.dropIn i) (set.native i) ]) {ROUNDS})
"#,
        fixture = repo_root().join("tests/linux/nix/vmtools.nix").display(),
        lib = repo_root().join("nix/lib").display(),
        pkgs = pkgs.display(),
        kernel = kernel.bzimage.display(),
        modules = modules.display(),
        release = kernel.release,
        list = list.join(" "),
    );
    std::fs::write(dir.join("test.nix"), expr).unwrap();
    dir
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn nix_trivial_build_drop_in_vs_native() {
    let dir = setup();
    // One derivation at a time, alternating drop-in and native, each timed.
    let script = format!(
        "for drv in $(nix-instantiate {expr}); do\n\
           t0=$(date +%s%N)\n\
           out=$(nix-store --realise $drv) || {{ echo \"BUILD FAILED: $drv\" >&2; exit 1; }}\n\
           t1=$(date +%s%N)\n\
           [ -d $out ] && echo \"WARM IMAGE $(( (t1 - t0) / 1000000 ))\" >&2 && continue\n\
           echo \"TIMED $drv $(( (t1 - t0) / 1000000 )) $(cat $out)\" >&2\n\
         done",
        expr = dir.join("test.nix").display()
    );
    let run = nix_build_with_guard(&script, &dir, std::time::Duration::from_secs(2100));
    run.check(run.status == Some(0), "every build should succeed");
    let release = cloud_kernel().release;
    let (mut drop_in, mut native) = (Vec::new(), Vec::new());
    for line in run.stderr.lines().filter(|l| l.starts_with("TIMED ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (drv, ms, out) = (words[1], words[2], words.get(3).copied().unwrap_or(""));
        run.check(
            out == release,
            &format!("{drv} wrote {out:?}, not {release}"),
        );
        let secs = ms.parse::<f64>().unwrap() / 1000.0;
        if drv.contains("trivial-drop-in") {
            drop_in.push(secs);
        } else {
            native.push(secs);
        }
    }
    run.check(
        drop_in.len() == ROUNDS && native.len() == ROUNDS,
        "every round should build both ways",
    );
    let restored = run
        .stderr
        .lines()
        .filter(|l| l.contains("kvmbuild: restored "))
        .count();
    run.check(
        restored == ROUNDS,
        &format!("every native build should start from the warm image ({restored} did)"),
    );
    let image_ms = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("WARM IMAGE "))
        .and_then(|ms| ms.trim().parse::<f64>().ok());
    run.check(image_ms.is_some(), "the warm image is built first");
    println!(
        "    warm image (built once): {:.1} s",
        image_ms.unwrap_or(0.0) / 1000.0
    );
    println!("    drop-in (vmTools shape, kvmbuild as qemu-kvm): {drop_in:.1?} s");
    println!("    native runInLinuxVM (kvmbuild exec):          {native:.1?} s");
    println!(
        "    medians: drop-in {:.1} s, native {:.1} s",
        median(drop_in),
        median(native)
    );
    std::fs::remove_dir_all(dir).unwrap();
}
