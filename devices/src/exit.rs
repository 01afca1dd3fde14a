//! The one channel through which anything ends the VM.
//!
//! Devices (the exit port, the ACPI registers, the i8042) and the VMM itself (vCPU errors,
//! timeouts) call [`VmExit::request`]; the first reason wins and wakes the run loop through an
//! `EventFd`. Boot-phase markers are timestamped here too, so `bench` reads them from one place.
//! Only the first time each phase is marked is kept (later marks are counted): the guest may
//! write the marker port any number of times, and must not grow kvmbuild's memory by doing so.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::thread_kind::{ThreadKind, ThreadStart};

/// Why a guest-initiated exit happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetSource {
    /// 0xfe written to the i8042 command port (`reboot=k`).
    I8042,
    /// The FADT reset register.
    AcpiReset,
    /// A vCPU shut down (triple fault), which is how x86 resets itself.
    TripleFault,
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off without reporting a status.
    PowerOff,
    /// The guest reported its program's exit status on the exit port.
    GuestStatus(u8),
    /// The guest reset itself; kvmbuild never reboots a guest.
    Reset(ResetSource),
    /// `--timeout` elapsed.
    Timeout,
    /// The VM's owner asked it to stop, through the stop event it passed to the run (kvmbuild's
    /// front ends do on SIGINT, SIGTERM and SIGHUP).
    Stopped,
    /// A console port's reader went away (a broken pipe): the VM ends as a process in a
    /// pipeline would on SIGPIPE.
    OutputClosed,
    /// A vCPU or device failed in a way the VMM cannot recover from.
    Internal(String),
    /// The guest reached the snapshot point and the VM's owner asked to stop there (see
    /// [`VmExit::pause_at_snapshot_point`]). Not an end: the owner saves the VM and resumes it.
    SnapshotPoint,
}

/// Boot phases the guest marks on kvmbuild's marker port (part of the guest ABI).
pub use abi::BootPhase;

/// The exit channel shared by every vCPU, device and the run loop.
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    /// Whether the snapshot port pauses the VM (else it is ignored).
    pause_at_snapshot: AtomicBool,
    /// Set with `reason`: lets vCPU threads check on every KVM exit without taking the lock.
    requested: AtomicBool,
    markers: Mutex<Markers>,
    event: EventFd,
    /// When the run must end (`--timeout` counted from the start of set-up), if ever: waits
    /// that happen before the run loop starts (a back end's answers) are bounded by it too.
    deadline: Mutex<Option<Instant>>,
    /// A copy of the owner's stop event, for waits before the run loop (which polls the
    /// event itself); `None` until [`VmExit::set_stop_event`].
    stop: Mutex<Option<EventFd>>,
    /// What each of the VM's threads does first (its seccomp filter), if anything.
    thread_start: Mutex<Option<ThreadStart>>,
}

impl VmExit {
    /// A channel with no exit requested yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            pause_at_snapshot: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            markers: Mutex::new(Markers::default()),
            event: EventFd::new(EFD_NONBLOCK)?,
            deadline: Mutex::new(None),
            stop: Mutex::new(None),
            thread_start: Mutex::new(None),
        })
    }

    /// Sets what each thread of this VM does first as it starts; set before any starts.
    pub fn set_thread_start(&self, start: ThreadStart) {
        *self.thread_start.lock().unwrap_or_else(|p| p.into_inner()) = Some(start);
    }

    /// What each thread of this VM does first, for threads started without this channel.
    pub fn thread_start(&self) -> Option<ThreadStart> {
        self.thread_start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Called first by each thread of this VM, with its kind.
    pub fn thread_started(&self, kind: ThreadKind) {
        if let Some(start) = self.thread_start() {
            start(kind);
        }
    }

    /// Sets when the run must end (None: never).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
    }

    /// Lets set-up waits see the owner's stop event (a copy of it; it is only ever polled).
    pub fn set_stop_event(&self, stop: &EventFd) -> io::Result<()> {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.try_clone()?);
        Ok(())
    }

    /// Whether the owner has signalled its stop event (before or during set-up).
    pub fn stop_requested(&self) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stop) = stop.as_ref() else {
            return false;
        };
        let mut fd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(stop),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call; a zero timeout never blocks.
        unsafe { libc::poll(&mut fd, 1, 0) == 1 }
    }

    /// When the run must end, if it was given a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the VM to end. Only the first request counts: a guest that reports a status and
    /// then powers off exits with its status.
    pub fn request(&self, reason: ExitReason) {
        let mut current = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none() {
            *current = Some(reason);
            self.requested.store(true, Ordering::Release);
            // A full eventfd counter only means the loop is already being woken.
            let _ = self.event.write(1);
        }
    }

    /// Makes the guest's next write to the snapshot port stop the VM with
    /// [`ExitReason::SnapshotPoint`] (once).
    pub fn pause_at_snapshot_point(&self) {
        self.pause_at_snapshot.store(true, Ordering::SeqCst);
    }

    /// The guest wrote the snapshot port: stops the VM if its owner asked for that.
    pub fn snapshot_point(&self) {
        if self.pause_at_snapshot.swap(false, Ordering::SeqCst) {
            self.request(ExitReason::SnapshotPoint);
        }
    }

    /// Clears a [`ExitReason::SnapshotPoint`] stop, so the VM can run on; any other reason
    /// stays (the VM has ended). Returns whether the VM may run on.
    pub fn resume(&self) -> bool {
        let mut current = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if *current == Some(ExitReason::SnapshotPoint) {
            *current = None;
            self.requested.store(false, Ordering::Release);
            let _ = self.event.read();
        }
        current.is_none()
    }

    /// Whether an exit was requested: a lock-free check for hot paths.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The reason the VM is ending, once one was requested.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Becomes readable when an exit is requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Records that the guest reached `phase` now (if it had not already).
    pub fn mark(&self, phase: BootPhase) {
        let now = Instant::now();
        self.lock_markers().mark(phase, now);
    }

    /// The phases marked so far, each with the host time it was first marked, in time order.
    pub fn markers(&self) -> Vec<(BootPhase, Instant)> {
        self.lock_markers().first_marks()
    }

    /// How many times the guest marked `phase` (the first time included).
    pub fn mark_count(&self, phase: BootPhase) -> u64 {
        self.lock_markers().count[phase as usize - 1]
    }

    fn lock_markers(&self) -> std::sync::MutexGuard<'_, Markers> {
        self.markers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The boot-phase marks: a fixed-size record whatever the guest writes.
