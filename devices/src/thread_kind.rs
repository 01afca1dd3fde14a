//! Each of kvmbuild's threads says what kind it is as it starts, so that the VMM can confine
//! it to the system calls that kind makes (seccomp, in `vmm::seccomp`). This crate has no
//! seccomp of its own: the VMM sets the hook, and without one (unit tests, `--seccomp off`)
//! starting a thread changes nothing.

use std::sync::OnceLock;

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
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Sets the function every thread calls as it starts (once per process; later calls are
/// ignored).
pub fn set_hook(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// Called first thing by each thread of `kind`.
pub fn started(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}
