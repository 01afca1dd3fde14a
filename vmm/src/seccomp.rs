//! seccomp filters: each thread that touches guest-controlled data (vCPUs, the device thread,
//! console writers, the vhost-user watchdog) confines itself, as it
//! starts, to the system calls its kind makes. The lists come from tracing the test suite
//! (`strace -f` over the tiny-guest, fault and Linux tests) plus the error and exit paths
//! the traces cannot reach (KVM's emulation-failure report, panics, thread exit).
//!
//! A forbidden call traps (SECCOMP_RET_TRAP): the SIGSYS handler prints the thread's kind and
//! the call's number, and the process exits 70. `--seccomp off` (or `KVMBUILD_SECCOMP=off`)
//! leaves the threads unfiltered, for debugging.
//!
//! The owner builds the [`Filters`] once ([`Filters::enable`], which also installs the SIGSYS
//! handler: a signal's disposition is the process's) and hands them to each VM in
//! `VmConfig::seccomp`; the VM sets them as its threads' start
//! ([`devices::exit::VmExit::set_thread_start`]). Nothing here is process-global state.
//!
//! The main thread is not filtered: it builds and tears down VMs (opening files, creating
//! memfds, VMs and threads), `bench` runs many VMs in one process, and it never handles
//! guest-controlled data itself, so a filter on it would allow nearly everything and protect
//! nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::TryInto;
use std::sync::Arc;

use devices::thread_kind::{ThreadKind, ThreadStart};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors from setting seccomp up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter could not be built (a bug in the lists below).
    #[error("cannot build the seccomp filter for {0:?} threads: {1}")]
    Build(ThreadKind, String),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter for {0:?} threads")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

/// The status a forbidden system call ends the process with (an internal error).
pub const FORBIDDEN_CALL_STATUS: i32 = 70;

const KINDS: [ThreadKind; 4] = [
    ThreadKind::Vcpu,
    ThreadKind::DeviceLoop,
    ThreadKind::ConsoleWriter,
    ThreadKind::VhostUser,
];

thread_local! {
    /// This thread's kind, for the SIGSYS message (index into [`KINDS`], or -1).
    static KIND: Cell<i8> = const { Cell::new(-1) };
}

/// The compiled filters, one per kind (in [`KINDS`] order).
pub struct Filters {
    programs: Vec<BpfProgram>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filters")
            .field("kinds", &self.programs.len())
            .finish()
    }
}

impl Filters {
    /// Builds every filter and installs the SIGSYS handler. Call once, before the first VM
    /// runs, and give the result to every VM's configuration.
    pub fn enable() -> Result<Arc<Filters>, SeccompError> {
        let programs = KINDS
            .iter()
            .map(|&kind| build(kind))
            .collect::<Result<Vec<_>, _>>()?;
        install_sigsys_handler()?;
        Ok(Arc::new(Filters { programs }))
    }

    /// Confines the calling thread to `kind`'s system calls.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let index = kind_index(kind);
        KIND.with(|k| k.set(i8::try_from(index).unwrap_or(-1)));
        seccompiler::apply_filter(&self.programs[index]).map_err(|e| SeccompError::Install(kind, e))
    }

    /// What each thread of a VM confined by these filters does first.
    pub fn thread_start(self: &Arc<Self>) -> ThreadStart {
        let filters = self.clone();
        Arc::new(move |kind| install_or_exit(&filters, kind))
    }
}

/// The thread start: a thread that cannot be confined must not go on unconfined.
fn install_or_exit(filters: &Filters, kind: ThreadKind) {
    if let Err(e) = filters.install(kind) {
        eprintln!("kvmbuild: {e}");
        // SAFETY: _exit ends the process at once; nothing is left half-written that matters
        // more than not running unconfined.
        unsafe { libc::_exit(FORBIDDEN_CALL_STATUS) };
    }
}

fn kind_index(kind: ThreadKind) -> usize {
    KINDS.iter().position(|&k| k == kind).unwrap_or(0)
}

