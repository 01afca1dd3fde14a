//! Bounds every wait on the vhost-user back end.
//!
//! The vhost crate's endpoint reads replies with a blocking `recvmsg` and retries EAGAIN and
//! EINTR itself, so neither `SO_RCVTIMEO` nor a signal can end a wait on a back end that never
//! answers. Shutting the socket down from another thread can: the read then sees end of file
//! and the request fails. The watchdog is that thread. It is armed around each exchange, and
//! cuts the connection when the exchange's deadline passes, when the VM is asked to end (the
//! run's timeout or a signal while the guest runs), or when the process gets a stop signal
//! (set-up happens before the run loop, which otherwise turns signals into exits).

use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::exit::{ExitReason, VmExit};

/// How often an armed watchdog looks for a stop signal, which cannot wake it (a signal handler
/// may not touch a condition variable). Exchanges take microseconds, so it rarely looks at all.
const SIGNAL_POLL: Duration = Duration::from_millis(20);

/// Why the watchdog cut the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The exchange's own bound passed.
    Bound(Duration),
    /// The run's deadline (`--timeout`) passed.
    Timeout,
    /// The VM's owner signalled its stop event (kvmbuild's front ends do on a stop signal).
    Stopped,
    /// The VM is ending for another reason.
    VmEnding,
}

impl Cut {
    /// How the run ends because of this cut, when the cut itself decides it (a timeout or a
    /// signal); otherwise the failed exchange is reported as the back end's failure.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        match self {
            Cut::Timeout => Some(ExitReason::Timeout),
            Cut::Stopped => Some(ExitReason::Stopped),
            Cut::Bound(_) | Cut::VmEnding => None,
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Bound(bound) => write!(f, "no answer within {}s", bound.as_secs_f32()),
            Cut::Timeout => f.write_str("no answer before the run's timeout"),
            Cut::Stopped => f.write_str("asked to stop while waiting"),
            Cut::VmEnding => f.write_str("the VM ended while waiting"),
        }
    }
}

/// What the caller and the watchdog thread share.
struct State {
    /// The deadline of the exchange in progress and its own bound, if one is.
    armed: Option<(Instant, Duration)>,
    /// Why the last exchange was cut.
    cut: Option<Cut>,
    quit: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    socket: RawFd,
    exit: Arc<VmExit>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A thread that cuts the back end's connection when an exchange takes too long.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `socket` (which must outlive the watchdog) for the VM behind `exit`.
    pub fn start(socket: RawFd, exit: Arc<VmExit>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                armed: None,
                cut: None,
                quit: false,
            }),
            wake: Condvar::new(),
            socket,
            exit,
        });
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn({
                let shared = shared.clone();
                move || watch(&shared)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `exchange` with the back end, cutting the connection if it has not finished by
    /// `limit` (or by the run's deadline, if that is sooner). Returns the exchange's result, or
    /// why it was cut (the exchange then failed, or finished just as the cut came).
    pub fn bound<T>(&self, limit: Limit, exchange: impl FnOnce() -> T) -> Result<T, Cut> {
        let deadline = limit.deadline_within_the_run(&self.shared.exit);
        {
            let mut state = self.shared.lock();
            if let Some(cut) = state.cut.clone() {
                // The connection is already cut: nothing more can be exchanged.
                return Err(cut);
            }
            state.armed = Some((deadline, limit.bound));
        }
        self.shared.wake.notify_one();
        let result = exchange();
        let mut state = self.shared.lock();
        state.armed = None;
        match state.cut.clone() {
            Some(cut) => Err(cut),
            None => Ok(result),
        }
    }
}

/// When a phase of exchanges (connecting, starting the queues, stopping them) must be over.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    deadline: Instant,
    bound: Duration,
}

impl Limit {
    /// A phase starting now that may take `bound`.
    pub fn from_now(bound: Duration) -> Self {
        Self {
            deadline: Instant::now() + bound,
            bound,
        }
    }

    /// Why a wait within this limit must end now, if it must (see [`cut_reason`]).
    pub fn cut(&self, exit: &VmExit) -> Option<Cut> {
        cut_reason(exit, self.deadline_within_the_run(exit), self.bound)
    }

