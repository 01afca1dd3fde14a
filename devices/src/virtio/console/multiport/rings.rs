//! Bytes between the rings and the host: transmit chains copied to a port's output, control
//! messages read and written, and pending input put into receive buffers.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::super::control::{self, Message};
use super::super::input::PortInput;
use super::super::output::Output;
use super::QUEUE_SIZE;
use crate::virtio::chain::{
    next_chain_or_rearm, read_stream, readable_chain, sub_range, used_len, writable_chain, Chain,
    ChainError, Segment,
};

/// A transmit chain being copied to the port's output.
pub(super) struct TxChain {
    pub(super) head: u16,
    segments: Vec<Segment>,
    len: u64,
    /// Bytes already handed to the output.
    done: u64,
}

impl TxChain {
    pub(super) fn new(
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
    pub(super) fn copy_out(
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

/// Reads one control message from a driver's chain; `None` when it is too short to be one.
pub(super) fn read_control(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Option<Message>, ChainError> {
    let mut reader = readable_chain(mem, chain, usize::from(QUEUE_SIZE))?;
    if reader.available_bytes() < control::HEADER_LEN {
        return Ok(None);
    }
    let mut header = [0u8; control::HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| ChainError::Memory)?;
    Ok(Message::decode(&header))
}

/// Writes `bytes` into a chain of device-writable buffers, as far as they fit; returns how
/// many were written.
pub(super) fn write_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    bytes: &[u8],
) -> Result<u32, ChainError> {
    let mut writer = writable_chain(mem, chain, usize::from(QUEUE_SIZE))?;
    let n = writer.write(bytes).map_err(|_| ChainError::Memory)?;
    used_len(n)
}

/// Moves `input.pending` into the receive queue's buffers while there are some.
pub(super) fn fill_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    input: &mut PortInput,
    used_any: &mut bool,
) -> Result<(), ChainError> {
    while !input.pending.is_empty() {
        let Some(chain) = next_chain_or_rearm(queue, mem)? else {
            return Ok(());
        };
        let head = chain.head_index();
        let n = write_chain(mem, chain, input.pending.make_contiguous())?;
        input.pending.drain(..n as usize);
        queue.add_used(mem, head, n).map_err(|_| ChainError::Ring)?;
        *used_any = true;
    }
    Ok(())
}
