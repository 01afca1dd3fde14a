//! The stock Debian cloud kernel reaches user space under kvmbuild and powers off cleanly.

use std::time::Duration;

use super::guest::{boot, busybox_initrd, cloud_kernel, scratch};

/// Generous: a nested boot under TCG takes ~15-30 s; this only catches hangs.
const GUARD: Duration = Duration::from_secs(180);
const CMDLINE: &str = "console=ttyS0 panic=1 quiet";

/// The smoke initrd's init: a marker, what the guest sees of its CPUs and keeps time with (the
/// VM has no PIT), a timed sleep, then power off.
const SMOKE_INIT: &str = r#"
/bin/busybox mount -t proc proc /proc
echo "KVMBUILD-SMOKE kernel $(/bin/busybox uname -r)"
echo "KVMBUILD-SMOKE cpus $(/bin/busybox grep -c ^processor /proc/cpuinfo)"
/bin/busybox grep -m1 '^flags' /proc/cpuinfo | /bin/busybox grep -q hypervisor && echo "KVMBUILD-SMOKE hypervisor flag"
/bin/busybox grep -m1 '^flags' /proc/cpuinfo | /bin/busybox grep -qw tsc_deadline_timer && echo "KVMBUILD-SMOKE tsc-deadline timer"
echo "KVMBUILD-SMOKE model $(/bin/busybox grep -m1 '^model name' /proc/cpuinfo)"
echo "KVMBUILD-SMOKE clocksource $(/bin/busybox cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
/bin/busybox dmesg | /bin/busybox grep -i -e pit -e 'tsc' -e 'apic timer' -e clocksource -e clockevent | /bin/busybox sed 's/^/KVMBUILD-DMESG /'
/bin/busybox sleep 1 && echo "KVMBUILD-SMOKE slept 1 s"
/bin/busybox poweroff -f
"#;

fn smoke(kernel_file: fn(&super::guest::Kernel) -> &std::path::Path, cpus: &str, test: &str) {
    let kernel = cloud_kernel();
    let dir = scratch(test);
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, busybox_initrd(SMOKE_INIT)).unwrap();
    let run = boot(
        kernel_file(&kernel),
        &initrd,
        CMDLINE,
        &["--mem", "256", "--cpus", cpus],
        GUARD,
    );
    println!(
        "{test}: booted {} to poweroff in {:.1} s",
        kernel.release,
        run.elapsed.as_secs_f64()
    );
    run.check(
        run.status == Some(0),
        "kvmbuild should exit 0 after the guest's poweroff",
    );
    run.check(
        run.console
            .contains(&format!("KVMBUILD-SMOKE kernel {}", kernel.release)),
        "the init's marker with the kernel release should be on the console",
    );
    run.check(
        run.console.contains(&format!("KVMBUILD-SMOKE cpus {cpus}")),
        "the guest should see every vCPU",
    );
    run.check(
        run.console.contains("KVMBUILD-SMOKE hypervisor flag"),
        "CPUID should carry the hypervisor bit",
    );
    run.check(
        run.console.contains("KVMBUILD-SMOKE clocksource kvm-clock"),
        "without a PIT the guest should keep time with kvmclock",
    );
    run.check(
        run.console.contains("KVMBUILD-SMOKE slept 1 s"),
        "timer interrupts should wake a sleeping guest",
    );
    for line in run.console.lines().filter(|l| l.contains("KVMBUILD-")) {
        println!("{test}: {line}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Debian's bzImage (LZ4) with two vCPUs: SMP bring-up through the in-kernel LAPIC, ACPI MADT.
pub fn bzimage_two_vcpus() {
    smoke(|k| &k.bzimage, "2", "smoke_bzimage_two_vcpus");
}

/// The same kernel as an ELF vmlinux, through its 64-bit ELF entry.
pub fn elf_vmlinux() {
    smoke(|k| &k.vmlinux, "1", "smoke_elf_vmlinux");
}

/// An init that exits makes the kernel panic; with panic=1 the kernel reboots, which kvmbuild
/// reports as a guest reset (exit 125) rather than booting again.
pub fn panic_is_reported_as_reset() {
    let kernel = cloud_kernel();
    let dir = scratch("panic");
    let initrd = dir.join("initrd.cpio");
    std::fs::write(
        &initrd,
        busybox_initrd("echo KVMBUILD-PANIC about to exit\nexit 3\n"),
    )
    .unwrap();
    let run = boot(&kernel.bzimage, &initrd, CMDLINE, &["--mem", "256"], GUARD);
    run.check(
        run.console.contains("KVMBUILD-PANIC about to exit"),
        "init should have run",
    );
    run.check(
        run.status == Some(125),
        "a panic with panic=1 should end as a reset (exit 125)",
    );
    run.check(
        run.stderr.contains("reset itself"),
        "kvmbuild should say the guest reset itself",
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `reboot -f` with no `reboot=` option: Linux's default path on a hardware-reduced ACPI machine
/// without EFI ends at the BIOS reset vector, where kvmbuild's stub resets the VM (exit 125).
pub fn default_reboot_is_reported_as_reset() {
    let kernel = cloud_kernel();
    let dir = scratch("reboot");
    let initrd = dir.join("initrd.cpio");
    std::fs::write(
        &initrd,
        busybox_initrd("echo KVMBUILD-REBOOT\n/bin/busybox reboot -f\n"),
    )
    .unwrap();
    let run = boot(
        &kernel.bzimage,
        &initrd,
        "console=ttyS0 quiet",
        &["--mem", "256"],
        GUARD,
    );
    run.check(
        run.console.contains("KVMBUILD-REBOOT"),
        "init should have run",
    );
    run.check(
        run.status == Some(125),
        "a reboot should end as a reset (exit 125)",
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// 3.5 GiB of RAM (the test host has 4): the 512 MiB beyond 3 GiB continue above the 32-bit MMIO
/// hole, and the kernel uses them (MemTotal exceeds everything that fits below the hole).
pub fn memory_above_the_mmio_hole() {
    let kernel = cloud_kernel();
    let dir = scratch("highmem");
    let initrd = dir.join("initrd.cpio");
    let init = "/bin/busybox mount -t proc proc /proc\n\
                echo \"KVMBUILD-MEMTOTAL $(/bin/busybox awk '/^MemTotal/ {print $2}' /proc/meminfo)\"\n\
                /bin/busybox poweroff -f\n";
    std::fs::write(&initrd, busybox_initrd(init)).unwrap();
    let run = boot(&kernel.bzimage, &initrd, CMDLINE, &["--mem", "3584"], GUARD);
    run.check(run.status == Some(0), "the guest should power off cleanly");
    let kib: u64 = run
        .console
        .lines()
        .find_map(|l| l.split("KVMBUILD-MEMTOTAL ").nth(1)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal on the console:\n{}", run.console));
    println!("highmem: MemTotal {kib} KiB with --mem 3584");
    // At most 3 GiB fit below the hole (less the kernel's reservations); anything clearly above
    // that must come from the RAM above 4 GiB.
    assert!(
        kib > 3 * 1024 * 1024 + 128 * 1024,
        "MemTotal {kib} KiB: RAM above the hole is missing"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
