//! The hardware-reduced ACPI sleep and reset registers that the FADT points at.
//!
//! A hardware-reduced FADT has no PM1 blocks; instead it names a sleep control register, a
//! sleep status register and a reset register. kvmbuild puts the three bytes side by side at
//! the port the VMM chooses (and names in the FADT):
//!
//! | offset | register       | behaviour                                                    |
//! |--------|----------------|--------------------------------------------------------------|
//! | 0      | sleep control  | SLP_EN with SLP_TYP = S5 powers the VM off; other types are ignored |
//! | 1      | sleep status   | reads 0, writes ignored                                      |
//! | 2      | reset          | [`RESET_VALUE`] ends the VM as a reset           |
//!
//! Sleep status never shows WAK_STS: after requesting S5, ACPICA polls for it, and keeping the
//! vCPU spinning there (until the VMM stops it) is better than letting the guest believe it
//! woke up and carry on.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ResetSource, VmExit};

/// The device's length: sleep control, sleep status, reset.
pub const ACPI_PM_LEN: u64 = 3;
/// Offset of the FADT's `SLEEP_CONTROL_REG`: writing SLP_EN with SLP_TYP = [`S5_SLEEP_TYPE`]
/// powers the VM off.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the FADT's `SLEEP_STATUS_REG`.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the FADT's `RESET_REG`: writing [`RESET_VALUE`] resets (ends) the VM.
pub const RESET: u64 = 2;
/// The value the FADT tells the guest to write to [`RESET`].
pub const RESET_VALUE: u8 = 0x01;
/// The S5 sleep type the DSDT's `_S5_` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;

/// SLP_EN: start the transition to the sleep type in SLP_TYP.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP occupies bits 2..=4 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The ACPI sleep/reset registers on the PIO bus.
pub struct AcpiPm {
    exit: Arc<VmExit>,
}

impl AcpiPm {
    /// Registers that report poweroff and reset to `exit`.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }

    fn write_register(&self, register: u64, value: u8) {
        match register {
            SLEEP_CONTROL => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    self.exit.request(ExitReason::PowerOff);
                }
            }
            RESET if value == RESET_VALUE => {
                self.exit.request(ExitReason::Reset(ResetSource::AcpiReset));
            }
            _ => {}
        }
    }
}

/// The register under byte `i` of an access at `offset`; saturates, as nothing lives at the top.
fn register_at(offset: u64, i: usize) -> u64 {
    offset.saturating_add(i as u64)
}

impl BusDevice for AcpiPm {
    /// The registers are bytes; each byte of a wider access reads the register at its offset.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match register_at(offset, i) {
                SLEEP_CONTROL | SLEEP_STATUS | RESET => 0,
                _ => 0xff,
            };
        }
    }

    /// Each byte of a wider access is written to the register at its offset, as on hardware.
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            self.write_register(register_at(offset, i), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPm, Arc<VmExit>) {
        let exit = Arc::new(VmExit::new().unwrap());
        (AcpiPm::new(exit.clone()), exit)
    }

    fn sleep(sleep_type: u8) -> u8 {
        SLP_EN | (sleep_type << SLP_TYP_SHIFT)
    }

    #[test]
    fn offsets_match_the_port_map() {
        assert_eq!((SLEEP_CONTROL, SLEEP_STATUS, RESET), (0, 1, 2));
        assert_eq!(ACPI_PM_LEN, RESET + 1);
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, exit) = device();
        dev.write(SLEEP_CONTROL, &[sleep(S5_SLEEP_TYPE)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_requests_are_ignored() {
        let (mut dev, exit) = device();
        // S5 without SLP_EN, then every other sleep type with it; stray high bits too.
        dev.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        for sleep_type in (0..=7).filter(|&t| t != S5_SLEEP_TYPE) {
            dev.write(SLEEP_CONTROL, &[sleep(sleep_type) | 0xc3]);
        }
        dev.write(SLEEP_STATUS, &[0xff]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn reset_value_resets_and_others_do_not() {
        let (mut dev, exit) = device();
        for value in (0..=u8::MAX).filter(|&v| v != RESET_VALUE) {
            dev.write(RESET, &[value]);
        }
        assert_eq!(exit.reason(), None);
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(
            exit.reason(),
            Some(ExitReason::Reset(ResetSource::AcpiReset))
        );
    }

    #[test]
    fn registers_read_zero_and_beyond_reads_ones() {
        let (mut dev, _) = device();
        let mut data = [0xaa; 5];
        dev.read(0, &mut data);
        assert_eq!(data, [0, 0, 0, 0xff, 0xff]);
        dev.read(u64::MAX - 1, &mut data);
        assert_eq!(data, [0xff; 5]);
        dev.read(0, &mut []);
    }

    #[test]
    fn wide_writes_reach_each_register() {
        let (mut dev, exit) = device();
        dev.write(u64::MAX, &[RESET_VALUE; 3]);
        dev.write(3, &[RESET_VALUE]);
        dev.write(0, &[]);
        assert_eq!(exit.reason(), None);
        dev.write(SLEEP_STATUS, &[0, RESET_VALUE]);
        assert_eq!(
            exit.reason(),
            Some(ExitReason::Reset(ResetSource::AcpiReset))
        );
    }
}
