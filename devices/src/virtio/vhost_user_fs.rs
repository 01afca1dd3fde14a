//! virtio-fs (device id 26) as a vhost-user front end: the file system is served by an
//! external back end (virtiofsd) over a Unix socket, and kvmbuild only sets it up.
//!
//! The data path never touches kvmbuild: the back end maps guest RAM from the memfd regions it is
//! handed, reads the queues' notification eventfds (KVM ioeventfds) as its "kick" fds and writes
//! the device's irqfd as its "call" fd. The set-up order is the vhost-user one: owner, features,
//! protocol features, then at DRIVER_OK the memory table and each vring's size, addresses, base,
//! call, kick, enable. If the back end goes away while the guest runs, the guest's file-system
//! requests could never complete, so the VM ends with an error instead of hanging.
//!
//! Snapshots: a running device is saved only before the guest has made any request (every
//! ring's available and used indices are still 0), as before it mounts the share: a back end
//! that has served requests holds a session (FUSE_INIT, the inodes the guest looked up) that
//! another run's back end would not have. A restored device hands this run's back end the
//! same rings with their saved index as the base: for the back end it is an ordinary set-up,
//! for the guest's driver nothing happened.
//!
//! Every request that waits for an answer is bounded (see [`watchdog`]): each phase of the
//! set-up must be over within [`SETUP_BOUND`] and before the run's deadline, and a stop signal
//! or the VM's end cuts the wait short. Connecting is part of the first phase and bounded the
//! same way (see [`connect`]: a back end whose listen backlog is full would otherwise hold a
//! blocking connect(2) for ever).

mod connect;
mod watchdog;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, DeviceWorker, VirtioDevice,
};
use crate::exit::{ExitReason, VmExit};
pub use watchdog::Cut;
use watchdog::{Limit, Watchdog};

/// The longest tag the configuration space holds.
pub const MAX_TAG_LEN: usize = 36;
/// One high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
/// The request queues the config space announces: all but the high-priority queue.
const REQUEST_QUEUES: u32 = 1;
const _: () = assert!(REQUEST_QUEUES as usize == NUM_QUEUES - 1);
/// Entries per queue.
const QUEUE_SIZE: u16 = 1024;
/// The vhost-user feature bit that announces protocol features; never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// How long each phase of the set-up (connecting, starting the queues, stopping them) may wait
/// for the back end's answers when the run's deadline does not come first. A working back end
/// answers in microseconds; this only has to outlast a loaded host.
pub const SETUP_BOUND: Duration = Duration::from_secs(20);

/// Errors from setting up the back end.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    /// The tag is empty or longer than the configuration space allows.
    #[error("the virtio-fs tag {0:?} must be 1 to {MAX_TAG_LEN} bytes")]
    BadTag(String),
    /// The back end's socket cannot be reached.
    #[error("cannot connect to the vhost-user back end at {}", .0.display())]
    Connect(PathBuf, #[source] std::io::Error),
    /// A vhost-user request failed.
    #[error("vhost-user back end at {}: cannot {what}", path.display())]
    Request {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    /// A request was not answered in time, or the wait for it was stopped.
    #[error("vhost-user back end at {}: cannot {what}: {cut}", path.display())]
    Cut {
        path: PathBuf,
        what: &'static str,
        cut: Cut,
    },
    /// The watchdog thread could not start.
    #[error("cannot start the vhost-user watchdog thread")]
    Watchdog(#[source] std::io::Error),
    /// Guest memory that the back end cannot map.
    #[error("guest memory at {0:#x} is not file-backed, so a vhost-user back end cannot map it")]
    NotFileBacked(u64),
}

impl VhostUserFsError {
    /// How the run ends when set-up was stopped by the run's timeout or a signal (rather than
    /// failing because of the back end).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        match self {
            VhostUserFsError::Cut { cut, .. } => cut.exit_reason(),
            _ => None,
        }
    }
}

/// A virtio-fs device served by a vhost-user back end.
pub struct VhostUserFs {
    socket: PathBuf,
    /// Declared before `frontend`, so it stops before the socket it watches is closed.
    watchdog: Watchdog,
    frontend: Frontend,
    /// The back end's virtio features (without the vhost-user protocol bit).
    backend_features: u64,
    /// Whether protocol features were negotiated (then vrings must be enabled explicitly).
    protocol_features: bool,
    /// Whether the back end was handed the vrings (and so has something to stop at reset).
    started: bool,
    config: Vec<u8>,
    exit: Arc<VmExit>,
}

