//! Guest memory served from a snapshot on demand, through userfaultfd(2).
//!
//! Copying a snapshot's pages into guest memory before the guest resumes costs time in
//! proportion to everything the guest had touched when it was saved, most of which a short
//! run never reads again. Instead, guest RAM is registered with a userfaultfd in "missing"
//! mode: the first access to a page that is not yet in the memory file (by a vCPU through
//! KVM, or by one of kvmbuild's own device threads) stops the accessing thread and queues an
//! event here, and a thread of this module copies that page (and the block around it) from
//! the snapshot's memory file with `UFFDIO_COPY`, which also wakes the thread. The same
//! technique lets Firecracker hand page faults to an outside handler; here the handler is a
//! thread of the VMM, reading the snapshot the restore has already checked.
//!
//! What this cannot see: a vhost-user back end (virtiofsd) maps the memory file itself, not
//! this process's registered mapping, so its first access to a page fills that page with
//! zeros instead of the snapshot's content. The guest binds virtio-fs only after the restore
//! (the snapshot point is before any virtio driver), and the buffers it hands the back end are
//! ones it has just allocated and written (requests) or that the back end fills (replies, into
//! freshly allocated pages): both kinds are either already in the file through the guest's
//! own access or have no content worth keeping. A buffer whose old content matters and that
//! the guest passes to the back end without touching it first since the restore would read as
//! zeros; kvmbuild's init does nothing of the kind.
//!
//! The userfaultfd ABI is five ioctls on plain structures, written out below with
//! `vmm-sys-util`'s ioctl helpers: the `userfaultfd` crate generates its bindings with
//! bindgen at build time, which would make libclang a build dependency of kvmbuild (and of its
//! Nix package) for these few definitions.
//!
//! userfaultfd(2) needs privilege to handle faults that arise in the kernel, as KVM's do
//! (root, CAP_SYS_PTRACE, or `vm.unprivileged_userfaultfd = 1`): where it is refused, the
//! restore copies every page first, as it does for hugetlb-backed memory.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::exit::{ExitReason, VmExit};
use devices::thread_kind::ThreadKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

