//! What a snapshot keeps of a virtio device besides guest memory.
//!
//! The rings and the buffers are in guest memory, which a snapshot keeps whole. The rest is the
//! transport's registers ([`TransportState`]) and, for a device a driver has started, where
//! the device stands in each queue and what it remembers of its own protocol
//! ([`WorkerState`]). Saved with the guest's vCPUs stopped and the device thread held still
//! ([`DeviceThreadHandle::freeze`](super::DeviceThreadHandle::freeze)), these and the memory
//! describe one instant; restored, the device goes on from it without the driver noticing.

use serde::{Deserialize, Serialize};

use super::console::MultiportState;

/// Errors from saving a device.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The device keeps state outside guest memory that kvmbuild does not save (the
    /// single-port console, `run`'s hvc0).
    #[error("a driver runs a virtio device whose state a snapshot cannot keep")]
    Unsupported,
    /// The device is in the middle of something a snapshot cannot hold.
    #[error("the virtio device is busy: {0}")]
    Busy(&'static str),
    /// The guest has used a share: its back end holds the session (FUSE_INIT, the inodes
    /// the guest looked up), which another run's back end would not have.
    #[error("a virtio-fs share was used before the snapshot point; its back end's session cannot be carried over")]
    ShareInUse,
    /// The driver broke the device, which waits for a reset.
    #[error("a virtio device waits for its driver to reset it")]
    NeedsReset,
    /// The device thread did not answer.
    #[error("the virtio device thread did not answer")]
    Thread,
}

/// Where a running device stands in one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProgress {
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
}

/// What a running device remembers beyond its queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// Nothing: the rings say it all (virtio-rng, virtio-blk, virtio-fs).
    Stateless,
    /// A multiport console's handshake, its ports and its unsent control messages.
    Multiport(MultiportState),
}

/// A running device: its queues' positions, in queue order, and its own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Each queue's position.
    pub queues: Vec<QueueProgress>,
    /// The device's own state.
    pub device: DeviceState,
}

/// One queue's registers, as the driver wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    /// QueueNum.
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver (the available ring).
    pub avail: u64,
    /// QueueDevice (the used ring).
    pub used: u64,
}

/// A virtio-mmio transport's registers, and its device's state when a driver started it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device behind it, checked on restore.
    pub device_type: u32,
    /// The device status, as the driver set it.
    pub status: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// Each queue's registers.
    pub queues: Vec<QueueRegisters>,
    /// InterruptStatus bits the driver has not acknowledged.
    pub interrupt_status: u32,
    /// The running device, when the driver set DRIVER_OK.
    pub running: Option<WorkerState>,
}
