//! Making the guest's writes to its disks durable before the VM ends, without asking the host
//! to flush anything else.
//!
//! `sync(2)` would also send `FUSE_SYNCFS` to every virtio-fs share, and virtiofsd answers it
//! with `syncfs(2)` on the host file system it serves: for `kvmbuild exec`'s root share, the
//! host's own root file system, with whatever other programs left dirty there, on every run.
//! Writes through virtio-fs reach the host as they are made (the guest keeps no write-back
//! cache for them), so only block-backed file systems and the block devices themselves need
//! flushing: each mounted file system whose source is a `/dev/` node is `syncfs`ed, then each
//! block device is `fsync`ed (what a command wrote to a raw device, e.g. with `dd`).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use super::sys;

/// Flushes block-backed file systems and block devices; falls back to `sync(2)` when the
/// mount table cannot be read.
pub fn flush_disks() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        sys::sync();
        return;
    };
    for mountpoint in block_mounts(&mounts) {
        if let Ok(dir) = File::open(&mountpoint) {
            // A file system that fails to flush cannot be helped here; the others still can.
            let _ = sys::syncfs(&dir);
        }
    }
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for device in devices.flatten() {
        if let Ok(node) = File::open(PathBuf::from("/dev").join(device.file_name())) {
            let _ = node.sync_all();
        }
    }
}

/// The mount points of the file systems in a `/proc/mounts` text whose source is a device
/// node, with the table's octal escapes (`\040` for a space) decoded.
pub fn block_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let source = fields.next()?;
            let mountpoint = fields.next()?;
            source
                .starts_with("/dev/")
                .then(|| PathBuf::from(unescape(mountpoint)))
        })
        .collect()
}

/// Decodes `\ooo` octal escapes.
fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_device_backed_mounts_are_flushed() {
        let table = "\
kvmbuild-root / virtiofs ro,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
devtmpfs /dev devtmpfs rw,nosuid,size=1k,mode=755 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
/dev/vda /mnt ext4 rw,relatime 0 0
/dev/vdb1 /data\\040dir xfs rw 0 0
kvmbuild-share0 /work virtiofs rw 0 0
";
        assert_eq!(
            block_mounts(table),
            [PathBuf::from("/mnt"), PathBuf::from("/data dir")]
        );
        assert_eq!(unescape("a\\134b\\0"), OsString::from("a\\b\\0"));
    }
}
