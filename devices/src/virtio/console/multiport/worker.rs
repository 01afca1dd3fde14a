//! The running multiport device: the control handshake, each port's input and output.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::super::control::{self, Message, Outbox};
use super::super::flush::FlushState;
use super::super::input::PortInput;
use super::super::lock;
use super::super::output::Output;
use super::super::tx::Transmit;
use super::rings::{fill_rx, read_control, write_chain};
use super::{
    role, rx_queue, tx_queue, PortShared, Role, CONTROL_RX, CONTROL_TX, INPUT_TAG, ROOM_TAG,
};
use crate::virtio::chain::{drain_queue, next_chain_or_rearm, notify_used, ChainError};
use crate::virtio::{
    queue_progress, register_queue_events, ActivateError, Activation, DeviceState, Interrupt,
    SaveError, Worker, WorkerState,
};

/// What a snapshot keeps of a running multiport console besides its queues' positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultiportState {
    /// DEVICE_ADD was queued for every port.
    announced: bool,
    /// Each port's handshake and open state, by port id.
    ports: Vec<PortFlags>,
    /// Control messages not yet in the driver's buffers.
    outbox: Vec<Message>,
}

/// What the driver and the device have told each other about one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PortFlags {
    ready: bool,
    guest_open: bool,
    host_open: bool,
}

/// One port's state in the running device.
struct PortState {
    id: u32,
    name: String,
    input: Option<Arc<Mutex<PortInput>>>,
    input_watched: bool,
    output: Option<Output>,
    /// The driver set the port up (PORT_READY); its name and PORT_OPEN(1) were queued.
    ready: bool,
    /// The guest has the port open.
    guest_open: bool,
    /// The device told the driver the host side is connected (and has not closed it since).
    host_open: bool,
    /// The transmit queue's chain waiting for room in the output, if any.
    tx: Transmit,
}

impl PortState {
    fn new((id, shared): (u32, &PortShared)) -> Self {
        Self {
            id,
            name: shared.name.clone(),
            input: shared.input.clone(),
            input_watched: false,
            output: shared.output.clone(),
            ready: false,
            guest_open: false,
            host_open: false,
            tx: Transmit::new(),
        }
    }
}

/// The running multiport device.
pub(super) struct MultiportWorker {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Interrupt,
    ports: Vec<PortState>,
    /// Control messages waiting for the driver's control receive buffers.
    outbox: Outbox,
    /// DEVICE_ADD was queued for every port.
    announced: bool,
    /// Set once the guest broke a queue; nothing more is done until reset.
    broken: bool,
    flush: Arc<FlushState>,
}

impl MultiportWorker {
    /// The device running on `a`'s queues for `ports`: fresh, or as a snapshot left it.
    pub(super) fn new(
        a: Activation,
        ports: &[PortShared],
        flush: Arc<FlushState>,
    ) -> Result<Self, ActivateError> {
        let (queues, events) = a.queues.into_iter().unzip();
        let mut worker = Self {
            mem: a.mem,
            queues,
            events,
            interrupt: a.interrupt,
            ports: (0..).zip(ports).map(PortState::new).collect(),
            outbox: Outbox::new(ports.len()),
            announced: false,
            broken: false,
            flush,
        };
        match a.resume {
            None => {}
            Some(DeviceState::Multiport(saved)) => worker.resume(saved)?,
            Some(_) => return Err(ActivateError::ResumeState),
        }
        Ok(worker)
    }

    /// Takes up the handshake and the ports where a snapshot left them. This run's inputs
    /// and outputs stand behind the ports; the guest sees no change.
    fn resume(&mut self, saved: MultiportState) -> Result<(), ActivateError> {
        if saved.ports.len() != self.ports.len() {
            return Err(ActivateError::ResumeState);
        }
        self.outbox =
            Outbox::restored(self.ports.len(), saved.outbox).ok_or(ActivateError::ResumeState)?;
        self.announced = saved.announced;
        for (port, flags) in self.ports.iter_mut().zip(saved.ports) {
            port.ready = flags.ready;
            port.guest_open = flags.guest_open;
            port.host_open = flags.host_open;
        }
        Ok(())
    }

