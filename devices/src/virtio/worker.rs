//! The worker of a device with one request queue (virtio-blk, virtio-rng): on each kick it
//! drains the queue through the device's request handler, and once the guest breaks the queue
//! it stops for good and asks the driver for a reset.

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{drain_queue, ChainError};
use super::{
    queue_progress, register_queue_events, ActivateError, Activation, DeviceState, Interrupt,
    SaveError, Worker, WorkerState,
};

/// What a one-queue device does with each request.
pub trait RequestHandler: Send {
    /// Serves one request chain; returns the bytes written into it. An error means the chain
    /// itself is broken, which stops the device until reset.
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, ChainError>;
}

/// A running one-queue device.
pub struct SingleQueueWorker<H> {
    handler: H,
    mem: GuestMemoryMmap,
    queue: Queue,
    event: EventFd,
    interrupt: Interrupt,
    /// Set once the guest broke the queue; nothing more is done until reset.
    broken: bool,
}

impl<H: RequestHandler> SingleQueueWorker<H> {
    /// Takes the one queue of `activation` for `handler`.
    pub fn new(handler: H, mut activation: Activation) -> Result<Self, ActivateError> {
        activation.expect_queues(1)?;
        activation.expect_stateless()?;
        let (queue, event) = activation.queues.remove(0);
        Ok(Self {
            handler,
            mem: activation.mem,
            queue,
            event,
            interrupt: activation.interrupt,
            broken: false,
        })
    }

    fn run_queue(&mut self) {
        if self.broken {
            return;
        }
        let (handler, mem) = (&mut self.handler, &self.mem);
        let result = drain_queue(&mut self.queue, mem, &self.interrupt, |chain| {
            handler.handle(mem, chain)
        });
        if result.is_err() {
            self.mark_broken();
        }
    }

    fn mark_broken(&mut self) {
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

impl<H: RequestHandler> MutEventSubscriber for SingleQueueWorker<H> {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        // Clear the kick; a failed read only means there was none.
        let _ = self.event.read();
        self.run_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if !register_queue_events(ops, std::slice::from_ref(&self.event)) {
            self.mark_broken();
            return;
        }
        // Requests published before activation would otherwise wait for the next kick.
        self.run_queue();
    }
}

impl<H: RequestHandler> Worker for SingleQueueWorker<H> {
    /// Requests are served whole on each kick, so the queue's position is all there is.
    fn save(&self) -> Result<WorkerState, SaveError> {
        if self.broken {
            return Err(SaveError::NeedsReset);
        }
        Ok(WorkerState {
            queues: queue_progress([&self.queue]),
            device: DeviceState::Stateless,
        })
    }
}
