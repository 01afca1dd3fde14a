//! The disk backend: the image file read and written at an offset straight from and into
//! guest memory, and ranges of it freed or zeroed with `fallocate`.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

/// A file read or written with `pread`/`pwrite` from a moving offset, so that vm-memory's
/// volatile copy loops can move data straight between the file and guest memory.
pub(super) struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    pub(super) fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    fn offset(&self) -> Result<libc::off64_t, VolatileMemoryError> {
        libc::off64_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }

    fn advance(&mut self, n: isize) -> Result<usize, VolatileMemoryError> {
        let n = usize::try_from(n)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the file descriptor is open for the borrow of `self.file`; the destination
        // is valid for writes of `buf.len()` bytes while `guard` lives (VolatileSlice's
        // invariant), and pread writes at most that many.
        let n = unsafe {
            libc::pread64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        // A failed read may have written part of the buffer.
        buf.bitmap()
            .mark_dirty(0, usize::try_from(n).unwrap_or(buf.len()));
        self.advance(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the file descriptor is open for the borrow of `self.file`; the source is
        // valid for reads of `buf.len()` bytes while `guard` lives (VolatileSlice's
        // invariant), and pwrite reads at most that many.
        let n = unsafe {
            libc::pwrite64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.advance(n)
    }
}

/// Deallocates `[offset, offset + len)` of `file`, keeping its size; reads return zeroes.
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes `[offset, offset + len)` of `file` keeping it allocated, where the file system can;
/// punches a hole otherwise (reads return zeroes either way).
pub(super) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let flags = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, flags, offset, len) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
            punch_hole(file, offset, len)
        }
        other => other,
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off64_t::try_from(offset).map_err(invalid)?;
    let len = libc::off64_t::try_from(len).map_err(invalid)?;
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for the
    // borrow of `file`.
    let rc = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
