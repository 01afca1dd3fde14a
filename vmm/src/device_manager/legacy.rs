//! The PC devices on port I/O and where they sit: COM1, the i8042 (for `reboot=k`), the ACPI
//! power registers the FADT names, and kvmbuild's marker and exit ports (the guest ABI).
//!
//! The devices themselves only know register offsets; the port numbers are the machine's, and
//! this is the one place they are chosen. The ACPI tables read them from here.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::{self, AcpiPm};
use devices::bus::Bus;
use devices::exit::VmExit;
use devices::exit_port::{self, ExitPort};
use devices::i8042::{self, I8042};
use devices::serial::{Serial, SerialState, SERIAL_LEN};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;

/// COM1, the 8250 UART that carries the kernel console (`console=ttyS0`).
pub const SERIAL_COM1: u16 = 0x3f8;
/// The COM1 interrupt line (ISA IRQ 4, routed 1:1 to IOAPIC GSI 4).
pub const SERIAL_COM1_IRQ: u32 = 4;
/// The i8042's data port; its status/command port follows at +4. Linux's `reboot=k` reads the
/// status port and writes 0xfe (pulse the reset line) to the command port.
pub const I8042_BASE: u16 = 0x60;
/// Base of the hardware-reduced ACPI registers the FADT points at.
pub const ACPI_PM_BASE: u16 = 0x600;
/// kvmbuild's marker and exit ports, fixed by the guest ABI.
pub const KVMBUILD_PORTS_BASE: u16 = abi::ports::BASE;

/// The port of one of the ACPI power registers, by its offset in [`acpi_pm`] (a few bytes:
/// asserted, at compile time for the constants).
#[allow(clippy::cast_possible_truncation)] // asserted to fit
pub const fn acpi_pm_port(offset: u64) -> u16 {
    assert!(offset < 0x100);
    ACPI_PM_BASE + offset as u16
}

/// The port ranges in use, for the overlap check and the documentation.
pub const PORT_RANGES: [(&str, u16, u64); 4] = [
    ("serial port", SERIAL_COM1, SERIAL_LEN),
    ("i8042", I8042_BASE, i8042::I8042_LEN),
    ("ACPI registers", ACPI_PM_BASE, acpi_pm::ACPI_PM_LEN),
    (
        "kvmbuild ports",
        KVMBUILD_PORTS_BASE,
        exit_port::EXIT_PORT_LEN,
    ),
];

/// Puts the legacy devices on `pio` and routes COM1's interrupt. Returns COM1, which the
/// console input and the flush at the end still need.
pub fn attach(
    vm: &VmFd,
    pio: &mut Bus,
    console: Box<dyn Write + Send>,
    serial_state: Option<&SerialState>,
    exit: &Arc<VmExit>,
) -> Result<Arc<Mutex<Serial>>, DeviceError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::Create {
        what: "serial port",
        reason: e.to_string(),
    })?;
    vm.register_irqfd(&irq, SERIAL_COM1_IRQ)
        .map_err(|source| DeviceError::Kvm {
            what: "route the serial interrupt",
            source,
        })?;
    let serial = match serial_state {
        Some(state) => {
            Serial::with_state(irq, console, state).map_err(|e| DeviceError::Create {
                what: "serial port",
                reason: e.to_string(),
            })?
        }
        None => Serial::new(irq, console).map_err(|e| DeviceError::Create {
            what: "serial port",
            reason: e.to_string(),
        })?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let [com1, kbc, pm, ports] = PORT_RANGES;
    insert(pio, serial.clone(), com1)?;
    insert(pio, Arc::new(Mutex::new(I8042::new(exit.clone()))), kbc)?;
    insert(pio, Arc::new(Mutex::new(AcpiPm::new(exit.clone()))), pm)?;
    insert(
        pio,
        Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
        ports,
    )?;
    Ok(serial)
}

fn insert(
    pio: &mut Bus,
    device: devices::bus::SharedDevice,
    (what, base, len): (&'static str, u16, u64),
) -> Result<(), DeviceError> {
    pio.insert(device, u64::from(base), len)
        .map_err(|e| DeviceError::Create {
            what,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_do_not_overlap() {
        for (i, (a, a_base, a_len)) in PORT_RANGES.iter().enumerate() {
            for (b, b_base, b_len) in &PORT_RANGES[i + 1..] {
                let (a_base, b_base) = (u64::from(*a_base), u64::from(*b_base));
                assert!(
                    a_base + a_len <= b_base || b_base + b_len <= a_base,
                    "{a} overlaps {b}"
                );
            }
        }
    }

    #[test]
    fn the_pc_ports_are_where_linux_looks() {
        assert_eq!(SERIAL_COM1, 0x3f8);
        assert_eq!(I8042_BASE + i8042::COMMAND as u16, 0x64);
        assert_eq!(
            KVMBUILD_PORTS_BASE + exit_port::EXIT as u16,
            abi::ports::EXIT
        );
    }
}
