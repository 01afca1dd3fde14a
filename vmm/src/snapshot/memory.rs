//! Guest RAM in a snapshot: only the pages the guest touched, at their offsets in the guest
//! memory file, in a sparse file of the same size.
//!
//! Guest RAM is a memfd whose pages exist only once written; `SEEK_DATA`/`SEEK_HOLE` list
//! them, so a 512 MiB guest that booted to its init saves (and restores) tens of MiB, not
//! 512. Restoring checks the saved pages and, unless they are to be served as the guest
//! touches them ([`super::on_demand`]), writes them into a fresh memfd, which vhost-user back
//! ends can map as they would a cold VM's memory. It writes through the file, not through
//! the mapping: a store into the mapping takes a page fault for every 4 KiB page, which `pwrite` avoids
//! (64 MiB restored in 48 ms instead of 85 ms, release build on this project's machine), and
//! the guest's first touch of a page maps it as it would on a cold boot. Hugetlb memory is the
//! exception: its files refuse `write(2)`, so the file is read straight into its mapping
//! ([`read_in`]), one fault per 2 MiB page, and checked apart.
//!
//! Every non-zero page is covered by a CRC-32, with its offset, as it is written and as it
//! is read back: the check must run at memory speed on each restore, and it guards against a
//! damaged cache file (the cache is the user's own; a forged snapshot is outside the threat
//! model, as a forged kernel is).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::SnapshotError;

/// One guest RAM region: its bytes in this process and its offset in the memory file.
struct Region<'a> {
    host: *mut u8,
    len: usize,
    file: &'a File,
    file_offset: u64,
}

fn regions(mem: &GuestMemoryMmap) -> Result<Vec<Region<'_>>, SnapshotError> {
    mem.iter()
        .map(|region| {
            let file = region.file_offset().ok_or(SnapshotError::MemoryNotAFile)?;
            Ok(Region {
                host: region.as_ptr(),
                len: usize::try_from(region.len()).map_err(|_| SnapshotError::MemoryNotAFile)?,
                file: file.file(),
                file_offset: file.start(),
            })
        })
        .collect()
}

/// The next range of data in `file` at or after `from` and before `end`, if any.
fn next_data(file: &File, from: u64, end: u64) -> Result<Option<(u64, u64)>, SnapshotError> {
    let seek = |offset: u64, whence| {
        let offset = libc::off_t::try_from(offset).map_err(|_| SnapshotError::MemoryNotAFile)?;
        // SAFETY: lseek only moves this descriptor's file position.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        match at {
            -1 => {
                let e = std::io::Error::last_os_error();
                // ENXIO: no data at or after `offset`.
                match e.raw_os_error() == Some(libc::ENXIO) {
                    true => Ok(None),
                    false => Err(SnapshotError::Io("find the guest's pages", e)),
                }
            }
            at => Ok(u64::try_from(at).ok()),
        }
    };
    if from >= end {
        return Ok(None);
    }
    let Some(start) = seek(from, libc::SEEK_DATA)?.filter(|&s| s < end) else {
        return Ok(None);
    };
    let stop = seek(start, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
    Ok(Some((start, stop)))
}

/// The guest's data ranges in `file` (guest memory or a snapshot of it), per region.
fn data_ranges(file: &File, region: &Region) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let end = region.file_offset + region.len as u64;
    let mut ranges = Vec::new();
    let mut at = region.file_offset;
    while let Some((start, stop)) = next_data(file, at, end)? {
        ranges.push((start, stop));
        at = stop;
    }
    Ok(ranges)
}

/// A snapshot's memory file, mapped read-only: the source its pages are checked from here, and
/// copied from by `UFFDIO_COPY` ([`super::on_demand`]: the kernel copies from the file's page
/// cache straight into guest memory; were the file cut short while mapped, that copy fails
/// with EFAULT and the run ends with that error). Reading through the mapping instead of
/// `pread` saves copying every page once more: checking 66 MiB took 14 ms this way against
/// 52 ms natively, and 200 ms against 500 ms in the test host. Only the file's data ranges are
/// ever read through it: a read of a hole of a tmpfs file through a mapping allocates that
/// page in the file.
pub struct MappedFile {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by its one MappedFile; sending it to another
// thread moves that ownership.
unsafe impl Send for MappedFile {}

impl MappedFile {
    /// Maps all of `file`, read-only.
    pub fn map(file: &File) -> std::io::Result<MappedFile> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a new read-only private mapping of `len` bytes of an open file; nothing else
        // refers to the address range it returns.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedFile { addr, len })
    }

