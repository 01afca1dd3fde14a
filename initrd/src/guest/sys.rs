//! Thin, safe wrappers over the system calls and port I/O the init needs.
//!
//! Each returns `io::Result` with the errno on failure; the callers attach context.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use abi::ports::{EXIT as EXIT_PORT, MARKER as MARKER_PORT};

/// `finit_module` flag: the file is compressed and the kernel should decompress it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Converts a return value of -1 into the errno.
fn check(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Access to kvmbuild's marker and exit ports, when the kernel grants it.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    enabled: bool,
}

impl Ports {
    /// Asks for access to the two ports. Without it (a kernel in lockdown, say) writes are
    /// skipped and the init ends the VM by powering off instead.
    pub fn open() -> Self {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        let enabled = unsafe {
            libc::ioperm(
                libc::c_ulong::from(abi::ports::BASE),
                libc::c_ulong::from(abi::ports::LEN),
                1,
            )
        } == 0;
        Self { enabled }
    }

    /// Marks a boot phase.
    pub fn mark(&self, phase: abi::BootPhase) {
        self.out(MARKER_PORT, phase.byte());
    }

    /// Reaches the snapshot point: kvmbuild may save the VM here, and later runs may resume
    /// from here (the init cannot tell which it is).
    pub fn snapshot_point(&self) {
        self.out(abi::ports::SNAPSHOT, 1);
    }

    /// Reports the exit status; on kvmbuild this ends the VM before it returns.
    pub fn exit(&self, status: u8) {
        self.out(EXIT_PORT, status);
    }

    fn out(&self, port: u16, value: u8) {
        if self.enabled {
            outb(port, value);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn outb(port: u16, value: u8) {
    // SAFETY: `Ports::open` obtained permission for exactly these ports through ioperm; the
    // instruction touches no memory and the VMM traps it.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn outb(_port: u16, _value: u8) {}

/// mount(2).
pub fn mount(
    source: &OsStr,
    target: &Path,
    fstype: &OsStr,
    flags: libc::c_ulong,
    data: &OsStr,
) -> io::Result<()> {
    let (source, target, fstype, data) = (
        cstring(source)?,
        cstring(target.as_os_str())?,
        cstring(fstype)?,
        cstring(data)?,
    );
    let data_ptr = if data.as_bytes().is_empty() {
        std::ptr::null()
    } else {
        data.as_ptr().cast()
    };
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (or null data).
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    };
    check(ret.into())
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let path = cstring(path.as_os_str())?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) }.into())
}

/// Loads a module from an open file; `compressed` asks the kernel to decompress it.
pub fn finit_module(file: &std::fs::File, params: &CStr, compressed: bool) -> io::Result<()> {
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: the fd is open for the call's duration and `params` is NUL-terminated.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    check(ret)
}

/// Loads a module from an image in memory.
pub fn init_module(image: &[u8], params: &CStr) -> io::Result<()> {
    // SAFETY: the kernel reads `image.len()` bytes from the slice and the NUL-terminated params.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len(),
            params.as_ptr(),
        )
    };
    check(ret)
}

/// Flushes every filesystem's dirty data.
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// syncfs(2): flushes the file system that holds `file`.
pub fn syncfs(file: &std::fs::File) -> io::Result<()> {
    // SAFETY: syncfs takes an open descriptor, which `file` keeps open for the call.
    check(unsafe { libc::syncfs(file.as_raw_fd()) }.into())
}

/// Powers the machine off; returns only on failure.
pub fn power_off() -> io::Error {
    // SAFETY: reboot with RB_POWER_OFF has no memory arguments; PID 1 is allowed to call it.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// Waits until everything written to the terminal `fd` has been transmitted (tcdrain).
pub fn drain(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: tcdrain takes no pointers; on a non-terminal it fails with ENOTTY.
    let ret = unsafe { libc::tcdrain(fd) };
    check(ret.into())
}

/// Waits for any child; returns its pid and wait status.
pub fn wait_any() -> io::Result<(libc::pid_t, i32)> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer for the call.
    let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
    if pid == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok((pid, status))
    }
}

/// Sets the wall clock (`CLOCK_REALTIME`) to `ns` nanoseconds since the Unix epoch.
pub fn set_wall_clock(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(ns / 1_000_000_000)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        // Below 10^9, so it fits any c_long.
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the call's duration.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }.into())
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel's entropy pool, credited as fully random (the host read it
/// from its own generator), then reseeds the kernel's generator from the pool at once, so
/// nothing drawn from here on depends only on the state before.
pub fn add_entropy_and_reseed(seed: &[u8]) -> io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let bits =
        i32::try_from(seed.len() * 8).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let len = i32::try_from(seed.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut info = Vec::with_capacity(8 + seed.len().next_multiple_of(4));
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(seed);
    info.resize(8 + seed.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a rand_pool_info with `buf_size` bytes after its header, alive for
    // the call; the kernel only reads it.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) }.into())?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) }.into())
}

/// Seconds since boot, for verbose logs that line up with the kernel's timestamps.
pub fn uptime() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// True when `fd` is open.
pub fn fd_is_open(fd: libc::c_int) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Makes `file` this process's descriptor `fd`.
pub fn dup_to(file: &std::fs::File, fd: libc::c_int) -> io::Result<()> {
    // SAFETY: dup2 on an open descriptor; the old `fd`, if any, is replaced atomically.
    let ret = unsafe { libc::dup2(file.as_raw_fd(), fd) };
    check(ret.into())
}

/// In a freshly forked child: start a session and take the terminal on stdin, if it is one,
/// as the controlling terminal, so job control and ^C reach the command.
///
/// Only async-signal-safe calls are made, as is required between fork and exec.
pub fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid and ioctl(TIOCSCTTY) take no pointers; both are async-signal-safe.
    unsafe {
        if libc::setsid() == -1 {
            return Err(io::Error::last_os_error());
        }
        if libc::isatty(0) == 1 {
            // Failing to get a controlling terminal is harmless for a batch command.
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
    }
    Ok(())
}
