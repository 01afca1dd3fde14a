//! The device thread: one event-manager loop that runs every active virtio device, and the
//! serial port's input ([`crate::serial::SerialInput`]).
//!
//! The VMM starts it once, before the vCPUs, and hands a [`DeviceThreadHandle`] to each
//! [`MmioTransport`](super::MmioTransport). A transport adds its device's worker when the
//! driver sets DRIVER_OK and removes it when the driver resets the device; both calls wait
//! until the loop has done it, so after a reset returns the worker no longer touches guest
//! memory. Stopping the thread (explicitly or by dropping it) ends the loop and drops every
//! worker still on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, RemoteEndpoint, SubscriberId};

use super::{DeviceWorker, SaveError, WorkerState};
use crate::thread_kind::{ThreadKind, ThreadStart};

/// Errors from the device thread.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    /// The event loop could not be created.
    #[error("cannot create the device event loop")]
    Create(#[source] event_manager::Error),
    /// The OS thread could not be started.
    #[error("cannot start the device thread")]
    Spawn(#[source] std::io::Error),
    /// The event loop failed while running.
    #[error("device event loop failed")]
    Loop(#[source] event_manager::Error),
    /// A request could not reach the loop (it has stopped) or was refused by it.
    #[error("device thread unreachable")]
    Request(#[source] event_manager::Error),
    /// The thread panicked.
    #[error("device thread panicked")]
    Panicked,
    /// The loop did not answer in time.
    #[error("the device thread did not answer")]
    NoAnswer,
}

/// How long [`DeviceThreadHandle::freeze`] waits for the loop to take its request: workers
/// never block, so the loop answers within one event's work.
const FREEZE_ANSWER: Duration = Duration::from_secs(10);
/// The longest a frozen loop waits to be let go; past it, it runs on by itself.
const FREEZE_LIMIT: Duration = Duration::from_secs(300);

/// Holds the device loop still until dropped (see [`DeviceThreadHandle::freeze`]).
pub struct Frozen {
    /// Dropping it lets the loop go.
    _release: mpsc::Sender<()>,
}

impl From<event_manager::Error> for ThreadError {
    fn from(e: event_manager::Error) -> Self {
        Self::Request(e)
    }
}

/// Identifies a worker on the device thread, for removing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerId(SubscriberId);

/// A cloneable handle for adding and removing workers on the device thread.
#[derive(Clone)]
pub struct DeviceThreadHandle {
    endpoint: RemoteEndpoint<DeviceWorker>,
}

impl DeviceThreadHandle {
    /// Puts `worker` on the loop (its `init` registers its fds there) and waits until it is.
    pub fn add(&self, worker: DeviceWorker) -> Result<WorkerId, ThreadError> {
        self.endpoint
            .call_blocking(move |ops| -> Result<SubscriberId, ThreadError> {
                Ok(ops.add_subscriber(worker))
            })
            .map(WorkerId)
    }

    /// Takes the worker off the loop and drops it there; returns once it is gone.
    pub fn remove(&self, id: WorkerId) -> Result<(), ThreadError> {
        self.endpoint
            .call_blocking(move |ops| -> Result<(), ThreadError> {
                ops.remove_subscriber(id.0)
                    .map(drop)
                    .map_err(ThreadError::from)
            })
    }

    /// Saves the workers `ids`, in that order, and holds the loop still until the returned
    /// guard is dropped (at most [`FREEZE_LIMIT`]): with the vCPUs stopped too, nothing
    /// touches guest memory or the saved workers until the caller has saved the memory.
    #[allow(clippy::type_complexity)] // one result per worker, and the guard
    pub fn freeze(
        &self,
        ids: Vec<WorkerId>,
    ) -> Result<(Vec<Result<WorkerState, SaveError>>, Frozen), ThreadError> {
        let (saved, states) = mpsc::channel();
        let (release, held) = mpsc::channel::<()>();
        self.endpoint.fire(move |ops| {
            let each = ids
                .iter()
                .map(|id| match ops.subscriber_mut(id.0) {
                    Ok(worker) => worker.save(),
                    Err(_) => Err(SaveError::Thread),
                })
                .collect::<Vec<_>>();
            if saved.send(each).is_ok() {
                // Returns at once when the guard is dropped (the channel disconnects).
                let _ = held.recv_timeout(FREEZE_LIMIT);
            }
        })?;
        let states = states
            .recv_timeout(FREEZE_ANSWER)
            .map_err(|_| ThreadError::NoAnswer)?;
        Ok((states, Frozen { _release: release }))
    }
}

/// The running device thread.
pub struct DeviceThread {
    handle: DeviceThreadHandle,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<Result<(), ThreadError>>>,
}

impl DeviceThread {
    /// Starts the event loop on a new thread named `kvmbuild-virtio`.
    pub fn start() -> Result<Self, ThreadError> {
        Self::start_with(None)
    }

    /// As [`DeviceThread::start`], the thread first calling `on_start` (its VM's
    /// [`ThreadStart`], which confines it).
    pub fn start_with(on_start: Option<ThreadStart>) -> Result<Self, ThreadError> {
        let mut manager = EventManager::<DeviceWorker>::new().map_err(ThreadError::Create)?;
        let handle = DeviceThreadHandle {
            endpoint: manager.remote_endpoint(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let join = std::thread::Builder::new()
            .name("kvmbuild-virtio".into())
            .spawn(move || {
                if let Some(start) = on_start {
                    start(ThreadKind::DeviceLoop);
                }
                run(&mut manager, &stop_flag)
            })
            .map_err(ThreadError::Spawn)?;
        Ok(Self {
            handle,
            stop,
            join: Some(join),
        })
    }

    /// A handle for transports to add and remove workers.
    pub fn handle(&self) -> DeviceThreadHandle {
        self.handle.clone()
    }

    /// Ends the loop, drops every worker still on it, and reports how the loop ended.
    pub fn stop(mut self) -> Result<(), ThreadError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ThreadError> {
        let Some(join) = self.join.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::Release);
        // Waking the loop through its endpoint is the stop event: the loop checks the flag
        // after every wake-up. A failure means the loop has already ended.
        let _ = self.handle.endpoint.kick();
        join.join().map_err(|_| ThreadError::Panicked)?
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn run(manager: &mut EventManager<DeviceWorker>, stop: &AtomicBool) -> Result<(), ThreadError> {
    while !stop.load(Ordering::Acquire) {
        manager.run().map_err(ThreadError::Loop)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Reports each wake-up of its eventfd, and its own drop.
    struct Probe {
        event: EventFd,
        seen: Sender<&'static str>,
    }

    impl crate::virtio::Worker for Probe {}

    impl MutEventSubscriber for Probe {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.event.read();
            let _ = self.seen.send("event");
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.event, EventSet::IN)).unwrap();
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            let _ = self.seen.send("dropped");
        }
    }

    fn probe() -> (EventFd, Probe, std::sync::mpsc::Receiver<&'static str>) {
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let (seen, rx) = channel();
        let probe = Probe {
            event: event.try_clone().unwrap(),
            seen,
        };
        (event, probe, rx)
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn workers_run_on_the_thread_until_removed() {
        let thread = DeviceThread::start().unwrap();
        let (kick, worker, seen) = probe();
        let id = thread.handle().add(Box::new(worker)).unwrap();
        kick.write(1).unwrap();
        assert_eq!(seen.recv_timeout(WAIT).unwrap(), "event");
        thread.handle().remove(id).unwrap();
        // Removal is synchronous: the worker is already gone when `remove` returns.
        assert_eq!(seen.try_recv().unwrap(), "dropped");
        kick.write(1).unwrap();
        assert!(seen.recv_timeout(Duration::from_millis(50)).is_err());
        assert!(thread.handle().remove(id).is_err());
        thread.stop().unwrap();
    }

    #[test]
    fn stop_drops_remaining_workers_and_handles_fail_afterwards() {
        let thread = DeviceThread::start().unwrap();
        let handle = thread.handle();
        let (_kick, worker, seen) = probe();
        handle.add(Box::new(worker)).unwrap();
        thread.stop().unwrap();
        assert_eq!(seen.recv_timeout(WAIT).unwrap(), "dropped");
        let (_kick, worker, _seen) = probe();
        assert!(handle.add(Box::new(worker)).is_err());
    }
}
