//! Warm start, the guest's side: the init stops at the snapshot point before anything of this
//! run is known, and learns the run afterwards.
//!
//! With `kvmbuild.warm` on the command line the init loads every module, `virtio_mmio`
//! included, and waits until the virtio-console has handed over all of its ports
//! ([`wait_for_console`]); the console and the RNG are then bound and running. The run's own
//! devices, its disks and shares, read as empty slots (device ID 0) at this point, which the
//! virtio-mmio driver passes over. The init writes the snapshot port; from there on (in the
//! run that saved the snapshot, or in any run restored from it) the host shows this run's
//! disks and shares in those slots, and the init has the driver probe them again
//! ([`probe_run_devices`]). The run's settings (command, environment, shares, clock, seed)
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
/// this run's disks and shares now are. Each probe runs within the write, so the devices
/// exist when this returns (their block devices and tags may still take a moment, which the
/// mounts wait for).
pub fn probe_run_devices(log: &Log) -> Result<(), Error> {
    let entries = std::fs::read_dir(PLATFORM_DEVICES).map_err(|source| Error::ReadConfig {
        path: PLATFORM_DEVICES.into(),
        source,
    })?;
    let mut probed = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join("driver").exists() || !is_virtio_mmio_slot(&dir) {
            continue;
        }
        // A slot that stays empty (a driver that refuses it) is not this step's failure: what
        // needs the device waits for it, with a deadline, and says which is missing.
        let _ = std::fs::write(DRIVERS_PROBE, entry.file_name().as_encoded_bytes());
        probed += 1;
    }
    log.step(format_args!(
        "probed {probed} virtio-mmio slots for this run's devices"
    ));
    Ok(())
}

/// Whether the platform device at `dir` is a virtio-mmio slot: one the kernel command line
/// declared (`virtio-mmio.N`) or the DSDT did (`LNRO0005`).
fn is_virtio_mmio_slot(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("modalias"))
        .is_ok_and(|m| is_virtio_mmio_modalias(m.trim_end()))
}

fn is_virtio_mmio_modalias(modalias: &str) -> bool {
    modalias == "platform:virtio-mmio" || modalias.starts_with("acpi:LNRO0005:")
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

    #[test]
    fn virtio_mmio_slots_are_told_by_their_modalias() {
        assert!(is_virtio_mmio_modalias("platform:virtio-mmio"));
        assert!(is_virtio_mmio_modalias("acpi:LNRO0005:"));
        assert!(!is_virtio_mmio_modalias("platform:serial8250"));
        assert!(!is_virtio_mmio_modalias("acpi:PNP0501:"));
        assert!(!is_virtio_mmio_modalias("platform:virtio-mmio-x"));
    }

    #[test]
    fn only_unbound_virtio_mmio_slots_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modalias"), "platform:virtio-mmio\n").unwrap();
        assert!(is_virtio_mmio_slot(dir.path()));
        std::fs::write(dir.path().join("modalias"), "platform:i8042\n").unwrap();
        assert!(!is_virtio_mmio_slot(dir.path()));
        assert!(!is_virtio_mmio_slot(&dir.path().join("absent")));
    }
}
