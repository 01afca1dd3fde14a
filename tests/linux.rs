//! Real Linux guests booted by kvmbuild: Debian's stock kernels, real initrds, real devices.
//!
//! These need a KVM with hardware-virtualisation semantics. Where /dev/kvm is hardware-backed
//! the tests run directly. Where it is PVM (which cannot run an ordinary kernel), this binary
//! runs itself again inside the test host (tests/host-vm/run): a QEMU-TCG machine with nested
//! SVM whose /dev/kvm is real. Each run says which path it took.
//!
//! The harness is our own (`harness = false`) so that the whole binary, not each test, crosses
//! into the test host once; it prints libtest's result lines.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod linux {
    pub mod exec;
    pub mod guest;
    pub mod harness;
    pub mod init;
    pub mod nix;
    pub mod smoke;
    pub mod virtio;
    pub mod virtiofs;
    pub mod warm;
}

use linux::harness::{self, Test};

/// The tests, named after their functions.
macro_rules! tests {
    ($($module:ident::$test:ident),* $(,)?) => {
        &[$(Test { name: stringify!($test), run: linux::$module::$test }),*]
    };
}

const TESTS: &[Test] = tests![
    smoke::bzimage_two_vcpus,
    smoke::elf_vmlinux,
    smoke::panic_is_reported_as_reset,
    smoke::default_reboot_is_reported_as_reset,
    smoke::memory_above_the_mmio_hole,
    virtio::ext4_made_in_the_guest_and_a_read_only_disk,
    virtio::hvc0_console_and_hwrng,
    virtiofs::guest_and_host_share_files_through_virtiofsd,
    virtiofs::a_vanished_virtiofsd_ends_the_vm,
    virtiofs::qemu_compat_runs_the_vmtools_device_set,
    init::init_runs_an_included_command,
    init::init_passes_the_exit_status_through,
    init::init_reports_a_missing_command,
    exec::exec_runs_host_programs_on_the_host_root,
    exec::exec_streams_are_separate_exact_and_stdin_ends,
    exec::exec_copies_through_two_shares_and_ro_refuses_writes,
    exec::exec_disks_written_in_the_guest_are_on_the_host,
    exec::exec_passes_the_status_through,
    exec::exec_ends_when_a_virtiofsd_dies,
    exec::exec_sigterm_stops_everything,
    exec::exec_sigkill_leaves_no_virtiofsd,
    exec::exec_caches_the_initrd,
    warm::exec_warm_restores_one_snapshot_for_many_runs,
    warm::exec_warm_replaces_a_damaged_snapshot,
    warm::exec_warm_attaches_each_runs_own_disk,
    warm::exec_warm_restores_into_huge_pages,
    warm::exec_warm_runs_concurrently_from_one_snapshot,
    warm::bench_exec_warm_reports_cold_and_restored_runs,
    nix::nix_run_in_linux_vm_builds_in_the_guest,
    nix::nix_builder_status_and_output_reach_nix,
    nix::nix_make_disk_image_gpt_none_and_qcow2,
    nix::nix_builds_on_a_remote_builder_over_ssh,
    nix::vmtools_stage1_through_the_qemu_entry_point,
    nix::vmtools_failing_builder_resets_and_qemu_compat_exits_0,
];

/// Measurements rather than tests (ten timed Nix builds): they run only when
/// `KVMBUILD_LINUX_TESTS` names them.
const MEASUREMENTS: &[Test] = tests![nix::nix_trivial_build_drop_in_vs_native];

fn main() -> std::process::ExitCode {
    let named = std::env::var("KVMBUILD_LINUX_TESTS").unwrap_or_default();
    let requested = |t: &&Test| named.split(',').any(|n| n == t.name);
    let tests: Vec<Test> = TESTS
        .iter()
        .chain(MEASUREMENTS.iter().filter(requested))
        .cloned()
        .collect();
    harness::main(&tests)
}
