//! Building a complete initrd: kvmbuild's init, a module closure, and extra files.
//!
//! Layout of the image:
//!
//! | guest path | what |
//! |---|---|
//! | `/init` | the static init binary |
//! | `/lib/modules/VERSION/...` | the module closure, at the same relative paths as on the host |
//! | `/etc/kvmbuild/modules` | the load list: one guest module path per line, in load order |
//! | `/etc/kvmbuild/config` | baked-in settings, when given ([`crate::config`]) |
//! | `/dev/console` | the console node (char 5:1), so the kernel gives init stdin/stdout/stderr |
//! | `/proc`, `/sys`, `/dev`, `/tmp`, `/root` | mount points and scratch space |
//! | included paths | as given |

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::compress::{self, Compression};
use crate::config::{self, Config};
use crate::cpio::{self, Archive, Kind};
use crate::modules::{self, Module, ModuleTree};

/// Errors building an initrd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The init binary needs a dynamic loader, which the initrd does not have.
    #[error("{} is not statically linked: the initrd has no dynamic loader", .0.display())]
    InitNotStatic(PathBuf),
    /// An included path is a FIFO or socket, which an initrd cannot hold.
    #[error("cannot include {}: not a file, directory, symlink or device", .0.display())]
    Unsupported(PathBuf),
    /// An `--include` argument without a host path.
    #[error("bad include {0:?} (expected HOST_PATH[:GUEST_PATH])")]
    BadInclude(String),
    /// Resolving the module closure failed.
    #[error(transparent)]
    Modules(#[from] modules::Error),
    /// A module file could not be decompressed.
    #[error("cannot decompress {}", path.display())]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// Why.
        #[source]
        source: compress::Error,
    },
    /// Two files claim one path, or a path is invalid.
    #[error(transparent)]
    Archive(#[from] cpio::Error),
    /// Compressing the image failed.
    #[error(transparent)]
    Compress(#[from] compress::Error),
}

/// A host path copied into the initrd. Directories are copied recursively; symbolic links
/// inside them stay links, while a link named directly is followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Include {
    /// The path on the host.
    pub host: PathBuf,
    /// Where it goes in the guest.
    pub guest: PathBuf,
}

impl FromStr for Include {
    type Err = Error;

    /// `HOST_PATH:GUEST_PATH`, or `HOST_PATH` alone for the same path in the guest. The split
    /// is at the last `:`.
    fn from_str(arg: &str) -> Result<Self, Error> {
        let (host, guest) = arg.rsplit_once(':').unwrap_or((arg, arg));
        if host.is_empty() || guest.is_empty() {
            return Err(Error::BadInclude(arg.to_owned()));
        }
        Ok(Self {
            host: host.into(),
            guest: guest.into(),
        })
    }
}

/// Where the init's bytes come from.
#[derive(Clone, Debug)]
pub enum InitBinary {
    /// A file on the host (`--init`, `$KVMBUILD_INIT`).
    File(PathBuf),
    /// Bytes the caller already holds, such as the init embedded in kvmbuild itself.
    Embedded(&'static [u8]),
}

impl InitBinary {
    /// The binary's bytes.
    pub fn bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>, Error> {
        match self {
            Self::File(path) => read(path).map(std::borrow::Cow::Owned),
            Self::Embedded(bytes) => Ok(std::borrow::Cow::Borrowed(bytes)),
        }
    }