#[derive(Default)]
struct Markers {
    /// When each phase (indexed by its byte minus 1) was first marked.
    first: [Option<Instant>; BootPhase::ALL.len()],
    /// How many times each phase was marked.
    count: [u64; BootPhase::ALL.len()],
}

impl Markers {
    fn mark(&mut self, phase: BootPhase, now: Instant) {
        let i = phase as usize - 1;
        self.first[i].get_or_insert(now);
        self.count[i] = self.count[i].saturating_add(1);
    }

    fn first_marks(&self) -> Vec<(BootPhase, Instant)> {
        let mut marks: Vec<_> = BootPhase::ALL
            .into_iter()
            .filter_map(|phase| Some((phase, self.first[phase as usize - 1]?)))
            .collect();
        marks.sort_by_key(|&(_, at)| at);
        marks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_loop() {
        let exit = VmExit::new().unwrap();
        assert_eq!(exit.reason(), None);
        assert!(!exit.is_requested());
        exit.request(ExitReason::GuestStatus(7));
        exit.request(ExitReason::PowerOff);
        assert_eq!(exit.reason(), Some(ExitReason::GuestStatus(7)));
        assert!(exit.is_requested());
        assert_eq!(exit.event().read().unwrap(), 1);
    }

    #[test]
    fn the_snapshot_point_pauses_only_when_asked_and_only_once() {
        let exit = VmExit::new().unwrap();
        exit.snapshot_point();
        assert_eq!(exit.reason(), None, "ignored unless asked for");
        exit.pause_at_snapshot_point();
        exit.snapshot_point();
        assert_eq!(exit.reason(), Some(ExitReason::SnapshotPoint));
        assert!(exit.resume());
        assert!(!exit.is_requested());
        exit.snapshot_point();
        assert_eq!(exit.reason(), None, "once");
        exit.request(ExitReason::PowerOff);
        assert!(!exit.resume(), "a real end stays");
    }

    #[test]
    fn repeated_marks_keep_the_first_time_and_a_count() {
        let exit = VmExit::new().unwrap();
        exit.mark(BootPhase::CommandStarted);
        let first = exit.markers();
        for _ in 0..300_000 {
            exit.mark(BootPhase::CommandStarted);
            exit.mark(BootPhase::InitStarted);
        }
        let marks = exit.markers();
        assert_eq!(marks.len(), 2);
        assert_eq!(marks[0], first[0]);
        assert_eq!(marks[1].0, BootPhase::InitStarted);
        assert_eq!(exit.mark_count(BootPhase::CommandStarted), 300_001);
        assert_eq!(exit.mark_count(BootPhase::CommandFinished), 0);
        // The record is a fixed-size value, whatever the guest writes.
        assert_eq!(
            std::mem::size_of::<Markers>(),
            std::mem::size_of::<[Option<Instant>; BootPhase::ALL.len()]>()
                + 8 * BootPhase::ALL.len()
        );
    }
}
