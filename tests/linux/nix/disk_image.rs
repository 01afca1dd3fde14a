//! (d) nix/lib/make-disk-image.nix built for real by Nix (tests/linux/nix/disk-image.nix):
//! a GPT image, a whole-disk ("none") image and an MBR image converted to qcow2. On the host
//! each raw file system passes `e2fsck -fn`, carries its label, holds the closure of the image's
//! init with a registration that `nix-store --load-db` takes; the qcow2 passes `qemu-img
//! check`; and the raw images boot under `kvmbuild run` (the cloud kernel, a busybox stage 1
//! that mounts `root=` and `switch_root`s into `init=`) to the image's own init.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::super::guest::{boot, cloud_kernel, initrd_with, InitrdSpec, Run};
use super::super::harness::repo_root;
use super::{nix_build, package_set};

const BOOT_GUARD: Duration = Duration::from_secs(300);
/// Three VM builds, nested in the TCG test host.
const IMAGES_GUARD: Duration = Duration::from_secs(1200);
/// The first sector of the partition makeDiskImage makes (1 MiB).
const PARTITION_START_SECTOR: u64 = 2048;

/// Stage 1 for booting an image: mount `root=` read-write, `switch_root` into `init=`.
const STAGE1: &str = r#"for o in $(/bin/busybox cat /proc/cmdline); do
  case $o in
    root=*) root=${o#root=} ;;
    init=*) init=${o#init=} ;;
  esac
done
tries=0
while [ ! -b "$root" ]; do
  tries=$((tries + 1))
  [ "$tries" -lt 100 ] || { echo "stage 1: $root did not appear"; exit 1; }
  /bin/busybox sleep 0.1
done
/bin/busybox mkdir -p /newroot
/bin/busybox mount -t ext4 "$root" /newroot
exec /bin/busybox switch_root /newroot "$init"
"#;

/// A host binary as a bundle for the guest: libexec/NAME and lib/ with the libraries and the
/// dynamic loader `ldd` lists (the guest's root has no /lib).
fn bundle(binary: &str, into: &Path) {
    let name = Path::new(binary).file_name().unwrap();
    std::fs::create_dir_all(into.join("libexec")).unwrap();
    std::fs::create_dir_all(into.join("lib")).unwrap();
    std::fs::copy(binary, into.join("libexec").join(name)).unwrap();
    let out = Command::new("ldd").arg(binary).output().expect("ldd runs");
    for lib in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let file = Path::new(lib).file_name().unwrap();
        std::fs::copy(lib, into.join("lib").join(file)).unwrap();
    }
    assert!(
        into.join("lib/ld-linux-x86-64.so.2").exists(),
        "{binary}: no dynamic loader in its ldd list"
    );
}

fn which(name: &str) -> String {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (.ci/install-deps)"))
}

/// The package set plus the bundles, and `test.nix` calling the fixture.
fn setup() -> PathBuf {
    let dir = package_set("nix-disk-image");
    let pkgs = dir.join("pkgs");
    bundle(&which("sfdisk"), &pkgs.join("sfdisk"));
    bundle(&which("mke2fs"), &pkgs.join("mke2fs"));
    let kernel = cloud_kernel();
    let modules = pkgs.join("modules/lib/modules").join(&kernel.release);
    let expr = format!(
        r#"
let add = path: name: builtins.path {{ inherit path name; }};
in import {fixture} {{
  lib = {lib};
  busybox = add {pkgs}/busybox "busybox";
  kvmbuild = add {pkgs}/kvmbuild "kvmbuild";
  kernel = add {kernel} "vmlinuz";
  modules = add {modules} "modules-{release}";
  virtiofsd = add {pkgs}/virtiofsd "virtiofsd";
  sfdiskBundle = add {pkgs}/sfdisk "sfdisk";
  mke2fsBundle = add {pkgs}/mke2fs "mke2fs";
  jq = add {jq} "jq";
  qemuImg = add {qemu_img} "qemu-img";
}}
"#,
        fixture = repo_root().join("tests/linux/nix/disk-image.nix").display(),
        lib = repo_root().join("nix/lib").display(),
        pkgs = pkgs.display(),
        kernel = kernel.bzimage.display(),
        modules = modules.display(),
        release = kernel.release,
        jq = which("jq"),
        qemu_img = which("qemu-img"),
    );
    std::fs::write(dir.join("test.nix"), expr).unwrap();
    dir
}

fn tool(program: &str, args: &[&str], file: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text.into_owned())
}

/// The file system of a raw image: the image itself, or (partitioned) its first partition
/// copied out, so that e2fsprogs can read it without a loop device.
fn file_system(image: &Path, partitioned: bool) -> PathBuf {
    if !partitioned {
        return image.to_path_buf();
    }
    let (ok, table) = tool("sfdisk", &["--dump"], image);
    assert!(ok, "sfdisk --dump: {table}");
    assert!(
        table
            .replace(' ', "")
            .contains(&format!("start={PARTITION_START_SECTOR},")),
        "the partition should start at sector {PARTITION_START_SECTOR}:\n{table}"
    );
    let part = image.with_extension("part");
    let status = Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=512", "conv=sparse", "status=none"])
        .arg(format!("skip={PARTITION_START_SECTOR}"))
        .status()
        .unwrap();
    assert!(status.success());
    part
}

