//! Snapshots of a booted VM, saved once and restored for every later run.
//!
//! A snapshot is taken at a point the guest chooses, by writing to kvmbuild's snapshot port
//! ([`abi::ports::SNAPSHOT`]). kvmbuild's init does it once its virtio-console, virtio-rng
//! and virtio-fs shares are bound and the console's ports set up, before it mounts a share,
//! and before it probes the run's disks, which the VM shows as empty slots until then
//! ([`VmConfig::defer_per_run`](crate::vm::VmConfig::defer_per_run)). The snapshot keeps each
//! transport's registers and each running device's queue positions and own state
//! ([`devices::virtio::state`]), saved with the device thread held still until the memory is
//! saved too. A restored VM's console, RNG and shares go on where they stood, behind this
//! run's streams and virtiofsd daemons; its disks are fresh devices on this run's files.
//! [`Vm::save_snapshot`] refuses a device it cannot save (a share the guest has used,
//! a port's output still waiting for its reader, hvc0).
//!
//! On disk a snapshot is a directory:
//!
//! | file     | content |
//! |----------|---------|
//! | `state`  | `KVMBSNAP`, the format version (u32 LE), the SHA-256 of the payload, then the payload: [`SavedState`] (vCPUs, VM, COM1, virtio devices) encoded with postcard |
//! | `memory` | guest RAM as a sparse file: the non-zero pages at their offsets in the guest memory file |
//! | `hot`    | optional, added later: `KVMBHOT1`, then the memory file offsets (u64 LE) of the blocks the first restored run touched, in the order it touched them ([`on_demand`]) |
//!
//! It is written to a temporary directory and renamed into place, so readers see a whole
//! snapshot or none. A snapshot whose magic, version, hash, memory checksum, memory size or
//! vCPU count does not match is refused with [`SnapshotError`]; the caller then boots cold.
//! The memory checksum is compared before the guest resumes, or, when the owner holds the
//! run's input back until it passed, beside the guest ([`check`]): either way no run's
//! command starts from a damaged snapshot.
//! The hot list is a hint for what to copy ahead of the guest: it selects which of the snapshot's pages
//! are placed early, never what they hold, so it carries no checksum, and one that does not
//! parse is ignored.
//!
//! [`Vm::save_snapshot`]: crate::vm::Vm::save_snapshot

pub mod check;
pub mod cpu;
pub mod memory;
pub mod on_demand;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use cpu::{VcpuState, VmState};

/// The first bytes of a state file.
const MAGIC: &[u8; 8] = b"KVMBSNAP";
/// The layout of [`SavedState`]; a snapshot of another version is never restored.
pub const FORMAT_VERSION: u32 = 4;
/// The state file's name in a snapshot directory.
const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
const MEMORY_FILE: &str = "memory";
/// A bound on the state file: a few KiB per vCPU, far below this for any supported count.
const MAX_STATE_BYTES: u64 = 64 << 20;
/// The hot list's name in a snapshot directory.
const HOT_FILE: &str = "hot";
/// The first bytes of a hot list.
const HOT_MAGIC: &[u8; 8] = b"KVMBHOT1";

