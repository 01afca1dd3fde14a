//! The cpio newc writer: archives from arbitrary entries, read back by an independent reader
//! that checks the format as the kernel's initramfs unpacker reads it, and compared with what
//! was added.

#![no_main]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use arbitrary::Arbitrary;
use initrd::cpio::{Archive, Kind};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    Dir(&'a [u8], u32),
    File(&'a [u8], &'a [u8], u32),
    Symlink(&'a [u8], &'a [u8]),
    Char(&'a [u8], u32, u32, u32),
    Block(&'a [u8], u32, u32, u32),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    mtime: u32,
    ops: Vec<Op<'a>>,
}

/// What the archive should hold at a path: mode (type and permission bits), data, device.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    mode: u32,
    data: Vec<u8>,
    rdev: (u32, u32),
}

fuzz_target!(|input: Input| {
    let mut archive = Archive::new().with_mtime(input.mtime);
    let mut expected: BTreeMap<Vec<u8>, Expected> = BTreeMap::new();
    for op in input.ops {
        let (path, result, mode, data, rdev) = match op {
            Op::Dir(p, perm) => (
                p,
                archive.add_dir(os(p), perm),
                0o040000 | perm & 0o7777,
                vec![],
                (0, 0),
            ),
            Op::File(p, data, perm) => (
                p,
                archive.add_file(os(p), data.to_vec(), perm),
                0o100000 | perm & 0o7777,
                data.to_vec(),
                (0, 0),
            ),
            Op::Symlink(p, target) => (
                p,
                archive.add_symlink(os(p), os(target)),
                0o120777,
                target.to_vec(),
                (0, 0),
            ),
            Op::Char(p, major, minor, perm) => (
                p,
                archive.add_node(os(p), Kind::CharDevice(major, minor), perm),
                0o020000 | perm & 0o7777,
                vec![],
                (major, minor),
            ),
            Op::Block(p, major, minor, perm) => (
                p,
                archive.add_node(os(p), Kind::BlockDevice(major, minor), perm),
                0o060000 | perm & 0o7777,
                vec![],
                (major, minor),
            ),
        };
        if result.is_ok() {
            let key = normalise(path);
            assert!(archive.contains(os(path)));
            // Parents appear as directories (mode 0755 unless set explicitly).
            for (i, _) in key.iter().enumerate().filter(|&(_, &b)| b == b'/') {
                expected.entry(key[..i].to_vec()).or_insert(Expected {
                    mode: 0o040755,
                    data: vec![],
                    rdev: (0, 0),
                });
            }
            expected.insert(key, Expected { mode, data, rdev });
        }
    }
    assert_eq!(archive.len(), expected.len());

    let bytes = archive.to_bytes();
    let read = read_newc(&bytes, input.mtime);
    assert_eq!(read.len(), expected.len());
    for ((name, got), (key, want)) in read.iter().zip(&expected) {
        assert_eq!(name, key);
        assert_eq!(got, want, "{}", String::from_utf8_lossy(name));
    }
});

fn os(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// The archive key of a path: its normal components joined by `/`.
fn normalise(path: &[u8]) -> Vec<u8> {
    let parts: Vec<&[u8]> = os(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.as_bytes()),
            _ => None,
        })
        .collect();
    parts.join(&b'/')
}

fn field(header: &[u8], index: usize) -> u32 {
    let text = std::str::from_utf8(&header[6 + 8 * index..6 + 8 * (index + 1)]).unwrap();
    assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text:?}");
    u32::from_str_radix(text, 16).unwrap()
}

fn pad4(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// Reads a newc archive the way the kernel does (names are C strings; `TRAILER!!!` ends the
/// archive), checking every field kvmbuild fixes; returns the entries in archive order.
fn read_newc(bytes: &[u8], mtime: u32) -> Vec<(Vec<u8>, Expected)> {
    let mut out: Vec<(Vec<u8>, Expected)> = Vec::new();
    let mut at = 0;
    loop {
        let header = &bytes[at..at + 110];
        assert_eq!(&header[..6], b"070701");
        let name_size = field(header, 11) as usize;
        let file_size = field(header, 6) as usize;
        assert!(name_size >= 1);
        let name_at = at + 110;
        let raw_name = &bytes[name_at..name_at + name_size];
        assert_eq!(raw_name.last(), Some(&0), "name not NUL-terminated");
        let name = &raw_name[..name_size - 1];
        // The kernel reads the name as a C string: an inner NUL would cut it short.
        assert!(!name.contains(&0), "NUL inside the name {name:?}");
        let data_at = pad4(name_at + name_size);
        assert!(bytes[name_at + name_size..data_at].iter().all(|&b| b == 0));
        let data = &bytes[data_at..data_at + file_size];
        let next = pad4(data_at + file_size);
        assert!(bytes[data_at + file_size..next].iter().all(|&b| b == 0));
        at = next;
        if name == b"TRAILER!!!" {
            break;
        }
        let mode = field(header, 1);
        assert_eq!(field(header, 0) as usize, out.len() + 1, "inode numbers");
        assert_eq!((field(header, 2), field(header, 3)), (0, 0), "uid/gid");
        assert_eq!(field(header, 5), mtime);
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        assert_eq!(field(header, 4), nlink);
        if mode & 0o170000 == 0o120000 {
            // The kernel passes the target to symlink() as a C string.
            assert!(!data.contains(&0), "NUL inside a symlink target");
        }
        // Sorted, and every parent before its children, as a directory.
        if let Some((prev, _)) = out.last() {
            assert!(prev.as_slice() < name, "not sorted");
        }
        assert!(!name.is_empty() && !name.starts_with(b"/") && !name.ends_with(b"/"));
        for (i, _) in name.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            // `out` is sorted (checked above), so the parent is found by binary search.
            let parent = out
                .binary_search_by(|(n, _)| n.as_slice().cmp(&name[..i]))
                .map(|at| &out[at].1);
            assert!(
                parent.is_ok_and(|e| e.mode & 0o170000 == 0o040000),
                "no parent directory for {name:?}"
            );
        }
        let entry = Expected {
            mode,
            data: data.to_vec(),
            rdev: (field(header, 9), field(header, 10)),
        };
        out.push((name.to_vec(), entry));
    }
    assert_eq!(at, bytes.len(), "bytes after the trailer");
    out
}
