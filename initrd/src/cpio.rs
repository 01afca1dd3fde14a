//! A deterministic writer for the cpio "newc" format, the format of Linux initramfs images.
//!
//! An [`Archive`] collects entries in memory, keyed by their path, and writes them sorted by
//! path with fixed owners (uid/gid 0), one fixed modification time and inode numbers assigned
//! in that order, so the same entries always give the same bytes. Parent directories are
//! created implicitly. Paths are stored relative (`init`, not `/init`), as GNU cpio expects and
//! as the kernel accepts.
//!
//! Layout of one entry (see the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`):
//! a 110-byte ASCII header (`070701` and 13 eight-digit hex fields), the NUL-terminated name
//! padded to a multiple of 4, then the data padded to a multiple of 4. The archive ends with an
//! entry named `TRAILER!!!`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is empty, climbs out of the archive with `..`, contains a NUL byte (the
    /// kernel reads names as C strings, so it would be cut short there) or is the name that
    /// ends an archive (`TRAILER!!!`).
    #[error("invalid archive path {0:?}")]
    InvalidPath(String),
    /// Two entries claim the same path.
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    /// An entry would be placed below something that is not a directory.
    #[error("{parent:?} is not a directory, so {path:?} cannot be placed in it")]
    NotADirectory {
        /// The entry that is in the way.
        parent: String,
        /// The entry being added.
        path: String,
    },
    /// A symbolic link's target contains a NUL byte, where the kernel would cut it short.
    #[error("symbolic link {0:?} has a NUL byte in its target")]
    NulInTarget(String),
    /// An entry is bigger than the format's 32-bit size field.
    #[error("{0:?} is larger than 4 GiB, the cpio newc limit")]
    TooLarge(String),
}

/// File-type bits of `st_mode`, as cpio stores them.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;

/// The newc magic: "new ASCII" without checksums.
const MAGIC: &[u8] = b"070701";
/// Name of the entry that ends an archive.
const TRAILER: &[u8] = b"TRAILER!!!";
/// Size of the fixed header: the magic and 13 fields of 8 hex digits.
const HEADER_LEN: usize = 6 + 13 * 8;

/// What one archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link with its target.
    Symlink(Vec<u8>),
    /// A character device node (major, minor).
    CharDevice(u32, u32),
    /// A block device node (major, minor).
    BlockDevice(u32, u32),
}

/// One entry: what it is and its permission bits (`0o755` and the like).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's type and contents.
    pub kind: Kind,
    /// Permission bits; the type bits are added from `kind`.
    pub perm: u32,
    /// True for directories added only because something lives below them.
    implicit: bool,
}

impl Entry {
    fn mode(&self) -> u32 {
        let kind = match self.kind {
            Kind::Dir => S_IFDIR,
            Kind::File(_) => S_IFREG,
            Kind::Symlink(_) => S_IFLNK,
            Kind::CharDevice(..) => S_IFCHR,
            Kind::BlockDevice(..) => S_IFBLK,
        };
        kind | (self.perm & 0o7777)
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            Kind::File(data) | Kind::Symlink(data) => data,
            _ => &[],
        }
    }

    fn rdev(&self) -> (u32, u32) {
        match self.kind {
            Kind::CharDevice(major, minor) | Kind::BlockDevice(major, minor) => (major, minor),
            _ => (0, 0),
        }
    }
}

/// An in-memory cpio archive that writes itself deterministically.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    /// Entries by normalised relative path; the map's order is the archive's order. A parent's
    /// path is a prefix of its children's, so it always sorts (and is written) first.
    entries: BTreeMap<Vec<u8>, Entry>,
    /// The modification time of every entry, in seconds since the epoch.
    mtime: u32,
}

impl Archive {
    /// An empty archive whose entries all carry modification time 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the modification time stamped on every entry (a `SOURCE_DATE_EPOCH`).
    pub fn with_mtime(mut self, mtime: u32) -> Self {
        self.mtime = mtime;
        self
    }

