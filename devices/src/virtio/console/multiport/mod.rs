//! The multiport console: named generic ports, as Linux's `virtio_console` driver drives them.
//!
//! Queues: port 0's receive and transmit queues are 0 and 1, the control receive queue
//! (c_ivq, device → driver) is 2 and the control transmit queue (c_ovq, driver → device) 3;
//! port N ≥ 1 has queues 2N+2 and 2N+3. The configuration space's `max_nr_ports` is the
//! number of ports.
//!
//! The handshake: the driver sends DEVICE_READY; the device answers DEVICE_ADD for each port;
//! the driver sends PORT_READY for each; the device sends the port's PORT_NAME and PORT_OPEN(1)
//! ("host connected": the guest's writes would block, and its reads end, without it). The
//! driver sends PORT_OPEN(1/0) as the guest opens and closes the port's `/dev/vportNpM`.
//!
//! Input is delivered only while the guest has the port open (a closed generic port drops
//! what arrives). At the input's end of file, once every byte of it is in the guest's receive
//! buffers and marked used, the device sends PORT_OPEN(0): the guest's read then returns 0.
//!
//! Output goes through each port's writer thread ([`Output`]); when its buffer is full, the
//! port's transmit buffers wait in the ring (a partly copied one is remembered) until the
//! writer signals room. When the VM has ended, [`ConsoleFlush`] has the worker write out what
//! is still in the rings as it is dropped, then gives the writers a bounded time to finish.
//!
//! The pieces: this module holds the host side of the ports (kept across resets) and the
//! queue layout; `worker.rs` is the running device (handshake, input, output); `rings.rs`
//! moves bytes between the rings and the host.

use std::sync::{Arc, Mutex};

use super::flush::{ConsoleFlush, FlushState};
use super::input::PortInput;
use super::output::Output;
use super::single::CONFIG_LEN;
use super::{ConsoleError, PortConfig, F_MULTIPORT, QUEUE_SIZE};
use crate::exit::VmExit;
use crate::virtio::{ActivateError, Activation, DeviceWorker};

mod rings;
mod worker;

pub use worker::MultiportState;
use worker::MultiportWorker;

pub(super) const CONTROL_RX: usize = 2;
pub(super) const CONTROL_TX: usize = 3;
/// Event data tag of port N's input descriptor: `INPUT_TAG + N` (queue events use their index).
pub(super) const INPUT_TAG: u32 = 1 << 16;
/// Event data tag of port N's output room event: `ROOM_TAG + N`.
pub(super) const ROOM_TAG: u32 = 2 << 16;

/// What a queue index is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Rx(usize),
    Tx(usize),
    ControlRx,
    ControlTx,
}

pub(super) fn role(queue: usize) -> Role {
    match queue {
        0 => Role::Rx(0),
        1 => Role::Tx(0),
        CONTROL_RX => Role::ControlRx,
        CONTROL_TX => Role::ControlTx,
        q if q % 2 == 0 => Role::Rx(q / 2 - 1),
        q => Role::Tx(q / 2 - 1),
    }
}

pub(super) fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

pub(super) fn tx_queue(port: usize) -> usize {
    rx_queue(port) + 1
}

/// The host side of one port, kept across device resets.
pub(super) struct PortShared {
    pub(super) name: String,
    pub(super) input: Option<Arc<Mutex<PortInput>>>,
    pub(super) output: Option<Output>,
}

/// The host side of a multiport console.
pub(super) struct Ports {
    ports: Vec<PortShared>,
    queue_sizes: Vec<u16>,
    flush: Arc<FlushState>,
}

impl Ports {
    /// Starts the writer thread of each port that has an output.
    pub(super) fn new(
        configs: Vec<PortConfig>,
        exit: Option<Arc<VmExit>>,
    ) -> Result<Self, ConsoleError> {
        let mut ports = Vec::with_capacity(configs.len());
        for config in configs {
            let output = match config.output {
                Some(writer) => Some(Output::start(&config.name, writer, exit.clone())?),
                None => None,
            };
            ports.push(PortShared {
                name: config.name,
                input: config
                    .input
                    .map(|source| Arc::new(Mutex::new(PortInput::new(source)))),
                output,
            });
        }
        let flush = Arc::new(FlushState::new(
            ports.iter().filter_map(|p| p.output.clone()).collect(),
        ));
        Ok(Self {
            queue_sizes: vec![QUEUE_SIZE; 2 * ports.len() + 2],
            ports,
            flush,
        })
    }

    pub(super) fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// cols and rows 0 (no `VIRTIO_CONSOLE_F_SIZE`), max_nr_ports, emerg_wr 0.
    pub(super) fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0; CONFIG_LEN];
        let ports = u32::try_from(self.ports.len()).unwrap_or(u32::MAX); // at most MAX_PORTS
        config[4..8].copy_from_slice(&ports.to_le_bytes());
        config
    }

    pub(super) fn flush_handle(&self) -> ConsoleFlush {
        ConsoleFlush::new(self.flush.clone())
    }

    pub(super) fn activate(&self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        a.expect_queues(self.queue_sizes.len())?;
        if a.features & F_MULTIPORT == 0 {
            return Err(ActivateError::FeatureNotAccepted(
                "VIRTIO_CONSOLE_F_MULTIPORT",
            ));
        }
        Ok(Box::new(MultiportWorker::new(
            a,
            &self.ports,
            self.flush.clone(),
        )?))
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        // Lets each writer thread end once it has written what it holds.
        self.flush.close_outputs();
    }
}