/// Errors from saving or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed.
    #[error("cannot {what}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A file operation failed.
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The snapshot is damaged or not kvmbuild's.
    #[error("the snapshot is damaged: {0} does not match")]
    Corrupt(&'static str),
    /// The snapshot was written by another format version.
    #[error("the snapshot has format version {0}; this kvmbuild reads version {FORMAT_VERSION}")]
    Version(u32),
    /// The snapshot is of another machine.
    #[error("the snapshot is of a guest with {what} {saved}, not {wanted}")]
    Mismatch {
        what: &'static str,
        saved: u64,
        wanted: u64,
    },
    /// The snapshot was made for another kernel, initrd or device set.
    #[error("the snapshot was made for other settings")]
    KeyMismatch,
    /// A virtio device cannot be saved as it stands.
    #[error("cannot save the virtio devices")]
    Device(#[source] devices::virtio::SaveError),
    /// The saved virtio devices do not fit this VM's.
    #[error("cannot restore the virtio devices")]
    Devices(#[source] devices::virtio::MmioError),
    /// No vCPU state to save: a vCPU is running or did not come back.
    #[error("the vCPUs are not stopped")]
    VcpusRunning,
    /// The VM's memory is still being served from another snapshot: its memory file lacks
    /// the pages the guest has not touched yet.
    #[error("a VM restored from a snapshot is not saved again")]
    ServedOnDemand,
    /// Guest memory is not backed by a file (it always is in kvmbuild).
    #[error("guest memory is not backed by a file")]
    MemoryNotAFile,
    /// The state could not be encoded or decoded.
    #[error("cannot encode or decode the state: {0}")]
    Encoding(postcard::Error),
    /// An MSR list could not be built.
    #[error("too many MSRs")]
    Msrs,
    /// KVM refused an MSR the snapshot holds.
    #[error("KVM refused to restore MSR {0:#x}")]
    MsrRefused(u32),
    /// A CPUID list could not be built.
    #[error("too many CPUID entries")]
    Cpuid,
    /// This host's KVM would give the vCPUs another CPUID than the saved guest saw (another
    /// processor, or another host kernel): the guest may use what this host does not offer.
    #[error("it was made on a host whose processor (as KVM offers it) differs from this one's")]
    OtherHostCpu,
}

/// How a snapshot encodes vm-superio's `SerialState` (a type of another crate, without serde):
/// serde's remote derive, which checks these fields against the original's.
#[derive(Serialize, Deserialize)]
#[serde(remote = "devices::serial::SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Everything in a snapshot but guest RAM.
#[derive(Serialize, Deserialize)]
pub struct SavedState {
    /// What the snapshot is for (the caller's key: kernel, initrd, command line, devices).
    pub key: String,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The VM's interrupt controllers, clock and PIT.
    pub vm: VmState,
    /// COM1's registers.
    #[serde(with = "SerialStateDef")]
    pub serial: devices::serial::SerialState,
    /// Each virtio-mmio transport, in guest-visible order, with its device's state when a
    /// driver had started it.
    pub virtio: Vec<devices::virtio::TransportState>,
    /// The checksum of the memory file's pages (see [`memory`]).
    pub memory_crc: u32,
    /// What the saving host's KVM offered (`KVM_GET_SUPPORTED_CPUID`). The vCPUs' CPUID is
    /// restored as saved, so a host that offers anything else (another processor, another
    /// host kernel) must not restore it.
    pub host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

/// A snapshot read from disk, its state checked; its memory is checked as it is restored.
pub struct Snapshot {
    /// The state.
    pub state: SavedState,
    /// The memory file.
    pub memory: File,
    /// The hot list: memory file offsets to copy ahead of the guest, first first (empty when
    /// the snapshot has none yet).
    pub hot: Vec<u64>,
}

impl Snapshot {
    /// Reads the snapshot in `dir`, refusing one that is damaged, of another format version,
    /// or made for another `key`.
    pub fn open(dir: &Path, key: &str) -> Result<Snapshot, SnapshotError> {
        let state = read_state(&dir.join(STATE_FILE))?;
        if state.key != key {
            return Err(SnapshotError::KeyMismatch);
        }
        let memory = File::open(dir.join(MEMORY_FILE))
            .map_err(|e| SnapshotError::Io("open the memory file", e))?;
        let hot = read_hot_list(&dir.join(HOT_FILE), state.mem_size);
        Ok(Snapshot { state, memory, hot })
    }

    /// Whether the snapshot in `dir` has a hot list yet.
    pub fn has_hot_list(dir: &Path) -> bool {
        dir.join(HOT_FILE).exists()
    }

    /// Refuses a snapshot of a guest with another memory size or vCPU count.
    pub fn check_machine(&self, mem_size: u64, vcpus: u8) -> Result<(), SnapshotError> {
        let mismatch = |what, saved, wanted| SnapshotError::Mismatch {
            what,
            saved,
            wanted,
        };
        if self.state.mem_size != mem_size {
            return Err(mismatch(
                "memory size (MiB)",
                self.state.mem_size >> 20,
                mem_size >> 20,
            ));
        }
        let saved_vcpus = self.state.vcpus.len() as u64;
        if saved_vcpus != u64::from(vcpus) {
            return Err(mismatch("vCPU count", saved_vcpus, u64::from(vcpus)));
        }
        Ok(())
    }
}

fn read_state(path: &Path) -> Result<SavedState, SnapshotError> {
    let file = File::open(path).map_err(|e| SnapshotError::Io("open the state file", e))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_STATE_BYTES), &mut bytes)
        .map_err(|e| SnapshotError::Io("read the state file", e))?;
    decode_state(&bytes)
}

fn decode_state(bytes: &[u8]) -> Result<SavedState, SnapshotError> {
    let header = MAGIC.len() + 4 + 32;
    if bytes.len() < header || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::Corrupt("the state file's magic"));
    }
    let version_bytes: [u8; 4] = bytes[MAGIC.len()..MAGIC.len() + 4]
        .try_into()
        .map_err(|_| SnapshotError::Corrupt("the state file's header"))?;
    let version = u32::from_le_bytes(version_bytes);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version(version));
    }
    let (hash, payload) = bytes[MAGIC.len() + 4..].split_at(32);
    if Sha256::digest(payload).as_slice() != hash {
        return Err(SnapshotError::Corrupt("the state file's hash"));
    }
    postcard::from_bytes(payload).map_err(SnapshotError::Encoding)
}

