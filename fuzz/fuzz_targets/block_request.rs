//! virtio-blk request parsing and handling: arbitrary request chains (headers, data segments,
//! discard/write-zeroes segment lists, status bytes anywhere) served synchronously against
//! small read-write and read-only images.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use devices::virtio::fuzzing::{next_chain, serve_block_request, Chain};
use devices::virtio::Block;
use kvmbuild_fuzz::{memory, scratch_file, Ring};
use libfuzzer_sys::fuzz_target;

/// Sectors in each image.
const SECTORS: u64 = 64;

/// A writable and a read-only image, each opened once (their files are unlinked at once).
fn images() -> &'static (Block, Block) {
    static IMAGES: OnceLock<(Block, Block)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let open = |name: &str, read_only: bool| {
            let path = scratch_file(name, (SECTORS * 512) as usize);
            let block = Block::new(&path, read_only).unwrap();
            std::fs::remove_file(&path).unwrap();
            block
        };
        (open("rw.img", false), open("ro.img", true))
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    /// The driver's features: FLUSH (bit 9), DISCARD (13), WRITE_ZEROES (14) matter.
    features: u16,
    ring: Ring,
}

fuzz_target!(|input: Input| {
    let (rw, ro) = images();
    let block = if input.read_only { ro } else { rw };
    assert_eq!(block.capacity(), SECTORS);
    let mem = memory();
    let mut queue = input.ring.install(&mem);
    for _ in 0..=input.ring.size() {
        let Ok(Some(chain)) = next_chain(&mut queue, &mem) else {
            break;
        };
        // Walk a copy first: what the device answers must agree with the chain's shape.
        let walked = Chain::walk(chain.clone(), 256);
        match serve_block_request(block, u64::from(input.features), &mem, chain) {
            Ok(written) => {
                let walked = walked.expect("a served chain walks");
                // Data plus the status byte, never more than the driver offered.
                assert!(written >= 1);
                assert!(u64::from(written) <= walked.writable_len());
            }
            // The device must then be reset; stop as the worker does.
            Err(_) => break,
        }
    }
});
