//! `exec --warm`: which snapshot a run starts from, and the settings it hands to a guest that
//! may be one restored from it.
//!
//! Snapshots live in `$XDG_CACHE_HOME/kvmbuild/snapshots/KEY/`, KEY a hash of everything the
//! saved guest depends on: the kernel file (path and identity), the initrd image (whose name is
//! already the hash of the init and the modules), the command line, the memory size, the vCPU
//! count, the device set (disks with their read-only flags, the number of shares, the console
//! ports), kvmbuild's version and the snapshot format. Everything else about a run (command,
//! environment, working directory, which host directories the shares serve, the clock, a
//! random seed) travels on the settings port after the snapshot point, so one snapshot serves
//! every run with the same key.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vmm::snapshot::{Snapshot, SnapshotError, FORMAT_VERSION};

use super::cache::{self, hex, identity};
use super::options::Plan;

/// How many random bytes each run gives the guest's generator.
const SEED_BYTES: usize = 32;

/// Where a warm run stands.
pub struct Warm {
    /// The snapshot's directory.
    pub dir: PathBuf,
    /// Its key.
    pub key: String,
}

/// `$XDG_CACHE_HOME/kvmbuild/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    cache::xdg_cache_home().join("kvmbuild").join("snapshots")
}

impl Warm {
    /// The snapshot for this plan, initrd image and command line.
    pub fn new(plan: &Plan, initrd: &Path, cmdline: &str, shares: usize) -> Warm {
        let mut h = Sha256::new();
        let kernel = std::fs::canonicalize(&plan.kernel.kernel)
            .unwrap_or_else(|_| plan.kernel.kernel.clone());
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(FORMAT_VERSION.to_le_bytes());
        h.update(kernel.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(identity(&kernel));
        h.update(initrd.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(identity(initrd));
        h.update([0]);
        h.update(cmdline.as_bytes());
        h.update([0]);
        h.update(plan.mem.to_le_bytes());
        h.update([plan.vcpus]);
        h.update((plan.disks.len() as u64).to_le_bytes());
        h.update(
            plan.disks
                .iter()
                .map(|d| u8::from(d.read_only))
                .collect::<Vec<_>>(),
        );
        h.update((shares as u64).to_le_bytes());
        let key = hex(&h.finalize());
        Warm {
            dir: snapshots_dir().join(&key),
            key,
        }
    }

    /// The saved snapshot, if there is a good one. A damaged one (or one a crashed writer
    /// left) is removed, with a warning, so this run saves a new one.
    pub fn saved(&self) -> Option<Snapshot> {
        if !self.dir.exists() {
            return None;
        }
        match Snapshot::open(&self.dir, &self.key) {
            Ok(snapshot) => Some(snapshot),
            Err(e) => {
                self.discard(&e);
                None
            }
        }
    }

    /// Gives the snapshot the blocks a run restored from it faulted in, as its hot list, when
    /// it has none yet: later restores place them ahead of the guest. A hint only (a failure
    /// to write it changes nothing but speed), so nothing is said about it.
    pub fn keep_hot_list(&self, faulted: &[u64]) {
        if faulted.is_empty() || Snapshot::has_hot_list(&self.dir) {
            return;
        }
        let _ = vmm::snapshot::write_hot_list(&self.dir, faulted);
    }

    /// Removes the snapshot after `why` made it unusable, saying so.
    pub fn discard(&self, why: &SnapshotError) {
        eprintln!(
            "kvmbuild: warning: snapshot {} is not usable ({}); booting cold and saving a new one",
            self.dir.display(),
            initrd::guest::error_chain(why)
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The settings port's input for a run restored from a snapshot, and the settings held back
/// until the snapshot's memory has passed its check, which runs beside the guest
/// ([`vmm::snapshot::check`]): the guest settings plus a fresh seed and the host's clock, read
/// as they are released.
pub fn held_settings(
    mut settings: initrd::config::Config,
) -> std::io::Result<(File, vmm::snapshot::check::HeldInput)> {
    settings.seed = seed()?;
    vmm::snapshot::check::HeldInput::pipe(Box::new(move || {
        settings.clock_ns = Some(wall_clock_ns());
        settings.render().into_bytes()
    }))
}

/// Writes this run's settings file into `run_dir` and opens it for the settings port: the
/// guest settings plus the host's clock and a fresh seed.
pub fn settings_file(
    settings: &mut initrd::config::Config,
    run_dir: &Path,
) -> std::io::Result<File> {
    settings.clock_ns = Some(wall_clock_ns());
    settings.seed = seed()?;
    let path = run_dir.join("settings");
    File::create(&path)?.write_all(settings.render().as_bytes())?;
    File::open(&path)
}

fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Fresh random bytes from the host's generator.
fn seed() -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; SEED_BYTES];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes)
}
