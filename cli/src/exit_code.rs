//! kvmbuild's process exit statuses: the contract scripts rely on (DESIGN.md §3).
//!
//! A guest that reports a status on the exit port passes it through unchanged, so statuses
//! 1..=255 may also come from the guest; kvmbuild's own failures always print one line on
//! stderr starting with "kvmbuild:", which tells them apart.

/// The guest powered off without reporting a status, or reported 0.
pub const SUCCESS: u8 = 0;
/// Bad arguments or input files (BSD sysexits' EX_USAGE).
pub const BAD_INPUT: u8 = 64;
/// KVM is absent or unusable; there is no software-emulation fallback (EX_UNAVAILABLE).
pub const KVM_UNAVAILABLE: u8 = 69;
/// An internal error, or KVM failed to run or emulate the guest (EX_SOFTWARE).
pub const INTERNAL: u8 = 70;
/// `--timeout` elapsed (as coreutils' `timeout`).
pub const TIMEOUT: u8 = 124;
/// The guest reset itself (reboot, triple fault, or a panic with `panic=N`).
pub const GUEST_RESET: u8 = 125;
/// A reader of the guest's output (a virtio-console port) went away: 128 + SIGPIPE, as a
/// process in a pipeline that SIGPIPE killed.
pub const OUTPUT_CLOSED: u8 = 141;

/// The exit-status table shown by `--help`, as a literal so help texts can `concat!` it.
macro_rules! help_table {
    () => {
        "Exit status:
  0      the guest powered off, or its program exited 0
  N      the guest's program exited N (reported on I/O port 0x6f1)
  64     bad arguments or input files
  69     KVM is not available (no software-emulation fallback)
  70     internal error, or KVM could not run or emulate the guest
  124    --timeout elapsed
  125    the guest rebooted, reset or triple-faulted (e.g. a panic with panic=1)
  128+N  kvmbuild stopped the guest on signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
  141    the reader of the guest's output went away (a broken pipe, as SIGPIPE would)"
    };
}
pub(crate) use help_table;
