//! The contract between kvmbuild's VMM and software written for it (kvmbuild's init, the tiny
//! test guests): the I/O ports only kvmbuild has, the boot phases a guest marks on them, and
//! the statuses kvmbuild's init reports. One definition, used by both sides.
//!
//! | port  | write |
//! |-------|-------|
//! | 0x6f0 | a [`BootPhase`] byte, timestamped on the host |
//! | 0x6f1 | the program's exit status; ends the VM |
//! | 0x6f2 | the snapshot point (any byte) |
//!
//! This crate has no dependencies, so the static init and the VMM can both build on it.

#![no_std]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

/// kvmbuild's own I/O ports, outside every range a PC device uses.
pub mod ports {
    /// The boot-marker port: a [`BootPhase`](crate::BootPhase) byte written here is
    /// timestamped on the host clock (unknown bytes are ignored).
    pub const MARKER: u16 = 0x6f0;
    /// The exit port: the byte written here is the guest program's exit status, and the write
    /// ends the VM at once.
    pub const EXIT: u16 = 0x6f1;
    /// The snapshot port: a write here says "this is the snapshot point": the VMM may save
    /// the VM now and restore later runs from here. Only meaningful before any virtio driver
    /// has started a device; the VMM ignores it when it was not asked to take snapshots. The
    /// guest cannot tell whether it was saved, or whether it is the saved one resumed.
    pub const SNAPSHOT: u16 = 0x6f2;
    /// The first port of kvmbuild's range ([`MARKER`]..=[`SNAPSHOT`]).
    pub const BASE: u16 = MARKER;
    /// How many ports the range spans.
    pub const LEN: u16 = SNAPSHOT - MARKER + 1;
}

/// Boot phases a guest marks on [`ports::MARKER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BootPhase {
    /// kvmbuild's init has started (PID 1 is running).
    InitStarted = 1,
    /// The user's command has been started.
    CommandStarted = 2,
    /// The user's command has finished.
    CommandFinished = 3,
    /// The init has passed the snapshot point (a warm run only). In a VM restored from a
    /// snapshot this is the first thing the guest does after it resumes.
    Resumed = 4,
    /// Every kernel module is loaded, so the virtio devices are probed and ready.
    DevicesReady = 5,
}

impl BootPhase {
    /// Every phase, in byte order (not the order a boot reaches them).
    pub const ALL: [BootPhase; 5] = [
        Self::InitStarted,
        Self::CommandStarted,
        Self::CommandFinished,
        Self::Resumed,
        Self::DevicesReady,
    ];

    /// A short lower-case name, for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::InitStarted => "init started",
            Self::CommandStarted => "command started",
            Self::CommandFinished => "command finished",
            Self::Resumed => "resumed",
            Self::DevicesReady => "devices ready",
        }
    }

    /// The byte a guest writes to mark this phase.
    pub const fn byte(self) -> u8 {
        self as u8
    }

    /// The phase a marker byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|phase| phase.byte() == byte)
    }
}

/// The exit statuses kvmbuild's init reports on [`ports::EXIT`].
///
/// The command's own status passes through unchanged, and a command killed by signal N reports
/// 128+N, as shells do. The init's own failures use the codes below; they sit below 124 and
/// 125, which `kvmbuild run` uses for a timeout and a guest reboot, and follow the shell's
/// 126/127 for commands that cannot run.
///
/// | status | meaning |
/// |---|---|
/// | 0–255 | the command's exit status |
/// | 128+N | the command was killed by signal N |
/// | 119 | the init failed internally (could not fork, mount `/proc`, or it panicked) |
/// | 120 | bad settings: unknown `kvmbuild.*` key, malformed value, no `kvmbuild.cmd`, unusable `kvmbuild.tty` |
/// | 121 | a kernel module failed to load |
/// | 122 | a virtio-fs share or disk failed to mount |
/// | 123 | the working directory (`kvmbuild.cwd`) does not exist or cannot be entered |
/// | 126 | the command was found but cannot be executed (permissions, bad format) |
/// | 127 | the command was not found (also: its interpreter or dynamic loader is missing) |
pub mod status {
    /// The init failed internally: fork failed, `/proc` could not be mounted, or it panicked.
    pub const INTERNAL: u8 = 119;
    /// The settings are invalid, or name no command.
    pub const BAD_CONFIG: u8 = 120;
    /// A kernel module failed to load.
    pub const MODULE_FAILED: u8 = 121;
    /// A share or disk failed to mount.
    pub const MOUNT_FAILED: u8 = 122;
    /// The working directory cannot be entered.
    pub const BAD_CWD: u8 = 123;
    /// The command exists but cannot be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command does not exist.
    pub const NOT_FOUND: u8 = 127;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_their_bytes() {
        for phase in BootPhase::ALL {
            assert_eq!(BootPhase::from_byte(phase.byte()), Some(phase));
        }
        assert_eq!(BootPhase::from_byte(0), None);
        assert_eq!(BootPhase::from_byte(6), None);
    }

    #[test]
    fn init_statuses_stay_clear_of_the_vmms_own() {
        // 124 (timeout) and 125 (reset) belong to `kvmbuild run`.
        for s in [
            status::INTERNAL,
            status::BAD_CONFIG,
            status::MODULE_FAILED,
            status::MOUNT_FAILED,
            status::BAD_CWD,
        ] {
            assert!(s < 124, "{s}");
        }
    }
}
