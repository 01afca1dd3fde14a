//! Flushing a console's output when the VM ends (see [`ConsoleFlush`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::lock;
use super::output::Output;

pub(super) struct FlushState {
    /// Set once the VM has stopped for good: until when the output may still be flushed.
    deadline: Mutex<Option<Instant>>,
    outputs: Vec<Output>,
    /// Output that could not be flushed in time, described.
    lost: Mutex<Vec<String>>,
}

impl FlushState {
    pub(super) fn new(outputs: Vec<Output>) -> Self {
        Self {
            deadline: Mutex::new(None),
            outputs,
            lost: Mutex::new(Vec::new()),
        }
    }

    /// Until when output may still be flushed; `None` until the VM has stopped for good.
    pub(super) fn deadline(&self) -> Option<Instant> {
        *lock(&self.deadline)
    }

    /// Records output that could not be flushed.
    pub(super) fn lost(&self, what: String) {
        lock(&self.lost).push(what);
    }

    /// Lets each writer thread end once it has written what it holds.
    pub(super) fn close_outputs(&self) {
        for output in &self.outputs {
            output.close();
        }
    }
}

/// Flushes a console's output (hvc0's, or every port's) when the VM ends, in two steps:
///
/// 1. [`ConsoleFlush::vm_stopped`], once the vCPUs have stopped for good (so no driver can
///    reset the device any more) and before the device thread stops. From then on, the
///    device's worker, when dropped (as stopping the device thread does), first writes out
///    every transmit buffer still in the rings, the guest's last output.
/// 2. [`ConsoleFlush::finish`], after the device thread has stopped: waits for each writer
///    thread to write what it holds.
///
/// Both wait at most until the deadline given to the first step, so a reader that never
/// reads cannot hang the VMM. A worker dropped by a driver reset never touches the rings.
#[derive(Clone)]
pub struct ConsoleFlush(Arc<FlushState>);

impl ConsoleFlush {
    pub(super) fn new(state: Arc<FlushState>) -> Self {
        Self(state)
    }

    /// The guest can no longer run: flush its output until `deadline` when the worker drops.
    pub fn vm_stopped(&self, deadline: Instant) {
        *lock(&self.0.deadline) = Some(deadline);
    }

    /// Waits until the deadline for every writer to write what it holds; describes the
    /// output that was lost if some was (a broken pipe is not reported: the VM's exit says
    /// it).
    pub fn finish(&self) -> Result<(), String> {
        let deadline = self.0.deadline().unwrap_or_else(Instant::now);
        let mut problems = std::mem::take(&mut *lock(&self.0.lost));
        // Every writer learns at once that nothing more comes, so that one whose reader
        // stalls until the deadline does not leave the others no time to finish.
        self.0.close_outputs();
        for output in &self.0.outputs {
            if let Err(e) = output.finish(deadline) {
                problems.push(e);
            }
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }
}
