//! virtio-fs (device id 26) as a vhost-user front end: the file system is served by an
//! external back end (virtiofsd) over a Unix socket, and kvmbuild only sets it up.
//!
//! The data path never touches kvmbuild: the back end maps guest RAM from the memfd regions it is
//! handed, reads the queues' notification eventfds (KVM ioeventfds) as its "kick" fds and writes
//! the device's irqfd as its "call" fd. The set-up order is the vhost-user one: owner, features,
//! protocol features, then at DRIVER_OK the memory table and each vring's size, addresses, base,
//! call, kick, enable. If the back end goes away while the guest runs, the guest's file-system
//! requests could never complete, so the VM ends with an error instead of hanging.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{
    device_type, features, read_config_bytes, ActivateError, Activation, DeviceWorker, VirtioDevice,
};
use crate::exit::{ExitReason, VmExit};

/// The longest tag the configuration space holds.
pub const MAX_TAG_LEN: usize = 36;
/// One high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
/// Entries per queue.
const QUEUE_SIZE: u16 = 1024;
/// The vhost-user feature bit that announces protocol features; never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors from setting up the back end.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    /// The tag is empty or longer than the configuration space allows.
    #[error("the virtio-fs tag {0:?} must be 1 to {MAX_TAG_LEN} bytes")]
    BadTag(String),
    /// The back end's socket cannot be reached.
    #[error("cannot connect to the vhost-user back end at {}", .0.display())]
    Connect(PathBuf, #[source] vhost::Error),
    /// A vhost-user request failed.
    #[error("vhost-user back end at {}: cannot {what}", path.display())]
    Request {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    /// Guest memory that the back end cannot map.
    #[error("guest memory at {0:#x} is not file-backed, so a vhost-user back end cannot map it")]
    NotFileBacked(u64),
}

/// A virtio-fs device served by a vhost-user back end.
pub struct VhostUserFs {
    socket: PathBuf,
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
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64)
            .map_err(|e| VhostUserFsError::Connect(socket.to_path_buf(), e))?;
        let request = |what| request_err(socket, what);
        frontend.set_owner().map_err(request("set the owner"))?;
        let raw_features = frontend
            .get_features()
            .map_err(request("read its features"))?;
        let protocol_features = raw_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(request("read its protocol features"))?;
            // Multiqueue is what lets it report its queue count; nothing else is needed here.
            let wanted =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(wanted)
                .map_err(request("set protocol features"))?;
        }
        Ok(Self {
            socket: socket.to_path_buf(),
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
        self.frontend
            .set_features(acked)
            .map_err(request_err(&self.socket, "set features"))?;
        let regions = memory_regions(&a.mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(request_err(&self.socket, "set the memory table"))?;
        for (index, (queue, kick)) in a.queues.iter().enumerate() {
            let config = vring_config(&a.mem, queue);
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(request_err(&self.socket, "set a vring's size"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(request_err(&self.socket, "set a vring's addresses"))?;
            self.frontend
                .set_vring_base(index, 0)
                .map_err(request_err(&self.socket, "set a vring's base"))?;
            self.frontend
                .set_vring_call(index, a.interrupt.event())
                .map_err(request_err(&self.socket, "set a vring's call fd"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(request_err(&self.socket, "set a vring's kick fd"))?;
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(request_err(&self.socket, "enable a vring"))?;
            }
        }
        Ok(())
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
    config.extend_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
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
        self.started = true;
        if let Err(e) = self.start(&a) {
            self.exit.request(ExitReason::Internal(error_chain(&e)));
            return Err(ActivateError::Backend(e.to_string()));
        }
        Ok(Box::new(DisconnectWatch {
            socket: self.frontend.as_raw_fd(),
            path: self.socket.clone(),
            exit: self.exit.clone(),
        }))
    }

    fn reset(&mut self) {
        // Linux resets the device at the start of every probe, before any set-up: then there is
        // nothing to stop. Otherwise get_vring_base stops each ring (vhost-user's way); the back
        // end keeps the connection and is set up afresh at the next DRIVER_OK.
        if std::mem::take(&mut self.started) {
            for index in 0..NUM_QUEUES {
                let _ = self.frontend.get_vring_base(index);
            }
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

/// Watches the back end's socket: it only becomes readable or hangs up when the back end goes
/// away (replies are read synchronously during set-up, never while the guest runs).
struct DisconnectWatch {
    socket: std::os::fd::RawFd,
    path: PathBuf,
    exit: Arc<VmExit>,
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
