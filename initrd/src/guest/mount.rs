//! Mounting the basic filesystems, virtio-fs shares and disks.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{sys, Error, Log};
use crate::config::{Disk, Share};

/// The pause between tries while waiting.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// The filesystems every command expects: (type, mount point, flags, data).
const BASICS: &[(&str, &str, libc::c_ulong, &str)] = &[
    (
        "proc",
        "/proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    (
        "sysfs",
        "/sys",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
    ),
    (
        "tmpfs",
        "/dev/shm",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    ),
];

/// Links devtmpfs does not create but shells and build tools use.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// Mounts /proc, /sys, /dev and friends. Already-mounted ones (EBUSY) are fine.
pub fn mount_basics() -> Result<(), Error> {
    for &(fstype, target, flags, data) in BASICS {
        let path = Path::new(target);
        let result = make_dir(path).and_then(|()| {
            sys::mount(
                OsStr::new(fstype),
                path,
                OsStr::new(fstype),
                flags,
                OsStr::new(data),
            )
        });
        match result {
            Err(source) if source.raw_os_error() != Some(libc::EBUSY) => {
                return Err(Error::BasicMount {
                    fstype,
                    target,
                    source,
                });
            }
            _ => {}
        }
    }
    for &(link, target) in DEV_LINKS {
        // An existing link is fine, and a missing one only matters to the few tools that use it.
        let _ = std::os::unix::fs::symlink(target, link);
    }
    let _ = make_dir(Path::new("/tmp"));
    Ok(())
}

/// Mounts one virtio-fs share.
pub fn mount_share(share: &Share, log: &Log) -> Result<(), Error> {
    let (flags, data) = parse_options(&share.options);
    log.step(format_args!(
        "mounting virtio-fs {:?} on {}",
        share.tag,
        share.mountpoint.display()
    ));
    mount_waiting(
        &share.tag,
        &share.mountpoint,
        OsStr::new("virtiofs"),
        flags,
        &data,
    )
    .map_err(|source| Error::Mount {
        what: format!("virtio-fs share {:?}", share.tag),
        target: share.mountpoint.clone(),
        source,
    })
}

/// Mounts the virtio-fs share `tag` on `target`, waiting for its device to register.
pub fn mount_virtiofs(
    tag: &OsStr,
    target: &Path,
    flags: libc::c_ulong,
    data: &OsStr,
) -> io::Result<()> {
    mount_waiting(tag, target, OsStr::new("virtiofs"), flags, data)
}

/// Mounts one disk, trying each block filesystem the kernel knows when no type is given.
pub fn mount_disk(disk: &Disk, log: &Log) -> Result<(), Error> {
    let (flags, data) = parse_options(&disk.options);
    log.step(format_args!(
        "mounting {} on {}",
        disk.device.display(),
        disk.mountpoint.display()
    ));
    let mount_error = |source| Error::Mount {
        what: disk.device.display().to_string(),
        target: disk.mountpoint.clone(),
        source,
    };
    make_dir(&disk.mountpoint)
        .and_then(|()| wait_for_path(&disk.device))
        .map_err(mount_error)?;
    let fstypes = match &disk.fstype {
        Some(fstype) => vec![fstype.clone()],
        None => block_filesystems().map_err(mount_error)?,
    };
    // One try per type: the device exists, so an error now is the filesystem's answer.
    let mut last = io::Error::from_raw_os_error(libc::ENODEV);
    for fstype in fstypes {
        match sys::mount(
            disk.device.as_os_str(),
            &disk.mountpoint,
            &fstype,
            flags,
            &data,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(mount_error(last))
}

/// Creates the mount point and mounts, retrying for a while when the source is not there yet.
fn mount_waiting(
    source: &OsStr,
    target: &Path,
    fstype: &OsStr,
    flags: libc::c_ulong,
    data: &OsStr,
) -> io::Result<()> {
    make_dir(target)?;
    let deadline = Instant::now() + super::DEVICE_WAIT;
    loop {
        match sys::mount(source, target, fstype, flags, data) {
            Err(e) if is_not_ready(&e) && Instant::now() < deadline => {
                std::thread::sleep(RETRY_PAUSE)
            }
            result => return result,
        }
    }
}

/// Errors a virtio-fs mount gives while its device is still being probed: EINVAL is the
/// answer for a tag that is not registered (yet).
fn is_not_ready(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENXIO | libc::EINVAL)
    )
}