    /// Number of entries, implicit directories included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when an entry exists at `path`.
    pub fn contains(&self, path: impl AsRef<Path>) -> bool {
        normalise(path.as_ref()).is_ok_and(|key| self.entries.contains_key(&key))
    }

    /// Adds a directory. Adding one that exists (explicitly or implicitly) only sets its mode.
    pub fn add_dir(&mut self, path: impl AsRef<Path>, perm: u32) -> Result<(), Error> {
        let key = normalise(path.as_ref())?;
        self.make_parents(&key)?;
        match self.entries.get_mut(&key) {
            Some(entry) if entry.kind == Kind::Dir => {
                entry.perm = perm;
                entry.implicit = false;
                Ok(())
            }
            Some(_) => Err(Error::Duplicate(display(&key))),
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        kind: Kind::Dir,
                        perm,
                        implicit: false,
                    },
                );
                Ok(())
            }
        }
    }

    /// Adds a regular file with the given contents and permission bits.
    pub fn add_file(
        &mut self,
        path: impl AsRef<Path>,
        data: Vec<u8>,
        perm: u32,
    ) -> Result<(), Error> {
        self.add(path.as_ref(), Kind::File(data), perm)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn add_symlink(
        &mut self,
        path: impl AsRef<Path>,
        target: impl AsRef<Path>,
    ) -> Result<(), Error> {
        let target = target.as_ref().as_os_str().as_bytes().to_vec();
        if target.contains(&0) {
            return Err(Error::NulInTarget(path.as_ref().display().to_string()));
        }
        self.add(path.as_ref(), Kind::Symlink(target), 0o777)
    }

    /// Adds a device node; `kind` must be [`Kind::CharDevice`] or [`Kind::BlockDevice`].
    pub fn add_node(&mut self, path: impl AsRef<Path>, kind: Kind, perm: u32) -> Result<(), Error> {
        debug_assert!(matches!(kind, Kind::CharDevice(..) | Kind::BlockDevice(..)));
        self.add(path.as_ref(), kind, perm)
    }

    /// Adds a non-directory entry; a path may be used once.
    fn add(&mut self, path: &Path, kind: Kind, perm: u32) -> Result<(), Error> {
        let key = normalise(path)?;
        if let Kind::File(data) | Kind::Symlink(data) = &kind {
            if u32::try_from(data.len()).is_err() {
                return Err(Error::TooLarge(display(&key)));
            }
        }
        self.make_parents(&key)?;
        if self.entries.contains_key(&key) {
            return Err(Error::Duplicate(display(&key)));
        }
        self.entries.insert(
            key,
            Entry {
                kind,
                perm,
                implicit: false,
            },
        );
        Ok(())
    }

    /// Creates the directories above `key` that do not exist yet, mode 0755.
    fn make_parents(&mut self, key: &[u8]) -> Result<(), Error> {
        for (i, _) in key.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            let parent = &key[..i];
            match self.entries.get(parent) {
                Some(entry) if entry.kind == Kind::Dir => {}
                Some(_) => {
                    return Err(Error::NotADirectory {
                        parent: display(parent),
                        path: display(key),
                    });
                }
                None => {
                    let dir = Entry {
                        kind: Kind::Dir,
                        perm: 0o755,
                        implicit: true,
                    };
                    self.entries.insert(parent.to_vec(), dir);
                }
            }
        }
        Ok(())
    }

    /// Writes the archive, trailer included, to `out`.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        for (index, (name, entry)) in self.entries.iter().enumerate() {
            // Inode 0 is avoided: some tools treat it as "no inode".
            let ino = u32::try_from(index + 1).map_err(|_| io::Error::other("too many entries"))?;
            let nlink = if entry.kind == Kind::Dir { 2 } else { 1 };
            let header = Header {
                ino,
                mode: entry.mode(),
                nlink,
                mtime: self.mtime,
                rdev: entry.rdev(),
            };
            write_entry(out, &header, name, entry.data())?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            rdev: (0, 0),
        };
        write_entry(out, &trailer, TRAILER, &[])
    }

    /// The archive's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail, and sizes were checked when entries were added.
        self.write_to(&mut out)
            .expect("writing a cpio archive to memory");
        out
    }
}

