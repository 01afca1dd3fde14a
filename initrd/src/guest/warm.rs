//! Warm start, the guest's side: the init stops at the snapshot point before anything of this
//! run is known, and learns the run afterwards.
//!
//! With `kvmbuild.warm` on the command line the init loads every module, `virtio_mmio`
//! included, and waits until the virtio-console has handed over all of its ports
//! ([`wait_for_console`]); the console, the RNG and the shares (virtio-fs, not yet mounted)
//! are then bound and running. The run's disks read as empty slots (device ID 0) at this
//! point, which the virtio-mmio driver passes over. The init writes the snapshot port; from
//! there on (in the run that saved the snapshot, or in any run restored from it) the host
//! shows this run's disks in those slots and serves the shares from this run's virtiofsd,
//! and the init has the driver probe the empty slots again ([`probe_run_devices`]). The run's settings (command, environment, shares, clock, seed)
//! arrive as the contents of the [`SETTINGS_PORT_NAME`] console port, read to its end. The
//! same init, kernel and memory size thus serve any number of runs from one snapshot, and a
//! restored guest starts with its console's handshake already done.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{stdio, sys, Error, Log};
use crate::config::{Config, SETTINGS_PORT_NAME, STDIO_PORT_NAMES};

/// A bound on the settings: far more than any command line and environment.
const MAX_SETTINGS: u64 = 4 << 20;
/// Where Linux lists platform devices; the virtio-mmio slots are among them.
const PLATFORM_DEVICES: &str = "/sys/bus/platform/devices";
/// Writing a device's name here has the bus probe it against every driver.
const DRIVERS_PROBE: &str = "/sys/bus/platform/drivers_probe";