/// Errors from setting up on-demand memory; any of them means the restore copies instead.
#[derive(Debug, thiserror::Error)]
pub enum OnDemandError {
    /// userfaultfd(2) failed (commonly EPERM: no privilege for kernel-mode faults).
    #[error("userfaultfd is not available: {0}")]
    Unavailable(#[source] std::io::Error),
    /// The API handshake failed.
    #[error("the userfaultfd API handshake failed: {0}")]
    Api(#[source] std::io::Error),
    /// A region could not be registered.
    #[error("guest memory cannot be registered with userfaultfd: {0}")]
    Register(#[source] std::io::Error),
    /// The kernel does not offer UFFDIO_COPY on guest memory.
    #[error("userfaultfd cannot fill this guest memory")]
    NoCopy,
    /// The snapshot file or the stop event could not be duplicated or made.
    #[error("cannot prepare the page server: {0}")]
    Setup(#[source] std::io::Error),
    /// Guest memory is not backed by a file.
    #[error("guest memory is not backed by a file")]
    MemoryNotAFile,
}

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `_UFFDIO_COPY`: the bit in a registration's `ioctls` that says UFFDIO_COPY works there.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// The size of a `struct uffd_msg`.
const MSG_SIZE: usize = 32;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);

/// The page size guest RAM is served in.
const PAGE: u64 = 4096;
/// How much is served per fault: the faulting page's aligned 64 KiB block. A fault costs a
/// round trip through this thread; guests touch memory in clusters (kernel text, page tables,
/// slabs), so a block saves most of the trips a page-at-a-time server would make while copying
/// little the guest does not use.
const BLOCK: u64 = BLOCK_BYTES as u64;
const BLOCK_BYTES: usize = 16 * 4096;

/// One registered region: its address range here and where it starts in the memory file.
#[derive(Clone, Copy)]
struct Region {
    host: u64,
    len: u64,
    file_offset: u64,
}

impl Region {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.host && addr - self.host < self.len
    }

    /// The block to serve for a fault at `addr` (in this region): host address and length.
    fn block_around(&self, addr: u64) -> (u64, u64) {
        let start = (addr - (addr - self.host) % BLOCK).max(self.host);
        let end = (start + BLOCK).min(self.host + self.len);
        (start, end - start)
    }

    /// The page holding `addr`.
    fn page_of(&self, addr: u64) -> u64 {
        addr - (addr - self.host) % PAGE
    }

    fn file_offset_of(&self, addr: u64) -> u64 {
        self.file_offset + (addr - self.host)
    }
}

/// Guest memory being served on demand; dropping it stops the server (after which any page
/// not yet served reads as zeros, so it must outlive every vCPU and device thread).
pub struct OnDemand {
    stop: EventFd,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Guest memory registered for on-demand filling, before its server starts.
pub struct Registered {
    uffd: OwnedFd,
    regions: Vec<Region>,
}

impl Registered {
    /// Registers `mem` (fresh, all zero) to be filled as the guest touches it. Until
    /// [`Registered::serve`] starts the server, nothing may touch it.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Registered, OnDemandError> {
        let regions = regions(mem)?;
        let uffd = open_userfaultfd()?;
        for region in &regions {
            register(&uffd, region)?;
        }
        Ok(Registered { uffd, regions })
    }

    /// Starts the thread that fills the memory from `snapshot` (the checked memory file, laid
    /// out as the memory file). A failure of that thread later ends the VM through `exit`.
    pub fn serve(self, snapshot: &File, exit: &Arc<VmExit>) -> Result<OnDemand, OnDemandError> {
        let snapshot = snapshot.try_clone().map_err(OnDemandError::Setup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(OnDemandError::Setup)?;
        let server = Server {
            uffd: self.uffd,
            snapshot,
            regions: self.regions,
            stop: stop.try_clone().map_err(OnDemandError::Setup)?,
            served: Arc::new(AtomicU64::new(0)),
            buffer: vec![0; BLOCK_BYTES],
        };
        let served = server.served.clone();
        let exit = exit.clone();
        let thread = std::thread::Builder::new()
            .name("kvmbuild-pages".into())
            .spawn(move || {
                exit.thread_started(ThreadKind::PageServer);
                if let Err(e) = server.serve() {
                    exit.request(ExitReason::Internal(format!(
                        "serving guest memory from the snapshot failed: {e}"
                    )));
                }
            })
            .map_err(OnDemandError::Setup)?;
        Ok(OnDemand {
            stop,
            served,
            thread: Some(thread),
        })
    }
}

impl OnDemand {
    /// Bytes served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn regions(mem: &GuestMemoryMmap) -> Result<Vec<Region>, OnDemandError> {
    mem.iter()
        .map(|r| {
            let file = r.file_offset().ok_or(OnDemandError::MemoryNotAFile)?;
            Ok(Region {
                host: r.as_ptr() as u64,
                len: r.len(),
                file_offset: file.start(),
            })
        })
        .collect()
}

fn open_userfaultfd() -> Result<OwnedFd, OnDemandError> {
    // SAFETY: userfaultfd takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let fd = i32::try_from(fd).unwrap_or(-1);
    if fd < 0 {
        return Err(OnDemandError::Unavailable(std::io::Error::last_os_error()));
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api, which lives for the call.
    let rc = unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) };
    if rc < 0 {
        return Err(OnDemandError::Api(std::io::Error::last_os_error()));
    }
    Ok(uffd)
}

fn register(uffd: &OwnedFd, region: &Region) -> Result<(), OnDemandError> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: region.host,
            len: region.len,
        },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register; the range is a mapping of
    // guest memory that lives as long as the VM, which outlives this userfaultfd.
    let rc = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_REGISTER(), &mut reg) };
    if rc < 0 {
        return Err(OnDemandError::Register(std::io::Error::last_os_error()));
    }
    if reg.ioctls & UFFDIO_COPY_BIT == 0 {
        return Err(OnDemandError::NoCopy);
    }
    Ok(())
}

/// The page server's thread state.
struct Server {
    uffd: OwnedFd,
    snapshot: File,
    regions: Vec<Region>,
    stop: EventFd,
    served: Arc<AtomicU64>,
    buffer: Vec<u8>,
}