/// System calls every filtered thread makes: memory, locks, time, signals, thread exit, and
/// writing a message (the SIGSYS handler's own calls are here).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What each kind adds to [`COMMON`].
fn extra_calls(kind: ThreadKind) -> &'static [i64] {
    match kind {
        // KVM_RUN and its exits; device activation at DRIVER_OK: eventfds, handing workers to
        // the device thread, and the vhost-user set-up conversation.
        ThreadKind::Vcpu => &[
            libc::SYS_eventfd2,
            libc::SYS_dup,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
        ],
        // Queues, disk I/O, randomness, console input, and its own event loop.
        ThreadKind::DeviceLoop => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_eventfd2,
            libc::SYS_dup,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
        ],
        ThreadKind::ConsoleWriter => &[],
        // Cutting a back end's connection.
        ThreadKind::VhostUser => &[libc::SYS_shutdown],
    }
}

/// KVM's ioctl type byte: vCPU threads may issue KVM ioctls only.
const KVMIO: u64 = 0xae;

fn build(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Build(kind, e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(extra_calls(kind))
        .map(|&call| (call, Vec::new()))
        .collect();
    if kind == ThreadKind::Vcpu {
        let kvm_only = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            KVMIO << 8,
        )
        .map_err(|e| err(&e))?;
        rules.insert(
            libc::SYS_ioctl,
            vec![SeccompRule::new(vec![kvm_only]).map_err(|e| err(&e))?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the fields set below make it a SA_SIGINFO handler
    // that uses only async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Where siginfo_t keeps the trapped system call's number (`si_syscall`, in the `_sigsys`
/// member of its union: after three ints and padding, then the call address).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS from
    // seccomp its _sigsys member holds the call number at this offset.
    let call = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let kind = KIND.with(|k| k.get());
    let mut message = Message::default();
    message.push(b"kvmbuild: seccomp: a ");
    message.push(kind_name(kind).as_bytes());
    message.push(b" thread made system call ");
    message.push_number(call);
    message.push(b", which its filter forbids (--seccomp off to debug)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(2, message.bytes.as_ptr().cast(), message.len);
        libc::_exit(FORBIDDEN_CALL_STATUS);
    }
}

fn kind_name(index: i8) -> &'static str {
    match usize::try_from(index).ok().and_then(|i| KINDS.get(i)) {
        Some(ThreadKind::Vcpu) => "vCPU",
        Some(ThreadKind::DeviceLoop) => "device",
        Some(ThreadKind::ConsoleWriter) => "console writer",
        Some(ThreadKind::VhostUser) => "vhost-user",
        None => "filtered",
    }
}

/// A message built without allocating (a signal handler may not).
struct Message {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, text: &[u8]) {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i32) {
        let mut digits = [0u8; 11];
        let mut at = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn every_kind_has_a_filter() {
        for kind in KINDS {
            let program = build(kind).unwrap();
            assert!(!program.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut m = Message::default();
        m.push(b"call ");
        m.push_number(110);
        m.push(b" ");
        m.push_number(0);
        m.push(b" ");
        m.push_number(-7);
        assert_eq!(&m.bytes[..m.len], b"call 110 0 -7");
    }

    /// The child half of the next test: a filtered thread makes a call its filter forbids.
    #[test]
    fn forbidden_call_child() {
        if std::env::var_os("KVMBUILD_SECCOMP_CHILD").is_none() {
            return;
        }
        let filters = Filters::enable().unwrap();
        let start = filters.thread_start();
        std::thread::spawn(move || {
            start(ThreadKind::VhostUser);
            // SAFETY: getppid has no preconditions; here it only has to be forbidden.
            unsafe { libc::getppid() };
        })
        .join()
        .unwrap();
        unreachable!("the forbidden call did not end the process");
    }

    #[test]
    fn a_forbidden_call_ends_the_process_naming_the_thread_and_the_call() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::forbidden_call_child",
                "--nocapture",
            ])
            .env("KVMBUILD_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(FORBIDDEN_CALL_STATUS), "{stderr}");
        let expected = format!(
            "kvmbuild: seccomp: a vhost-user thread made system call {}, which its filter forbids",
            libc::SYS_getppid
        );
        assert!(stderr.contains(&expected), "{stderr}");
    }
}
