//! Real Nix builds through the native `runInLinuxVM` (nix/lib/run-in-linux-vm.nix), with Nix
//! itself (Debian's nix-bin, single-user, as root, no sandbox) and a package set of our own made
//! of host binaries: static busybox (shell and tools), the kvmbuild under test, virtiofsd, and
//! Debian's cloud kernel with a trimmed module tree.
//!
//! Each build runs in a mount namespace of its own with a fresh tmpfs on /nix, so that it never
//! touches a store on the machine (and, in the test host, the store is not on the overlay over
//! the virtiofs root, which a nested virtiofsd serves badly). What a test checks on the host is
//! copied out of that store before the namespace goes away.

mod disk_image;
mod remote;
mod timing;
mod vmtools;

pub use disk_image::nix_make_disk_image_gpt_none_and_qcow2;
pub use remote::nix_builds_on_a_remote_builder_over_ssh;
pub use timing::nix_trivial_build_drop_in_vs_native;
pub use vmtools::{
    vmtools_failing_builder_resets_and_qemu_compat_exits_0,
    vmtools_stage1_through_the_qemu_entry_point,
};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use initrd::modules::ModuleTree;

use super::guest::{cloud_kernel, run_guarded, scratch, Run};
use super::harness::repo_root;
use super::virtiofs::which_virtiofsd;

const GUARD: Duration = Duration::from_secs(420);
/// Guest RAM the first test asks for (`memSize`), and checks in the guest's /proc/meminfo.
const MEM_SIZE_MIB: u64 = 384;
/// busybox applets our "coreutils" offers to the builders, runInLinuxVM and makeDiskImage.
const APPLETS: &[&str] = &[
    "sh", "mkdir", "ln", "cat", "head", "nproc", "uname", "echo", "cp", "mv", "rm", "chmod", "ls",
    "grep", "sed", "mount", "umount", "sync", "sleep", "truncate", "poweroff",
];

/// The test's scratch directory with the package set, a Nix configuration and `test.nix`.
fn setup(test: &str) -> PathBuf {
    let dir = package_set(test);
    let kernel = cloud_kernel();
    let pkgs = dir.join("pkgs");
    let modules = pkgs.join("modules/lib/modules").join(&kernel.release);
    let expr = format!(
        r#"
let
  add = path: name: builtins.path {{ inherit path name; }};
  busybox = add {pkgs}/busybox "busybox";
  runInLinuxVM = import {lib} {{
    kvmbuild = add {pkgs}/kvmbuild "kvmbuild";
    kernel = add {kernel} "vmlinuz";
    modules = add {modules} "modules-{release}";
    virtiofsd = add {pkgs}/virtiofsd "virtiofsd";
    shell = "${{busybox}}/bin/sh";
    coreutils = busybox;
  }};
  script = name: text: builtins.toFile name text;
  build = name: attrs: runInLinuxVM (derivation ({{
    inherit name;
    system = builtins.currentSystem;
    builder = "${{busybox}}/bin/sh";
    PATH = "${{busybox}}/bin";
  }} // attrs));
in
{{
  uname = build "guest-uname" {{
    memSize = {MEM_SIZE_MIB};
    kvmbuildVerbose = true;
    args = [ "-e" (script "uname.sh" ''
      uname -r > $out
      while read -r key value unit; do
        if [ "$key" = MemTotal: ]; then echo "$value" >> $out; fi
      done < /proc/meminfo
    '') ];
  }};
  fails = build "fails-with-3" {{
    args = [ "-c" "echo builder-was-here; echo 'builder said: on stderr' >&2; exit 3" ];
  }};
}}
"#,
        pkgs = pkgs.display(),
        lib = repo_root().join("nix/lib/run-in-linux-vm.nix").display(),
        kernel = kernel.bzimage.display(),
        modules = modules.display(),
        release = kernel.release,
    );
    std::fs::write(dir.join("test.nix"), expr).unwrap();
    dir
}

/// The test's scratch directory with the package set (`pkgs/`: busybox with its applets, the
/// kvmbuild under test, virtiofsd, the cloud kernel's module tree trimmed to kvmbuild's
/// initrd) and a Nix configuration (`etc/nix.conf`).
fn package_set(test: &str) -> PathBuf {
    let uid = Command::new("id").arg("-u").output().expect("id runs");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the Nix tests run as root (a single-user store on a tmpfs mounted in a namespace)"
    );
    assert!(
        Command::new("nix-build").arg("--version").output().is_ok(),
        "nix-build is missing: install Debian's nix-bin (.ci/install-deps)"
    );
    let dir = scratch(test);
    let pkgs = dir.join("pkgs");
    let _ = std::fs::remove_dir_all(&pkgs);
    // busybox as a package: bin/busybox and its applets (a store path named after busybox
    // itself would make it look for an applet called "<hash>-busybox").
    let bb_bin = pkgs.join("busybox/bin");
    std::fs::create_dir_all(&bb_bin).unwrap();
    std::fs::copy("/bin/busybox", bb_bin.join("busybox")).expect("/bin/busybox (busybox-static)");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bb_bin.join(applet)).unwrap();
    }
    let kvmbuild_bin = pkgs.join("kvmbuild/bin");
    std::fs::create_dir_all(&kvmbuild_bin).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_kvmbuild"),
        kvmbuild_bin.join("kvmbuild"),
    )
    .unwrap();
    std::fs::copy(which_virtiofsd(), pkgs.join("virtiofsd")).unwrap();
    let kernel = cloud_kernel();
    trimmed_modules(&kernel.modules, &kernel.release, &pkgs.join("modules"));

    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("nix.conf"),
        "build-users-group =\nsandbox = false\nsystem-features = kvm\nsubstituters =\n",
    )
    .unwrap();
    dir
}

