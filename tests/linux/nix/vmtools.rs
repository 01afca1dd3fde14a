//! (e) A vmTools-style run through the QEMU entry point, without Nix: the host side of
//! nixpkgs' `vmRunCommand` (saved-env in `xchg`, one virtiofsd for the store and one for
//! `xchg`, vmTools' QEMU argument line, then `xchg/in-vm-exit`) and a busybox stage 1 shaped
//! like nixpkgs' (modules `insmod`ed by path, `store` and `xchg` mounted by tag on a tmpfs
//! root, `command=` read from /proc/cmdline, `switch_root` into stage 2). Stage 2 sources the
//! saved environment, runs the builder under `set -e`, writes `in-vm-exit` and `poweroff -f`s.
//!
//! It pins the QEMU semantics vmTools relies on: a failing builder ends stage 2, so PID 1 dies,
//! the kernel panics and `panic=1` resets the guest, which under `-no-reboot` ends the process
//! with status 0 and no `in-vm-exit` (vmTools then says "Virtual machine didn't produce an exit
//! code"); and the kernel's log has no "PCI: Fatal" line.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::super::guest::{cloud_kernel, initrd_with, run_guarded, scratch, InitrdSpec, Run};
use super::super::virtiofs::{vmtools_share_args, Virtiofsd};

const GUARD: Duration = Duration::from_secs(300);
/// What nixpkgs' vmTools loads in stage 1 that the cloud kernel has as modules.
const STAGE1_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_rng", "virtiofs"];