    /// This limit's deadline, or the run's if that comes first.
    fn deadline_within_the_run(&self, exit: &VmExit) -> Instant {
        match exit.deadline() {
            Some(run_ends) => self.deadline.min(run_ends),
            None => self.deadline,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watchdog thread: sleeps until armed, then until the exchange ends or must be cut.
fn watch(shared: &Shared) {
    shared
        .exit
        .thread_started(crate::thread_kind::ThreadKind::VhostUser);
    let mut state = shared.lock();
    loop {
        if state.quit {
            return;
        }
        let Some((deadline, bound)) = state.armed else {
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        if let Some(cut) = cut_reason(&shared.exit, deadline, bound) {
            // SAFETY: shutdown(2) on a descriptor the device keeps open while the watchdog
            // runs; it touches no memory. The blocked read then returns end of file.
            unsafe { libc::shutdown(shared.socket, libc::SHUT_RDWR) };
            state.cut = Some(cut);
            state.armed = None;
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        state = shared
            .wake
            .wait_timeout(state, left.min(SIGNAL_POLL))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Why an exchange with `deadline` must be cut now, if it must.
fn cut_reason(exit: &VmExit, deadline: Instant, bound: Duration) -> Option<Cut> {
    if exit.stop_requested() {
        return Some(Cut::Stopped);
    }
    if exit.is_requested() {
        return Some(Cut::VmEnding);
    }
    let now = Instant::now();
    if now < deadline {
        return None;
    }
    match exit.deadline() {
        Some(run_ends) if run_ends <= now => Some(Cut::Timeout),
        _ => Some(Cut::Bound(bound)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn an_exchange_that_finishes_is_not_cut() {
        let (ours, _theirs) = pair();
        let exit = Arc::new(VmExit::new().unwrap());
        let dog = Watchdog::start(ours.as_raw_fd(), exit).unwrap();
        assert_eq!(
            dog.bound(Limit::from_now(Duration::from_secs(5)), || 7),
            Ok(7)
        );
        assert_eq!(
            dog.bound(Limit::from_now(Duration::from_secs(5)), || 8),
            Ok(8)
        );
    }

    #[test]
    fn a_silent_peer_is_cut_at_the_bound() {
        let (mut ours, _theirs) = pair();
        let exit = Arc::new(VmExit::new().unwrap());
        let dog = Watchdog::start(ours.as_raw_fd(), exit).unwrap();
        let started = Instant::now();
        let bound = Duration::from_millis(200);
        let result = dog.bound(Limit::from_now(bound), || ours.read(&mut [0u8; 1]).unwrap());
        assert_eq!(result, Err(Cut::Bound(bound)));
        let waited = started.elapsed();
        assert!(waited >= bound && waited < bound * 10, "{waited:?}");
        // Once cut, the connection stays unusable.
        assert_eq!(
            dog.bound(Limit::from_now(bound), || 1),
            Err(Cut::Bound(bound))
        );
    }

    #[test]
    fn the_run_deadline_comes_first_and_is_a_timeout() {
        let (mut ours, _theirs) = pair();
        let exit = Arc::new(VmExit::new().unwrap());
        exit.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        let dog = Watchdog::start(ours.as_raw_fd(), exit).unwrap();
        let result = dog.bound(Limit::from_now(Duration::from_secs(30)), || {
            ours.read(&mut [0u8; 1])
        });
        assert_eq!(result.err(), Some(Cut::Timeout));
        assert_eq!(Cut::Timeout.exit_reason(), Some(ExitReason::Timeout));
    }

    #[test]
    fn an_ending_vm_cuts_the_wait() {
        let (mut ours, _theirs) = pair();
        let exit = Arc::new(VmExit::new().unwrap());
        let dog = Watchdog::start(ours.as_raw_fd(), exit.clone()).unwrap();
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            exit.request(ExitReason::PowerOff);
        });
        let result = dog.bound(Limit::from_now(Duration::from_secs(30)), || {
            ours.read(&mut [0u8; 1])
        });
        assert_eq!(result.err(), Some(Cut::VmEnding));
        ender.join().unwrap();
    }
}