/// Waits until the virtio-console's driver has set up every port the host offers a warm run
/// (the stdio ports and the settings port), each with its device node: past this, nothing
/// of the console's handshake is left in flight, so a snapshot holds it done.
pub fn wait_for_console(log: &Log) -> Result<(), Error> {
    let deadline = Instant::now() + super::DEVICE_WAIT;
    let names: Vec<&str> = STDIO_PORT_NAMES
        .iter()
        .copied()
        .chain([SETTINGS_PORT_NAME])
        .collect();
    loop {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| !stdio::find_port(name).is_some_and(|node| node.exists()))
            .collect();
        if missing.is_empty() {
            log.step(format_args!("console ports ready"));
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Internal(format!(
                "the host's console ports did not appear (missing: {})",
                missing.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Has the virtio-mmio driver probe the slots it found empty before the snapshot point, where
/// this run's disks now are. Each probe runs within the write, so the devices exist when this
/// returns (their block devices may still take a moment, which the mounts wait for).
pub fn probe_run_devices(log: &Log) -> Result<(), Error> {
    let entries = std::fs::read_dir(PLATFORM_DEVICES).map_err(|source| Error::ReadConfig {
        path: PLATFORM_DEVICES.into(),
        source,
    })?;
    let slots: Vec<Slot> = entries
        .flatten()
        .filter_map(|entry| Slot::read(&entry.path()))
        .collect();
    let mut probed = 0;
    for slot in empty_slots(&slots) {
        // A slot that stays empty (a driver that refuses it) is not this step's failure: what
        // needs the device waits for it, with a deadline, and says which is missing.
        let _ = std::fs::write(DRIVERS_PROBE, slot.name.as_bytes());
        let bound = Path::new(PLATFORM_DEVICES)
            .join(&slot.name)
            .join("driver")
            .exists();
        log.step(format_args!(
            "probed {}: {}",
            slot.name,
            if bound { "bound" } else { "left unbound" }
        ));
        probed += 1;
    }
    log.step(format_args!(
        "probed {probed} virtio-mmio slots for this run's devices"
    ));
    Ok(())
}

/// A virtio-mmio slot as the platform bus lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    name: String,
    /// Declared in the DSDT (`LNRO0005`) rather than on the command line (`virtio-mmio.N`).
    acpi: bool,
    bound: bool,
}

impl Slot {
    /// The virtio-mmio slot at `dir`, if it is one.
    fn read(dir: &Path) -> Option<Slot> {
        let modalias = std::fs::read_to_string(dir.join("modalias")).ok()?;
        let acpi = slot_kind(modalias.trim_end())?;
        Some(Slot {
            name: dir.file_name()?.to_str()?.to_owned(),
            acpi,
            bound: dir.join("driver").exists(),
        })
    }
}

/// Whether a modalias is a virtio-mmio slot's, and if so whether the DSDT declared it.
fn slot_kind(modalias: &str) -> Option<bool> {
    match modalias {
        "platform:virtio-mmio" => Some(false),
        m if m.starts_with("acpi:LNRO0005:") => Some(true),
        _ => None,
    }
}

/// The unbound slots to probe. kvmbuild declares every device twice, in the DSDT and on the
/// command line, and only one of each pair can claim the window; the other stays unbound for
/// good. So only unbound slots of the kind that holds the bound devices are empty ones.
fn empty_slots(slots: &[Slot]) -> impl Iterator<Item = &Slot> {
    let acpi_binds = slots.iter().any(|s| s.bound && s.acpi)
        || !slots.iter().any(|s| s.bound) && slots.iter().any(|s| s.acpi);
    slots
        .iter()
        .filter(move |s| !s.bound && s.acpi == acpi_binds)
}

/// Reads this run's settings from the settings port and applies them over `config`, then sets
/// the clock and reseeds the random generator from them.
pub fn read_run_settings(config: &mut Config, log: &Log) -> Result<(), Error> {
    let node = wait_for_settings_port()?;
    let mut text = String::new();
    std::fs::File::open(&node)
        .and_then(|f| f.take(MAX_SETTINGS).read_to_string(&mut text))
        .map_err(|source| Error::ReadConfig {
            path: node.clone(),
            source,
        })?;
    config.apply_file(&text)?;
    super::check_mount_points(config)?;
    log.step(format_args!("run settings read from {}", node.display()));
    if let Some(ns) = config.clock_ns {
        sys::set_wall_clock(ns)
            .map_err(|e| Error::Internal(format!("cannot set the clock: {e}")))?;
    }
    if !config.seed.is_empty() {
        sys::add_entropy_and_reseed(&config.seed)
            .map_err(|e| Error::Internal(format!("cannot reseed the random generator: {e}")))?;
    }
    Ok(())
}

fn wait_for_settings_port() -> Result<std::path::PathBuf, Error> {
    let deadline = Instant::now() + super::DEVICE_WAIT;
    loop {
        if let Some(node) = stdio::find_port(SETTINGS_PORT_NAME).filter(|n| n.exists()) {
            return Ok(node);
        }
        if Instant::now() >= deadline {
            return Err(Error::Internal(format!(
                "the host's {SETTINGS_PORT_NAME} port did not appear"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, acpi: bool, bound: bool) -> Slot {
        Slot {
            name: name.into(),
            acpi,
            bound,
        }
    }

    fn names<'a>(slots: impl Iterator<Item = &'a Slot>) -> Vec<&'a str> {
        slots.map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn virtio_mmio_slots_are_told_by_their_modalias() {
        assert_eq!(slot_kind("platform:virtio-mmio"), Some(false));
        assert_eq!(slot_kind("acpi:LNRO0005:"), Some(true));
        assert_eq!(slot_kind("platform:serial8250"), None);
        assert_eq!(slot_kind("acpi:PNP0501:"), None);
        assert_eq!(slot_kind("platform:virtio-mmio-x"), None);
    }

    #[test]
    fn a_slot_is_read_from_its_sysfs_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("virtio-mmio.3");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("modalias"), "platform:virtio-mmio\n").unwrap();
        assert_eq!(Slot::read(&path), Some(slot("virtio-mmio.3", false, false)));
        std::fs::create_dir(path.join("driver")).unwrap();
        assert!(Slot::read(&path).unwrap().bound);
        std::fs::write(path.join("modalias"), "platform:i8042\n").unwrap();
        assert_eq!(Slot::read(&path), None);
        assert_eq!(Slot::read(&dir.path().join("absent")), None);
    }

    #[test]
    fn only_the_empty_slots_of_the_binding_kind_are_probed() {
        // The DSDT's twins hold the console and the RNG; slot 00 is a disk's, still empty.
        let slots = [
            slot("LNRO0005:00", true, false),
            slot("LNRO0005:01", true, true),
            slot("LNRO0005:02", true, true),
            slot("virtio-mmio.0", false, false),
            slot("virtio-mmio.1", false, false),
            slot("virtio-mmio.2", false, false),
        ];
        assert_eq!(names(empty_slots(&slots)), ["LNRO0005:00"]);
        // Without ACPI the command line's slots bind.
        let slots = [
            slot("virtio-mmio.0", false, false),
            slot("virtio-mmio.1", false, true),
        ];
        assert_eq!(names(empty_slots(&slots)), ["virtio-mmio.0"]);
        // Nothing bound yet (every device is the run's): the DSDT's slots come first at boot.
        let slots = [
            slot("LNRO0005:00", true, false),
            slot("virtio-mmio.0", false, false),
        ];
        assert_eq!(names(empty_slots(&slots)), ["LNRO0005:00"]);
    }
}
