//! Bytes between the rings and the host: control messages read and written, and pending input
//! put into receive buffers (transmit chains go through `../tx.rs`).

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::super::control::{self, Message};
use super::super::input::PortInput;
use super::QUEUE_SIZE;
use crate::virtio::chain::{
    next_chain_or_rearm, readable_chain, used_len, writable_chain, ChainError,
};

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
