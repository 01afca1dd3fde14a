//! The PIO and MMIO buses: address ranges mapped to devices.
//!
//! A vCPU exit names an address; the bus finds the device whose range holds it and hands it the
//! offset within that range. Accesses that hit no device read as all ones and are otherwise
//! ignored, as on real hardware, so a probing guest is never fatal.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes in one address range.
pub trait BusDevice: Send {
    /// Fills `data` from the device at `offset` bytes into its range.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let _ = offset;
    }

    /// Hands `data` written at `offset` bytes into its range to the device.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length.
    #[error("bus range at {0:#x} has zero length")]
    EmptyRange(u64),
    /// A range that would wrap past the top of the address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows")]
    Overflow { base: u64, len: u64 },
    /// A range that overlaps one already on the bus.
    #[error("bus range at {0:#x} overlaps a device already on the bus")]
    Overlap(u64),
}

#[derive(Clone)]
struct Slot {
    len: u64,
    device: SharedDevice,
}

/// An address space of non-overlapping device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let overlaps_below = self
            .slots
            .range(..=base)
            .next_back()
            .is_some_and(|(b, s)| b + s.len > base);
        let overlaps_above = self.slots.range(base..end).next().is_some();
        if overlaps_below || overlaps_above {
            return Err(BusError::Overlap(base));
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    /// The device holding `addr`, and the offset of `addr` within its range.
    fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (base, slot) = self.slots.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < slot.len).then_some((&slot.device, offset))
    }

    /// Reads from the device at `addr`; returns false (and fills `data` with ones) when no
    /// device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose previous user panicked is
/// still better answered than the whole VMM brought down.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_by_offset_within_range() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x105, &mut buf));
        assert_eq!(buf, [5, 5]);
        assert!(bus.write(0x10f, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0xf, vec![7])]);
    }

    #[test]
    fn unmapped_addresses_read_as_ones() {
        let bus = Bus::new();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0x80, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        assert!(!bus.write(0x80, &[1]));
    }

    #[test]
    fn rejects_overlaps_empty_and_wrapping_ranges() {
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(dev(), 0x10f, 1), Err(BusError::Overlap(0x10f)));
        assert_eq!(bus.insert(dev(), 0xf8, 0x10), Err(BusError::Overlap(0xf8)));
        assert_eq!(bus.insert(dev(), 0x0, 0), Err(BusError::EmptyRange(0)));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(dev(), 0x110, 1).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