impl VhostUserFs {
    /// Connects to the back end at `socket` and exports it to the guest under `tag`. If the back
    /// end disconnects while the guest runs, `exit` ends the VM.
    pub fn connect(socket: &Path, tag: &str, exit: Arc<VmExit>) -> Result<Self, VhostUserFsError> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(VhostUserFsError::BadTag(tag.to_string()));
        }
        let limit = Limit::from_now(SETUP_BOUND);
        let stream = connect::connect(socket, limit, &exit).map_err(|e| match e {
            connect::ConnectError::Io(e) => VhostUserFsError::Connect(socket.to_path_buf(), e),
            connect::ConnectError::Cut(cut) => VhostUserFsError::Cut {
                path: socket.to_path_buf(),
                what: "connect",
                cut,
            },
        })?;
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        let watchdog = Watchdog::start(frontend.as_raw_fd(), exit.clone())
            .map_err(VhostUserFsError::Watchdog)?;
        let phase = Phase::within(socket, &watchdog, limit);
        phase.ask("set the owner", || frontend.set_owner())?;
        let raw_features = phase.ask("read its features", || frontend.get_features())?;
        let protocol_features = raw_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol_features {
            let offered = phase.ask("read its protocol features", || {
                frontend.get_protocol_features()
            })?;
            // Multiqueue is what lets it report its queue count; nothing else is needed here.
            let wanted =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            phase.ask("set protocol features", || {
                frontend.set_protocol_features(wanted)
            })?;
            if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every set-up request then waits for the back end's answer, so a back end
                // that refuses the memory table or a ring fails the set-up (and a stalled one
                // meets the watchdog) instead of leaving the guest's requests unanswered.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Self {
            socket: socket.to_path_buf(),
            watchdog,
            frontend,
            backend_features: raw_features & !VHOST_USER_F_PROTOCOL_FEATURES,
            protocol_features,
            started: false,
            config: fs_config(tag),
            exit,
        })
    }

    /// Hands the back end guest memory and the ready queues.
    fn start(&mut self, a: &Activation) -> Result<(), VhostUserFsError> {
        let mut acked = a.features & self.backend_features;
        if self.protocol_features {
            acked |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let phase = Phase::new(&self.socket, &self.watchdog);
        let frontend = &mut self.frontend;
        phase.ask("set features", || frontend.set_features(acked))?;
        let regions = memory_regions(&a.mem)?;
        phase.ask("set the memory table", || frontend.set_mem_table(&regions))?;
        for (index, (queue, kick)) in a.queues.iter().enumerate() {
            let config = vring_config(&a.mem, queue);
            phase.ask("set a vring's size", || {
                frontend.set_vring_num(index, queue.size())
            })?;
            phase.ask("set a vring's addresses", || {
                frontend.set_vring_addr(index, &config)
            })?;
            // 0 for a driver's fresh start; where a snapshot's back end stood for a restore.
            let base = queue.next_avail();
            phase.ask("set a vring's base", || {
                frontend.set_vring_base(index, base)
            })?;
            phase.ask("set a vring's call fd", || {
                frontend.set_vring_call(index, a.interrupt.event())
            })?;
            phase.ask("set a vring's kick fd", || {
                frontend.set_vring_kick(index, kick)
            })?;
            if self.protocol_features {
                phase.ask("enable a vring", || frontend.set_vring_enable(index, true))?;
            }
        }
        Ok(())
    }

    /// Stops the back end's rings (vhost-user's way: get_vring_base). A back end that cannot
    /// stop them can serve this device no more, so the VM ends.
    fn stop(&mut self) {
        let phase = Phase::new(&self.socket, &self.watchdog);
        for index in 0..NUM_QUEUES {
            if let Err(e) = phase.ask("stop a vring", || self.frontend.get_vring_base(index)) {
                let reason = e
                    .exit_reason()
                    .unwrap_or(ExitReason::Internal(error_chain(&e)));
                self.exit.request(reason);
                return;
            }
        }
    }
}

/// One phase of talking to the back end: every request in it must be answered within
/// [`SETUP_BOUND`] of the phase's start (and before the run's deadline).
struct Phase<'a> {
    socket: &'a Path,
    watchdog: &'a Watchdog,
    limit: Limit,
}

