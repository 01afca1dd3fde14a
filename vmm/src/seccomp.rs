//! seccomp filters: each thread that touches guest-controlled data (vCPUs, the device thread,
//! console writers, the vhost-user watchdog, a restored VM's page server) confines itself, as it
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
//! The thread that runs a VM (the caller of `Vm::run`, a front end's main thread) gets a filter
//! of the opposite shape when its owner asks for it (`VmConfig::confine_runner`): it has to
//! stay free to open and write files (snapshots, reports), start threads, stop virtiofsd and
//! tear the VM down, so instead of listing what it may do, the filter lists what nothing in
//! kvmbuild does once the guest runs: starting programs, new sockets, and the kernel's
//! administrative surfaces (ptrace, mounts and namespaces, modules, kexec, BPF,
//! keyrings, identity changes). A front end that runs one VM and nothing after it (`run`,
//! `exec`, the QEMU entry point) asks for it; `bench` runs many VMs and other programs in one
//! process, so it does not.

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
    /// The runner's filter could not be built (a bug in the list below).
    #[error("cannot build the seccomp filter for the thread that runs the VM: {0}")]
    BuildRunner(String),
    /// The kernel refused the runner's filter.
    #[error("cannot install the seccomp filter for the thread that runs the VM")]
    InstallRunner(#[source] seccompiler::Error),
}

/// The status a forbidden system call ends the process with (an internal error).
pub const FORBIDDEN_CALL_STATUS: i32 = 70;

const KINDS: [ThreadKind; 6] = [
    ThreadKind::Vcpu,
    ThreadKind::DeviceLoop,
    ThreadKind::ConsoleWriter,
    ThreadKind::VhostUser,
    ThreadKind::PageServer,
    ThreadKind::MemoryCheck,
];

/// [`KIND`]'s value on the thread that runs the VM: the index after the last kind.
const RUNNER: i8 = 6;
const _: () = assert!(RUNNER as usize == KINDS.len());

thread_local! {
    /// This thread's kind, for the SIGSYS message (index into [`KINDS`], [`RUNNER`], or -1).
    static KIND: Cell<i8> = const { Cell::new(-1) };
}

/// The compiled filters, one per kind (in [`KINDS`] order), and the runner's.
pub struct Filters {
    programs: Vec<BpfProgram>,
    /// The runner's deny list.
    runner: BpfProgram,
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
        let runner = build_runner()?;
        install_sigsys_handler()?;
        Ok(Arc::new(Filters { programs, runner }))
    }

    /// Confines the calling thread, which runs a VM, with the runner's deny list (see the
    /// module's documentation). Threads it starts afterwards inherit it.
    pub fn confine_runner(&self) -> Result<(), SeccompError> {
        KIND.with(|k| k.set(RUNNER));
        seccompiler::apply_filter(&self.runner).map_err(SeccompError::InstallRunner)
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
        // Polls and reads its userfaultfd (common calls); its ioctls are limited to
        // userfaultfd's, below. The snapshot is mapped before the thread starts.
        ThreadKind::PageServer => &[],
        // Reads the memory file through a mapping made, and where its data is found, before
        // the thread starts; writes the settings into their pipe (common calls).
        ThreadKind::MemoryCheck => &[],
    }
}

/// KVM's ioctl type byte: vCPU threads may issue KVM ioctls only.
const KVMIO: u64 = 0xae;
/// userfaultfd's ioctl type byte: the page server may issue those only.
const UFFDIO: u64 = 0xaa;

/// The ioctls a kind may issue, by type byte.
fn ioctl_type(kind: ThreadKind) -> Option<u64> {
    match kind {
        ThreadKind::Vcpu => Some(KVMIO),
        ThreadKind::PageServer => Some(UFFDIO),
        _ => None,
    }
}

fn build(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Build(kind, e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(extra_calls(kind))
        .map(|&call| (call, Vec::new()))
        .collect();
    if let Some(ty) = ioctl_type(kind) {
        let of_type = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            ty << 8,
        )
        .map_err(|e| err(&e))?;
        rules.insert(
            libc::SYS_ioctl,
            vec![SeccompRule::new(vec![of_type]).map_err(|e| err(&e))?],
        );
    }
    compile(rules, SeccompAction::Trap, SeccompAction::Allow)
        .map_err(|e| SeccompError::Build(kind, e))
}

/// Compiles `rules` for x86_64: a call that matches a rule gets `matched`, any other call
/// `mismatched`. The error is seccompiler's, as text.
fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatched: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatched, matched, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// What the thread that runs a VM must never do once the guest runs (x86_64). Processes are
/// not on the list: one made from this thread inherits the filter, so it can start no program
/// either, and kvmbuild releases a finished VM through such a process (`crate::release`).
const RUNNER_DENIED: &[i64] = &[
    // New programs.
    libc::SYS_execve,
    libc::SYS_execveat,
    // Other processes' memory.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    // New sockets: every back end is connected while the VM is built.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    // Mounts and namespaces.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_open_by_handle_at,
    // The kernel itself.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_personality,
    // Keyrings and identity.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
];