/// e2fsck-clean, labelled, and holding every closure path and a loadable registration.
fn check_file_system(fs: &Path, label: &str, closure: &[String], dir: &Path) {
    let (ok, text) = tool("e2fsck", &["-fn"], fs);
    assert!(ok, "e2fsck -fn {} is not clean:\n{text}", fs.display());
    let (_, header) = tool("dumpe2fs", &["-h"], fs);
    assert!(
        header.contains(&format!("Filesystem volume name:   {label}")),
        "label {label} expected:\n{header}"
    );
    assert!(
        header.contains("extent"),
        "ext4 features expected:\n{header}"
    );
    let (_, listing) = tool("debugfs", &["-R", "ls -p /nix/store"], fs);
    for path in closure {
        let base = path.trim_start_matches("/nix/store/");
        assert!(
            listing.contains(&format!("/{base}/")),
            "{base} is not in the image's /nix/store:\n{listing}"
        );
    }
    let registration = dir.join(format!("{label}.registration"));
    let (ok, text) = tool(
        "debugfs",
        &[
            "-R",
            &format!("dump /nix-path-registration {}", registration.display()),
        ],
        fs,
    );
    assert!(
        ok && registration.exists(),
        "no /nix-path-registration: {text}"
    );
    // Loaded into an empty store of its own, the registration gives the closure's references.
    let store = dir.join(format!("{label}.store"));
    let load = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "nix-store --store {s} --load-db < {r} && nix-store --store {s} -qR {init}",
            s = store.display(),
            r = registration.display(),
            init = closure[0],
        ))
        .env("NIX_CONF_DIR", dir.join("etc"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&load.stdout);
    assert!(
        load.status.success() && closure.iter().all(|p| said.contains(p.as_str())),
        "nix-store --load-db of the registration should give the closure {closure:?}: {said}{}",
        String::from_utf8_lossy(&load.stderr)
    );
}

/// Boots a copy of `image` (the copy is the guest's to write) to its init.
fn boot_image(image: &Path, root: &str, init: &str, dir: &Path) -> Run {
    let kernel = cloud_kernel();
    let spec = InitrdSpec {
        modules: &["virtio_mmio", "virtio_blk"],
        kernel: Some(&kernel),
        binaries: &[],
    };
    let initrd = dir.join("stage1.img");
    std::fs::write(&initrd, initrd_with(STAGE1, &spec)).unwrap();
    let disk = image.with_extension("boot");
    std::fs::copy(image, &disk).unwrap();
    let run = boot(
        &kernel.bzimage,
        &initrd,
        &format!("console=ttyS0 panic=1 root={root} init={init}/bin/init"),
        &["--disk", disk.to_str().unwrap()],
        BOOT_GUARD,
    );
    let _ = std::fs::remove_file(&disk);
    run
}

pub fn nix_make_disk_image_gpt_none_and_qcow2() {
    let dir = setup();
    let then = format!(
        "set -- $out\n\
         cp $1/nixos.img {d}/gpt.img && cp $2/nixos.img {d}/none.img && cp $3/nixos.qcow2 {d}/image.qcow2\n\
         init=$(nix-instantiate --eval -E '(import {d}/test.nix).init.outPath' | tr -d '\"')\n\
         nix-store -qR $init > {d}/closure\n\
         echo $init > {d}/init",
        d = dir.display()
    );
    let run = nix_build(&dir, "images", &then, IMAGES_GUARD);
    run.check(
        run.status == Some(0),
        "the three image builds should succeed",
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let init = read("init").trim().to_string();
    let mut closure: Vec<String> = read("closure").lines().map(str::to_string).collect();
    // The init first: the registration check asks for its closure.
    closure.sort_by_key(|p| *p != init);
    run.check(
        closure.len() >= 2,
        "the init's closure should hold busybox too",
    );

    for (name, label, partitioned, root) in [
        ("gpt.img", "kvmbuild-gpt", true, "/dev/vda1"),
        ("none.img", "kvmbuild-none", false, "/dev/vda"),
    ] {
        let image = dir.join(name);
        let fs = file_system(&image, partitioned);
        check_file_system(&fs, label, &closure, &dir);
        if partitioned {
            let (_, table) = tool("sfdisk", &["--dump"], &image);
            assert!(table.contains("label: gpt"), "a GPT expected:\n{table}");
        }
        let boot = boot_image(&image, root, &init, &dir);
        println!("    boot of {name}: {:.1} s", boot.elapsed.as_secs_f64());
        boot.check(boot.status == Some(0), "the image's init should power off");
        boot.check(
            boot.console
                .contains("KVMBUILD-IMAGE-INIT-REACHED as pid 1"),
            "the image's own init should run as PID 1",
        );
        boot.check(
            boot.console.contains(&format!("root mount: {root} / ext4")),
            "the root should be the image's ext4",
        );
    }

    let (ok, text) = tool("qemu-img", &["check"], &dir.join("image.qcow2"));
    assert!(ok && text.contains("No errors"), "qemu-img check: {text}");
    let (_, info) = tool("qemu-img", &["info"], &dir.join("image.qcow2"));
    assert!(info.contains("file format: qcow2"), "{info}");
    std::fs::remove_dir_all(dir).unwrap();
}
