//! Emulated devices for kvmbuild.
//!
//! Nothing here touches KVM: devices see reads and writes on a [`bus::Bus`], raise interrupts
//! through `EventFd`s that the VMM registers as irqfds, and end the VM through [`exit::VmExit`].

pub mod acpi_pm;
pub mod bus;
pub mod exit;
pub mod exit_port;
pub mod host_file;
pub mod i8042;
pub mod serial;
pub mod virtio;

/// The I/O ports and MMIO addresses of kvmbuild's fixed devices: the one place they are defined,
/// shared by the devices, the ACPI tables and the documentation.
pub mod ports {
    /// COM1, the 8250 UART that carries the kernel console (`console=ttyS0`).
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// The COM1 interrupt line (ISA IRQ 4, routed 1:1 to IOAPIC GSI 4).
    pub const SERIAL_COM1_IRQ: u32 = 4;
    /// The i8042 data port. Linux's `reboot=k` path reads the status port and writes 0xfe
    /// (pulse reset line) to the command port.
    pub const I8042_DATA: u16 = 0x60;
    /// The i8042 status/command port.
    pub const I8042_COMMAND: u16 = 0x64;
    /// Base of the hardware-reduced ACPI registers that the FADT points at.
    pub const ACPI_PM_BASE: u16 = 0x600;
    /// FADT `SLEEP_CONTROL_REG`: writing SLP_EN with SLP_TYP=5 (S5) powers the VM off.
    pub const ACPI_SLEEP_CONTROL: u16 = ACPI_PM_BASE;
    /// FADT `SLEEP_STATUS_REG`.
    pub const ACPI_SLEEP_STATUS: u16 = ACPI_PM_BASE + 1;
    /// FADT `RESET_REG`: writing [`ACPI_RESET_VALUE`] resets (ends) the VM.
    pub const ACPI_RESET: u16 = ACPI_PM_BASE + 2;
    /// The value the FADT tells the guest to write to [`ACPI_RESET`].
    pub const ACPI_RESET_VALUE: u8 = 0x01;
    /// The S5 sleep type announced in the DSDT's `_S5_` package.
    pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
    /// kvmbuild's boot-marker port: a byte written here marks a boot phase (see
    /// [`crate::exit::BootPhase`]) and is timestamped on the host clock.
    pub const KVMBUILD_MARKER: u16 = 0x6f0;
    /// kvmbuild's exit port: the byte written here is the guest program's exit status, and the
    /// write ends the VM at once.
    pub const KVMBUILD_EXIT: u16 = 0x6f1;
}