fn encode_state(state: &SavedState) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(state).map_err(SnapshotError::Encoding)?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + 32 + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&Sha256::digest(&payload));
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Writes a snapshot into `dir` (which must not exist) through a temporary sibling renamed
/// into place. `write_memory` fills the memory file and returns its checksum, which goes into
/// the state. If another process put a snapshot at `dir` first, that one is kept.
pub fn write(
    dir: &Path,
    mut state: SavedState,
    write_memory: impl FnOnce(&File) -> Result<u32, SnapshotError>,
) -> Result<(), SnapshotError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| SnapshotError::Io("create the snapshot directory", e))?;
    let tmp = temporary_sibling(dir);
    std::fs::create_dir(&tmp).map_err(|e| SnapshotError::Io("create the snapshot directory", e))?;
    let result = (|| {
        let memory = File::create(tmp.join(MEMORY_FILE))
            .map_err(|e| SnapshotError::Io("create the memory file", e))?;
        state.memory_crc = write_memory(&memory)?;
        let mut file = File::create(tmp.join(STATE_FILE))
            .map_err(|e| SnapshotError::Io("create the state file", e))?;
        file.write_all(&encode_state(&state)?)
            .map_err(|e| SnapshotError::Io("write the state file", e))?;
        std::fs::rename(&tmp, dir).map_err(|e| SnapshotError::Io("move the snapshot into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process finished the same snapshot first: theirs is as good.
        if dir.join(STATE_FILE).exists() {
            return Ok(());
        }
    }
    result
}

/// Gives the snapshot in `dir` a hot list: `blocks` (memory file offsets, in the order a
/// restored run touched them; repeats after the first are dropped). Written to a temporary
/// file and renamed into place, so a reader sees all of it or nothing.
pub fn write_hot_list(dir: &Path, blocks: &[u64]) -> Result<(), SnapshotError> {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = HOT_MAGIC.to_vec();
    for block in blocks.iter().filter(|b| seen.insert(**b)) {
        bytes.extend_from_slice(&block.to_le_bytes());
    }
    let tmp = temporary_sibling(&dir.join(HOT_FILE));
    let result = std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, dir.join(HOT_FILE)))
        .map_err(|e| SnapshotError::Io("write the hot list", e));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The hot list at `path`, for guest memory of `mem_size` bytes: empty when there is none or
/// it does not parse, and never longer than one entry per 4 KiB of guest memory.
fn read_hot_list(path: &Path, mem_size: u64) -> Vec<u64> {
    let bound = HOT_MAGIC.len() as u64 + mem_size / 4096 * 8;
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if std::io::Read::read_to_end(&mut std::io::Read::take(file, bound + 1), &mut bytes).is_err() {
        return Vec::new();
    }
    parse_hot_list(&bytes, bound, mem_size)
}

fn parse_hot_list(bytes: &[u8], bound: u64, mem_size: u64) -> Vec<u64> {
    let Some(entries) = bytes.strip_prefix(HOT_MAGIC.as_slice()) else {
        return Vec::new();
    };
    if bytes.len() as u64 > bound || entries.len() % 8 != 0 {
        return Vec::new();
    }
    entries
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()))
        .filter(|&offset| offset < mem_size)
        .collect()
}