    /// The address of `len` bytes at file offset `offset`, if the file holds them.
    pub fn at(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        (end <= self.len as u64).then(|| self.addr as u64 + offset)
    }

    /// The bytes at file offsets `start..end`, if the file holds them.
    fn bytes(&self, start: u64, end: u64) -> Option<&[u8]> {
        let len = usize::try_from(end.checked_sub(start)?).ok()?;
        let addr = self.at(start, end - start)?;
        // SAFETY: the range lies in the mapping, which lives as long as `self`, and is only
        // read. The file is kvmbuild's own cache file, which nothing writes once saved; one
        // cut short under a running kvmbuild would end the process with SIGBUS here, as it
        // would any program reading it through a mapping.
        Some(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by MappedFile::map and is unmapped once, here.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The unit in which pages are compared, checked and written.
const PAGE: usize = 4096;
/// How much of the memory file a restore checks at a time, between looks at whether to go on
/// (a multiple of [`PAGE`]).
const RESTORE_CHUNK: usize = 256 * PAGE;
/// A page of zeros to compare pages with: slice equality on bytes is a `memcmp`, which stays
/// fast in unoptimised builds (a byte loop there made a restore take seconds under TCG).
const ZERO_PAGE: [u8; PAGE] = [0; PAGE];

fn is_zero(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len()]
}

/// The runs of pages in `bytes` (which starts at memory-file offset `offset`, page-aligned)
/// that are not all zero, as (offset, bytes). A page the guest touched but left zero needs no
/// saving: a fresh memfd reads as zero.
fn nonzero_runs(offset: u64, bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut runs = Vec::new();
    let mut run_start: Option<usize> = None;
    for (i, page) in bytes.chunks(PAGE).enumerate() {
        let zero = is_zero(page);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * PAGE),
            (true, Some(start)) => {
                runs.push((offset + start as u64, &bytes[start..i * PAGE]));
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        runs.push((offset + start as u64, &bytes[start..]));
    }
    runs
}

/// Adds each page of `runs` (from [`nonzero_runs`]: every non-zero page, at its memory-file
/// offset) to `crc`, with its offset: what counts is the memory's content, not how a file
/// system lays out holes or how the reader splits its reads. The runs come from the one scan
/// for zero pages that also decides what is written.
fn checksum(crc: &mut crc32fast::Hasher, runs: &[(u64, &[u8])]) {
    for &(offset, run) in runs {
        for (at, page) in (offset..).step_by(PAGE).zip(run.chunks(PAGE)) {
            crc.update(&at.to_le_bytes());
            crc.update(page);
        }
    }
}

/// The bytes of `region` at memory-file offsets `start..stop`.
///
/// # Safety
/// No vCPU may run (nothing else writes guest memory while the slice lives), and
/// `start..stop` must lie in the region.
#[allow(clippy::cast_possible_truncation)] // within the region, whose length is a usize
unsafe fn region_bytes<'a>(region: &Region<'a>, start: u64, stop: u64) -> &'a mut [u8] {
    let at = (start - region.file_offset) as usize;
    // SAFETY: the caller guarantees the range lies in the region, which is mapped for `len`
    // bytes at `host` for the life of the guest memory, and that nothing else uses it now.
    unsafe { std::slice::from_raw_parts_mut(region.host.add(at), (stop - start) as usize) }
}

