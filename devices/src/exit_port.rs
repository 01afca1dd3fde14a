//! kvmbuild's exit and boot-marker ports, written by kvmbuild's init.
//!
//! | port                               | write                                                   |
//! |------------------------------------|---------------------------------------------------------|
//! | [`abi::ports::MARKER`] (0x6f0)     | a [`BootPhase`] byte, timestamped on the host (the first of each phase; repeats are only counted); unknown bytes are ignored |
//! | [`abi::ports::EXIT`] (0x6f1)       | the program's exit status; ends the VM at once          |
//! | [`abi::ports::SNAPSHOT`] (0x6f2)   | the snapshot point: pauses the VM for its owner to save it, when the owner asked for that; ignored otherwise |
//!
//! Each write acts on its first byte only, so `outw`/`outl` behave like `outb`. Both ports
//! read as 0xff, like unmapped ports: there is nothing for the guest to learn here.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{BootPhase, ExitReason, VmExit};

/// The device's length, from the marker port to the exit port; it is registered at
/// [`abi::ports::BASE`], which the guest ABI fixes.
pub const EXIT_PORT_LEN: u64 = abi::ports::LEN as u64;

/// Offset of the marker port.
pub const MARKER: u64 = (abi::ports::MARKER - abi::ports::BASE) as u64;
/// Offset of the exit port.
pub const EXIT: u64 = (abi::ports::EXIT - abi::ports::BASE) as u64;
/// Offset of the snapshot port.
pub const SNAPSHOT: u64 = (abi::ports::SNAPSHOT - abi::ports::BASE) as u64;

/// The marker and exit ports on the PIO bus.
pub struct ExitPort {
    exit: Arc<VmExit>,
}

impl ExitPort {
    /// Ports that report markers and the guest's status to `exit`.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            MARKER => {
                if let Some(phase) = BootPhase::from_byte(byte) {
                    self.exit.mark(phase);
                }
            }
            EXIT => self.exit.request(ExitReason::GuestStatus(byte)),
            SNAPSHOT => self.exit.snapshot_point(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (ExitPort, Arc<VmExit>) {
        let exit = Arc::new(VmExit::new().unwrap());
        (ExitPort::new(exit.clone()), exit)
    }

    fn phases(exit: &VmExit) -> Vec<BootPhase> {
        exit.markers().into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn spans_marker_and_exit_ports() {
        assert_eq!((MARKER, EXIT, SNAPSHOT, EXIT_PORT_LEN), (0, 1, 2, 3));
    }

    #[test]
    fn known_markers_are_recorded_in_order() {
        let (mut dev, exit) = device();
        for byte in [
            BootPhase::InitStarted as u8,
            0,
            0xff,
            BootPhase::CommandStarted as u8,
        ] {
            dev.write(MARKER, &[byte]);
        }
        assert_eq!(
            phases(&exit),
            [BootPhase::InitStarted, BootPhase::CommandStarted]
        );
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn status_byte_ends_the_vm() {
        let (mut dev, exit) = device();
        dev.write(EXIT, &[42]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestStatus(42)));
        assert_eq!(exit.event().read().unwrap(), 1);
    }

    #[test]
    fn wide_writes_use_the_first_byte() {
        let (mut dev, exit) = device();
        dev.write(MARKER, &[BootPhase::CommandFinished as u8, 0, 0, 0]);
        assert_eq!(phases(&exit), [BootPhase::CommandFinished]);
        dev.write(EXIT, &[3, 0xff]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestStatus(3)));
    }

    #[test]
    fn reads_empty_writes_and_stray_offsets_are_harmless() {
        let (mut dev, exit) = device();
        let mut data = [0u8; 4];
        dev.read(EXIT, &mut data);
        assert_eq!(data, [0xff; 4]);
        dev.read(u64::MAX, &mut []);
        dev.write(EXIT, &[]);
        dev.write(2, &[1]);
        dev.write(u64::MAX, &[1]);
        assert_eq!(exit.reason(), None);
        assert!(exit.markers().is_empty());
    }
}