    fn fail(&mut self) {
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    fn port_index(&self, id: u32) -> Option<usize> {
        usize::try_from(id).ok().filter(|&p| p < self.ports.len())
    }

    // ---- control ----

    /// Reads and acts on every message the driver sent.
    fn run_control_tx(&mut self) {
        let mem = &self.mem;
        let mut messages = Vec::new();
        let result = drain_queue(
            &mut self.queues[CONTROL_TX],
            mem,
            &self.interrupt,
            |chain| {
                messages.extend(read_control(mem, chain)?);
                Ok(0)
            },
        );
        for message in messages {
            self.handle_control(&message);
        }
        if result.is_err() {
            self.fail();
        }
    }

    /// Driver-to-device events; others (device-to-driver ones, unknown ones, bad ids) are
    /// ignored, as is a repeated step of the handshake.
    fn handle_control(&mut self, message: &Message) {
        match message.event {
            control::DEVICE_READY if message.value == 1 => self.announce_ports(),
            control::PORT_READY if message.value == 1 => self.port_ready(message.id),
            control::PORT_OPEN => self.guest_opened(message.id, message.value != 0),
            // Device-to-driver events have no meaning here.
            control::DEVICE_ADD
            | control::DEVICE_REMOVE
            | control::CONSOLE_PORT
            | control::RESIZE
            | control::PORT_NAME => {}
            _ => {}
        }
    }

    fn announce_ports(&mut self) {
        if std::mem::replace(&mut self.announced, true) {
            return;
        }
        for port in &self.ports {
            self.outbox
                .push(Message::new(port.id, control::DEVICE_ADD, 1));
        }
    }

    fn port_ready(&mut self, id: u32) {
        let Some(p) = self.port_index(id).filter(|_| self.announced) else {
            return;
        };
        let port = &mut self.ports[p];
        if std::mem::replace(&mut port.ready, true) {
            return;
        }
        port.host_open = true;
        self.outbox.push(Message::name(id, &port.name));
        self.outbox.push(Message::new(id, control::PORT_OPEN, 1));
        self.pump_input(p);
    }

    fn guest_opened(&mut self, id: u32, open: bool) {
        let Some(p) = self.port_index(id) else { return };
        self.ports[p].guest_open = open;
        if open {
            self.pump_input(p);
        }
    }

    /// Moves queued control messages into the driver's control receive buffers.
    fn send_control(&mut self) {
        let mut used_any = false;
        let result = self.fill_control_rx(&mut used_any);
        if used_any {
            notify_used(&mut self.queues[CONTROL_RX], &self.mem, &self.interrupt);
        }
        if result.is_err() {
            self.fail();
        }
    }

    fn fill_control_rx(&mut self, used_any: &mut bool) -> Result<(), ChainError> {
        let (mem, queue) = (&self.mem, &mut self.queues[CONTROL_RX]);
        while let Some(bytes) = self.outbox.front().map(Message::encode) {
            let Some(chain) = next_chain_or_rearm(queue, mem)? else {
                return Ok(());
            };
            let head = chain.head_index();
            let n = write_chain(mem, chain, &bytes)?;
            queue.add_used(mem, head, n).map_err(|_| ChainError::Ring)?;
            *used_any = true;
            self.outbox.pop();
        }
        Ok(())
    }

    // ---- input ----

    /// Reads what the input has after epoll reported it (once per wake-up).
    fn read_input(&mut self, p: usize, events: EventSet) {
        let Some(input) = &self.ports[p].input else {
            return;
        };
        let mut input = lock(input);
        if events.contains(EventSet::IN) {
            input.read_once();
        } else {
            // Hang-up or error without data: nothing more will come.
            input.eof = true;
        }
    }

    /// Delivers what it can of port `p`'s input, then closes the host side if the input has
    /// ended and all of it was delivered.
    fn pump_input(&mut self, p: usize) {
        if self.broken {
            return;
        }
        if self.deliver_input(p).is_err() {
            self.fail();
            return;
        }
        self.close_if_drained(p);
    }

    fn deliver_input(&mut self, p: usize) -> Result<(), ChainError> {
        let port = &self.ports[p];
        // A generic port that the guest has not opened drops what arrives.
        let (Some(input), true) = (port.input.clone(), port.guest_open) else {
            return Ok(());
        };
        let mut input = lock(&input);
        let (mem, queue) = (&self.mem, &mut self.queues[rx_queue(p)]);
        let mut used_any = false;
        let result = loop {
            input.fill_unpolled();
            let before = input.pending.len();
            if let Err(e) = fill_rx(queue, mem, &mut input, &mut used_any) {
                break Err(e);
            }
            let stalled = input.pending.len() == before;
            if stalled || input.pollable || input.eof {
                break Ok(());
            }
        };
        if used_any {
            notify_used(queue, mem, &self.interrupt);
        }
        result
    }

    /// End of file for the guest: PORT_OPEN(0), sent only once every byte of the input is in
    /// the guest's receive buffers, marked used and notified.
    fn close_if_drained(&mut self, p: usize) {
        let port = &mut self.ports[p];
        let drained = port.input.as_ref().is_some_and(|i| lock(i).drained());
        if drained && port.ready && port.host_open {
            port.host_open = false;
            self.outbox
                .push(Message::new(port.id, control::PORT_OPEN, 0));
        }
    }

    /// Watches port `p`'s input exactly while it is pollable and there is room for more.
    fn update_input_watch(&mut self, p: usize, ops: &mut EventOps) {
        let broken = self.broken;
        let port = &mut self.ports[p];
        let Some(shared) = port.input.clone() else {
            return;
        };
        let mut input = lock(&shared);
        let want = input.pollable && input.wants_data() && !broken;
        if want == port.input_watched {
            return;
        }
        let events = Events::with_data_raw(input.fd(), INPUT_TAG + port.id, EventSet::IN);
        let done = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match done {
            Ok(()) => port.input_watched = want,
            Err(_) if want => {
                // epoll refuses regular files and /dev/null (EPERM): they are always
                // readable, so read them directly from now on.
                input.pollable = false;
                drop(input);
                self.pump_input(p);
            }
            Err(_) => {}
        }
    }

    // ---- output ----

    /// Copies port `p`'s transmit buffers to its output while the output has room.
    fn run_port_tx(&mut self, p: usize) {
        if self.broken {
            return;
        }
        let mut used_any = false;
        let result = self.transmit(p, &mut used_any);
        if used_any {
            notify_used(&mut self.queues[tx_queue(p)], &self.mem, &self.interrupt);
        }
        if result.is_err() {
            self.fail();
        }
    }

    fn transmit(&mut self, p: usize, used_any: &mut bool) -> Result<(), ChainError> {
        let (mem, queue) = (&self.mem, &mut self.queues[tx_queue(p)]);
        let PortState { tx, output, .. } = &mut self.ports[p];
        // A chain left waiting is resumed by the output's room event.
        tx.run(queue, mem, output.as_ref(), used_any)
    }

    /// At the VM's end: writes out port `p`'s transmit buffers, waiting for room until
    /// `deadline`.
    fn drain_at_end(&mut self, p: usize, deadline: Instant) {
        loop {
            self.run_port_tx(p);
            let port = &self.ports[p];
            let (true, Some(output)) = (port.tx.is_waiting(), &port.output) else {
                return;
            };
            if self.broken {
                return;
            }
            if !output.wait_for_room(deadline) {
                self.flush.lost(format!(
                    "console port {}: the guest's last output was not taken in time",
                    port.name
                ));
                return;
            }
        }
    }

    fn serve_queue(&mut self, queue: usize) {
        if let Some(e) = self.events.get(queue) {
            // Clear the kick; a failed read only means there was none.
            let _ = e.read();
        }
        let ports = self.ports.len();
        match role(queue) {
            Role::Rx(p) if p < ports => self.pump_input(p),
            Role::Tx(p) if p < ports => self.run_port_tx(p),
            Role::ControlTx => self.run_control_tx(),
            // Control receive buffers are used by send_control after every event.
            _ => {}
        }
    }
}

impl Worker for MultiportWorker {
    fn save(&self) -> Result<WorkerState, SaveError> {
        if self.broken {
            return Err(SaveError::NeedsReset);
        }
        // A chain taken from a transmit queue lives only here: wait for a quiet console.
        if self.ports.iter().any(|p| p.tx.is_waiting()) {
            return Err(SaveError::Busy(
                "a console port's output waits for its reader",
            ));
        }
        let ports = self
            .ports
            .iter()
            .map(|p| PortFlags {
                ready: p.ready,
                guest_open: p.guest_open,
                host_open: p.host_open,
            })
            .collect();
        Ok(WorkerState {
            queues: queue_progress(&self.queues),
            device: DeviceState::Multiport(MultiportState {
                announced: self.announced,
                ports,
                outbox: self.outbox.saved(),
            }),
        })
    }
}

impl MutEventSubscriber for MultiportWorker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data >= ROOM_TAG {
            let p = (data - ROOM_TAG) as usize;
            if let Some(output) = self.ports.get(p).and_then(|port| port.output.as_ref()) {
                // Clear the event (level-triggered) even when broken.
                let _ = output.room_event().read();
                self.run_port_tx(p);
            }
        } else if data >= INPUT_TAG {
            let p = (data - INPUT_TAG) as usize;
            if p < self.ports.len() && !self.broken {
                self.read_input(p, events.event_set());
                self.pump_input(p);
            }
        } else {
            self.serve_queue(data as usize);
        }
        if !self.broken {
            self.send_control();
        }
        for p in 0..self.ports.len() {
            self.update_input_watch(p, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if !register_queue_events(ops, &self.events) {
            self.fail();
            return;
        }
        for port in &self.ports {
            let Some(output) = &port.output else { continue };
            let room = Events::with_data(output.room_event(), ROOM_TAG + port.id, EventSet::IN);
            if ops.add(room).is_err() {
                self.fail();
                return;
            }
        }
        // Messages and output published before activation would otherwise wait for a kick.
        self.run_control_tx();
        for p in 0..self.ports.len() {
            self.run_port_tx(p);
        }
        self.send_control();
        for p in 0..self.ports.len() {
            self.update_input_watch(p, ops);
        }
    }
}

impl Drop for MultiportWorker {
    fn drop(&mut self) {
        // Only once the VM has stopped for good: a worker dropped by a driver reset must not
        // touch rings that are no longer the device's.
        let Some(deadline) = self.flush.deadline() else {
            return;
        };
        for p in 0..self.ports.len() {
            self.drain_at_end(p, deadline);
        }
    }
}
