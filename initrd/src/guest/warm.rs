//! Warm start, the guest's side: the init stops at the snapshot point before anything of this
//! run is known, and learns the run afterwards.
//!
//! With `kvmbuild.warm` on the command line the init loads every module but `virtio_mmio`
//! (the virtio drivers register, but no device exists for them yet), writes the snapshot port,
//! then loads `virtio_mmio`: the devices appear, fresh, with this run's disks, shares and
//! streams behind them. The run's settings (command, environment, shares, clock, seed) arrive
//! as the contents of the [`SETTINGS_PORT_NAME`] console port, read to its end. The same
//! init, kernel and memory size thus serve any number of runs from one snapshot.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{stdio, sys, Error, Log};
use crate::config::{Config, SETTINGS_PORT_NAME};
use crate::modules::LoadEntry;

/// The transport module, loaded only after the snapshot point.
const TRANSPORT_MODULE: &str = "virtio_mmio";
/// A bound on the settings: far more than any command line and environment.
const MAX_SETTINGS: u64 = 4 << 20;

/// Whether `entry` is the virtio-mmio transport module.
pub fn is_transport(entry: &LoadEntry) -> bool {
    Path::new(&entry.path)
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .is_some_and(|stem| stem.replace('-', "_") == TRANSPORT_MODULE)
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

    fn entry(path: &str) -> LoadEntry {
        crate::modules::parse_load_list(path).remove(0)
    }

    #[test]
    fn only_the_transport_waits_for_the_snapshot_point() {
        assert!(is_transport(&entry(
            "/lib/modules/6.1.0/kernel/drivers/virtio/virtio_mmio.ko.xz"
        )));
        assert!(is_transport(&entry("/m/virtio_mmio.ko")));
        assert!(!is_transport(&entry("/m/virtio_blk.ko.xz")));
        assert!(!is_transport(&entry("/m/virtio.ko")));
    }
}