/// Copies the pages the guest touched into `out` (created empty, sized here) and returns
/// their checksum. No vCPU may run.
pub fn save(mem: &GuestMemoryMmap, out: &File) -> Result<u32, SnapshotError> {
    let regions = regions(mem)?;
    let size = regions
        .iter()
        .map(|r| r.file_offset + r.len as u64)
        .max()
        .unwrap_or(0);
    out.set_len(size)
        .map_err(|e| SnapshotError::Io("size the memory file", e))?;
    let mut crc = crc32fast::Hasher::new();
    for region in &regions {
        for (start, stop) in data_ranges(region.file, region)? {
            // SAFETY: the range came from this region's part of the memory file, and the
            // caller guarantees no vCPU runs.
            let bytes = unsafe { region_bytes(region, start, stop) };
            let runs = nonzero_runs(start, bytes);
            checksum(&mut crc, &runs);
            for (at, run) in runs {
                out.write_all_at(run, at)
                    .map_err(|e| SnapshotError::Io("write the memory file", e))?;
            }
        }
    }
    Ok(crc.finalize())
}

/// What reading a memory file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// The checksum of the pages read, to compare with the saved one.
    pub crc: u32,
    /// How many bytes of the memory file were read.
    pub bytes: u64,
}

/// Refuses a memory file whose size is not that of `mem`'s memory file.
fn check_size(regions: &[Region], input: &File) -> Result<(), SnapshotError> {
    let size = input
        .metadata()
        .map_err(|e| SnapshotError::Io("read the memory file", e))?
        .len();
    let expected = regions
        .iter()
        .map(|r| r.file_offset + r.len as u64)
        .max()
        .unwrap_or(0);
    match size == expected {
        true => Ok(()),
        false => Err(SnapshotError::Corrupt("the memory file's size")),
    }
}

/// Reads the page-aligned memory file ranges `ranges` through the file's mapping `source`, a
/// chunk at a time, adding their non-zero pages to `crc` and handing each run of them to
/// `each` on the way. Returns the bytes read, or `None`, having stopped early, once `go_on`
/// says no (asked before each chunk).
fn scan(
    crc: &mut crc32fast::Hasher,
    ranges: &[(u64, u64)],
    source: &MappedFile,
    go_on: &dyn Fn() -> bool,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<Option<u64>, SnapshotError> {
    let mut read = 0;
    for &(start, stop) in ranges {
        for at in (start..stop).step_by(RESTORE_CHUNK) {
            if !go_on() {
                return Ok(None);
            }
            let end = stop.min(at + RESTORE_CHUNK as u64);
            let bytes = source
                .bytes(at, end)
                .ok_or(SnapshotError::Corrupt("the memory file's size"))?;
            let runs = nonzero_runs(at, bytes);
            checksum(crc, &runs);
            for (page_at, run) in runs {
                each(page_at, run)?;
            }
            read += end - at;
        }
    }
    Ok(Some(read))
}

/// The data ranges of `region`'s part of `input`, widened to whole pages, as they were
/// checksummed, whatever block size the file system reports data in (regions start on a
/// page).
fn page_ranges(input: &File, region: &Region) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let region_end = region.file_offset + region.len as u64;
    let mut ranges = Vec::new();
    for (start, stop) in data_ranges(input, region)? {
        let start = start - (start - region.file_offset) % PAGE as u64;
        let stop = stop.next_multiple_of(PAGE as u64).min(region_end);
        add_range(&mut ranges, start, stop);
    }
    Ok(ranges)
}

/// Reads a memory file written by [`save`], writes it into `mem` (fresh, all zero), and
/// returns what it read. No vCPU may run.
pub fn restore(mem: &GuestMemoryMmap, input: &File) -> Result<Checked, SnapshotError> {
    let regions = regions(mem)?;
    check_size(&regions, input)?;
    let source = MappedFile::map(input).map_err(|e| SnapshotError::Io("map the memory file", e))?;
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = 0;
    for region in &regions {
        let fill = |at, run: &[u8]| {
            region
                .file
                .write_all_at(run, at)
                .map_err(|e| SnapshotError::Io("fill guest memory", e))
        };
        let ranges = page_ranges(input, region)?;
        bytes += scan(&mut crc, &ranges, &source, &|| true, fill)?.unwrap_or(0);
    }
    Ok(Checked {
        crc: crc.finalize(),
        bytes,
    })
}

