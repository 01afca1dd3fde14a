//! The sliver of the i8042 keyboard controller that Linux's `reboot=k` path uses.
//!
//! Linux resets a PC by waiting for the controller's input buffer to drain (bit 1 of the
//! status port) and then writing 0xfe, "pulse the reset line", to the command port. kvmbuild
//! never reboots a guest, so that command ends the VM with
//! [`ResetSource::I8042`]. There is no keyboard: the status port always reads 0 (both buffers
//! empty), so a probing i8042 driver finds no controller answering and gives up, and the data
//! port reads 0.
//!
//! **Registration.** One device spans [`I8042_LEN`] ports (0x60..=0x64 on a PC), the data
//! port at offset 0 and the status/command port at offset [`COMMAND`]. Offsets 1..=3 are not the
//! controller's: they read as all ones and ignore writes, as if unmapped. In particular 0x61
//! (the PC speaker / NMI status port) is served by KVM's in-kernel PIT before an exit would
//! reach this device.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ResetSource, VmExit};

/// Offset of the data port.
const DATA: u64 = 0;
/// Offset of the status (read) / command (write) port.
pub const COMMAND: u64 = 4;
/// The device's length, reaching the status/command port.
pub const I8042_LEN: u64 = COMMAND + 1;
/// The command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The offset of byte `i` of an access at `offset`; saturates, since no port lives at the top.
fn port_at(offset: u64, i: usize) -> u64 {
    offset.saturating_add(i as u64)
}

/// The reset-only i8042 on the PIO bus.
pub struct I8042 {
    exit: Arc<VmExit>,
}

impl I8042 {
    /// A controller that reports a reset command to `exit`.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    /// Each byte of a (possibly wide) access reads the port at its own offset.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match port_at(offset, i) {
                DATA | COMMAND => 0,
                _ => 0xff,
            };
        }
    }

    /// Each byte of a (possibly wide) access writes the port at its own offset.
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if port_at(offset, i) == COMMAND && byte == CMD_RESET_CPU {
                self.exit.request(ExitReason::Reset(ResetSource::I8042));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, Arc<VmExit>) {
        let exit = Arc::new(VmExit::new().unwrap());
        (I8042::new(exit.clone()), exit)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0xaa];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn spans_data_to_command_port() {
        assert_eq!((DATA, COMMAND, I8042_LEN), (0, 4, 5));
    }

    #[test]
    fn status_and_data_read_empty() {
        let (mut dev, _) = device();
        assert_eq!(read(&mut dev, COMMAND), 0);
        assert_eq!(read(&mut dev, DATA), 0);
        assert_eq!(read(&mut dev, 1), 0xff);
    }

    #[test]
    fn reset_command_ends_the_vm() {
        let (mut dev, exit) = device();
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset(ResetSource::I8042)));
    }

    #[test]
    fn other_commands_and_ports_are_ignored() {
        let (mut dev, exit) = device();
        for cmd in [0x20, 0x60, 0xaa, 0xad, 0xd4, 0xff] {
            dev.write(COMMAND, &[cmd]);
        }
        dev.write(DATA, &[CMD_RESET_CPU]);
        dev.write(1, &[CMD_RESET_CPU]);
        dev.write(COMMAND, &[]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn wide_and_stray_accesses_are_harmless() {
        let (mut dev, exit) = device();
        let mut wide = [0xaa; 8];
        dev.read(u64::MAX - 2, &mut wide);
        dev.read(0, &mut wide);
        assert_eq!(wide, [0, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0xff]);
        dev.write(u64::MAX, &[CMD_RESET_CPU; 4]);
        assert_eq!(exit.reason(), None);
        // The second byte of a word written at offset 3 lands on the command port.
        dev.write(3, &[0, CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset(ResetSource::I8042)));
    }
}
