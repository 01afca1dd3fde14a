//! virtio-rng (device id 4): fills the guest's buffers with bytes from the host's
//! `getrandom(2)`. The guest sees it as `/dev/hwrng`.

use std::io::{self, Write};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::chain::{used_len, writable_chain, ChainError};
use super::worker::{RequestHandler, SingleQueueWorker};
use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, DeviceWorker, VirtioDevice,
};

/// Entries in the request queue.
const QUEUE_SIZE: u16 = 64;
/// Bytes handed out per request at most; the driver asks again for more.
const MAX_FILL: usize = 64 << 10;

/// Errors from the entropy source.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// `getrandom` failed.
    #[error("getrandom failed")]
    Getrandom(#[source] io::Error),
    /// The request's chain is broken or points outside guest memory.
    #[error("bad request")]
    Chain(#[from] ChainError),
}

/// The virtio-rng device model.
#[derive(Debug, Default)]
pub struct Rng;

impl Rng {
    /// An entropy device.
    pub fn new() -> Self {
        Self
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        Ok(Box::new(SingleQueueWorker::new(Entropy::default(), a)?))
    }
}

/// The running device's request handler, with a buffer reused across requests.
#[derive(Default)]
struct Entropy {
    buf: Vec<u8>,
}

impl RequestHandler for Entropy {
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, ChainError> {
        fill(mem, chain, &mut self.buf)
    }
}

/// Fills the writable buffers of one request; returns the bytes written.
fn fill(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut Vec<u8>,
) -> Result<u32, ChainError> {
    let mut writer = writable_chain(mem, chain, usize::from(QUEUE_SIZE))?;
    buf.resize(writer.available_bytes().min(MAX_FILL), 0);
    if getrandom(buf).is_err() {
        // Nothing written: the driver sees an empty answer and asks again.
        return Ok(0);
    }
    let written = writer.write(buf).map_err(|_| ChainError::Memory)?;
    used_len(written)
}

/// Fills `buf` from the kernel's random pool.
pub fn getrandom(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe the writable slice `rest`, which outlives
        // the call; getrandom writes at most `rest.len()` bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(RngError::Getrandom(e));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{Driver, DATA, R, W};
    use crate::virtio::MmioError;

    const FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX;

    fn rng() -> Driver {
        let d = Driver::new(Box::new(Rng::new()));
        d.init(FEATURES, &[16]);
        d
    }

    #[test]
    fn fills_buffers_with_random_bytes() {
        let d = rng();
        d.push(0, &[(DATA, 16, W), (DATA + 0x1000, 48, W)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 1), (0, 64));
        let a = d.get(DATA, 16);
        let b = d.get(DATA + 0x1000, 48);
        assert!(a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0));
        // A second request gets different bytes.
        d.push(0, &[(DATA + 0x2000, 16, W)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 2), (2, 16));
        assert_ne!(d.get(DATA + 0x2000, 16), a);
    }

    #[test]
    fn a_restored_device_goes_on_where_it_stood() {
        let d = rng();
        d.push(0, &[(DATA, 16, W)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 1), (0, 16));
        // Published but not yet kicked when the snapshot is taken.
        d.push(0, &[(DATA + 0x1000, 8, W)]);
        let state = d.save();
        let running = state.running.as_ref().unwrap();
        assert_eq!(
            (running.queues[0].next_avail, running.queues[0].next_used),
            (1, 1)
        );
        let d = d.restore(Box::new(Rng::new()), &state).unwrap();
        assert!(d.is_active());
        // The restored device serves what was waiting, then goes on: nothing is served twice.
        assert_eq!(d.wait_used(0, 2), (1, 8));
        d.push(0, &[(DATA + 0x2000, 4, W)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 3), (2, 4));
    }

    #[test]
    fn a_saved_state_fits_only_its_own_device() {
        let d = rng();
        let mut state = d.save();
        state.device_type = 3;
        let refused = d.restore(Box::new(Rng::new()), &state).err().unwrap();
        assert!(
            matches!(refused, MmioError::Mismatch("device type")),
            "{refused}"
        );
    }

    #[test]
    fn large_requests_are_capped() {
        let d = rng();
        d.push(0, &[(DATA, 1 << 20, W)]);
        d.kick(0);
        assert_eq!(d.wait_used(0, 1), (0, MAX_FILL as u32));
    }

    #[test]
    fn hostile_requests_mark_needs_reset() {
        for bad in [
            vec![(DATA, 16, R)],
            vec![(crate::virtio::testing::MEM_SIZE - 8, 16, W)],
        ] {
            let d = rng();
            d.push(0, &bad);
            d.kick(0);
            assert!(d.wait_needs_reset());
            // The queue is dead until reset; then the device works again.
            d.reset();
            d.init(FEATURES, &[16]);
            d.push(0, &[(DATA, 8, W)]);
            d.kick(0);
            assert_eq!(d.wait_used(0, 1), (0, 8));
        }
    }
}
