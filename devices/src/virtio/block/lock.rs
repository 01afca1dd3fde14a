//! Image locking: whole-file open-file-description locks, as QEMU's locks see them.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::BlockError;

/// Locks the whole image for as long as `file` stays open: shared for a read-only disk,
/// exclusive for a writable one, so that two VMs never write one image and none reads an
/// image another is writing. Open-file-description locks rather than `flock`, because QEMU
/// takes these (on a few bytes of the image) and a whole-file lock conflicts with them both
/// ways. A file system without lock support gets no lock, as with QEMU.
pub(super) fn lock_image(file: &File, read_only: bool, path: &Path) -> Result<(), BlockError> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    let lock = whole_file_lock(kind);
    // SAFETY: F_OFD_SETLK reads the flock we pass and does not keep the pointer; the fd is
    // open for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(BlockError::Locked {
            path: path.to_path_buf(),
            held: conflicting_lock(file, kind),
        }),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL) => Ok(()),
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source: error,
        }),
    }
}

/// A `kind` lock (`F_RDLCK` or `F_WRLCK`) on the whole file: `l_start` and `l_len` 0 cover it
/// however it grows.
#[allow(clippy::cast_possible_truncation)] // F_RDLCK, F_WRLCK and SEEK_SET are 0 to 2
fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value, and the fields that matter are
    // set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

/// Names the kind of lock that blocks a `kind` lock on the whole of `file`.
fn conflicting_lock(file: &File, kind: libc::c_int) -> &'static str {
    let mut probe = whole_file_lock(kind);
    // SAFETY: F_OFD_GETLK fills in the flock we pass and does not keep the pointer.
    let found = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) } == 0;
    match (found, i32::from(probe.l_type)) {
        (true, libc::F_RDLCK) => "read",
        (true, libc::F_WRLCK) => "write",
        _ => "conflicting",
    }
}