/// The header fields that vary between entries.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
}

/// Writes one header, name and data, each padded to 4 bytes.
fn write_entry(out: &mut impl Write, h: &Header, name: &[u8], data: &[u8]) -> io::Result<()> {
    let too_big = |_| io::Error::other("cpio field overflow");
    let name_len = u32::try_from(name.len() + 1).map_err(too_big)?;
    let data_len = u32::try_from(data.len()).map_err(too_big)?;
    let fields = [
        h.ino, h.mode, 0, 0, h.nlink, h.mtime, data_len,
        // The device holding the file: meaningless in an image, always 0.
        0, 0, h.rdev.0, h.rdev.1, name_len,
        // `check` is only used by the "070702" CRC variant.
        0,
    ];
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    for field in fields {
        header.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.write_all(&header)?;
    out.write_all(name)?;
    out.write_all(&[0])?;
    out.write_all(padding(HEADER_LEN + name.len() + 1))?;
    out.write_all(data)?;
    out.write_all(padding(data.len()))
}

/// The zero bytes that bring `len` to a multiple of 4.
fn padding(len: usize) -> &'static [u8] {
    &[0u8; 3][..(4 - len % 4) % 4]
}

/// Turns `/a/./b/` into `a/b`; rejects empty paths, `..`, NUL bytes and the trailer's name,
/// also as the first component of a longer path (whose parent directory it would name).
fn normalise(path: &Path) -> Result<Vec<u8>, Error> {
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(Error::InvalidPath(path.display().to_string()));
    }
    let mut key = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => {
                if !key.is_empty() {
                    key.push(b'/');
                }
                key.extend_from_slice(part.as_bytes());
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidPath(path.display().to_string()));
            }
        }
    }
    let names_the_trailer = key
        .strip_prefix(TRAILER)
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/');
    if key.is_empty() || names_the_trailer {
        return Err(Error::InvalidPath(path.display().to_string()));
    }
    Ok(key)
}

