//! The guest's ACPI tables, RSDP → XSDT → {FADT → DSDT, MADT}, at [`layout::ACPI_START`].
//!
//! The machine they describe is *hardware-reduced* ACPI: no PM1 event/control blocks, no SCI,
//! no GPEs, no FACS. Power-off and reset go through the three byte-wide I/O registers of
//! `devices::acpi_pm`, which the FADT names directly. The DSDT only declares what Linux cannot
//! find on its own: the `\_S5_` sleep type, COM1 and the virtio-mmio devices.
//!
//! Memory layout, every table 8-byte aligned, in this order:
//!
//! | table | size                         |
//! |-------|------------------------------|
//! | RSDP  | 36 (at `ACPI_START` itself, 16-byte aligned, so the legacy scan finds it) |
//! | XSDT  | 36 + 8 per entry (FADT, MADT) |
//! | FADT  | 276 (ACPI 6.5 layout)        |
//! | MADT  | 44 + 8 per vCPU + 12 (IOAPIC) |
//! | DSDT  | 36 + AML, last because it grows with the device count |

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::device_manager::{legacy, mmio};
use crate::layout;

/// One virtio-mmio device, as the DSDT announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceAcpi {
    /// Guest-physical base of the device's register window.
    pub addr: u64,
    /// Length of the register window.
    pub len: u64,
    /// The IOAPIC input (GSI) the device interrupts on.
    pub gsi: u32,
}

