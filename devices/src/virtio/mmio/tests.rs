//! virtio-mmio transport tests: the test plays the driver through the register window.

use super::*;
use crate::virtio::testing::{Driver, QUEUE_AREA};
use crate::virtio::thread::DeviceThread;
use crate::virtio::{read_config_bytes, ActivateError, DeviceWorker};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;
use virtio_queue::QueueT;

/// A device with two queues that reports its activations, kicks and resets.
struct Dummy {
    log: Sender<String>,
    fail: bool,
    direct_irq: bool,
}

struct DummyWorker {
    events: Vec<EventFd>,
    log: Sender<String>,
}

impl crate::virtio::Worker for DummyWorker {}

impl MutEventSubscriber for DummyWorker {
    fn process(&mut self, events: Events, _: &mut EventOps) {
        let i = events.data() as usize;
        let _ = self.events[i].read();
        let _ = self.log.send(format!("kick {i}"));
    }
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in (0..).zip(&self.events) {
            ops.add(Events::with_data(e, i, EventSet::IN)).unwrap();
        }
    }
}

impl Drop for DummyWorker {
    fn drop(&mut self) {
        let _ = self.log.send("stopped".into());
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | 1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[0xa0, 0xa1, 0xa2, 0xa3, 0xa4], offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        a.expect_queues(2)?;
        let _ = self.log.send(format!(
            "activate sizes {:?} features {:#x}",
            a.queues.iter().map(|(q, _)| q.size()).collect::<Vec<_>>(),
            a.features
        ));
        if self.fail {
            return Err(ActivateError::Io(std::io::Error::other("no")));
        }
        Ok(Box::new(DummyWorker {
            events: a.queues.into_iter().map(|(_, e)| e).collect(),
            log: self.log.clone(),
        }))
    }
    fn reset(&mut self) {
        let _ = self.log.send("reset".into());
    }
    fn signals_irqfd_directly(&self) -> bool {
        self.direct_irq
    }
}

fn dummy(fail: bool) -> (Driver, Receiver<String>) {
    let (log, rx) = channel();
    let dev = Dummy {
        log,
        fail,
        direct_irq: false,
    };
    (Driver::new(Box::new(dev)), rx)
}

