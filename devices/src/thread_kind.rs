//! Each of kvmbuild's threads says what kind it is as it starts, so that the VMM can confine
//! it to the system calls that kind makes (seccomp, in `vmm::seccomp`). This crate has no
//! seccomp of its own: a VM's owner sets a [`ThreadStart`] on the VM's exit channel
//! ([`crate::exit::VmExit::set_thread_start`]), and every thread of that VM calls it first;
//! without one (unit tests, `--seccomp off`) starting a thread changes nothing.

use std::sync::Arc;

/// The kinds of threads kvmbuild runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN, port and MMIO exits, device activation.
    Vcpu,
    /// The device thread: virtio queues, disk I/O, randomness, console and serial input.
    DeviceLoop,
    /// Writes one virtio-console port's output to its file, pipe or terminal.
    ConsoleWriter,
    /// Watches the waits on a vhost-user back end.
    VhostUser,
    /// Fills guest memory from a snapshot as the guest touches it (userfaultfd).
    PageServer,
    /// Checks a restored VM's memory file beside the running guest, then hands the guest
    /// this run's settings.
    MemoryCheck,
}

/// What each thread of a VM does first, given its kind.
pub type ThreadStart = Arc<dyn Fn(ThreadKind) + Send + Sync>;