/// Why the ACPI tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A guest needs at least one vCPU to describe.
    #[error("no vCPUs")]
    NoVcpus,
    /// The DSDT's `Memory32Fixed` descriptor only holds 32-bit windows.
    #[error("virtio-mmio device {index} at {addr:#x} (length {len:#x}) is not below 4 GiB")]
    DeviceNot32Bit {
        /// Position of the device in the list.
        index: usize,
        /// Its base address.
        addr: u64,
        /// Its window length.
        len: u64,
    },
    /// The in-kernel IOAPIC has pins 0..=23 only.
    #[error("virtio-mmio device {index} uses GSI {gsi}, beyond the IOAPIC's last pin")]
    GsiOutOfRange {
        /// Position of the device in the list.
        index: usize,
        /// The offending GSI.
        gsi: u32,
    },
    /// Device names `V000`..`VFFF` are used up.
    #[error("{0} virtio-mmio devices are more than the DSDT can name")]
    TooManyDevices(usize),
    /// The tables do not fit between `ACPI_START` and `ACPI_TABLES_END`.
    #[error("ACPI tables need {needed:#x} bytes, only {room:#x} are reserved")]
    TooLarge {
        /// Bytes the tables need.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
    /// Guest memory rejected the write (e.g. the ACPI area is not backed by RAM).
    #[error("cannot write ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"KVMBLD";
/// OEM table ID in every table header (the spec wants the FADT's to match the root table's, so
/// one ID is used throughout).
const OEM_TABLE_ID: [u8; 8] = *b"KVMBUILD";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// FADT `HYPERVISOR_VENDOR_IDENTITY`: the ASCII name, read as a little-endian u64.
const HYPERVISOR_VENDOR_ID: u64 = u64::from_le_bytes(*b"KVMBUILD");

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Size of a standard ACPI table header.
const SDT_HEADER_LEN: usize = 36;
/// Offset of the checksum byte in a standard table header.
const SDT_CHECKSUM_OFFSET: usize = 9;
/// Offset of the MADT's `Flags` field (after the header and the local APIC address).
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1 << 0;

/// IA-PC boot architecture flag: no VGA hardware; Linux must not poke at VGA ports or memory.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: no MSI; every kvmbuild device interrupts on an IOAPIC pin.
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// IA-PC boot architecture flag: no CMOS RTC, so Linux registers no `rtc_cmos` device and
/// never touches ports 0x70/0x71 (kvmclock supplies the wall clock).
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// The IA-PC boot architecture flags kvmbuild announces.
///
/// The "8042 present" bit (1 << 1) is deliberately clear even though kvmbuild has a minimal
/// i8042 for the reset line: Linux then marks the controller "firmware absent", and since the
/// DSDT has no PNP0303/PNP0F13 device the i8042 driver gives up at once instead of probing the
/// ports directly (controller self-test, then a keyboard through atkbd, each with timeouts).
/// Linux's keyboard-controller reboot fallback writes port 0x64 directly and does not look at
/// this flag. "Legacy devices" (1 << 0) is clear too: that only stops Linux looking for a PnP
/// BIOS.
const IAPC_BOOT_ARCH: u16 =
    IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT;

/// The IOAPIC's ID. 0 is what KVM's in-kernel IOAPIC reports in its ID register; 64-bit Linux
/// (and 32-bit Linux on an xAPIC, which KVM emulates) accepts an IOAPIC ID shared with a local
/// APIC, as QEMU and Firecracker guests show.
const IOAPIC_ID: u8 = 0;

/// Alignment of each table in guest memory.
const TABLE_ALIGN: u64 = 8;
/// DSDT device names are `V` and three hex digits.
const MAX_VIRTIO_DEVICES: usize = 0x1000;

// The MADT holds 32-bit APIC addresses and the tables must fit in 32-bit pointers as well.
const _: () = assert!(layout::LAPIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::ACPI_START % 16 == 0 && layout::ACPI_START < layout::ACPI_TABLES_END);

/// Builds the ACPI tables for `vcpus` vCPUs and the `virtio` devices and writes them into
/// `mem` at [`layout::ACPI_START`]. Returns the RSDP's address, for `boot_params.acpi_rsdp_addr`.
pub fn write_acpi_tables<M: GuestMemory>(
    mem: &M,
    vcpus: u8,
    virtio: &[MmioDeviceAcpi],
) -> Result<GuestAddress, AcpiError> {
    // The variable-sized tables first, so every address is known before the tables that point
    // at them are built.
    let madt = madt(vcpus)?;
    let dsdt = dsdt(virtio)?;

    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // Two XSDT entries: FADT and MADT.
    let xsdt_len = (SDT_HEADER_LEN + 2 * 8) as u64;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            needed: end - layout::ACPI_START,
            room: layout::ACPI_TABLES_END - layout::ACPI_START,
        });
    }

    let fadt = to_bytes(&fadt(dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    // One image, one write: the guest never sees a half-written set of tables, and a failed
    // write leaves nothing behind to clean up.
    // The tables lie in the ACPI area, a few KiB (see layout).
    #[allow(clippy::cast_possible_truncation)]
    let mut image = vec![0u8; (end - layout::ACPI_START) as usize];
    for (addr, table) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        #[allow(clippy::cast_possible_truncation)] // as above
        let at = (addr - layout::ACPI_START) as usize;
        image[at..at + table.len()].copy_from_slice(table);
    }
    mem.write_slice(&image, GuestAddress(layout::ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(GuestAddress(rsdp_addr))
}

/// The FADT of a hardware-reduced machine whose DSDT is at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    // The builder has no setters for these; its fields are public for exactly this.
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_register(legacy::acpi_pm_port(acpi_pm::RESET));
    fadt.reset_value = acpi_pm::RESET_VALUE;
    // Linux powers off a hardware-reduced machine by writing SLP_TYP (from `\_S5_`) << 2 |
    // SLP_EN to the sleep control register, after clearing WAK_STS in the status register.
    fadt.sleep_control_reg = io_register(legacy::acpi_pm_port(acpi_pm::SLEEP_CONTROL));
    fadt.sleep_status_reg = io_register(legacy::acpi_pm_port(acpi_pm::SLEEP_STATUS));
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR_ID.into();
    fadt.finalize()
}

/// A byte-wide register at I/O port `port`; the spec requires exactly this for RESET_REG, and
/// ACPICA accesses the sleep registers with the width given here.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The MADT: one enabled local APIC per vCPU (ACPI UID = APIC ID = vCPU index, matching the
/// APIC IDs the VMM puts in CPUID) and the IOAPIC with GSIs from 0.
///
/// There are no interrupt source overrides: with KVM's default GSI routing, the in-kernel PIT,
/// PIC and IOAPIC wire ISA IRQ n to IOAPIC pin n (the PIT on pin 0, not pin 2 as on real
/// chipsets and under QEMU), so the identity mapping that no overrides means is the truth.
fn madt(vcpus: u8) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(const { layout::as_u32(layout::LAPIC_ADDR) }),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        IOAPIC_ID,
        const { layout::as_u32(layout::IOAPIC_ADDR) },
        0,
    ));
    let mut bytes = to_bytes(&madt);
    // The crate offers no way to set the MADT flags, so set PCAT_COMPAT in the serialized
    // table and fix the checksum.
    let flags = &mut bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4];
    let value = u32::from_le_bytes(flags.try_into().expect("4-byte slice")) | MADT_PCAT_COMPAT;
    flags.copy_from_slice(&value.to_le_bytes());
    fix_checksum(&mut bytes);
    Ok(bytes)
}

