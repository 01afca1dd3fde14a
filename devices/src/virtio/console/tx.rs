//! A transmit queue's chains copied into a port's [`Output`], as far as it has room. Both
//! consoles use it: hvc0's single port and each port of the multiport console.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::output::Output;
use super::QUEUE_SIZE;
use crate::virtio::chain::{
    next_chain_or_rearm, read_stream, sub_range, Chain, ChainError, Segment,
};

/// Bytes copied out of the guest per step.
pub(super) const CHUNK: usize = 16 << 10;

/// A transmit chain being copied to the port's output.
pub(super) struct TxChain {
    head: u16,
    segments: Vec<Segment>,
    len: u64,
    /// Bytes already handed to the output.
    done: u64,
}

impl TxChain {
    fn new(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let chain = Chain::walk(chain, usize::from(QUEUE_SIZE))?;
        chain.check_memory(mem)?;
        if !chain.writable.is_empty() {
            // The driver must only offer buffers for the device to read.
            return Err(ChainError::Order);
        }
        Ok(Self {
            head,
            len: chain.readable_len(),
            segments: chain.readable,
            done: 0,
        })
    }

    /// Copies what fits into `output` (everything is dropped without one); true once the
    /// whole chain is copied, false while the output is full.
    fn copy_out(
        &mut self,
        mem: &GuestMemoryMmap,
        output: Option<&Output>,
        scratch: &mut [u8],
    ) -> Result<bool, ChainError> {
        let Some(output) = output else {
            self.done = self.len;
            return Ok(true);
        };
        while self.done < self.len {
            let room = output.reserve();
            if room == 0 {
                return Ok(false);
            }
            let n = usize::try_from(self.len - self.done)
                .unwrap_or(usize::MAX)
                .min(room)
                .min(scratch.len());
            let parts = sub_range(&self.segments, self.done, n as u64).ok_or(ChainError::Memory)?;
            read_stream(mem, &parts, &mut scratch[..n]).map_err(|_| ChainError::Memory)?;
            output.push(&scratch[..n]);
            self.done += n as u64;
        }
        Ok(true)
    }
}

/// One transmit queue's side of a port: the chain waiting for room in the output, if any,
/// and the scratch buffer chains are copied through.
pub(super) struct Transmit {
    waiting: Option<TxChain>,
    scratch: Vec<u8>,
}

impl Transmit {
    pub(super) fn new() -> Self {
        Self {
            waiting: None,
            scratch: vec![0; CHUNK],
        }
    }

    /// True while a chain waits for room in the output.
    pub(super) fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// Copies `queue`'s chains to `output` while it has room, marking each used once all of
    /// it is copied; a chain the output could not take whole waits for the output's room
    /// event. Sets `used_any` when a chain was used.
    pub(super) fn run(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        output: Option<&Output>,
        used_any: &mut bool,
    ) -> Result<(), ChainError> {
        queue
            .disable_notification(mem)
            .map_err(|_| ChainError::Ring)?;
        loop {
            let current = match &mut self.waiting {
                Some(current) => current,
                None => match next_chain_or_rearm(queue, mem)? {
                    Some(chain) => self.waiting.insert(TxChain::new(mem, chain)?),
                    None => return Ok(()),
                },
            };
            if !current.copy_out(mem, output, &mut self.scratch)? {
                return Ok(());
            }
            queue
                .add_used(mem, current.head, 0)
                .map_err(|_| ChainError::Ring)?;
            self.waiting = None;
            *used_any = true;
        }
    }
}
