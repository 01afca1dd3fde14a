//! The descriptor-chain walk over arbitrary ring contents: `Chain::walk`, `check_memory`, the
//! status-byte lookup, `sub_range`, the read stream and virtio-queue's Writer over a walked
//! chain, and the standard queue loop.

#![no_main]

use arbitrary::Arbitrary;
use std::io::Write;

use devices::virtio::fuzzing::{
    drain_queue, next_chain, read_stream, sub_range, writer, Chain, ChainError,
};
use devices::virtio::Interrupt;
use kvmbuild_fuzz::{memory, Ring};
use libfuzzer_sys::fuzz_target;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

#[derive(Arbitrary, Debug)]
struct Input {
    ring: Ring,
    max_descriptors: u16,
    drain: bool,
    /// A sub-range to cut out of each chain's streams.
    offset: u32,
    len: u16,
    /// Bytes each chain's writable stream receives.
    reply: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let mut queue = input.ring.install(&mem);
    let max = usize::from(input.max_descriptors);
    if input.drain {
        let irq = Interrupt::new().unwrap();
        let mut chains = 0usize;
        let _ = drain_queue(&mut queue, &mem, &irq, |chain| {
            chains += 1;
            assert!(chains <= 1 << 16, "the queue loop does not end");
            serve(&mem, Chain::walk(chain.clone(), max)?, chain, &input)
        });
    } else {
        // At most one queue's worth of chains is published.
        for _ in 0..=input.ring.size() {
            let Ok(Some(chain)) = next_chain(&mut queue, &mem) else {
                break;
            };
            if let Ok(walked) = Chain::walk(chain.clone(), max) {
                let _ = serve(&mem, walked, chain, &input);
            }
        }
    }
});

fn serve(
    mem: &GuestMemoryMmap,
    chain: Chain,
    descriptors: DescriptorChain<&GuestMemoryMmap>,
    input: &Input,
) -> Result<u32, ChainError> {
    assert!(chain.readable.len() + chain.writable.len() <= usize::from(input.max_descriptors));
    let (readable, writable) = (chain.readable_len(), chain.writable_len());
    assert_eq!(
        readable,
        chain.readable.iter().map(|s| u64::from(s.len)).sum::<u64>()
    );

    if let Some(status) = chain.last_writable_byte(mem) {
        assert!(mem.address_in_range(status));
        let last = chain.writable.iter().rev().find(|s| s.len > 0).unwrap();
        assert_eq!(status.0, last.addr.0 + u64::from(last.len) - 1);
    }

    for segments in [&chain.readable, &chain.writable] {
        let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        let (offset, len) = (u64::from(input.offset), u64::from(input.len));
        match sub_range(segments, offset, len) {
            Some(parts) => {
                assert!(offset + len <= total);
                assert_eq!(parts.iter().map(|s| u64::from(s.len)).sum::<u64>(), len);
            }
            None => assert!(
                offset + len > total
                    || segments
                        .iter()
                        .any(|s| s.addr.0.checked_add(u64::from(s.len)).is_none())
            ),
        }
    }

    if chain.check_memory(mem).is_err() {
        return Ok(0);
    }
    let mut buf = vec![0u8; readable.min(64 << 10) as usize];
    read_stream(mem, &chain.readable, &mut buf).map_err(|_| ChainError::Memory)?;
    let mut out = writer(mem, descriptors)?;
    let n = out.write(&input.reply).map_err(|_| ChainError::Memory)?;
    assert_eq!(n as u64, writable.min(input.reply.len() as u64));
    Ok(n as u32)
}
