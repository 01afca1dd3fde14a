//! The command's standard streams on virtio-console ports, for `kvmbuild exec`.
//!
//! The host offers three generic ports (`VIRTIO_CONSOLE_F_MULTIPORT`) named by
//! [`STDIO_PORT_NAMES`]. They are character devices, not terminals: bytes pass unchanged in
//! both directions, a read returns 0 (end of file) once the host has closed its side of
//! `kvmbuild.stdin` and delivered everything before it, and writes wait while the host is not
//! reading. Linux creates `/dev/vportNpM` for each port once its driver has handled the
//! device's control messages, so the init waits for them (a bounded wait, like any device).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Error;
use crate::config::STDIO_PORT_NAMES;

/// Where Linux lists the virtio-console ports, each with a `name` attribute.
const PORTS_DIR: &str = "/sys/class/virtio-ports";
/// The pause between looks while waiting.
const RETRY_PAUSE: Duration = Duration::from_millis(2);

/// The open streams: stdin (read), stdout and stderr (write).
pub struct StdioPorts {
    /// The command's stdin.
    pub stdin: File,
    /// The command's stdout.
    pub stdout: File,
    /// The command's stderr.
    pub stderr: File,
}

/// Waits for the three ports and opens each once (a port can be open only once at a time).
pub fn open() -> Result<StdioPorts, Error> {
    let [stdin, stdout, stderr] = wait_for_nodes()?;
    Ok(StdioPorts {
        stdin: open_port(&stdin, false)?,
        stdout: open_port(&stdout, true)?,
        stderr: open_port(&stderr, true)?,
    })
}

fn open_port(node: &Path, write: bool) -> Result<File, Error> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .open(node)
        .map_err(|source| Error::Tty {
            path: node.to_path_buf(),
            source,
        })
}

/// The device nodes of the three ports, in [`STDIO_PORT_NAMES`] order, once all exist.
fn wait_for_nodes() -> Result<[PathBuf; 3], Error> {
    let deadline = Instant::now() + super::DEVICE_WAIT;
    loop {
        let found = find_ports(Path::new(PORTS_DIR));
        if let [Some(a), Some(b), Some(c)] = found.clone().map(|p| p.filter(|p| p.exists())) {
            return Ok([a, b, c]);
        }
        if Instant::now() >= deadline {
            let missing: Vec<&str> = STDIO_PORT_NAMES
                .iter()
                .zip(&found)
                .filter(|(_, node)| node.is_none())
                .map(|(name, _)| *name)
                .collect();
            return Err(Error::Internal(format!(
                "the host's stdio ports did not appear (missing: {})",
                if missing.is_empty() {
                    "device nodes".to_string()
                } else {
                    missing.join(", ")
                }
            )));
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// For each name in [`STDIO_PORT_NAMES`], the `/dev` node of the port that has it, by reading
/// `DIR/*/name`.
pub fn find_ports(dir: &Path) -> [Option<PathBuf>; 3] {
    let mut found: [Option<PathBuf>; 3] = Default::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(name) = read_name(&entry.path().join("name")) else {
            continue;
        };
        if let Some(i) = STDIO_PORT_NAMES.iter().position(|n| *n == name) {
            found[i] = Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    found
}

/// The `/dev` node of the port named `name`, if the driver has listed it.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(PORTS_DIR).ok()?;
    entries.flatten().find_map(|entry| {
        let found = read_name(&entry.path().join("name")).ok()? == name;
        found.then(|| Path::new("/dev").join(entry.file_name()))
    })
}

fn read_name(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (entry, name) in [
            ("vport1p0", "kvmbuild.stdin\n"),
            ("vport1p1", "kvmbuild.stdout\n"),
            ("vport1p2", "other"),
            ("vport1p3", "kvmbuild.stderr\n"),
        ] {
            std::fs::create_dir(dir.path().join(entry)).unwrap();
            std::fs::write(dir.path().join(entry).join("name"), name).unwrap();
        }
        std::fs::create_dir(dir.path().join("vport1p4")).unwrap();
        let found = find_ports(dir.path());
        assert_eq!(
            found,
            [
                Some("/dev/vport1p0".into()),
                Some("/dev/vport1p1".into()),
                Some("/dev/vport1p3".into())
            ]
        );
        assert_eq!(find_ports(&dir.path().join("absent")), [None, None, None]);
    }
}