/// How many fault messages are read at once.
const MESSAGES_PER_READ: usize = 16;

impl Server {
    /// Serves faults until stopped. Returns an error only for one that leaves a guest thread
    /// waiting for ever (a page that can be neither read nor placed).
    fn serve(mut self) -> std::io::Result<()> {
        let mut messages = [0u8; MSG_SIZE * MESSAGES_PER_READ];
        loop {
            if !self.wait_for_faults()? {
                return Ok(());
            }
            let n = match read_messages(&self.uffd, &mut messages) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for msg in messages[..n - n % MSG_SIZE].chunks_exact(MSG_SIZE) {
                if msg[0] == UFFD_EVENT_PAGEFAULT {
                    let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap_or_default());
                    self.serve_fault(addr)?;
                }
            }
        }
    }

    /// Waits until faults are queued (true) or the server is stopped (false).
    fn wait_for_faults(&self) -> std::io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: poll reads and writes the two pollfds, which live for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        Ok(fds[0].revents & libc::POLLIN != 0)
    }

    /// Places the block around `addr` (or, when part of it is already there, the one page)
    /// and wakes whoever waits for it.
    fn serve_fault(&mut self, addr: u64) -> std::io::Result<()> {
        let Some(region) = self.regions.iter().copied().find(|r| r.contains(addr)) else {
            // Not guest memory: nothing registered it, so no thread waits on it.
            return Ok(());
        };
        let (start, len) = region.block_around(addr);
        if self.place(&region, start, len)? {
            return Ok(());
        }
        let page = region.page_of(addr);
        if self.place(&region, page, PAGE)? {
            return Ok(());
        }
        // The page is there already (placed for an earlier fault, or written by a vhost-user
        // back end through the memory file): wake whoever waits.
        wake(&self.uffd, page)
    }

    /// Copies `len` bytes of the snapshot into guest memory at `start`. False when some page
    /// of the range was already present (nothing after it was placed).
    fn place(&mut self, region: &Region, start: u64, len: u64) -> std::io::Result<bool> {
        let buffer = usize::try_from(len)
            .ok()
            .and_then(|len| self.buffer.get_mut(..len))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        read_or_zero(&self.snapshot, buffer, region.file_offset_of(start))?;
        loop {
            let mut copy = UffdioCopy {
                dst: start,
                src: buffer.as_ptr() as u64,
                len,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes from `buffer` (that long, alive for the
            // call) and places them in the registered guest range at `start` (inside a region).
            let rc = unsafe { ioctl_with_mut_ref(&self.uffd, UFFDIO_COPY(), &mut copy) };
            if rc == 0 {
                self.served.fetch_add(len, Ordering::Relaxed);
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(false),
                // The address space is changing (an mremap or fork elsewhere): try again.
                Some(libc::EAGAIN) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// Reads `buffer.len()` bytes of `file` at `offset`; what lies past the end reads as zeros (a
/// file cut short after its check fails no guest access; it cannot be restored right either,
/// but the checksum already vouched for it, so this is a race with the user's own hand).
fn read_or_zero(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buffer[done..].fill(0);
    Ok(())
}

fn wake(uffd: &OwnedFd, page: u64) -> std::io::Result<()> {
    let mut range = UffdioRange {
        start: page,
        len: PAGE,
    };
    // SAFETY: UFFDIO_WAKE reads one uffdio_range, which lives for the call.
    let rc = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_WAKE(), &mut range) };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// read(2) into `buf`: fault messages, whole ones.
fn read_messages(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: read writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_on, Backing};
    use crate::snapshot::memory::{restore, save, Fill};
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    /// Guest memory with content in a few places, saved to a snapshot memory file.
    fn saved_memory(size: u64) -> (File, Vec<(u64, Vec<u8>)>) {
        let mem = create_on(size, Backing::SmallPages).unwrap();
        let content = vec![
            (0x1000, b"low page".to_vec()),
            (0x10_0000 + 5, b"kernel".to_vec()),
            (size - 3, b"end".to_vec()),
            (2 * MIB, vec![7u8; 5 * BLOCK_BYTES + 123]),
        ];
        for (at, bytes) in &content {
            mem.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
        let file = tempfile::tempfile().unwrap();
        save(&mem, &file).unwrap();
        (file, content)
    }

    /// Registered fresh memory, or None where this process may not handle kernel-mode faults
    /// (not root): the restore then copies, which the snapshot's own tests cover.
    fn registered(mem: &GuestMemoryMmap) -> Option<Registered> {
        match Registered::new(mem) {
            // SAFETY: geteuid only reads this process's credentials.
            Err(OnDemandError::Unavailable(e)) if unsafe { libc::geteuid() } != 0 => {
                eprintln!("userfaultfd unavailable without root ({e}); not tested");
                None
            }
            other => Some(other.unwrap()),
        }
    }

    #[test]
    fn memory_reads_as_the_snapshot_and_only_touched_blocks_are_served() {
        let size = 8 * MIB;
        let (file, content) = saved_memory(size);
        let fresh = create_on(size, Backing::SmallPages).unwrap();
        let Some(registered) = registered(&fresh) else {
            return;
        };
        let (_, bytes) = restore(&fresh, &file, Fill::OnDemand).unwrap();
        assert!(bytes > 0);
        let exit = Arc::new(VmExit::new().unwrap());
        let server = registered.serve(&file, &exit).unwrap();
        for (at, expected) in &content {
            let mut back = vec![0u8; expected.len()];
            fresh.read_slice(&mut back, GuestAddress(*at)).unwrap();
            assert!(&back == expected, "content at {at:#x}");
        }
        // A page the snapshot has as zeros reads as zeros.
        let mut zeros = [1u8; 64];
        fresh.read_slice(&mut zeros, GuestAddress(6 * MIB)).unwrap();
        assert_eq!(zeros, [0u8; 64]);
        let served = server.served();
        assert!(served >= 5 * BLOCK, "served {served}");
        assert!(
            served <= 12 * BLOCK,
            "served {served}: more than the blocks read"
        );
        assert!(!exit.is_requested());
    }

    #[test]
    fn a_page_written_through_the_memory_file_first_is_left_as_written() {
        let size = 4 * MIB;
        let (file, _) = saved_memory(size);
        let fresh = create_on(size, Backing::SmallPages).unwrap();
        let Some(registered) = registered(&fresh) else {
            return;
        };
        let exit = Arc::new(VmExit::new().unwrap());
        let server = registered.serve(&file, &exit).unwrap();
        // As a vhost-user back end writes a reply: through the file, not this mapping.
        let region = fresh.iter().next().unwrap();
        let memfd = region.file_offset().unwrap();
        let page = 0x10_0000 + PAGE;
        memfd
            .file()
            .write_all_at(b"from the back end", memfd.start() + page)
            .unwrap();
        // The block around it is served except that page, which is not overwritten.
        let mut kernel = [0u8; 6];
        fresh
            .read_slice(&mut kernel, GuestAddress(0x10_0000 + 5))
            .unwrap();
        assert_eq!(&kernel, b"kernel");
        let mut reply = [0u8; 17];
        fresh.read_slice(&mut reply, GuestAddress(page)).unwrap();
        assert_eq!(&reply, b"from the back end");
        drop(server);
        assert!(!exit.is_requested());
    }

    #[test]
    fn a_block_is_aligned_and_stays_in_its_region() {
        let region = Region {
            host: 0x7f00_0000_0000,
            len: 20 * PAGE,
            file_offset: 0x1000_0000,
        };
        assert_eq!(
            region.block_around(region.host + 3 * PAGE + 5),
            (region.host, BLOCK)
        );
        assert_eq!(
            region.block_around(region.host + 17 * PAGE),
            (region.host + BLOCK, 4 * PAGE)
        );
        assert_eq!(
            region.page_of(region.host + 17 * PAGE + 9),
            region.host + 17 * PAGE
        );
        assert_eq!(
            region.file_offset_of(region.host + PAGE),
            0x1000_0000 + PAGE
        );
        assert!(!region.contains(region.host + 20 * PAGE));
    }
}