/// The DSDT: `\_S5_`, then COM1 and the virtio-mmio devices under `\_SB_`.
fn dsdt(virtio: &[MmioDeviceAcpi]) -> Result<Vec<u8>, AcpiError> {
    if virtio.len() > MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyDevices(virtio.len()));
    }
    let mut aml = Vec::new();
    // Hardware-reduced sleep uses only the first value (SLP_TYPa); the second is for the
    // PM1b block, which does not exist, and repeats it as firmware conventionally does.
    let s5 = acpi_pm::S5_SLEEP_TYPE;
    Name::new("_S5_".into(), &Package::new(vec![&s5, &s5])).to_aml_bytes(&mut aml);

    // Each device is serialized on its own, as the builders borrow their children.
    let mut sb = com1();
    for (index, dev) in virtio.iter().enumerate() {
        sb.extend(virtio_device(index, dev)?);
    }
    aml.extend(Scope::raw("\\_SB_".into(), sb));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        const { layout::as_u32(SDT_HEADER_LEN as u64) },
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    Ok(dsdt.as_slice().to_vec())
}

/// COM1 as a PNP0501 device. With hardware-reduced ACPI, x86 Linux installs no legacy PIC and
/// so sets up no identity ISA IRQ mappings; 8250_pnp takes the port and a properly mapped GSI 4
/// from this `_CRS` instead of the legacy driver's bare IRQ number 4.
fn com1() -> Vec<u8> {
    let io = aml::IO::new(legacy::SERIAL_COM1, legacy::SERIAL_COM1, 1, 8);
    let irq = Interrupt::new(true, true, false, false, legacy::SERIAL_COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &0u8);
    let crs = Name::new("_CRS".into(), &crs);
    to_bytes(&Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// A virtio-mmio device as Linux's `virtio_mmio` driver matches it over ACPI: `_HID`
/// "LNRO0005", its register window and an edge-triggered, active-high interrupt (an irqfd
/// delivers edges).
fn virtio_device(index: usize, dev: &MmioDeviceAcpi) -> Result<Vec<u8>, AcpiError> {
    let not_32bit = || AcpiError::DeviceNot32Bit {
        index,
        addr: dev.addr,
        len: dev.len,
    };
    let base = u32::try_from(dev.addr).map_err(|_| not_32bit())?;
    let len = u32::try_from(dev.len).map_err(|_| not_32bit())?;
    if dev.len == 0 || dev.addr + dev.len > 1 << 32 {
        return Err(not_32bit());
    }
    if dev.gsi > mmio::LAST_DEVICE_GSI {
        return Err(AcpiError::GsiOutOfRange {
            index,
            gsi: dev.gsi,
        });
    }

    let name = format!("V{index:03X}");
    let window = Memory32Fixed::new(true, base, len);
    let irq = Interrupt::new(true, true, false, false, dev.gsi);
    let crs = ResourceTemplate::new(vec![&window, &irq]);
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &index);
    let crs = Name::new("_CRS".into(), &crs);
    Ok(to_bytes(&Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    )))
}

/// Serializes a table or AML object.
fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Recomputes a standard table's checksum so that all its bytes sum to 0.
fn fix_checksum(table: &mut [u8]) {
    table[SDT_CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[SDT_CHECKSUM_OFFSET] = sum.wrapping_neg();
}

/// Rounds `addr` up to the table alignment.
fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

#[cfg(test)]
mod tests;