/// Where a memory file written by [`save`] for `mem` has content: its data, as sorted,
/// disjoint `start..end` ranges of whole pages. Everything else is zeros, which a page server
/// places without reading the file (a read of a hole through a mapping would allocate it in a
/// tmpfs-backed cache, growing the snapshot on every restore). Found from the file's holes
/// alone, without reading it: [`check`] reads it.
pub fn content(mem: &GuestMemoryMmap, input: &File) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let regions = regions(mem)?;
    check_size(&regions, input)?;
    let mut content = Vec::new();
    for region in &regions {
        for (start, stop) in page_ranges(input, region)? {
            add_range(&mut content, start, stop);
        }
    }
    Ok(content)
}

/// Reads a memory file written by [`save`] through its mapping `source`, where [`content`]
/// found its data (`content`), and returns what it read, or `None` when `go_on` stopped it
/// early. Writes nothing and makes no system call: it may run beside the guest.
pub fn check(
    content: &[(u64, u64)],
    source: &MappedFile,
    go_on: &dyn Fn() -> bool,
) -> Result<Option<Checked>, SnapshotError> {
    let mut crc = crc32fast::Hasher::new();
    let read = scan(&mut crc, content, source, go_on, |_, _| Ok(()))?;
    Ok(read.map(|bytes| Checked {
        crc: crc.finalize(),
        bytes,
    }))
}

/// Reads the memory file's `content` (as [`content`] found it) straight into `mem`'s mapping
/// with `pread`: no page fault on the file's side, one per page of guest memory. For hugetlb
/// memory, whose files refuse `write(2)`. Checks nothing ([`check`] does) and returns the
/// bytes read. No vCPU may run.
pub fn read_in(
    mem: &GuestMemoryMmap,
    input: &File,
    content: &[(u64, u64)],
) -> Result<u64, SnapshotError> {
    let mut bytes = 0;
    for region in &regions(mem)? {
        let (first, end) = (region.file_offset, region.file_offset + region.len as u64);
        for &(start, stop) in content {
            let (start, stop) = (start.max(first), stop.min(end));
            if start >= stop {
                continue;
            }
            // SAFETY: `start..stop` was cut to lie in the region, and the caller guarantees
            // no vCPU runs.
            let into = unsafe { region_bytes(region, start, stop) };
            input
                .read_exact_at(into, start)
                .map_err(|e| SnapshotError::Io("fill guest memory", e))?;
            bytes += stop - start;
        }
    }
    Ok(bytes)
}