fn build_runner() -> Result<BpfProgram, SeccompError> {
    let rules = RUNNER_DENIED
        .iter()
        .map(|&call| (call, Vec::new()))
        .collect();
    compile(rules, SeccompAction::Allow, SeccompAction::Trap).map_err(SeccompError::BuildRunner)
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
    if index == RUNNER {
        return "VM-running (main)";
    }
    match usize::try_from(index).ok().and_then(|i| KINDS.get(i)) {
        Some(ThreadKind::Vcpu) => "vCPU",
        Some(ThreadKind::DeviceLoop) => "device",
        Some(ThreadKind::ConsoleWriter) => "console writer",
        Some(ThreadKind::VhostUser) => "vhost-user",
        Some(ThreadKind::PageServer) => "page server",
        Some(ThreadKind::MemoryCheck) => "memory check",
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

    /// A child test's body: when the parent test has run this test binary again with `flag`
    /// set, runs `body` on a new thread with freshly enabled filters; the body must end the
    /// process with a forbidden call.
    fn as_child(flag: &str, body: impl FnOnce(&Arc<Filters>) + Send + 'static) {
        if std::env::var_os(flag).is_none() {
            return;
        }
        let filters = Filters::enable().unwrap();
        std::thread::spawn(move || body(&filters)).join().unwrap();
        unreachable!("the forbidden call did not end the process");
    }

    /// Runs the child test `test` with `flag` set; its status and stderr.
    fn run_child(test: &str, flag: &str) -> (Option<i32>, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture"])
            .env(flag, "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The child half of the next test: a filtered thread makes a call its filter forbids.
    #[test]
    fn forbidden_call_child() {
        as_child("KVMBUILD_SECCOMP_CHILD", |filters| {
            filters.thread_start()(ThreadKind::VhostUser);
            // SAFETY: getppid has no preconditions; here it only has to be forbidden.
            unsafe { libc::getppid() };
        });
    }

    #[test]
    fn a_forbidden_call_ends_the_process_naming_the_thread_and_the_call() {
        let (code, stderr) = run_child(
            "seccomp::tests::forbidden_call_child",
            "KVMBUILD_SECCOMP_CHILD",
        );
        assert_eq!(code, Some(FORBIDDEN_CALL_STATUS), "{stderr}");
        let expected = format!(
            "kvmbuild: seccomp: a vhost-user thread made system call {}, which its filter forbids",
            libc::SYS_getppid
        );
        assert!(stderr.contains(&expected), "{stderr}");
    }

    /// The child half of the runner test: threads still start on the confined thread, then a
    /// new socket ends the process.
    #[test]
    fn runner_child() {
        as_child("KVMBUILD_SECCOMP_RUNNER_CHILD", |filters| {
            filters.confine_runner().unwrap();
            let started = std::thread::spawn(|| 7).join().unwrap();
            eprintln!("thread started under the runner's filter: {started}");
            // SAFETY: socket(2) takes no pointers; here it only has to be forbidden.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        });
    }

    /// As [`runner_child`], with a new program instead of a socket.
    #[test]
    fn runner_exec_child() {
        as_child("KVMBUILD_SECCOMP_RUNNER_EXEC_CHILD", |filters| {
            filters.confine_runner().unwrap();
            let program = c"/bin/true";
            let argv = [program.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argument and environment arrays that outlive
            // the call; here it only has to be refused.
            unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        });
    }

    #[test]
    fn the_runner_starts_threads_but_no_sockets_or_programs() {
        let (code, stderr) = run_child(
            "seccomp::tests::runner_child",
            "KVMBUILD_SECCOMP_RUNNER_CHILD",
        );
        assert_eq!(code, Some(FORBIDDEN_CALL_STATUS), "{stderr}");
        assert!(
            stderr.contains("thread started under the runner's filter: 7"),
            "{stderr}"
        );
        let expected = format!(
            "kvmbuild: seccomp: a VM-running (main) thread made system call {}, which its filter forbids",
            libc::SYS_socket
        );
        assert!(stderr.contains(&expected), "{stderr}");

        let (code, stderr) = run_child(
            "seccomp::tests::runner_exec_child",
            "KVMBUILD_SECCOMP_RUNNER_EXEC_CHILD",
        );
        assert_eq!(code, Some(FORBIDDEN_CALL_STATUS), "{stderr}");
        let expected = format!(
            "a VM-running (main) thread made system call {}",
            libc::SYS_execve
        );
        assert!(stderr.contains(&expected), "{stderr}");
    }
}
