//! Guest memory served from a snapshot on demand, through userfaultfd(2).
//!
//! Copying a snapshot's pages into guest memory before the guest resumes costs time in
//! proportion to everything the guest had touched when it was saved, most of which a short
//! run never reads again. Instead, guest RAM is registered with a userfaultfd in "missing"
//! mode: the first access to a page that is not yet in the memory file (by a vCPU through
//! KVM, or by one of kvmbuild's own device threads) stops the accessing thread and queues an
//! event here, and a thread of this module fills that page as the snapshot has it (with
//! `UFFDIO_COPY` from the memory file), which also wakes the thread. Only the snapshot's
//! content is registered: guest memory is a fresh memory file, so a page the snapshot has as
//! zeros is left to the kernel's own zero-fill ([`release_holes`]). The same technique lets Firecracker hand
//! page faults to an outside handler; here the handler is a thread of the VMM, reading the
//! snapshot's memory file: checked before the guest resumed, or being checked beside it while
//! the run's input is held back ([`super::check`]).
//!
//! A restore also takes a list of pages to place ahead of the guest, between its faults: the
//! snapshot's hot list, the pages the first run restored from it faulted in, in that order
//! ([`Served::faulted`]). Later runs of the same init and kernel touch much the same memory,
//! so most of their faults never happen.
//!
//! Why pages and not larger blocks: copying is what a warm run pays for, more than the round
//! trips. Serving the 64 KiB block around each fault (which earlier beat 512 KiB and 2 MiB
//! blocks) placed 25 MiB for a warm `exec -- true`, against 10 MiB page by page; with a hot
//! list the page server started the command sooner (test host, release builds, 5 alternating
//! rounds: a median 3.9 s against 7.1 s). Only the first restore, which has no hot list yet,
//! is slower page by page: it makes a round trip per page.
//!
//! What this cannot see: a vhost-user back end (virtiofsd) maps the memory file itself, not
//! this process's registered mapping, so its first access to a page fills that page with
//! zeros instead of the snapshot's content. A restored share's rings are therefore read
//! through kvmbuild's mapping before a back end is handed them (`fault_in_rings` in
//! devices' `vhost_user_fs`), and the buffers the guest hands the back end are ones it has
//! just allocated and written (requests) or that the back end fills (replies, into freshly
//! allocated pages): both kinds are either already in the file through the guest's own access
//! or have no content worth keeping. A buffer whose old content matters and that
//! the guest passes to the back end without touching it first since the restore would read as
//! zeros; kvmbuild's init does nothing of the kind.
//!
//! The userfaultfd ABI is five ioctls on plain structures, written out below with
//! `vmm-sys-util`'s ioctl helpers: the `userfaultfd` crate generates its bindings with
//! bindgen at build time, which would make libclang a build dependency of kvmbuild (and of its
//! Nix package) for these few definitions.
//!
//! userfaultfd(2) needs privilege to handle faults that arise in the kernel, as KVM's do
//! (root, CAP_SYS_PTRACE, or `vm.unprivileged_userfaultfd = 1`); where it is refused,
//! `/dev/userfaultfd` (Linux 6.1+, governed by its file permissions) is tried, and where that
//! fails too the restore copies every page first, as it does for hugetlb-backed memory.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::exit::{ExitReason, VmExit};
use devices::thread_kind::ThreadKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

use super::memory::MappedFile;

/// Errors from setting up on-demand memory: one from [`Registered::new`] means the restore
/// copies instead; one from [`Registered::serve`] fails the run.
#[derive(Debug, thiserror::Error)]
pub enum OnDemandError {
    /// userfaultfd(2) failed (commonly EPERM: no privilege for kernel-mode faults).
    #[error("userfaultfd is not available: {0}")]
    Unavailable(std::io::Error),
    /// The API handshake failed.
    #[error("the userfaultfd API handshake failed: {0}")]
    Api(std::io::Error),
    /// A region could not be registered.
    #[error("guest memory cannot be registered with userfaultfd: {0}")]
    Register(std::io::Error),
    /// The kernel does not offer UFFDIO_COPY on guest memory.
    #[error("userfaultfd cannot fill this guest memory")]
    NoCopy,
    /// The snapshot file or the stop event could not be duplicated or made.
    #[error("cannot prepare the page server: {0}")]
    Setup(std::io::Error),
    /// Guest memory is not backed by a file.
    #[error("guest memory is not backed by a file")]
    MemoryNotAFile,
}

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// The bits in a registration's `ioctls` that say UFFDIO_COPY and UFFDIO_ZEROPAGE work there.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
const UFFDIO_ZEROPAGE_BIT: u64 = 1 << 0x04;
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

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);

