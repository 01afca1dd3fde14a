//! The one piece of firmware behaviour a Linux guest still relies on: the reset vector.
//!
//! kvmbuild boots without firmware, but Linux's last-resort reboot method jumps to the BIOS
//! reset vector (real mode, f000:fff0). On a hardware-reduced ACPI machine without EFI that is
//! even its *default* path: `reboot_init()` picks BOOT_EFI, which has nothing to call and
//! falls through to BOOT_BIOS. With nothing at the vector the CPU would execute zeroes forever
//! and the VM would hang instead of ending. So the vector holds a stub that writes the ACPI
//! reset register, which ends the VM as a guest reset.

use devices::acpi_pm::{self, RESET_VALUE as ACPI_RESET_VALUE};

use crate::device_manager::legacy;

/// The ACPI reset register's port.
const ACPI_RESET: u16 = legacy::acpi_pm_port(acpi_pm::RESET);
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Real-mode code at the reset vector: `mov dx, ACPI_RESET; mov al, ACPI_RESET_VALUE;
/// out dx, al; 1: hlt; jmp 1b`.
pub fn reset_stub() -> [u8; 9] {
    let [port_lo, port_hi] = ACPI_RESET.to_le_bytes();
    [
        0xba,
        port_lo,
        port_hi, // mov dx, imm16
        0xb0,
        ACPI_RESET_VALUE, // mov al, imm8
        0xee,             // out dx, al
        0xf4,             // hlt
        0xeb,
        0xfd, // jmp short to the hlt
    ]
}

/// Writes [`reset_stub`] at [`layout::RESET_VECTOR`].
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&reset_stub(), GuestAddress(layout::RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_writes_the_reset_register_and_halts() {
        let stub = reset_stub();
        assert_eq!(&stub[..3], &[0xba, 0x02, 0x06], "mov dx, 0x602");
        assert_eq!(&stub[3..5], &[0xb0, 0x01], "mov al, 1");
        assert_eq!(&stub[5..], &[0xee, 0xf4, 0xeb, 0xfd]);
        // The jmp's target (its end + displacement) is the hlt.
        assert_eq!(stub.len() as i32 + i32::from(stub[8] as i8), 6);
    }

    #[test]
    fn stub_fits_below_1_mib_and_after_the_acpi_tables() {
        const { assert!(layout::RESET_VECTOR + 9 <= layout::ACPI_END) };
        const { assert!(layout::ACPI_TABLES_END <= layout::RESET_VECTOR) };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_reset_vector(&mem).unwrap();
        let mut read = [0u8; 9];
        mem.read_slice(&mut read, GuestAddress(0xffff0)).unwrap();
        assert_eq!(read, reset_stub());
    }
}
