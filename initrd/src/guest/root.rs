//! Making a virtio-fs share the command's root: the host's `/`, read-only, for `kvmbuild exec`.
//!
//! The share is mounted at [`NEW_ROOT`] read-only, fresh tmpfs go on the directories programs
//! expect to write ([`SCRATCH_DIRS`]), the init's `/dev`, `/proc` and `/sys` move into it, and
//! it becomes `/` the way `switch_root` does it for an initramfs (which cannot be
//! `pivot_root`ed): move the mount over `/`, then `chroot`. The init stays PID 1 afterwards
//! and still reaches its ports, modules and descriptors.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use super::{mount, sys, Error, Log};

/// Where the new root is mounted before it becomes `/`.
pub const NEW_ROOT: &str = "/newroot";
/// Directories that get an empty tmpfs over the read-only root, with their modes.
pub const SCRATCH_DIRS: &[(&str, &str)] = &[
    ("tmp", "mode=1777"),
    ("run", "mode=0755"),
    ("var/tmp", "mode=1777"),
];
/// The init's mounts that move into the new root (with their submounts: /dev/pts, /dev/shm).
const MOVED: &[&str] = &["dev", "proc", "sys"];

/// Mounts the share `tag` as the new root and enters it.
pub fn enter(tag: &OsStr, log: &Log) -> Result<(), Error> {
    log.step(format_args!("mounting virtio-fs {tag:?} as the root"));
    let new_root = Path::new(NEW_ROOT);
    mount::mount_virtiofs(tag, new_root, libc::MS_RDONLY, OsStr::new("")).map_err(|source| {
        Error::Mount {
            what: format!("virtio-fs share {tag:?} (the root)"),
            target: new_root.to_path_buf(),
            source,
        }
    })?;
    for &(dir, options) in SCRATCH_DIRS {
        mount_scratch(&new_root.join(dir), options)?;
    }
    for dir in MOVED {
        move_mount(&Path::new("/").join(dir), &new_root.join(dir))?;
    }
    switch_to(new_root)?;
    log.step(format_args!("entered the new root"));
    Ok(())
}

/// An empty tmpfs on `dir`, where the root has that directory (a root without `/var/tmp` is
/// left as it is: a read-only root cannot get a new directory).
fn mount_scratch(dir: &Path, options: &str) -> Result<(), Error> {
    if !dir.is_dir() {
        return Ok(());
    }
    let tmpfs = OsStr::new("tmpfs");
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    sys::mount(tmpfs, dir, tmpfs, flags, OsStr::new(options)).map_err(|source| Error::Mount {
        what: "tmpfs".into(),
        target: dir.to_path_buf(),
        source,
    })
}

fn move_mount(from: &Path, to: &Path) -> Result<(), Error> {
    let empty = OsStr::new("");
    sys::mount(from.as_os_str(), to, empty, libc::MS_MOVE, empty).map_err(|source| Error::Mount {
        what: from.display().to_string(),
        target: to.to_path_buf(),
        source,
    })
}

/// Moves the mount at `new_root` over `/` and makes it this process's root.
fn switch_to(new_root: &Path) -> Result<(), Error> {
    let internal = |what: &str, e: io::Error| Error::Internal(format!("{what}: {e}"));
    std::env::set_current_dir(new_root).map_err(|e| internal("chdir to the new root", e))?;
    let (here, empty) = (OsStr::new("."), OsStr::new(""));
    sys::mount(here, Path::new("/"), empty, libc::MS_MOVE, empty)
        .map_err(|e| internal("move the new root over /", e))?;
    sys::chroot(Path::new(".")).map_err(|e| internal("chroot", e))?;
    std::env::set_current_dir("/").map_err(|e| internal("chdir /", e))
}
