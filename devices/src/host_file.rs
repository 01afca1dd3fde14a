//! Opening the host files a VM reads (kernel, initrd, disk images) and writes (the console),
//! the one way every front end does it.
//!
//! Every file is opened with `O_NONBLOCK`, so that opening a FIFO never waits for a peer that
//! may never come (that wait would sit before any deadline or signal handling, hanging
//! kvmbuild for good). The opened descriptor is then checked with `fstat` — the file as
//! opened, not a path that may since have changed — and only then is `O_NONBLOCK` cleared, so
//! reads and writes behave as usual.
//!
//! Inputs must be regular files (disks may also be block devices): a FIFO, socket, character
//! device or directory has no size and no stable content to boot from. An output may be
//! anything writable; a FIFO without a reader is refused at once (`ENXIO`) rather than waited
//! for.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What kind of file an input must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// A regular file: a kernel or an initrd.
    Regular,
    /// A regular file or a block device: a disk image.
    Disk,
}

/// Opens the input at `path` (writable if `write`) without blocking, and checks that it is
/// the `kind` of file it must be. The error says why in a few words; callers name the path.
pub fn open_input(path: &Path, kind: InputKind, write: bool) -> io::Result<File> {
    let file = open_nonblocking(path, OpenOptions::new().read(true).write(write))?;
    check_kind(&file, kind)?;
    Ok(file)
}

/// Opens `path` for writing, creating it (mode 0666 less the umask) but not truncating it:
/// the caller decides, once it knows what the file is. A FIFO without a reader fails with
/// `ENXIO` instead of waiting for one.
pub fn open_output(path: &Path) -> io::Result<File> {
    open_nonblocking(path, OpenOptions::new().write(true).create(true)).map_err(|e| {
        // ENXIO also comes from sockets and absent devices: say "FIFO" only for a FIFO.
        let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
        match e.raw_os_error() {
            Some(libc::ENXIO) if fifo => io::Error::new(e.kind(), "a FIFO with no reader"),
            _ => e,
        }
    })
}

/// Opens with `O_NONBLOCK`, then clears it on the open descriptor.
fn open_nonblocking(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.custom_flags(libc::O_NONBLOCK).open(path)?;
    set_blocking(&file)?;
    Ok(file)
}

fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd this function's caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer argument on the same open fd.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Refuses an opened file that is not of `kind`, naming what it is instead.
fn check_kind(file: &File, kind: InputKind) -> io::Result<()> {
    let file_type = file.metadata()?.file_type();
    let fits = file_type.is_file() || (kind == InputKind::Disk && file_type.is_block_device());
    if fits {
        return Ok(());
    }
    let what = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "not a file"
    };
    let wanted = match kind {
        InputKind::Regular => "a regular file",
        InputKind::Disk => "a regular file or block device",
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}, not {wanted}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo keeps no pointer.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifos_are_refused_without_waiting_for_a_peer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        for (kind, write) in [(InputKind::Regular, false), (InputKind::Disk, true)] {
            let err = open_input(&fifo, kind, write).unwrap_err();
            assert!(err.to_string().starts_with("a FIFO, not"), "{err}");
        }
        let err = open_output(&fifo).unwrap_err();
        assert_eq!(err.to_string(), "a FIFO with no reader");
    }

    #[test]
    fn directories_and_devices_are_not_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_input(dir.path(), InputKind::Disk, false).unwrap_err();
        assert!(err.to_string().starts_with("a directory"), "{err}");
        let err = open_input(Path::new("/dev/zero"), InputKind::Regular, false).unwrap_err();
        assert!(err.to_string().starts_with("a character device"), "{err}");
    }

    #[test]
    fn regular_files_open_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let file = open_input(&path, InputKind::Regular, false).unwrap();
        // SAFETY: F_GETFL on an open fd.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let out = open_output(&dir.path().join("new")).unwrap();
        assert!(out.metadata().unwrap().is_file());
        assert!(open_output(Path::new("/dev/null")).is_ok());
    }
}
