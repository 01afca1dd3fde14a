//! virtio-mmio devices under a stock Debian kernel: disks, console and entropy.

use std::process::Command;
use std::time::Duration;

use super::guest::{boot, cloud_kernel, initrd_with, scratch, InitrdSpec};

const GUARD: Duration = Duration::from_secs(180);
const DISK_MIB: u64 = 64;
const GREETING: &str = "written by a guest of kvmbuild";

/// The init for the disk test: ext4 made and filled on /dev/vda, then a write attempt on the
/// read-only /dev/vdb.
const DISK_INIT: &str = r#"
/sbin/mkfs.ext4 -q -F /dev/vda
/bin/busybox mount -t ext4 /dev/vda /mnt
echo "written by a guest of kvmbuild" > /mnt/greeting.txt
/bin/busybox seq 1 100000 > /mnt/numbers.txt
/bin/busybox umount /mnt
echo "KVMBUILD-VDB-RO $(/bin/busybox cat /sys/block/vdb/ro)"
if /bin/busybox dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; then
    echo KVMBUILD-VDB-WRITE-SUCCEEDED
else
    echo KVMBUILD-VDB-WRITE-FAILED
fi
/bin/busybox sync
/bin/busybox poweroff -f
"#;

fn host(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn debugfs_cat(image: &std::path::Path, file: &str) -> Vec<u8> {
    let out = host(
        "debugfs",
        &["-R", &format!("cat {file}"), image.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "debugfs cat {file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The guest makes an ext4 file system on a virtio-blk disk (discarding it first) and fills it;
/// the host's e2fsck finds it clean, debugfs reads back the same bytes and the discarded space
/// is holes again. A second, read-only disk refuses the
/// guest's write and is unchanged.
pub fn ext4_made_in_the_guest_and_a_read_only_disk() {
    let kernel = cloud_kernel();
    let dir = scratch("disks");
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    // Non-zero and fully allocated: only the guest's discards can turn it back into holes.
    std::fs::write(&rw, vec![0xa5u8; (DISK_MIB << 20) as usize]).unwrap();
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&ro, &pattern).unwrap();

    let spec = InitrdSpec {
        modules: &["virtio_mmio", "virtio_blk"],
        kernel: Some(&kernel),
        binaries: &["/sbin/mkfs.ext4"],
    };
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initrd_with(DISK_INIT, &spec)).unwrap();
    let disk_args = [
        "--mem",
        "256",
        "--disk",
        rw.to_str().unwrap(),
        "--disk",
        &format!("{},ro", ro.display()),
    ];
    let run = boot(
        &kernel.bzimage,
        &initrd,
        "console=ttyS0 panic=1 quiet",
        &disk_args,
        GUARD,
    );
    println!(
        "disks: guest made ext4 and powered off in {:.1} s",
        run.elapsed.as_secs_f64()
    );
    run.check(run.status == Some(0), "the guest should power off cleanly");
    run.check(
        run.console.contains("KVMBUILD-VDB-RO 1"),
        "the kernel should see vdb as read-only",
    );
    run.check(
        run.console.contains("KVMBUILD-VDB-WRITE-FAILED"),
        "a write to the read-only disk should fail",
    );

    let fsck = host("e2fsck", &["-fn", rw.to_str().unwrap()]);
    run.check(
        fsck.status.success(),
        &format!(
            "e2fsck -fn should find the guest's ext4 clean:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        ),
    );
    assert_eq!(
        debugfs_cat(&rw, "/greeting.txt"),
        format!("{GREETING}\n").into_bytes()
    );
    let numbers: String = (1..=100_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(debugfs_cat(&rw, "/numbers.txt"), numbers.into_bytes());
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        pattern,
        "the read-only disk must not change"
    );
    // mkfs.ext4 discards the whole device when virtio-blk offers DISCARD; the device punches
    // holes, so little of the image stays allocated (metadata and the two files).
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&rw).unwrap()) * 512;
    println!(
        "disks: {} KiB of the {DISK_MIB} MiB image allocated after mkfs",
        allocated >> 10
    );
    assert!(
        allocated < (DISK_MIB << 20) / 4,
        "the guest's discards should have punched holes: {allocated} bytes still allocated"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// With `--console-device hvc0` and `console=hvc0` only, kernel messages and the init's output
/// reach the host through virtio-console; virtio-rng feeds /dev/hwrng.
pub fn hvc0_console_and_hwrng() {
    let kernel = cloud_kernel();
    let dir = scratch("hvc0");
    let init = r#"
exec > /dev/hvc0 2>&1
echo KVMBUILD-HVC0 user space
echo "KVMBUILD-KMSG from the kernel log" > /dev/kmsg
echo "KVMBUILD-HWRNG $(/bin/busybox cat /sys/class/misc/hw_random/rng_current)"
echo "KVMBUILD-HWRNG-BYTES $(/bin/busybox dd if=/dev/hwrng bs=32 count=1 2>/dev/null | /bin/busybox wc -c)"
/bin/busybox poweroff -f
"#;
    let spec = InitrdSpec {
        modules: &["virtio_mmio", "virtio_console", "virtio_rng"],
        kernel: Some(&kernel),
        binaries: &[],
    };
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initrd_with(init, &spec)).unwrap();
    let args = ["--mem", "256", "--console-device", "hvc0", "--rng"];
    let run = boot(
        &kernel.bzimage,
        &initrd,
        "console=hvc0 panic=1",
        &args,
        GUARD,
    );
    run.check(run.status == Some(0), "the guest should power off cleanly");
    run.check(
        run.console.contains("KVMBUILD-HVC0 user space"),
        "user space should write through hvc0",
    );
    run.check(
        run.console
            .lines()
            .any(|l| l.contains("] KVMBUILD-KMSG from the kernel log")),
        "the kernel's console (console=hvc0 only) should print through hvc0",
    );
    run.check(
        run.console.contains("KVMBUILD-HWRNG virtio_rng"),
        "virtio-rng should be the current hw_random source",
    );
    run.check(
        run.console.contains("KVMBUILD-HWRNG-BYTES 32"),
        "/dev/hwrng should yield bytes",
    );
    std::fs::remove_dir_all(dir).unwrap();
}