/// The page size guest RAM is served in.
const PAGE: u64 = 4096;

/// The most holes [`Registered::serve`] gives back to the kernel: each splits the mapping of
/// guest memory (two more entries in the process's memory map, whose default limit is 65,530),
/// so where the snapshot's content is more scattered than this only the largest holes go.
const MAX_HOLES: usize = 4096;

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
    thread: Option<JoinHandle<Vec<u64>>>,
}

/// What a server did, once stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Bytes placed in guest memory, ahead of the guest or for its faults.
    pub bytes: u64,
    /// The memory file offsets of the pages placed for faults, in the order of the faults:
    /// the hot list for the snapshot's later restores.
    pub faulted: Vec<u64>,
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

    /// Starts the thread that fills the memory from `snapshot` (the memory file, whose data
    /// is in the sorted `content` ranges, [`super::memory::content`]): the
    /// pages at the file offsets in `ahead`, in order, between the guest's faults, and then
    /// only what the guest touches. A failure of that thread ends the VM through `exit`.
    pub fn serve(
        self,
        snapshot: &File,
        content: Vec<(u64, u64)>,
        ahead: Vec<u64>,
        exit: &Arc<VmExit>,
    ) -> Result<OnDemand, OnDemandError> {
        let source = MappedFile::map(snapshot).map_err(OnDemandError::Setup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(OnDemandError::Setup)?;
        let holes = release_holes(&self.uffd, &self.regions, &content);
        let server = Server {
            uffd: self.uffd,
            source,
            content,
            regions: self.regions,
            stop: stop.try_clone().map_err(OnDemandError::Setup)?,
            served: Arc::new(AtomicU64::new(0)),
            ahead,
            holes,
            faulted: Vec::new(),
        };
        let served = server.served.clone();
        let exit = exit.clone();
        let thread = std::thread::Builder::new()
            .name("kvmbuild-pages".into())
            .spawn(move || {
                exit.thread_started(ThreadKind::PageServer);
                let (faulted, result) = server.serve();
                if let Err(e) = result {
                    exit.request(ExitReason::Internal(format!(
                        "serving guest memory from the snapshot failed: {e}"
                    )));
                }
                faulted
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

    /// Stops the server and says what it did.
    pub fn finish(mut self) -> Served {
        let faulted = self.stop_thread();
        Served {
            bytes: self.served(),
            faulted,
        }
    }

    fn stop_thread(&mut self) -> Vec<u64> {
        let _ = self.stop.write(1);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        self.stop_thread();
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

/// The flags of every userfaultfd made here.
const UFFD_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK;
/// Where Linux 6.1 and later offer userfaultfds to whoever may open the file, unrestricted by
/// `vm.unprivileged_userfaultfd`: an administrator can grant a build user's group access.
const USERFAULTFD_DEVICE: &str = "/dev/userfaultfd";

/// A new userfaultfd that can handle kernel-mode faults, after the API handshake: from the
/// system call, or, where that is refused, from [`USERFAULTFD_DEVICE`].
fn open_userfaultfd() -> Result<OwnedFd, OnDemandError> {
    let uffd = match userfaultfd_syscall() {
        Ok(uffd) => uffd,
        Err(refused) => userfaultfd_device().map_err(|device| {
            OnDemandError::Unavailable(std::io::Error::new(
                refused.kind(),
                format!("{refused}; {USERFAULTFD_DEVICE}: {device}"),
            ))
        })?,
    };
    handshake(uffd)
}

fn userfaultfd_syscall() -> std::io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, UFFD_FLAGS) };
    owned_fd(i32::try_from(fd).unwrap_or(-1))
}

fn userfaultfd_device() -> std::io::Result<OwnedFd> {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(USERFAULTFD_DEVICE)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags by value and returns it
    // or -1; it touches no memory of this process.
    let fd = unsafe {
        ioctl_with_val(
            &device,
            USERFAULTFD_IOC_NEW(),
            libc::c_ulong::try_from(UFFD_FLAGS).unwrap_or(0),
        )
    };
    owned_fd(fd)
}

/// Takes ownership of `fd`, just returned by the kernel, or the error for -1.
fn owned_fd(fd: i32) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn handshake(uffd: OwnedFd) -> Result<OwnedFd, OnDemandError> {
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
    if reg.ioctls & (UFFDIO_COPY_BIT | UFFDIO_ZEROPAGE_BIT) != UFFDIO_COPY_BIT | UFFDIO_ZEROPAGE_BIT
    {
        return Err(OnDemandError::NoCopy);
    }
    Ok(())
}

/// The page server's thread state.
struct Server {
    uffd: OwnedFd,
    source: MappedFile,
    /// Where the memory file has non-zero pages (sorted, disjoint); the rest reads as zeros.
    content: Vec<(u64, u64)>,
    regions: Vec<Region>,
    stop: EventFd,
    served: Arc<AtomicU64>,
    /// Pages (memory file offsets) still to place ahead of the guest, next last.
    ahead: Vec<u64>,
    /// The memory file ranges (sorted) left to the kernel: see [`release_holes`].
    holes: Vec<(u64, u64)>,
    /// Pages placed for faults, in order.
    faulted: Vec<u64>,
}

/// How many fault messages are read at once.
const MESSAGES_PER_READ: usize = 16;

/// What woke the server.
enum Wake {
    Faults,
    Idle,
    Stop,
}

impl Server {
    /// Serves faults, and between them places the pages asked for ahead, until stopped.
    /// Returns the pages it placed for faults, and an error only for one that would leave a
    /// guest thread waiting for ever (a page that can be neither read nor placed).
    fn serve(mut self) -> (Vec<u64>, std::io::Result<()>) {
        self.ahead.reverse();
        let result = self.serve_until_stopped();
        (std::mem::take(&mut self.faulted), result)
    }

    fn serve_until_stopped(&mut self) -> std::io::Result<()> {
        let mut messages = [0u8; MSG_SIZE * MESSAGES_PER_READ];
        loop {
            match self.wait(!self.ahead.is_empty())? {
                Wake::Stop => return Ok(()),
                Wake::Faults => self.serve_queued_faults(&mut messages)?,
                Wake::Idle => self.place_next_ahead()?,
            }
        }
    }

    fn serve_queued_faults(&mut self, messages: &mut [u8]) -> std::io::Result<()> {
        let n = match read_messages(&self.uffd, messages) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        for msg in messages[..n - n % MSG_SIZE].chunks_exact(MSG_SIZE) {
            if msg[0] == UFFD_EVENT_PAGEFAULT {
                let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap_or_default());
                self.serve_fault(addr)?;
            }
        }
        Ok(())
    }

    /// Places the next page asked for ahead; one already there is left as it is.
    fn place_next_ahead(&mut self) -> std::io::Result<()> {
        let Some(offset) = self.ahead.pop() else {
            return Ok(());
        };
        let Some(region) = self
            .regions
            .iter()
            .copied()
            .find(|r| offset >= r.file_offset && offset - r.file_offset < r.len)
        else {
            return Ok(());
        };
        let page = region.page_of(region.host + (offset - region.file_offset));
        if in_ranges(&self.holes, region.file_offset_of(page)) {
            // A hole, not registered (a hint from an older snapshot): the kernel fills it.
            return Ok(());
        }
        self.place(&region, page).map(|_| ())
    }

    /// Waits until faults are queued or the server is stopped; with `busy` (work ahead),
    /// only looks.
    fn wait(&self, busy: bool) -> std::io::Result<Wake> {
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
        let timeout = if busy { 0 } else { -1 };
        loop {
            // SAFETY: poll reads and writes the two pollfds, which live for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if rc >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(if fds[1].revents != 0 {
            Wake::Stop
        } else if fds[0].revents & libc::POLLIN != 0 {
            Wake::Faults
        } else {
            Wake::Idle
        })
    }

    /// Places the page holding `addr` and wakes whoever waits for it.
    fn serve_fault(&mut self, addr: u64) -> std::io::Result<()> {
        let Some(region) = self.regions.iter().copied().find(|r| r.contains(addr)) else {
            // Not guest memory: nothing registered it, so no thread waits on it.
            return Ok(());
        };
        let page = region.page_of(addr);
        if self.place(&region, page)? {
            // Only a fault that placed something is recorded, so the record is bounded by
            // guest memory's pages however often the guest faults.
            self.faulted.push(region.file_offset_of(page));
            return Ok(());
        }
        // The page is there already (placed ahead or for an earlier fault, or written by a
        // vhost-user back end through the memory file): wake whoever waits.
        wake(&self.uffd, page)
    }

    /// Fills the page at `page` (in `region`) as the snapshot has it: copied from the file,
    /// or zeros (a hole that stayed registered). False when the page was already present.
    fn place(&mut self, region: &Region, page: u64) -> std::io::Result<bool> {
        let at = region.file_offset_of(page);
        let src = match in_ranges(&self.content, at) {
            true => Some(
                self.source
                    .at(at, PAGE)
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?,
            ),
            false => None,
        };
        self.fill(page, src, PAGE)
    }

    /// Places `len` bytes at guest address `dst`: copied from `src` in the snapshot's mapping,
    /// or zeros. False when a page was already present (the pages before it are placed).
    fn fill(&mut self, mut dst: u64, mut src: Option<u64>, mut left: u64) -> std::io::Result<bool> {
        loop {
            let (rc, done) = match src {
                Some(from) => {
                    let mut copy = UffdioCopy {
                        dst,
                        src: from,
                        len: left,
                        mode: 0,
                        copy: 0,
                    };
                    // SAFETY: UFFDIO_COPY reads `left` bytes at `from` (inside the read-only
                    // mapping of the snapshot, which lives as long as this server) and places
                    // them in the registered guest range at `dst` (inside a region).
                    let rc = unsafe { ioctl_with_mut_ref(&self.uffd, UFFDIO_COPY(), &mut copy) };
                    (rc, copy.copy)
                }
                None => {
                    let mut zero = UffdioZeropage {
                        range: UffdioRange {
                            start: dst,
                            len: left,
                        },
                        mode: 0,
                        zeropage: 0,
                    };
                    // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage and places
                    // zeros in the registered guest range at `dst` (inside a region).
                    let rc =
                        unsafe { ioctl_with_mut_ref(&self.uffd, UFFDIO_ZEROPAGE(), &mut zero) };
                    (rc, zero.zeropage)
                }
            };
            if rc == 0 {
                self.served.fetch_add(left, Ordering::Relaxed);
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            // A partial fill reports how far it got (and wakes that much); an error, -errno.
            let placed = u64::try_from(done).unwrap_or(0).min(left);
            self.served.fetch_add(placed, Ordering::Relaxed);
            dst += placed;
            src = src.map(|from| from + placed);
            left -= placed;
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(false),
                // Stopped short (at a page that is there: the next try says EEXIST), or the
                // address space is changing (an mremap or fork elsewhere): go on.
                Some(libc::EAGAIN) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// Unregisters the guest memory that the snapshot has as zeros (up to [`MAX_HOLES`] stretches
/// of it, the largest), and returns it as memory file ranges.
///
/// Guest memory is a fresh memory file, all zeros, so a hole needs nothing from the snapshot:
/// unregistered, the guest's first touch of it is an ordinary fault that the kernel answers
/// with a zeroed page, instead of a round trip through the server. Most such touches are the
/// guest allocating memory it had free when it was saved. It also lets a vhost-user back end,
/// which maps the memory file directly, see a hole as the zeros it is. A hole that cannot be
/// unregistered stays registered, which is only slower: the server places its zeros.
fn release_holes(uffd: &OwnedFd, regions: &[Region], content: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut holes: Vec<(u64, u64)> = regions
        .iter()
        .flat_map(|region| holes_in(region, content))
        .collect();
    if holes.len() > MAX_HOLES {
        holes.sort_by_key(|&(start, end)| std::cmp::Reverse(end - start));
        holes.truncate(MAX_HOLES);
    }
    holes.sort_unstable();
    holes.retain(|&(start, end)| {
        regions
            .iter()
            .find(|r| start >= r.file_offset && start - r.file_offset < r.len)
            .is_some_and(|r| {
                unregister(uffd, r.host + (start - r.file_offset), end - start).is_ok()
            })
    });
    holes
}

/// The whole pages of `region` that hold none of `content` (sorted, disjoint memory file
/// ranges), as sorted, disjoint memory file ranges.
fn holes_in(region: &Region, content: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let first = region.file_offset;
    let end = region.file_offset + region.len;
    let page_up = |at: u64| (first + (at - first).next_multiple_of(PAGE)).min(end);
    let page_down = |at: u64| at - (at - first) % PAGE;
    let inside = content
        .iter()
        .map(|&(start, stop)| (start.max(first), stop.min(end)))
        .filter(|&(start, stop)| start < stop);
    let mut holes = Vec::new();
    let mut from = first;
    for (start, stop) in inside.chain([(end, end)]) {
        let (hole_start, hole_end) = (page_up(from), page_down(start));
        if hole_start < hole_end {
            holes.push((hole_start, hole_end));
        }
        from = from.max(stop);
    }
    holes
}

/// Whether `at` lies in one of the sorted, disjoint `ranges`.
fn in_ranges(ranges: &[(u64, u64)], at: u64) -> bool {
    let next = ranges.partition_point(|&(_, stop)| stop <= at);
    ranges.get(next).is_some_and(|&(start, _)| start <= at)
}

fn unregister(uffd: &OwnedFd, start: u64, len: u64) -> std::io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range, which lives for the call; the range
    // lies in a registered mapping of guest memory.
    let rc = unsafe { ioctl_with_mut_ref(uffd, UFFDIO_UNREGISTER(), &mut range) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
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
    use crate::snapshot::memory::{self, save};
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;
    /// The long run of content [`saved_memory`] writes at 2 MiB: 80 pages and a bit.
    const RUN: usize = 80 * 4096 + 123;
    /// The pages with content in [`saved_memory`]: one each for the three short writes, and
    /// the run's.
    const CONTENT_PAGES: u64 = 3 + 81;

    /// Guest memory with content in a few places, saved to a snapshot memory file.
    fn saved_memory(size: u64) -> (File, Vec<(u64, Vec<u8>)>) {
        saved_memory_in(size, tempfile::tempfile().unwrap())
    }

    fn saved_memory_in(size: u64, file: File) -> (File, Vec<(u64, Vec<u8>)>) {
        let mem = create_on(size, Backing::SmallPages).unwrap();
        let content = vec![
            (0x1000, b"low page".to_vec()),
            (0x10_0000 + 5, b"kernel".to_vec()),
            (size - 3, b"end".to_vec()),
            (2 * MIB, vec![7u8; RUN]),
        ];
        for (at, bytes) in &content {
            mem.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
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
    fn memory_reads_as_the_snapshot_and_only_touched_content_is_served() {
        let size = 8 * MIB;
        let (file, content) = saved_memory(size);
        let fresh = create_on(size, Backing::SmallPages).unwrap();
        let Some(registered) = registered(&fresh) else {
            return;
        };
        let listed = memory::content(&fresh, &file).unwrap();
        assert!(!listed.is_empty());
        let exit = Arc::new(VmExit::new().unwrap());
        let server = registered.serve(&file, listed, Vec::new(), &exit).unwrap();
        for (at, expected) in &content {
            let mut back = vec![0u8; expected.len()];
            fresh.read_slice(&mut back, GuestAddress(*at)).unwrap();
            assert!(&back == expected, "content at {at:#x}");
        }
        // A page the snapshot has as zeros reads as zeros, without the server.
        let mut zeros = [1u8; 64];
        fresh.read_slice(&mut zeros, GuestAddress(6 * MIB)).unwrap();
        assert_eq!(zeros, [0u8; 64]);
        let served = server.finish();
        assert_eq!(served.bytes, CONTENT_PAGES * PAGE, "each page read, once");
        assert_eq!(served.faulted.len() as u64, CONTENT_PAGES);
        assert!(!exit.is_requested());
    }

    #[test]
    fn pages_asked_for_ahead_are_placed_without_faults_and_faults_are_recorded() {
        let size = 8 * MIB;
        let (file, content) = saved_memory(size);
        let fresh = create_on(size, Backing::SmallPages).unwrap();
        let Some(registered) = registered(&fresh) else {
            return;
        };
        let exit = Arc::new(VmExit::new().unwrap());
        // Two pages ahead, one of them twice, a hole, and an offset past the memory (the last
        // two are ignored).
        let ahead = vec![2 * MIB, 2 * MIB + PAGE, 2 * MIB, 6 * MIB, size + PAGE];
        let listed = memory::content(&fresh, &file).unwrap();
        let server = registered.serve(&file, listed, ahead, &exit).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server.served() < 2 * PAGE && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(server.served(), 2 * PAGE, "the pages ahead are placed");
        let mut ahead_bytes = vec![0u8; 2 * PAGE as usize];
        fresh
            .read_slice(&mut ahead_bytes, GuestAddress(2 * MIB))
            .unwrap();
        assert!(ahead_bytes.iter().all(|&b| b == 7));
        // Reading them faulted nothing; reading the low page does.
        let (at, expected) = &content[0];
        let mut back = vec![0u8; expected.len()];
        fresh.read_slice(&mut back, GuestAddress(*at)).unwrap();
        assert_eq!(&back, expected);
        let served = server.finish();
        assert_eq!(served.faulted, vec![0x1000]);
        assert_eq!(served.bytes, 3 * PAGE);
        assert!(!exit.is_requested());
    }

    /// On tmpfs, reading a hole through a mapping allocates it: the server must place zeros
    /// itself, or every restore would grow a snapshot kept on tmpfs towards guest RAM's size.
    #[test]
    fn serving_does_not_fill_the_snapshots_holes() {
        let Ok(file) = tempfile::tempfile_in("/dev/shm") else {
            eprintln!("no /dev/shm; not tested");
            return;
        };
        let size = 8 * MIB;
        let (file, _) = saved_memory_in(size, file);
        let blocks = |f: &File| std::os::unix::fs::MetadataExt::blocks(&f.metadata().unwrap());
        let before = blocks(&file);
        let fresh = create_on(size, Backing::SmallPages).unwrap();
        let Some(registered) = registered(&fresh) else {
            return;
        };
        let content = memory::content(&fresh, &file).unwrap();
        let exit = Arc::new(VmExit::new().unwrap());
        let server = registered
            .serve(&file, content, vec![4 * MIB], &exit)
            .unwrap();
        let mut all = vec![0u8; size as usize];
        fresh.read_slice(&mut all, GuestAddress(0)).unwrap();
        assert_eq!(&all[0x1000..0x1008], b"low page");
        assert!(all[4 * MIB as usize..5 * MIB as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(server.finish().bytes, CONTENT_PAGES * PAGE);
        assert_eq!(blocks(&file), before, "the snapshot's holes were filled");
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
        let content = memory::content(&fresh, &file).unwrap();
        let server = registered.serve(&file, content, Vec::new(), &exit).unwrap();
        // As a vhost-user back end writes a reply: through the file, not this mapping, into a
        // page that the snapshot has content in and the guest has not touched yet.
        let region = fresh.iter().next().unwrap();
        let memfd = region.file_offset().unwrap();
        let page = 2 * MIB + PAGE;
        memfd
            .file()
            .write_all_at(b"from the back end", memfd.start() + page)
            .unwrap();
        // The pages around it are served; that page is not overwritten.
        let mut run = vec![0u8; 2 * PAGE as usize];
        fresh
            .read_slice(&mut run, GuestAddress(2 * MIB + 2 * PAGE))
            .unwrap();
        assert!(run.iter().all(|&b| b == 7));
        let mut reply = [0u8; 17];
        fresh.read_slice(&mut reply, GuestAddress(page)).unwrap();
        assert_eq!(&reply, b"from the back end");
        drop(server);
        assert!(!exit.is_requested());
    }

    /// The device is the way in for a build user the system call refuses; where this process
    /// may open it, what it gives must work as the system call's does.
    #[test]
    fn the_userfaultfd_device_gives_a_working_userfaultfd() {
        let Ok(uffd) = userfaultfd_device() else {
            eprintln!("{USERFAULTFD_DEVICE} cannot be opened here; not tested");
            return;
        };
        let uffd = handshake(uffd).unwrap();
        let mem = create_on(MIB, Backing::SmallPages).unwrap();
        for region in regions(&mem).unwrap() {
            register(&uffd, &region).unwrap();
        }
    }

    /// Content on every other page makes more holes than may be released: the largest go,
    /// the rest stay registered and are still served as zeros.
    #[test]
    fn only_the_largest_holes_are_released() {
        let pages = 2 * MAX_HOLES as u64 + 8;
        let size = (pages * PAGE).next_multiple_of(2 * MIB) + 2 * MIB;
        let mem = create_on(size, Backing::SmallPages).unwrap();
        for page in (0..pages).step_by(2) {
            mem.write_obj(1u8, GuestAddress(page * PAGE)).unwrap();
        }
        let file = tempfile::tempfile().unwrap();
        save(&mem, &file).unwrap();
        let fresh = create_on(size, Backing::SmallPages).unwrap();
        let Some(registered) = registered(&fresh) else {
            return;
        };
        let content = memory::content(&fresh, &file).unwrap();
        let holes = release_holes(&registered.uffd, &registered.regions, &content);
        assert_eq!(holes.len(), MAX_HOLES);
        assert!(holes.windows(2).all(|w| w[0].1 <= w[1].0), "sorted");
        let tail = ((pages - 1) * PAGE, size);
        assert!(holes.contains(&tail), "the largest hole is released");
        // A one-page hole that stayed registered reads as zeros through the server.
        let exit = Arc::new(VmExit::new().unwrap());
        let server = registered.serve(&file, content, Vec::new(), &exit).unwrap();
        let last_small = (pages - 3) * PAGE;
        assert!(!in_ranges(&holes, last_small));
        assert_eq!(fresh.read_obj::<u8>(GuestAddress(last_small)).unwrap(), 0);
        assert_eq!(
            fresh
                .read_obj::<u8>(GuestAddress(last_small + PAGE))
                .unwrap(),
            1
        );
        drop(server);
        assert!(!exit.is_requested());
    }

    #[test]
    fn the_holes_are_the_pages_between_the_content() {
        let region = Region {
            host: 0x7f00_0000_0000,
            len: 16 * PAGE,
            file_offset: 0x1000_0000,
        };
        let base = region.file_offset;
        let at = |page: u64| base + page * PAGE;
        // Content before and after the region, and ranges inside it.
        let content = [
            (0, at(1)),
            (at(3), at(5)),
            (at(5), at(6)),
            (at(9), at(10)),
            (at(15), at(20)),
        ];
        assert_eq!(
            holes_in(&region, &content),
            vec![(at(1), at(3)), (at(6), at(9)), (at(10), at(15))]
        );
        assert_eq!(holes_in(&region, &[]), vec![(at(0), at(16))]);
        assert_eq!(holes_in(&region, &[(0, u64::MAX)]), vec![]);
        assert!(in_ranges(&content, at(4)));
        assert!(!in_ranges(&content, at(6)));
        assert!(!in_ranges(&[], 0));
    }

    #[test]
    fn a_region_maps_addresses_to_pages_and_file_offsets() {
        let region = Region {
            host: 0x7f00_0000_0000,
            len: 20 * PAGE,
            file_offset: 0x1000_0000,
        };
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
