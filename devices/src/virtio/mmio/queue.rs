//! One queue's settings as the driver writes them, and the live queue built from them.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::MmioError;
use crate::virtio::state::QueueRegisters;

/// The driver's settings for one queue, as written to the registers.
#[derive(Clone, Debug)]
pub(super) struct QueueConfig {
    pub(super) max_size: u16,
    pub(super) size: u32,
    pub(super) ready: bool,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
}

impl QueueConfig {
    pub(super) fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// The registers, for a snapshot.
    pub(super) fn registers(&self) -> QueueRegisters {
        QueueRegisters {
            size: self.size,
            ready: self.ready,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    /// The registers as a snapshot saved them.
    pub(super) fn set_registers(&mut self, saved: &QueueRegisters) {
        self.size = saved.size;
        self.ready = saved.ready;
        self.desc = saved.desc;
        self.avail = saved.avail;
        self.used = saved.used;
    }

    /// A live queue from these settings, if the driver's values are valid for `mem`.
    pub(super) fn build(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, MmioError> {
        if !self.ready {
            return Err(MmioError::QueueNotReady(index));
        }
        let mut queue = Queue::new(self.max_size).map_err(|_| MmioError::QueueSize(index))?;
        let size = u16::try_from(self.size).map_err(|_| MmioError::QueueSize(index))?;
        queue
            .try_set_size(size)
            .map_err(|_| MmioError::QueueSize(index))?;
        let address = |_| MmioError::QueueAddress(index);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(address)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(address)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .map_err(address)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(MmioError::QueueAddress(index));
        }
        Ok(queue)
    }
}