    /// How to name it in a message.
    pub fn describe(&self) -> PathBuf {
        match self {
            Self::File(path) => path.clone(),
            Self::Embedded(_) => PathBuf::from("(kvmbuild's embedded init)"),
        }
    }
}

/// What goes into an initrd.
#[derive(Clone, Debug)]
pub struct InitrdSpec {
    /// The init binary, installed as `/init`.
    pub init: InitBinary,
    /// A kernel's `lib/modules/VERSION` directory; `None` for a kernel that needs no modules.
    pub modules_dir: Option<PathBuf>,
    /// Module (or alias) names whose closure is included and loaded at boot.
    pub modules: Vec<String>,
    /// Extra files and directories.
    pub includes: Vec<Include>,
    /// Settings baked into `/etc/kvmbuild/config`.
    pub config: Option<Config>,
    /// How the whole image is compressed.
    pub compression: Compression,
    /// Store modules uncompressed, so the guest kernel loads them without decompressing and the
    /// image's own compression does the work once.
    pub decompress_modules: bool,
    /// Modification time of every entry (a `SOURCE_DATE_EPOCH`).
    pub mtime: u32,
}

impl InitrdSpec {
    /// A spec with kvmbuild's default modules from `modules_dir`, no includes, no compression.
    pub fn new(init: InitBinary, modules_dir: Option<PathBuf>) -> Self {
        Self {
            init,
            modules_dir,
            modules: modules::DEFAULT_MODULES
                .iter()
                .map(|m| m.to_string())
                .collect(),
            includes: Vec::new(),
            config: None,
            compression: Compression::None,
            decompress_modules: true,
            mtime: 0,
        }
    }
}

/// A built initrd.
#[derive(Clone, Debug)]
pub struct Initrd {
    /// The image, compressed as asked.
    pub image: Vec<u8>,
    /// The modules it loads, in order.
    pub modules: Vec<Module>,
    /// The kernel version the modules are for.
    pub kernel_version: Option<String>,
}

/// Builds the initrd that `spec` describes. The same spec and the same input files always
/// give the same bytes.
pub fn build_initrd(spec: &InitrdSpec) -> Result<Initrd, Error> {
    let mut archive = Archive::new().with_mtime(spec.mtime);
    add_skeleton(&mut archive)?;
    add_init(&mut archive, &spec.init)?;
    let (modules, kernel_version) = match &spec.modules_dir {
        Some(dir) => {
            let tree = ModuleTree::open(dir)?;
            let closure = tree.closure(&spec.modules)?;
            add_modules(&mut archive, &tree, &closure, spec.decompress_modules)?;
            (closure, Some(tree.version().to_owned()))
        }
        None => (Vec::new(), None),
    };
    if let Some(config) = &spec.config {
        archive.add_file(config::CONFIG_PATH, config.render().into_bytes(), 0o644)?;
    }
    for include in &spec.includes {
        add_include(&mut archive, include)?;
    }
    let mut image = Vec::new();
    spec.compression.compress(&archive.to_bytes(), &mut image)?;
    Ok(Initrd {
        image,
        modules,
        kernel_version,
    })
}

/// The directories and the console node every kvmbuild initrd has.
fn add_skeleton(archive: &mut Archive) -> Result<(), Error> {
    for dir in ["dev", "proc", "sys", "etc/kvmbuild", "root"] {
        archive.add_dir(dir, 0o755)?;
    }
    archive.add_dir("tmp", 0o1777)?;
    archive.add_node("dev/console", Kind::CharDevice(5, 1), 0o600)?;
    Ok(())
}

fn add_init(archive: &mut Archive, init: &InitBinary) -> Result<(), Error> {
    let binary = init.bytes()?;
    if !is_static_elf(&binary) {
        return Err(Error::InitNotStatic(init.describe()));
    }
    archive.add_file("init", binary.into_owned(), 0o755)?;
    Ok(())
}

/// True for an ELF file without a `PT_INTERP` program header, that is one the kernel can run
/// without a dynamic loader. Non-ELF files (scripts) are false.
pub fn is_static_elf(binary: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    // Offsets come from the file: every read and every sum is checked, a miss means "not static".
    let bytes_at = |at: usize, len: usize| binary.get(at..at.checked_add(len)?);
    let u16_at = |at: usize| bytes_at(at, 2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let u32_at = |at: usize| bytes_at(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| {
        let b = bytes_at(at, 8)?;
        let word = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        usize::try_from(word).ok()
    };
    // Only 64-bit little-endian ELF, the only kind an x86-64 guest runs as init here.
    if !binary.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let entry_at = |i: usize| phoff.checked_add(i.checked_mul(phentsize)?);
    (0..phnum).all(|i| matches!(entry_at(i).and_then(u32_at), Some(kind) if kind != PT_INTERP))
}

/// Adds the closure under `lib/modules/VERSION` and the load list.
fn add_modules(
    archive: &mut Archive,
    tree: &ModuleTree,
    closure: &[Module],
    decompress: bool,
) -> Result<(), Error> {
    let base = Path::new("/lib/modules").join(tree.version());
    let mut load_list = Vec::with_capacity(closure.len());
    for module in closure {
        let host = tree.dir().join(&module.path);
        let mut data = read(&host)?;
        let mut guest = base.join(&module.path);
        if decompress {
            if let Some(plain) = compress::decompress(&data)
                .map_err(|source| Error::Decompress { path: host, source })?
            {
                data = plain;
                guest = strip_compression_suffix(&guest);
            }
        }
        load_list.push(guest.to_string_lossy().into_owned());
        archive.add_file(&guest, data, 0o644)?;
    }
    archive.add_file(
        "etc/kvmbuild/modules",
        modules::render_load_list(&load_list).into_bytes(),
        0o644,
    )?;
    Ok(())
}

/// `x.ko.xz` → `x.ko`.
fn strip_compression_suffix(path: &Path) -> PathBuf {
    match path.extension().and_then(|e| e.to_str()) {
        Some("xz" | "zst" | "gz") => path.with_extension(""),
        _ => path.to_path_buf(),
    }
}

/// Copies one include: a file, a device, or a directory tree.
fn add_include(archive: &mut Archive, include: &Include) -> Result<(), Error> {
    // A link named directly is followed: `--include /usr/bin/python3` wants the program.
    let meta = fs::metadata(&include.host).map_err(|source| Error::Read {
        path: include.host.clone(),
        source,
    })?;
    add_path(archive, &include.host, &include.guest, &meta)
}

fn add_path(
    archive: &mut Archive,
    host: &Path,
    guest: &Path,
    meta: &fs::Metadata,
) -> Result<(), Error> {
    let perm = meta.mode() & 0o7777;
    let kind = meta.file_type();
    if kind.is_dir() {
        archive.add_dir(guest, perm)?;
        let entries = fs::read_dir(host).map_err(|source| Error::Read {
            path: host.to_path_buf(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| Error::Read {
                path: host.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            add_path(archive, &path, &guest.join(entry.file_name()), &meta)?;
        }
    } else if kind.is_file() {
        archive.add_file(guest, read(host)?, perm)?;
    } else if kind.is_symlink() {
        let target = fs::read_link(host).map_err(|source| Error::Read {
            path: host.to_path_buf(),
            source,
        })?;
        archive.add_symlink(guest, target)?;
    } else if kind.is_char_device() || kind.is_block_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let node = if kind.is_char_device() {
            Kind::CharDevice(major, minor)
        } else {
            Kind::BlockDevice(major, minor)
        };
        archive.add_node(guest, node, perm)?;
    } else {
        return Err(Error::Unsupported(host.to_path_buf()));
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    crate::host_input::read_regular(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// An init binary named by `$KVMBUILD_INIT`, which overrides the one embedded in kvmbuild.
pub fn init_from_env() -> Option<PathBuf> {
    std::env::var_os("KVMBUILD_INIT")
        .filter(|p| !p.as_bytes().is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A minimal static ELF header with one PT_LOAD program header, or PT_INTERP if asked.
    fn elf(interp: bool) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 0x38];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        e[0x40..0x44].copy_from_slice(&(if interp { 3u32 } else { 1u32 }).to_le_bytes());
        e
    }

    /// A module tree with one plain, one xz and one zstd module.
    fn fixture() -> (tempfile::TempDir, InitrdSpec) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("lib/modules/6.1.0-t");
        fs::create_dir_all(dir.join("kernel")).unwrap();
        fs::write(dir.join("kernel/a.ko"), b"module a").unwrap();
        let mut xz = Vec::new();
        {
            use std::io::Write;
            let mut enc = liblzma::write::XzEncoder::new(&mut xz, 1);
            enc.write_all(b"module b").unwrap();
            enc.finish().unwrap();
        }
        fs::write(dir.join("kernel/b.ko.xz"), xz).unwrap();
        fs::write(
            dir.join("kernel/c-d.ko.zst"),
            zstd::encode_all(&b"module c"[..], 1).unwrap(),
        )
        .unwrap();
        fs::write(dir.join("modules.dep"), "kernel/a.ko:\nkernel/b.ko.xz: kernel/a.ko\nkernel/c-d.ko.zst: kernel/b.ko.xz kernel/a.ko\n").unwrap();
        fs::write(root.path().join("init"), elf(false)).unwrap();
        let extra = root.path().join("extra");
        fs::create_dir_all(extra.join("sub")).unwrap();
        fs::write(extra.join("sub/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(extra.join("sub/tool"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("sub/tool", extra.join("link")).unwrap();
        let mut spec = InitrdSpec::new(InitBinary::File(root.path().join("init")), Some(dir));
        spec.modules = vec!["c_d".into()];
        spec.includes = vec![format!("{}:/opt/extra", extra.display()).parse().unwrap()];
        (root, spec)
    }

    fn listing(image: &[u8]) -> String {
        String::from_utf8_lossy(image).into_owned()
    }

    #[test]
    fn image_has_init_modules_load_list_and_includes() {
        let (_root, spec) = fixture();
        let built = build_initrd(&spec).unwrap();
        let names: Vec<&str> = built.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c_d"]);
        assert_eq!(built.kernel_version.as_deref(), Some("6.1.0-t"));
        let text = listing(&built.image);
        for needle in [
            "init\0",
            "dev/console\0",
            "lib/modules/6.1.0-t/kernel/b.ko\0",
            "module b",
            "lib/modules/6.1.0-t/kernel/c-d.ko\0",
            "/lib/modules/6.1.0-t/kernel/a.ko\n/lib/modules/6.1.0-t/kernel/b.ko\n/lib/modules/6.1.0-t/kernel/c-d.ko\n",
            "opt/extra/sub/tool\0",
            "opt/extra/link\0",
        ] {
            assert!(text.contains(needle), "missing {needle:?}");
        }
    }

    #[test]
    fn modules_can_stay_compressed() {
        let (_root, mut spec) = fixture();
        spec.decompress_modules = false;
        let text = listing(&build_initrd(&spec).unwrap().image);
        assert!(text.contains("/lib/modules/6.1.0-t/kernel/b.ko.xz\n"));
        assert!(text.contains("kernel/b.ko.xz\0") && !text.contains("kernel/b.ko\0"));
    }

    #[test]
    fn builds_are_reproducible_and_compress() {
        let (_root, mut spec) = fixture();
        spec.config = Some(Config {
            command: vec!["/bin/true".into()],
            ..Config::default()
        });
        let plain = build_initrd(&spec).unwrap().image;
        assert_eq!(plain, build_initrd(&spec).unwrap().image);
        assert!(listing(&plain).contains("kvmbuild.cmd=/bin/true\n"));
        for c in [Compression::Gzip, Compression::Zstd] {
            spec.compression = c;
            let packed = build_initrd(&spec).unwrap().image;
            assert_eq!(compress::decompress(&packed).unwrap().unwrap(), plain);
        }
    }

    #[test]
    fn dynamic_init_is_refused() {
        let (root, spec) = fixture();
        fs::write(root.path().join("init"), elf(true)).unwrap();
        assert!(matches!(build_initrd(&spec), Err(Error::InitNotStatic(_))));
        fs::write(root.path().join("init"), b"#!/bin/sh\n").unwrap();
        assert!(matches!(build_initrd(&spec), Err(Error::InitNotStatic(_))));
    }

    #[test]
    fn missing_module_and_collisions_are_errors() {
        let (_root, mut spec) = fixture();
        spec.modules.push("zzz".into());
        let err = build_initrd(&spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "module \"zzz\" not found for kernel 6.1.0-t"
        );
        let (_root, mut spec) = fixture();
        spec.includes.push(Include {
            host: spec.init.describe(),
            guest: "/init".into(),
        });
        assert!(matches!(
            build_initrd(&spec),
            Err(Error::Archive(cpio::Error::Duplicate(_)))
        ));
    }

    #[test]
    fn include_arguments() {
        let inc: Include = "/bin/busybox:/bin/sh".parse().unwrap();
        assert_eq!(
            inc,
            Include {
                host: "/bin/busybox".into(),
                guest: "/bin/sh".into()
            }
        );
        let same: Include = "/usr/bin/uname".parse().unwrap();
        assert_eq!(same.guest, Path::new("/usr/bin/uname"));
        assert!("/x:".parse::<Include>().is_err());
    }

    #[test]
    fn no_modules_dir_means_no_modules() {
        let (_root, mut spec) = fixture();
        spec.modules_dir = None;
        let built = build_initrd(&spec).unwrap();
        assert!(built.modules.is_empty() && built.kernel_version.is_none());
        assert!(!listing(&built.image).contains("etc/kvmbuild/modules"));
    }
}