/// Stage 1, after the prelude of [`initrd_with`] (proc, sys, devtmpfs, `insmod` of each
/// module by its path). `set -e` is on, as in vmTools' `ash -e`.
const STAGE1: &str = r#"/bin/busybox --install -s /bin
export PATH=/bin
for o in $(cat /proc/cmdline); do
  case $o in
    command=*) command=${o#command=} ;;
  esac
done
mkdir /fs
mount -t tmpfs none /fs
mkdir -p /fs/nix/store /fs/tmp /fs/dev /fs/proc /fs/sys
mount -t virtiofs store /fs/nix/store
mount -t tmpfs -o mode=1777 none /fs/tmp
mkdir -p /fs/tmp/xchg
mount -t virtiofs xchg /fs/tmp/xchg
mount -o bind /dev /fs/dev
mount -t proc none /fs/proc
mount -t sysfs none /fs/sys
echo "starting stage 2 ($command)"
exec switch_root /fs $command
"#;

/// Stage 2 (in the "store"), as vmTools' under `set -euo pipefail`: a failing builder ends it
/// before `in-vm-exit` is written.
const STAGE2: &str = r#"#!/nix/store/busybox sh
set -eu
. /tmp/xchg/saved-env
cd /tmp
"$origBuilder" $origArgs
echo $? > /tmp/xchg/in-vm-exit
/nix/store/busybox poweroff -f
"#;

/// A builder that records what the guest saw in `$out` (a directory in the shared store).
const BUILDER_OK: &str = r#"b=/nix/store/busybox
$b mkdir $out
$b uname -r > $out/release
$b cat /proc/cmdline > $out/cmdline
$b dmesg > $out/dmesg
"#;

const BUILDER_FAILS: &str = "echo builder-was-here-and-fails\nexit 3\n";

/// Boots the vmTools shape with `builder` as the derivation's builder script; returns the
/// run and the store and xchg directories.
fn vm_run(test: &str, builder: &str) -> (Run, std::path::PathBuf) {
    let kernel = cloud_kernel();
    let dir = scratch(test);
    let (store, xchg) = (dir.join("store"), dir.join("xchg"));
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&xchg).unwrap();
    std::fs::copy("/bin/busybox", store.join("busybox")).unwrap();
    write_executable(&store.join("stage2"), STAGE2);
    std::fs::write(store.join("builder.sh"), builder).unwrap();
    // What `export > xchg/saved-env` leaves for stage 2.
    std::fs::write(
        xchg.join("saved-env"),
        "export origBuilder=/nix/store/busybox\n\
         export origArgs='sh /nix/store/builder.sh'\n\
         export out=/nix/store/result\n",
    )
    .unwrap();
    let spec = InitrdSpec {
        modules: STAGE1_MODULES,
        kernel: Some(&kernel),
        binaries: &[],
    };
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, initrd_with(STAGE1, &spec)).unwrap();

    let store_fs = Virtiofsd::start(&store, dir.join("virtio-store.sock"));
    let xchg_fs = Virtiofsd::start(&xchg, dir.join("virtio-xchg.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmbuild"));
    // vmTools' line: its qemu-common binary with `-cpu max`, QEMU_OPTS' memory flags.
    cmd.arg("qemu-compat")
        .args(["-cpu", "max", "-nographic", "-no-reboot"])
        .args(["-device", "virtio-rng-pci"])
        .args(vmtools_share_args(&store_fs, &xchg_fs))
        .arg("-kernel")
        .arg(&kernel.bzimage)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 panic=1 command=/nix/store/stage2 mountDisk= loglevel=4",
        ])
        .args(["-m", "384", "-object"])
        .args(["memory-backend-memfd,id=mem,size=384M,share=on"])
        .args(["-machine", "memory-backend=mem"]);
    let run = run_guarded(cmd, GUARD);
    drop((store_fs, xchg_fs));
    println!("    vm-run: {:.1} s", run.elapsed.as_secs_f64());
    (run, dir)
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The builder's `$out` lands in the host's store directory, `in-vm-exit` says 0, the guest's
/// kernel got the no-PCI parameters and its whole log (dmesg, every level) has no "PCI: Fatal".
pub fn vmtools_stage1_through_the_qemu_entry_point() {
    let (run, dir) = vm_run("vmtools-ok", BUILDER_OK);
    run.check(run.status == Some(0), "qemu-compat should exit 0");
    let out = dir.join("store/result");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    run.check(
        std::fs::read_to_string(dir.join("xchg/in-vm-exit"))
            .ok()
            .as_deref()
            == Some("0\n"),
        "stage 2 should write 0 to xchg/in-vm-exit",
    );
    run.check(
        read("release").trim() == cloud_kernel().release,
        "$out/release should hold the guest kernel's release",
    );
    let cmdline = read("cmdline");
    run.check(
        cmdline.contains("command=/nix/store/stage2")
            && cmdline.contains("pci=off initcall_blacklist=pci_arch_init"),
        &format!(
            "the kernel's command line should be vmTools' plus the no-PCI parameters: {cmdline}"
        ),
    );
    let dmesg = read("dmesg");
    run.check(
        dmesg.contains("Linux version") && dmesg.contains("virtio"),
        "$out/dmesg should be the guest kernel's log",
    );
    run.check(
        !dmesg.contains("PCI: Fatal") && !run.console.contains("PCI: Fatal"),
        &format!("the kernel should not log \"PCI: Fatal\":\n{dmesg}"),
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A builder that exits 3: stage 2 ends, the kernel panics ("Attempted to kill init") and
/// `panic=1` resets the guest; under `-no-reboot` kvmbuild exits 0 as QEMU does, saying how the
/// guest reset, and `in-vm-exit` is absent, which is how vmTools detects the failure.
pub fn vmtools_failing_builder_resets_and_qemu_compat_exits_0() {
    let (run, dir) = vm_run("vmtools-fails", BUILDER_FAILS);
    run.check(
        run.status == Some(0),
        "a reset under -no-reboot should end qemu-compat with 0",
    );
    run.check(
        run.console.contains("builder-was-here-and-fails"),
        "the builder's output should be on the console",
    );
    run.check(
        run.console.contains("Attempted to kill init"),
        "the kernel should have panicked when stage 2 ended",
    );
    run.check(
        run.stderr.contains("reset itself") && run.stderr.contains("-no-reboot"),
        "kvmbuild should say the guest reset",
    );
    run.check(
        !dir.join("xchg/in-vm-exit").exists(),
        "no in-vm-exit should be written (vmTools: \"Virtual machine didn't produce an exit code\")",
    );
    std::fs::remove_dir_all(dir).unwrap();
}
