//! A port's output: a writer thread fed through a bounded buffer.
//!
//! The device thread never writes to a port's host writer itself: a reader that stops reading
//! (a full pipe) would block every device and the VMM's exit with it. It copies the guest's
//! bytes into a bounded buffer instead; a thread per port writes them out with `write_all`.
//! When the buffer is full, [`Output::reserve`] says so and the device stops taking that
//! port's transmit buffers (the guest's writer then blocks: real back-pressure); the thread
//! signals [`Output::room_event`] once it has taken bytes out again.
//!
//! A write error ends the writing: later output is discarded so the guest keeps running. A
//! broken pipe (the reader went away, as in `kvmbuild exec -- yes | head -1`) also asks the VM
//! to end with [`ExitReason::OutputClosed`], as a process in a pipeline would on SIGPIPE.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::exit::{ExitReason, VmExit};

/// Bytes a port buffers for its writer at most.
pub const OUTPUT_MAX: usize = 256 << 10;
/// Bytes the writer takes out of the buffer per write.
const WRITE_CHUNK: usize = 64 << 10;

/// Errors from starting a port's writer.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The room `EventFd` could not be created.
    #[error("cannot create the output event of console port {port}")]
    Event {
        port: String,
        #[source]
        source: io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the writer thread of console port {port}")]
    Spawn {
        port: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// No more bytes will come: the writer ends once it has written the buffer.
    closed: bool,
    /// The writer thread has ended.
    finished: bool,
    /// The writer holds a chunk it took from the buffer and has not finished writing it.
    writing: bool,
    /// The device stopped taking transmit buffers until there is room.
    device_waiting: bool,
    /// The first write error; later output is discarded.
    error: Option<io::Error>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled whenever the buffer or the writer's progress changes.
    changed: Condvar,
    /// Readable when the device may take transmit buffers again.
    room: EventFd,
}

/// The device's end of one port's writer thread.
#[derive(Clone)]
pub struct Output {
    name: Arc<str>,
    shared: Arc<Shared>,
}

impl Output {
    /// Starts the writer thread for port `name`, writing to `writer`. A broken pipe requests
    /// [`ExitReason::OutputClosed`] through `exit`, if given.
    pub fn start(
        name: &str,
        writer: Box<dyn Write + Send>,
        exit: Option<Arc<VmExit>>,
    ) -> Result<Self, OutputError> {
        let room = EventFd::new(EFD_NONBLOCK).map_err(|source| OutputError::Event {
            port: name.to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            room,
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("kvmbuild-out-{name}"))
            .spawn(move || write_loop(&thread_shared, writer, exit.as_deref()))
            .map_err(|source| OutputError::Spawn {
                port: name.to_string(),
                source,
            })?;
        Ok(Self {
            name: name.into(),
            shared,
        })
    }

    /// How many bytes [`Output::push`] may take now; 0 means full, and the room event will be
    /// signalled once there is room. After a write error everything is taken (and dropped).
    pub fn reserve(&self) -> usize {
        let mut state = self.lock();
        if state.error.is_some() {
            return usize::MAX;
        }
        let room = OUTPUT_MAX.saturating_sub(state.buf.len());
        if room == 0 {
            state.device_waiting = true;
        }
        room
    }

    /// Hands `data` to the writer; the caller keeps within [`Output::reserve`].
    pub fn push(&self, data: &[u8]) {
        let mut state = self.lock();
        if state.error.is_none() {
            state.buf.extend(data);
            self.shared.changed.notify_all();
        }
    }

    /// Readable when the device may take transmit buffers again.
    pub fn room_event(&self) -> &EventFd {
        &self.shared.room
    }

    /// Waits until the buffer has room or `deadline` passes; true if there is room.
    pub fn wait_for_room(&self, deadline: Instant) -> bool {
        self.wait_until(deadline, |s| s.error.is_some() || s.buf.len() < OUTPUT_MAX)
    }

    /// Tells the writer no more bytes will come: it ends once it has written what it holds.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.changed.notify_all();
    }

    /// Tells the writer no more bytes will come and waits until it has written them all, or
    /// until `deadline`. Returns why output was lost, if it was; a broken pipe is not
    /// reported (the VM's exit status says it).
    pub fn finish(&self, deadline: Instant) -> Result<(), String> {
        self.close();
        // Written out once the writer ended, or once it holds nothing more and has nothing to
        // take (it may not have woken yet to notice the close: that costs no output).
        let written = |s: &State| s.finished || (s.closed && s.buf.is_empty() && !s.writing);
        if !self.wait_until(deadline, written) {
            let left = self.lock().buf.len();
            return Err(format!(
                "console port {}: the reader did not take the last {left} bytes in time",
                self.name
            ));
        }
        match &self.lock().error {
            Some(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                Err(format!("console port {}: {e}", self.name))
            }
            _ => Ok(()),
        }
    }

    fn wait_until(&self, deadline: Instant, mut done: impl FnMut(&State) -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if done(&state) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = match self.shared.changed.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock_state(&self.shared)
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output").field("name", &self.name).finish()
    }
}

/// The writer thread: takes chunks out of the buffer and writes them until closed.
fn write_loop(shared: &Shared, mut writer: Box<dyn Write + Send>, exit: Option<&VmExit>) {
    if let Some(exit) = exit {
        exit.thread_started(crate::thread_kind::ThreadKind::ConsoleWriter);
    }
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    while take_chunk(shared, &mut chunk) {
        if let Err(e) = writer.write_all(&chunk).and_then(|()| writer.flush()) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                if let Some(exit) = exit {
                    exit.request(ExitReason::OutputClosed);
                }
            }
            let mut state = lock_state(shared);
            state.buf.clear();
            state.error = Some(e);
            shared.changed.notify_all();
        }
    }
}

/// Moves the next bytes to write into `chunk`; false once the buffer is closed and empty.
fn take_chunk(shared: &Shared, chunk: &mut Vec<u8>) -> bool {
    let mut state = lock_state(shared);
    // Back for more: the previous chunk, if any, is written.
    state.writing = false;
    if state.buf.is_empty() {
        shared.changed.notify_all();
    }
    while state.buf.is_empty() && !state.closed {
        state = match shared.changed.wait(state) {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
    }
    if state.buf.is_empty() {
        state.finished = true;
        shared.changed.notify_all();
        return false;
    }
    let n = state.buf.len().min(WRITE_CHUNK);
    chunk.clear();
    chunk.extend(state.buf.drain(..n));
    state.writing = true;
    if std::mem::take(&mut state.device_waiting) {
        // A full counter already means "room".
        let _ = shared.room.write(1);
    }
    shared.changed.notify_all();
    true
}

fn lock_state(shared: &Shared) -> MutexGuard<'_, State> {
    shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