fn next(rx: &Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

#[test]
fn identifies_itself() {
    let (d, _) = dummy(false);
    assert_eq!(d.read32(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read32(VERSION_REG), 2);
    assert_eq!(d.read32(DEVICE_ID), 42);
    assert_eq!(d.read32(VENDOR_ID_REG), 0);
    assert_eq!(d.read32(DEVICE_FEATURES), 1 << 3);
    d.write32(DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.read32(DEVICE_FEATURES), 1);
    d.write32(DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.read32(DEVICE_FEATURES), 0);
    d.write32(QUEUE_SEL, 1);
    assert_eq!(d.read32(QUEUE_NUM_MAX), 8);
    d.write32(QUEUE_SEL, 2);
    assert_eq!(d.read32(QUEUE_NUM_MAX), 0);
    assert_eq!(d.read32(SHM_LEN_LOW), u32::MAX);
    assert_eq!(d.read32(CONFIG_GENERATION), 0);
}

#[test]
fn config_space_and_odd_accesses() {
    let (d, _) = dummy(false);
    let mut byte = [0u8; 1];
    d.read(CONFIG + 1, &mut byte);
    assert_eq!(byte, [0xa1]);
    let mut word = [0u8; 4];
    d.read(CONFIG + 2, &mut word);
    assert_eq!(word, [0xa2, 0xa3, 0xa4, 0]);
    // Narrow, wide or misaligned register accesses read as zero and write nothing.
    let mut half = [0xffu8; 2];
    d.read(MAGIC_VALUE, &mut half);
    assert_eq!(half, [0, 0]);
    let mut wide = [0xffu8; 8];
    d.read(MAGIC_VALUE, &mut wide);
    assert_eq!(wide, [0; 8]);
    d.read(MAGIC_VALUE + 1, &mut word);
    assert_eq!(word, [0; 4]);
    d.write(STATUS, &[1]);
    assert_eq!(d.read32(STATUS), 0);
}

#[test]
fn status_steps_must_come_in_order() {
    let (d, _) = dummy(false);
    d.write32(STATUS, status::DRIVER);
    assert_eq!(d.read32(STATUS), 0);
    d.write32(STATUS, status::ACKNOWLEDGE);
    d.write32(STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
    assert_eq!(d.read32(STATUS), status::ACKNOWLEDGE);
    d.write32(STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(d.read32(STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // Clearing a bit without a reset is ignored.
    d.write32(STATUS, status::ACKNOWLEDGE);
    assert_eq!(d.read32(STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // DRIVER_OK before FEATURES_OK is refused.
    d.write32(
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(d.read32(STATUS), status::ACKNOWLEDGE | status::DRIVER);
    d.write32(
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_eq!(d.read32(STATUS) & status::FAILED, status::FAILED);
}

#[test]
fn refuses_features_not_offered_or_without_version_1() {
    let (d, _) = dummy(false);
    assert!(!d.negotiate(1 << 3));
    d.reset();
    assert!(!d.negotiate(features::VERSION_1 | 1 << 4));
    d.reset();
    assert!(d.negotiate(features::VERSION_1 | 1 << 3));
    // Features are fixed once FEATURES_OK is set.
    d.write32(DRIVER_FEATURES_SEL, 0);
    d.write32(DRIVER_FEATURES, 0);
    assert!(d.read32(STATUS) & status::FEATURES_OK != 0);
}

#[test]
fn activates_at_driver_ok_and_routes_kicks() {
    let (d, log) = dummy(false);
    d.init(features::VERSION_1, &[16, 4]);
    assert_eq!(next(&log), "activate sizes [16, 4] features 0x100000000");
    assert!(d.is_active());
    d.kick(1);
    assert_eq!(next(&log), "kick 1");
    // The notify EventFd is what the VMM registers as the ioeventfd.
    d.with(|t| t.queue_notify_events()[0].write(1).unwrap());
    assert_eq!(next(&log), "kick 0");
    // Queue registers are frozen while running.
    d.write32(QUEUE_SEL, 0);
    d.write32(QUEUE_READY, 0);
    assert_eq!(d.read32(QUEUE_READY), 1);
}

#[test]
fn reset_stops_the_worker_and_clears_everything() {
    let (d, log) = dummy(false);
    d.init(features::VERSION_1, &[16, 8]);
    next(&log);
    d.with(|t| t.interrupt.signal_used());
    d.write32(STATUS, 0);
    // The worker is gone by the time the status write returns.
    assert_eq!(log.try_recv().unwrap(), "stopped");
    assert_eq!(log.try_recv().unwrap(), "reset");
    assert_eq!(d.read32(STATUS), 0);
    assert_eq!(d.read32(INTERRUPT_STATUS), 0);
    assert_eq!(d.read32(QUEUE_READY), 0);
    assert!(!d.is_active());
    d.kick(0);
    assert!(log.recv_timeout(Duration::from_millis(50)).is_err());
    // And the device can be brought up again.
    d.init(features::VERSION_1, &[8, 8]);
    assert_eq!(next(&log), "activate sizes [8, 8] features 0x100000000");
}

#[test]
fn invalid_queues_fail_activation_with_needs_reset() {
    type Spoil = (&'static str, fn(&Driver));
    let cases: [Spoil; 5] = [
        ("not ready", |d| {
            d.write32(QUEUE_SEL, 1);
            d.write32(QUEUE_READY, 0);
        }),
        ("size not a power of two", |d| {
            d.write32(QUEUE_SEL, 0);
            d.write32(QUEUE_NUM, 6);
        }),
        ("size above max", |d| {
            d.write32(QUEUE_SEL, 1);
            d.write32(QUEUE_NUM, 16);
        }),
        ("rings outside memory", |d| {
            d.write32(QUEUE_SEL, 0);
            d.write32(QUEUE_USED_HIGH, 0x10);
        }),
        ("misaligned ring", |d| {
            d.write32(QUEUE_SEL, 0);
            d.write32(QUEUE_DESC_LOW, QUEUE_AREA as u32 + 2);
        }),
    ];
    for (what, spoil) in cases {
        let (d, log) = dummy(false);
        assert!(d.negotiate(features::VERSION_1));
        d.setup_queues(&[16, 8]);
        spoil(&d);
        d.driver_ok();
        let s = d.read32(STATUS);
        assert_eq!(s & status::NEEDS_RESET, status::NEEDS_RESET, "{what}");
        assert_eq!(d.read32(INTERRUPT_STATUS), 2, "{what}");
        assert!(!d.is_active(), "{what}");
        assert!(log.try_recv().is_err(), "{what}: device must not start");
        d.reset();
        assert_eq!(d.read32(STATUS), 0);
    }
}

#[test]
fn device_refusal_marks_needs_reset() {
    let (d, log) = dummy(true);
    d.init_unchecked(features::VERSION_1, &[16, 8]);
    next(&log);
    assert!(d.read32(STATUS) & status::NEEDS_RESET != 0);
    assert!(d.with(|t| t.last_error().is_some()));
}

#[test]
fn interrupt_ack_clears_bits() {
    let (d, _) = dummy(false);
    d.with(|t| {
        t.interrupt.signal_used();
        t.interrupt.signal_config();
    });
    assert_eq!(d.read32(INTERRUPT_STATUS), 3);
    d.write32(INTERRUPT_ACK, 1);
    assert_eq!(d.read32(INTERRUPT_STATUS), 2);
    assert_eq!(d.with(|t| t.interrupt_event().read().unwrap()), 2);
}

#[test]
fn dropping_the_transport_stops_its_worker() {
    let thread = DeviceThread::start().unwrap();
    let (log, rx) = channel();
    let dev = Dummy {
        log,
        fail: false,
        direct_irq: false,
    };
    let d = Driver::with_thread(Box::new(dev), &thread);
    d.init(features::VERSION_1, &[16, 8]);
    next(&rx);
    drop(d);
    assert_eq!(next(&rx), "stopped");
    thread.stop().unwrap();
}

#[test]
fn backends_that_signal_the_irqfd_report_used_buffers() {
    let (log, rx) = channel();
    let dev = Dummy {
        log,
        fail: false,
        direct_irq: true,
    };
    let d = Driver::new(Box::new(dev));
    assert_eq!(d.read32(INTERRUPT_STATUS), 0);
    d.init(features::VERSION_1, &[16, 8]);
    next(&rx);
    assert_eq!(d.read32(INTERRUPT_STATUS), 1);
    d.reset();
    assert_eq!(d.read32(INTERRUPT_STATUS), 0);
}

#[test]
fn a_deferred_slot_reads_empty_until_revealed() {
    let (d, log) = dummy(false);
    d.with(|t| t.defer());
    assert_eq!(d.read32(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read32(VERSION_REG), 2);
    // Device ID 0: Linux's virtio-mmio driver passes over the slot.
    assert_eq!(d.read32(DEVICE_ID), 0);
    assert_eq!(d.read32(DEVICE_FEATURES), 0);
    let mut config = [0xffu8; 4];
    d.read(CONFIG, &mut config);
    assert_eq!(config, [0; 4]);
    d.write32(STATUS, status::ACKNOWLEDGE);
    assert_eq!(d.read32(STATUS), 0);
    d.with(|t| t.reveal());
    assert_eq!(d.read32(DEVICE_ID), 42);
    // The write to the empty slot did nothing.
    assert_eq!(d.read32(STATUS), 0);
    d.init(features::VERSION_1, &[16, 8]);
    assert!(next(&log).starts_with("activate"));
}

#[test]
fn a_transport_mid_negotiation_is_restored_as_it_stood() {
    let (d, _) = dummy(false);
    assert!(d.negotiate(features::VERSION_1 | 1 << 3));
    d.write32(QUEUE_SEL, 1);
    let state = d.save();
    assert!(state.running.is_none());
    let (log, _rx) = channel();
    let fresh = Box::new(Dummy {
        log,
        fail: false,
        direct_irq: false,
    });
    let d = d.restore(fresh, &state).unwrap();
    assert_eq!(d.save(), state);
    assert_eq!(d.read32(QUEUE_NUM_MAX), 8, "the selected queue is kept");
    // The driver goes on from FEATURES_OK, with its features kept.
    d.setup_queues(&[16, 8]);
    d.driver_ok();
    assert!(d.is_active());
}
