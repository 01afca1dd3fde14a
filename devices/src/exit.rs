//! The one channel through which anything ends the VM.
//!
//! Devices (the exit port, the ACPI registers, the i8042) and the VMM itself (vCPU errors,
//! timeouts) call [`VmExit::request`]; the first reason wins and wakes the run loop through an
//! `EventFd`. Boot-phase markers are timestamped here too, so `bench` reads them from one place.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
    /// kvmbuild itself was asked to stop by this signal (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    /// A console port's reader went away (a broken pipe): the VM ends as a process in a
    /// pipeline would on SIGPIPE.
    OutputClosed,
    /// A vCPU or device failed in a way the VMM cannot recover from.
    Internal(String),
}

/// Boot phases the guest marks on [`crate::ports::KVMBUILD_MARKER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BootPhase {
    /// kvmbuild's init has started (PID 1 is running).
    InitStarted = 1,
    /// The user's command has been started.
    CommandStarted = 2,
    /// The user's command has finished.
    CommandFinished = 3,
}

impl BootPhase {
    /// The phase a marker byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::InitStarted),
            2 => Some(Self::CommandStarted),
            3 => Some(Self::CommandFinished),
            _ => None,
        }
    }
}

/// The exit channel shared by every vCPU, device and the run loop.
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    /// Set with `reason`: lets vCPU threads check on every KVM exit without taking the lock.
    requested: AtomicBool,
    markers: Mutex<Vec<(BootPhase, Instant)>>,
    event: EventFd,
}

impl VmExit {
    /// A channel with no exit requested yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            markers: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
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

    /// Records that the guest reached `phase` now.
    pub fn mark(&self, phase: BootPhase) {
        self.markers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((phase, Instant::now()));
    }

    /// The phases marked so far, in order, with their host timestamps.
    pub fn markers(&self) -> Vec<(BootPhase, Instant)> {
        self.markers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    fn marker_bytes_map_to_phases() {
        assert_eq!(BootPhase::from_byte(1), Some(BootPhase::InitStarted));
        assert_eq!(BootPhase::from_byte(3), Some(BootPhase::CommandFinished));
        assert_eq!(BootPhase::from_byte(0), None);
        assert_eq!(BootPhase::from_byte(4), None);
    }
}