/// Waits until `path` exists, for at most [`super::DEVICE_WAIT`].
fn wait_for_path(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + super::DEVICE_WAIT;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        std::thread::sleep(RETRY_PAUSE);
    }
    Ok(())
}

/// The filesystems in /proc/filesystems that need a block device.
fn block_filesystems() -> io::Result<Vec<OsString>> {
    Ok(parse_filesystems(&std::fs::read_to_string(
        "/proc/filesystems",
    )?))
}

/// Parses /proc/filesystems, keeping the lines without `nodev`.
pub fn parse_filesystems(text: &str) -> Vec<OsString> {
    text.lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| OsString::from(l.trim()))
        .filter(|s| !s.is_empty())
        .collect()
}

/// `mkdir -p`.
fn make_dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)
}

/// Splits `mount(8)` options into mount flags and the filesystem's own data string.
pub fn parse_options(options: &OsStr) -> (libc::c_ulong, OsString) {
    let mut flags = 0;
    let mut data: Vec<&[u8]> = Vec::new();
    for option in options
        .as_bytes()
        .split(|&b| b == b',')
        .filter(|o| !o.is_empty())
    {
        match flag(option) {
            Some((set, clear)) => flags = (flags & !clear) | set,
            None => data.push(option),
        }
    }
    (flags, OsString::from_vec(data.join(&b","[..])))
}

/// The (set, clear) flag bits of a generic mount option.
fn flag(option: &[u8]) -> Option<(libc::c_ulong, libc::c_ulong)> {
    let atime = libc::MS_NOATIME | libc::MS_RELATIME | libc::MS_STRICTATIME;
    Some(match option {
        b"defaults" | b"rw" => (0, libc::MS_RDONLY),
        b"ro" => (libc::MS_RDONLY, 0),
        b"nosuid" => (libc::MS_NOSUID, 0),
        b"suid" => (0, libc::MS_NOSUID),
        b"nodev" => (libc::MS_NODEV, 0),
        b"dev" => (0, libc::MS_NODEV),
        b"noexec" => (libc::MS_NOEXEC, 0),
        b"exec" => (0, libc::MS_NOEXEC),
        b"sync" => (libc::MS_SYNCHRONOUS, 0),
        b"async" => (0, libc::MS_SYNCHRONOUS),
        b"dirsync" => (libc::MS_DIRSYNC, 0),
        b"noatime" => (libc::MS_NOATIME, atime),
        b"relatime" => (libc::MS_RELATIME, atime),
        b"strictatime" => (libc::MS_STRICTATIME, atime),
        b"nodiratime" => (libc::MS_NODIRATIME, 0),
        b"lazytime" => (libc::MS_LAZYTIME, 0),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = parse_options(OsStr::new("ro,noatime,discard,cache=none,nosuid"));
        assert_eq!(flags, libc::MS_RDONLY | libc::MS_NOATIME | libc::MS_NOSUID);
        assert_eq!(data, "discard,cache=none");
        assert_eq!(parse_options(OsStr::new("")), (0, OsString::new()));
        assert_eq!(parse_options(OsStr::new("ro,rw")).0, 0);
        assert_eq!(
            parse_options(OsStr::new("noatime,relatime")).0,
            libc::MS_RELATIME
        );
    }

    #[test]
    fn block_filesystems_skip_nodev() {
        let text = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\tvirtiofs\n\tvfat\n";
        assert_eq!(parse_filesystems(text), ["ext4", "vfat"]);
    }

    #[test]
    fn not_ready_errors() {
        assert!(is_not_ready(&io::Error::from_raw_os_error(libc::ENOENT)));
        assert!(is_not_ready(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!is_not_ready(&io::Error::from_raw_os_error(libc::EACCES)));
    }
}