/// A module tree with only what kvmbuild's initrd loads (its default modules and their
/// dependencies), re-indexed by depmod: the whole tree is ~90 MB to copy into the store.
fn trimmed_modules(full: &Path, release: &str, base: &Path) -> PathBuf {
    let dir = base.join("lib/modules").join(release);
    std::fs::create_dir_all(&dir).unwrap();
    let tree = ModuleTree::open(full).unwrap();
    for module in tree.closure(initrd::DEFAULT_MODULES).unwrap() {
        let to = dir.join(&module.path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(full.join(&module.path), &to).unwrap();
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if full.join(index).exists() {
            std::fs::copy(full.join(index), dir.join(index)).unwrap();
        }
    }
    let out = Command::new("depmod")
        .arg("-b")
        .arg(base)
        .arg(release)
        .output()
        .expect("depmod runs (kmod)");
    assert!(
        out.status.success(),
        "depmod failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Runs `script` with Nix's configuration from `dir/etc`, in a mount namespace with a fresh
/// store on a tmpfs, killed after `guard`.
fn nix_build_with_guard(script: &str, dir: &Path, guard: Duration) -> Run {
    let script =
        format!("mkdir -p /nix && mount -t tmpfs nix-test-store /nix || exit 90\n{script}");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "/bin/sh", "-c", &script])
        .env("NIX_CONF_DIR", dir.join("etc"))
        .env_remove("NIX_CONFIG")
        .env_remove("NIX_PATH");
    run_guarded(cmd, guard)
}

/// `test.nix`'s `attr` instantiated (which adds the package set to the store) and built, in a
/// mount namespace with a fresh store; `then` runs after it in the same namespace (with `$out`
/// the result path, or empty when the build failed). Both steps are timed.
fn nix_build(dir: &Path, attr: &str, then: &str, guard: Duration) -> Run {
    let script = format!(
        "set -u\n\
         t0=$(date +%s%N)\n\
         drv=$(nix-instantiate {expr} -A {attr}) || exit 91\n\
         t1=$(date +%s%N)\n\
         out=$(nix-store --realise $drv); status=$?\n\
         t2=$(date +%s%N)\n\
         echo \"nix-instantiate took $(( (t1 - t0) / 1000000 )) ms, nix-store --realise $(( (t2 - t1) / 1000000 )) ms, exited $status\" >&2\n\
         {then}\n\
         exit $status\n",
        expr = dir.join("test.nix").display(),
    );
    let run = nix_build_with_guard(&script, dir, guard);
    let timing = run
        .stderr
        .lines()
        .find(|l| l.starts_with("nix-instantiate took"))
        .unwrap_or("no timing");
    println!(
        "    -A {attr}: {:.1} s in all; {timing}",
        run.elapsed.as_secs_f64()
    );
    run
}

/// A derivation whose builder runs in the VM writes the guest's `uname -r` and its RAM to
/// `$out`; on the host the file shows that the builder ran in the guest.
pub fn nix_run_in_linux_vm_builds_in_the_guest() {
    let dir = setup("nix-uname");
    let result = dir.join("result");
    let _ = std::fs::remove_file(&result);
    let run = nix_build(
        &dir,
        "uname",
        &format!("[ -n \"$out\" ] && cat \"$out\" > {}", result.display()),
        GUARD,
    );
    // kvmbuild exec -v's timing of this (trivial) build, from the build log.
    for line in run
        .stderr
        .lines()
        .filter(|l| l.contains("kvmbuild: command started"))
    {
        println!("    {line}");
    }
    run.check(run.status == Some(0), "the VM build should succeed");
    let text = std::fs::read_to_string(&result).unwrap_or_default();
    check_written_in_the_guest(&run, &text);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `text` is what the `uname` attribute's builder wrote to `$out`: the cloud kernel's release
/// and a RAM size that is the `memSize` asked for (the test host itself has 4 GiB), so the
/// builder ran in the guest.
fn check_written_in_the_guest(run: &Run, text: &str) {
    let mut lines = text.lines();
    let release = lines.next().unwrap_or_default();
    let mem_kib: u64 = lines.next().and_then(|l| l.parse().ok()).unwrap_or(0);
    run.check(
        release == cloud_kernel().release,
        &format!("$out should start with the guest kernel's release; it holds {text:?}"),
    );
    run.check(
        mem_kib > (MEM_SIZE_MIB - 128) * 1024 && mem_kib <= MEM_SIZE_MIB * 1024,
        &format!("the guest should have about {MEM_SIZE_MIB} MiB (memSize); it had {mem_kib} KiB"),
    );
}

/// A builder that exits 3 in the VM fails the build: Nix reports exit code 3, its log holds
/// what the builder printed on stdout and stderr, and no output path is left.
pub fn nix_builder_status_and_output_reach_nix() {
    let dir = setup("nix-fails");
    let run = nix_build(
        &dir,
        "fails",
        &format!(
            "p=$(nix-instantiate --eval -E '(import {}).fails.outPath' | tr -d '\"')\n\
             if [ -e \"$p\" ]; then echo \"OUTPUT LEFT: $p\" >&2; fi",
            dir.join("test.nix").display()
        ),
        GUARD,
    );
    run.check(run.status.is_some_and(|s| s != 0), "the build should fail");
    run.check(
        run.stderr.contains("failed with exit code 3"),
        "Nix should report the builder's status, 3",
    );
    run.check(
        run.stderr.contains("builder-was-here") && run.stderr.contains("builder said: on stderr"),
        "the build log should hold the builder's stdout and stderr",
    );
    run.check(
        !run.stderr.contains("OUTPUT LEFT"),
        "no output path should exist",
    );
    for line in run
        .stderr
        .lines()
        .filter(|l| l.contains("exit code") || l.contains("builder"))
    {
        println!("    nix said: {line}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