/// Appends `start..end` to sorted, disjoint `ranges`, merging it with the last one when they
/// touch (ranges come in file order).
fn add_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match ranges.last_mut() {
        Some((_, last_end)) if *last_end == start => *last_end = end,
        _ => ranges.push((start, end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_left_out_of_runs() {
        let mut bytes = vec![0u8; PAGE * 5];
        bytes[PAGE] = 1;
        bytes[PAGE * 2 + 7] = 2;
        bytes[PAGE * 4 + PAGE - 1] = 3;
        let runs: Vec<_> = nonzero_runs(0x10000, &bytes)
            .into_iter()
            .map(|(at, run)| (at, run.len()))
            .collect();
        assert_eq!(
            runs,
            vec![
                (0x10000 + PAGE as u64, 2 * PAGE),
                (0x10000 + 4 * PAGE as u64, PAGE)
            ]
        );
    }

    #[test]
    fn memory_round_trips_through_a_sparse_file() {
        let mem = small_pages(8 << 20);
        use vm_memory::{Bytes, GuestAddress};
        mem.write_slice(b"kernel", GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[0u8; 64], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(b"end", GuestAddress((8 << 20) - 3))
            .unwrap();
        // A run longer than a restore reads at once, ending mid-chunk.
        let long = vec![7u8; 3 * RESTORE_CHUNK + PAGE];
        mem.write_slice(&long, GuestAddress(0x30_0000)).unwrap();
        let file = tempfile::tempfile().unwrap();
        let saved = save(&mem, &file).unwrap();

        let fresh = small_pages(8 << 20);
        assert_eq!(restore(&fresh, &file).unwrap().crc, saved);
        assert_restored(&fresh, &long);
        // Read in instead, then checked apart: the same memory, the same checksum.
        let listed = content(&fresh, &file).unwrap();
        let read = small_pages(8 << 20);
        let bytes = read_in(&read, &file, &listed).unwrap();
        assert_eq!(bytes, listed.iter().map(|(a, b)| b - a).sum::<u64>());
        assert_restored(&read, &long);
        let source = MappedFile::map(&file).unwrap();
        assert_eq!(
            check(&listed, &source, &|| true).unwrap().unwrap().crc,
            saved
        );

        // A flipped byte is caught.
        file.write_all_at(b"X", 0x10_0001).unwrap();
        let other = small_pages(8 << 20);
        assert_ne!(restore(&other, &file).unwrap().crc, saved);
        // The content is where the file has data, merged across read chunks.
        let listed = content(&other, &file).unwrap();
        let source = MappedFile::map(&file).unwrap();
        let checked = check(&listed, &source, &|| true).unwrap().unwrap();
        assert_ne!(checked.crc, saved);
        assert!(check(&listed, &source, &|| false).unwrap().is_none());
        assert_eq!(
            listed,
            vec![
                (0x10_0000, 0x10_1000),
                (0x30_0000, 0x30_0000 + long.len() as u64),
                ((8 << 20) - 4096, 8 << 20)
            ]
        );
        // A memory file of another size is refused.
        let small = small_pages(4 << 20);
        assert!(restore(&small, &file).is_err());
        assert!(content(&small, &file).is_err());
    }

    /// Guest memory on 4 KiB pages, which `pwrite` fills, whatever else the host offers.
    fn small_pages(size: u64) -> GuestMemoryMmap {
        crate::memory::create_on(size, crate::memory::Backing::SmallPages).unwrap()
    }

    /// What `memory_round_trips_through_a_sparse_file` wrote, read back from `mem`.
    fn assert_restored(mem: &GuestMemoryMmap, long: &[u8]) {
        use vm_memory::{Bytes, GuestAddress};
        let mut buf = [0u8; 6];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf, b"kernel");
        let mut end = [0u8; 3];
        mem.read_slice(&mut end, GuestAddress((8 << 20) - 3))
            .unwrap();
        assert_eq!(&end, b"end");
        let mut back = vec![0u8; long.len()];
        mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
        assert!(back == long);
    }

    /// Hugetlb memory refuses `pwrite`; the memory file is read into its mapping instead
    /// (where the host has free huge pages).
    #[test]
    fn hugetlb_memory_is_read_in_and_checked_apart() {
        use crate::memory::{huge_pages, Backing, HostPages};
        use vm_memory::{Bytes, GuestAddress};
        let size = 8 << 20;
        if HostPages::read().hugetlb_available < size / huge_pages::HUGE_PAGE {
            eprintln!("skipped: this host has no free hugetlb pages");
            return;
        }
        let mem = small_pages(size);
        mem.write_slice(b"kernel", GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(b"end", GuestAddress(size - 3)).unwrap();
        let long = vec![7u8; 3 * RESTORE_CHUNK + PAGE];
        mem.write_slice(&long, GuestAddress(0x30_0000)).unwrap();
        let file = tempfile::tempfile().unwrap();
        let saved = save(&mem, &file).unwrap();

        let huge = crate::memory::create_on(size, Backing::Hugetlb).unwrap();
        assert!(restore(&huge, &file).is_err(), "pwrite into hugetlb");
        drop(huge);
        let huge = crate::memory::create_on(size, Backing::Hugetlb).unwrap();
        let listed = content(&huge, &file).unwrap();
        read_in(&huge, &file, &listed).unwrap();
        assert_restored(&huge, &long);
        let source = MappedFile::map(&file).unwrap();
        assert_eq!(
            check(&listed, &source, &|| true).unwrap().unwrap().crc,
            saved
        );
    }
}