fn temporary_sibling(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SavedState {
        SavedState {
            key: "k".into(),
            mem_size: 64 << 20,
            vcpus: Vec::new(),
            vm: VmState {
                irqchips: Vec::new(),
                clock: Default::default(),
                pit: None,
            },
            serial: devices::serial::SerialState::default(),
            virtio: vec![transport()],
            memory_crc: 7,
            host_cpuid: Vec::new(),
        }
    }

    /// A running virtio-rng's transport.
    fn transport() -> devices::virtio::TransportState {
        use devices::virtio::state::QueueRegisters;
        use devices::virtio::{DeviceState, QueueProgress, WorkerState};
        devices::virtio::TransportState {
            device_type: 4,
            status: 0xf,
            queue_sel: 0,
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            queues: vec![QueueRegisters {
                size: 128,
                ready: true,
                desc: 0x1000,
                avail: 0x2000,
                used: 0x3000,
            }],
            interrupt_status: 1,
            running: Some(WorkerState {
                queues: vec![QueueProgress {
                    next_avail: 65535,
                    next_used: 3,
                }],
                device: DeviceState::Stateless,
            }),
        }
    }

    #[test]
    fn state_round_trips_and_damage_is_caught() {
        let bytes = encode_state(&state()).unwrap();
        let back = decode_state(&bytes).unwrap();
        assert_eq!(back.virtio, vec![transport()]);
        assert_eq!(
            (back.key.as_str(), back.mem_size, back.memory_crc),
            ("k", 64 << 20, 7)
        );
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode_state(&flipped),
            Err(SnapshotError::Corrupt(_))
        ));
        let mut other_version = bytes.clone();
        other_version[8] = 9;
        assert!(matches!(
            decode_state(&other_version),
            Err(SnapshotError::Version(9))
        ));
        assert!(matches!(
            decode_state(b"short"),
            Err(SnapshotError::Corrupt(_))
        ));
    }

    #[test]
    fn a_hot_list_round_trips_and_a_bad_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write_hot_list(dir.path(), &[0x20000, 0x10000, 0x20000, 0x30000]).unwrap();
        let path = dir.path().join(HOT_FILE);
        assert_eq!(
            read_hot_list(&path, 1 << 20),
            vec![0x20000, 0x10000, 0x30000]
        );
        // Offsets past guest memory are dropped; a list longer than guest memory has pages,
        // cut short, or of another format is ignored.
        assert_eq!(read_hot_list(&path, 0x20000), vec![0x10000]);
        assert!(read_hot_list(&path, 8192).is_empty());
        let bytes = std::fs::read(&path).unwrap();
        assert!(parse_hot_list(&bytes[..bytes.len() - 1], 1 << 20, 1 << 20).is_empty());
        assert!(parse_hot_list(b"KVMBHOT2", 1 << 20, 1 << 20).is_empty());
        assert!(read_hot_list(&dir.path().join("none"), 1 << 20).is_empty());
    }

    #[test]
    fn snapshots_are_written_whole_and_opened_by_key() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        write(&dir, state(), |file| {
            file.set_len(64 << 20).unwrap();
            Ok(42)
        })
        .unwrap();
        let snap = Snapshot::open(&dir, "k").unwrap();
        assert_eq!(snap.state.memory_crc, 42);
        assert!(matches!(
            Snapshot::open(&dir, "other"),
            Err(SnapshotError::KeyMismatch)
        ));
        assert!(snap.check_machine(64 << 20, 0).is_ok());
        assert!(matches!(
            snap.check_machine(128 << 20, 0),
            Err(SnapshotError::Mismatch { .. })
        ));
        // Nothing temporary is left beside it.
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
    }
}