impl<'a> Phase<'a> {
    fn new(socket: &'a Path, watchdog: &'a Watchdog) -> Self {
        Self::within(socket, watchdog, Limit::from_now(SETUP_BOUND))
    }

    /// A phase that began earlier, with `limit` (connecting is part of the first phase).
    fn within(socket: &'a Path, watchdog: &'a Watchdog, limit: Limit) -> Self {
        Self {
            socket,
            watchdog,
            limit,
        }
    }

    /// Sends one request (`what`, for messages) and waits for its answer, if it has one.
    fn ask<T>(
        &self,
        what: &'static str,
        request: impl FnOnce() -> vhost::Result<T>,
    ) -> Result<T, VhostUserFsError> {
        match self.watchdog.bound(self.limit, request) {
            Ok(answer) => answer.map_err(request_err(self.socket, what)),
            Err(cut) => Err(VhostUserFsError::Cut {
                path: self.socket.to_path_buf(),
                what,
                cut,
            }),
        }
    }
}

/// Turns a failed vhost-user request to the back end at `socket` into an error naming both.
fn request_err(socket: &Path, what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserFsError {
    let path = socket.to_path_buf();
    move |source| VhostUserFsError::Request { path, what, source }
}

/// The configuration space: the tag, NUL-padded, then the number of request queues.
fn fs_config(tag: &str) -> Vec<u8> {
    let mut config = vec![0u8; MAX_TAG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config.extend_from_slice(&REQUEST_QUEUES.to_le_bytes());
    config
}

/// Guest memory as the back end maps it: each region's file, offset and our address for it.
fn memory_regions(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserFsError> {
    mem.iter()
        .map(|region| {
            let start = region.start_addr().0;
            let file = region
                .file_offset()
                .ok_or(VhostUserFsError::NotFileBacked(start))?;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VhostUserFsError::NotFileBacked(start))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}

/// A queue's rings, as addresses in this process (vhost-user translates them through the
/// memory table). The transport validated them against guest memory at activation.
fn vring_config(mem: &GuestMemoryMmap, queue: &Queue) -> VringConfigData {
    let host = |gpa: u64| {
        mem.get_host_address(GuestAddress(gpa))
            .map_or(0, |p| p as u64)
    };
    VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host(queue.desc_table()),
        used_ring_addr: host(queue.used_ring()),
        avail_ring_addr: host(queue.avail_ring()),
        log_addr: None,
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.backend_features | features::VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<DeviceWorker, ActivateError> {
        a.expect_queues(NUM_QUEUES)?;
        a.expect_stateless()?;
        if a.resume.is_some() {
            fault_in_rings(&a);
        }
        self.started = true;
        if let Err(e) = self.start(&a) {
            // A timeout or signal that cut the set-up short ends the run as itself.
            let reason = e
                .exit_reason()
                .unwrap_or(ExitReason::Internal(error_chain(&e)));
            self.exit.request(reason);
            return Err(ActivateError::Backend(e.to_string()));
        }
        Ok(Box::new(DisconnectWatch {
            socket: self.frontend.as_raw_fd(),
            path: self.socket.clone(),
            exit: self.exit.clone(),
            queues: a.queues.into_iter().map(|(q, _)| q).collect(),
            mem: a.mem,
        }))
    }

    fn reset(&mut self) {
        // Linux resets the device at the start of every probe, before any set-up: then there is
        // nothing to stop. Otherwise get_vring_base stops each ring (vhost-user's way); the back
        // end keeps the connection and is set up afresh at the next DRIVER_OK.
        if std::mem::take(&mut self.started) {
            self.stop();
        }
    }

    fn signals_irqfd_directly(&self) -> bool {
        true
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Has a restored guest's rings read through this process's mapping before a back end maps
/// them: pages a restored VM gets on demand reach guest memory on a fault of this mapping
/// only, and a back end that touched one first would see (and make) a blank page.
fn fault_in_rings(a: &Activation) {
    for (queue, _) in &a.queues {
        let size = u64::from(queue.size());
        let rings = [
            (queue.desc_table(), 16 * size),
            (queue.avail_ring(), 6 + 2 * size),
            (queue.used_ring(), 6 + 8 * size),
        ];
        for (start, len) in rings {
            let pages = (start & !0xfff..start + len).step_by(0x1000);
            for page in pages.map(|p| p.max(start)) {
                // The transport checked the rings against guest memory; a read that fails
                // only leaves the page to the guest's first touch.
                let _ = vm_memory::Bytes::read_obj::<u8>(&a.mem, GuestAddress(page));
            }
        }
    }
}

/// Watches the back end's socket: it only becomes readable or hangs up when the back end goes
/// away (replies are read synchronously during set-up, never while the guest runs).
struct DisconnectWatch {
    socket: std::os::fd::RawFd,
    path: PathBuf,
    exit: Arc<VmExit>,
    /// The rings the back end serves, to tell where it stands for a snapshot.
    queues: Vec<Queue>,
    mem: GuestMemoryMmap,
}

impl super::Worker for DisconnectWatch {
    /// Only a share the guest has not used yet is saved (see the module's documentation): its
    /// rings are where any back end starts.
    fn save(&self) -> Result<super::WorkerState, super::SaveError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            let ordering = std::sync::atomic::Ordering::Acquire;
            let avail = queue.avail_idx(&self.mem, ordering);
            let used = queue.used_idx(&self.mem, ordering);
            match (avail, used) {
                (Ok(avail), Ok(used)) if avail.0 == 0 && used.0 == 0 => {
                    queues.push(super::QueueProgress {
                        next_avail: 0,
                        next_used: 0,
                    })
                }
                _ => return Err(super::SaveError::ShareInUse),
            }
        }
        Ok(super::WorkerState {
            queues,
            device: super::DeviceState::Stateless,
        })
    }
}

impl MutEventSubscriber for DisconnectWatch {
    fn process(&mut self, _: Events, ops: &mut EventOps) {
        let _ = ops.remove(Events::new_raw(self.socket, EventSet::empty()));
        self.exit.request(ExitReason::Internal(format!(
            "the virtio-fs back end at {} went away",
            self.path.display()
        )));
    }

    fn init(&mut self, ops: &mut EventOps) {
        let events = EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP;
        let _ = ops.add(Events::new_raw(self.socket, events));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_the_tag_and_one_request_queue() {
        let config = fs_config("store");
        assert_eq!(config.len(), MAX_TAG_LEN + 4);
        assert_eq!(&config[..5], b"store");
        assert!(config[5..MAX_TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&config[MAX_TAG_LEN..], &1u32.to_le_bytes());
    }

    #[test]
    fn a_share_is_saved_only_before_its_first_request() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // Every queue on the same rings: what one shows, all show.
        let queue = || {
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_size(16);
            queue.set_desc_table_address(Some(0x1000), None);
            queue.set_avail_ring_address(Some(0x2000), None);
            queue.set_used_ring_address(Some(0x3000), None);
            queue.set_ready(true);
            queue
        };
        let watch = DisconnectWatch {
            socket: -1,
            path: "/run/share.sock".into(),
            exit: Arc::new(VmExit::new().unwrap()),
            queues: (0..NUM_QUEUES).map(|_| queue()).collect(),
            mem: mem.clone(),
        };
        let saved = super::super::Worker::save(&watch).unwrap();
        let start = super::super::QueueProgress {
            next_avail: 0,
            next_used: 0,
        };
        assert_eq!(saved.queues, vec![start; NUM_QUEUES]);
        // One request, answered: the back end now has a session.
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x3002)).unwrap();
        let refused = super::super::Worker::save(&watch).err().unwrap();
        assert!(
            matches!(refused, super::super::SaveError::ShareInUse),
            "{refused}"
        );
    }

    #[test]
    fn tags_must_fit_the_config_space() {
        let exit = Arc::new(VmExit::new().unwrap());
        let long = "x".repeat(MAX_TAG_LEN + 1);
        for tag in ["", long.as_str()] {
            let err = VhostUserFs::connect(Path::new("/nonexistent.sock"), tag, exit.clone())
                .err()
                .unwrap();
            assert!(matches!(err, VhostUserFsError::BadTag(_)), "{err}");
        }
    }

    #[test]
    fn a_missing_socket_is_named() {
        let exit = Arc::new(VmExit::new().unwrap());
        let err = VhostUserFs::connect(Path::new("/nonexistent/fs.sock"), "store", exit)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "cannot connect to the vhost-user back end at /nonexistent/fs.sock"
        );
    }

    #[test]
    fn anonymous_memory_cannot_be_shared() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            memory_regions(&mem),
            Err(VhostUserFsError::NotFileBacked(0))
        ));
    }
}
