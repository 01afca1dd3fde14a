//! The user's terminal while a guest runs: stdin as the guest's console input, and signals that
//! stop the guest cleanly instead of killing kvmbuild mid-flight.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Signals that end the VM cleanly (kvmbuild then exits 128 + the signal's number).
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The write end of this process's stop event while signals are routed to it (else -1): the
/// one piece of process-global state a signal handler needs. It belongs to the CLI, which owns
/// the VM's stop event; the VMM has none.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The first stop signal received, for the exit status (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = STOP_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this process keeps open for the
        // rest of its life (see `stop_vm_on_signals`); write(2) is async-signal-safe.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Creates the event that stops the VM and routes SIGINT, SIGTERM and SIGHUP to it. A signal
/// that arrives before the VM runs (while it is being set up) leaves the event signalled, so
/// the run ends as soon as it starts. Call it once per process. On failure, says so and
/// returns the status to exit with.
pub fn stop_vm_on_signals() -> Result<&'static EventFd, ExitCode> {
    install_stop_handlers().map_err(|e| {
        crate::fail(
            crate::exit_code::INTERNAL,
            format!("cannot install signal handlers: {e}"),
        )
    })
}

fn install_stop_handlers() -> std::io::Result<&'static EventFd> {
    // Leaked on purpose: the signal handler may write to it at any moment until the process
    // exits, so it must never be closed (and its number never reused).
    let stop: &'static EventFd = Box::leak(Box::new(EventFd::new(libc::EFD_NONBLOCK)?));
    STOP_FD.store(stop.as_raw_fd(), Ordering::SeqCst);
    for signal in STOP_SIGNALS {
        vmm_sys_util::signal::register_signal_handler(signal, on_stop_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(stop)
}

/// The signal that asked kvmbuild to stop, if one did.
pub fn stop_signal() -> Option<i32> {
    Some(STOP_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// The name of a stop signal, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Stdin in character-at-a-time mode (no line editing, no echo: the guest echoes), restored
/// when dropped. Signals stay enabled, so Ctrl-C still stops the VM.
pub struct RawishStdin {
    saved: libc::termios,
}

impl RawishStdin {
    /// Switches stdin's terminal mode; None when stdin is not a terminal.
    pub fn enter() -> Option<Self> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut mode = saved;
        mode.c_lflag &= !(libc::ICANON | libc::ECHO);
        mode.c_iflag &= !libc::ICRNL;
        mode.c_cc[libc::VMIN] = 1;
        mode.c_cc[libc::VTIME] = 0;
        // SAFETY: `mode` is a valid termios derived from the current one.
        (unsafe { libc::tcsetattr(fd, libc::TCSANOW, &mode) } == 0).then_some(Self { saved })
    }

    /// An unbuffered handle on stdin for the virtio-console to read (a dup, so the device can
    /// own and close it).
    pub fn input(&self) -> std::io::Result<File> {
        // SAFETY: dup of stdin, which stays open for the whole process.
        let fd = unsafe { libc::dup(std::io::stdin().as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

impl Drop for RawishStdin {
    fn drop(&mut self) {
        // SAFETY: restores the termios read from the same fd in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