/// A path key for messages.
fn display(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add_file("/init", b"#!init\n".to_vec(), 0o755).unwrap();
        a.add_file("etc/kvmbuild/modules", b"a.ko\n".to_vec(), 0o644)
            .unwrap();
        a.add_symlink("bin/sh", "/init").unwrap();
        a.add_node("dev/console", Kind::CharDevice(5, 1), 0o600)
            .unwrap();
        a.add_dir("tmp", 0o1777).unwrap();
        a
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn same_entries_in_any_order_give_the_same_bytes() {
        let mut b = Archive::new();
        b.add_dir("tmp", 0o1777).unwrap();
        b.add_node("dev/console", Kind::CharDevice(5, 1), 0o600)
            .unwrap();
        b.add_symlink("/bin/sh", "/init").unwrap();
        b.add_file("etc/kvmbuild/modules", b"a.ko\n".to_vec(), 0o644)
            .unwrap();
        b.add_file("init", b"#!init\n".to_vec(), 0o755).unwrap();
        assert_eq!(sample().to_bytes(), b.to_bytes());
    }

    #[test]
    fn output_hash_is_stable() {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(sample().to_bytes());
        // Computed once from this writer; a change here changes every initrd kvmbuild makes.
        assert_eq!(
            hex(&digest),
            "052c9961f75a9b0ab73e20e0c22ee374e80b5e001fc7db513e997a05d10017e1"
        );
    }

    #[test]
    fn header_fields_and_padding() {
        let mut a = Archive::new();
        a.add_file("ab", b"xyz".to_vec(), 0o644).unwrap();
        let bytes = a.to_bytes();
        let header = std::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
        let fields = [
            "00000001", "000081A4", "00000000", "00000000", "00000001", "00000000", "00000003",
            "00000000", "00000000", "00000000", "00000000", "00000003", "00000000",
        ];
        assert_eq!(header, format!("070701{}", fields.concat()));
        // Header + "ab\0" is 113 bytes, padded to 116; "xyz" is padded to 4.
        assert_eq!(&bytes[HEADER_LEN..116], b"ab\0\0\0\0");
        assert_eq!(&bytes[116..120], b"xyz\0");
        assert_eq!(&bytes[120..126], MAGIC);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn parents_are_implicit_and_written_first() {
        let a = sample();
        let names: Vec<String> = a.entries.keys().map(|k| display(k)).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/kvmbuild",
                "etc/kvmbuild/modules",
                "init",
                "tmp"
            ]
        );
        assert!(a.entries[b"etc".as_slice()].implicit);
        assert_eq!(a.entries[b"tmp".as_slice()].mode(), 0o41777);
    }

    #[test]
    fn mtime_is_stamped_on_every_entry() {
        let a = sample().with_mtime(0x1234_5678);
        let bytes = a.to_bytes();
        // The mtime field is the sixth field of the header.
        let mtime = &bytes[6 + 5 * 8..6 + 6 * 8];
        assert_eq!(mtime, b"12345678");
    }

    #[test]
    fn bad_paths_and_conflicts_are_errors() {
        let mut a = Archive::new();
        assert!(matches!(
            a.add_file("", vec![], 0o644),
            Err(Error::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_file("a/../b", vec![], 0o644),
            Err(Error::InvalidPath(_))
        ));
        a.add_file("f", vec![], 0o644).unwrap();
        assert!(matches!(
            a.add_file("/f", vec![], 0o644),
            Err(Error::Duplicate(_))
        ));
        assert!(matches!(
            a.add_file("f/g", vec![], 0o644),
            Err(Error::NotADirectory { .. })
        ));
        assert!(matches!(a.add_dir("f", 0o755), Err(Error::Duplicate(_))));
        a.add_file("d/x", vec![], 0o644).unwrap();
        a.add_dir("d", 0o700).unwrap();
        assert_eq!(a.entries[b"d".as_slice()].perm, 0o700);
    }

    /// Found by the cpio fuzz target: names the kernel would read differently from what was
    /// added (cut at a NUL, or ending the archive early) are refused.
    #[test]
    fn nul_bytes_and_the_trailer_name_are_refused() {
        use std::ffi::OsStr;
        let nul = |b: &'static [u8]| Path::new(OsStr::from_bytes(b));
        let mut a = Archive::new();
        assert!(matches!(
            a.add_file(nul(b"\0"), vec![], 0o644),
            Err(Error::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_dir(nul(b"a\0b"), 0o755),
            Err(Error::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_file("TRAILER!!!", vec![], 0o644),
            Err(Error::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_file("/./TRAILER!!!", vec![], 0o644),
            Err(Error::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_symlink("l", nul(b"x\0y")),
            Err(Error::NulInTarget(_))
        ));
        // Found by fuzzing: its parent would be a directory entry named `TRAILER!!!`, where
        // the kernel stops unpacking.
        assert!(matches!(
            a.add_file("TRAILER!!!/x", vec![], 0o644),
            Err(Error::InvalidPath(_))
        ));
        assert!(matches!(
            a.add_dir("/TRAILER!!!/a/b", 0o755),
            Err(Error::InvalidPath(_))
        ));
        assert!(a.is_empty());
        a.add_file("d/TRAILER!!!", vec![], 0o644).unwrap();
        a.add_file("TRAILER!!!x/y", vec![], 0o644).unwrap();
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let bytes = Archive::new().to_bytes();
        assert_eq!(bytes.len(), 124);
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 11], b"TRAILER!!!\0");
    }
}
