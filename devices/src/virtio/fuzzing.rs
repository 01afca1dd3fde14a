//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default).
//!
//! The descriptor-chain code and virtio-blk's request handler are private to this crate: the
//! VMM reaches them only through the MMIO transport and the device thread. The fuzz targets
//! call them directly and synchronously, through this module, so each input runs the same code
//! a guest request would without waiting on another thread. Nothing here is for the VMM.

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::block::Block;
pub use super::chain::{
    drain_queue, next_chain, read_stream, readable_chain, reader, sub_range, writable_chain,
    writer, Chain, ChainError, Segment,
};

/// Serves one virtio-blk request chain on `block` as a device that negotiated `features` would
/// (only `VIRTIO_BLK_F_FLUSH`, `_DISCARD` and `_WRITE_ZEROES` matter): returns the bytes
/// written into the chain, status byte included, or the error that marks the device as needing
/// reset.
pub fn serve_block_request(
    block: &Block,
    features: u64,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<u32, ChainError> {
    block.disk(features).serve(mem, chain)
}
