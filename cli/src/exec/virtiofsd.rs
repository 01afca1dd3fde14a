//! The virtiofsd processes that serve `kvmbuild exec`'s shares: started, connected and always
//! stopped.
//!
//! kvmbuild binds and listens on each share's socket itself and hands the listening descriptor
//! to virtiofsd (`--fd`), so the VMM can connect at once: no waiting for a socket file to
//! appear, no sleep loop. kvmbuild then closes its own copy, so that should virtiofsd die before
//! accepting, the connection fails instead of waiting forever. Every virtiofsd gets a
//! parent-death signal (SIGKILL kvmbuild, and it goes too), and [`Virtiofsd`] stops its
//! process when dropped: SIGTERM, a bounded wait, then SIGKILL.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting virtiofsd.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// No virtiofsd binary.
    #[error("virtiofsd not found on PATH: install it (cargo install virtiofsd) or give --virtiofsd PATH")]
    NotFound,
    /// The given binary is not there.
    #[error("--virtiofsd {}: not an executable file", .0.display())]
    BadBinary(PathBuf),
    /// The socket could not be created.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The descriptor number the listening socket has in virtiofsd.
const LISTEN_FD: i32 = 3;
/// How long a stopping virtiofsd gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// How one share is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareSpec {
    /// The host directory.
    pub dir: PathBuf,
    /// Refuse writes (virtiofsd `--readonly`).
    pub read_only: bool,
}

/// Finds virtiofsd: the given path, else `virtiofsd` on `PATH`, else `/usr/libexec/virtiofsd`
/// and `/usr/lib/qemu/virtiofsd` (where distributions install it).
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, VirtiofsdError> {
    if let Some(path) = explicit {
        return is_executable(path)
            .then(|| path.to_path_buf())
            .ok_or_else(|| VirtiofsdError::BadBinary(path.to_path_buf()));
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("virtiofsd"))
        .chain(["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"].map(PathBuf::from))
        .find(|p| is_executable(p))
        .ok_or(VirtiofsdError::NotFound)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running virtiofsd, stopped on drop.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Listens on `socket` and starts `binary` serving `share` on it.
    pub fn start(binary: &Path, share: &ShareSpec, socket: &Path) -> Result<Self, VirtiofsdError> {
        let listener = UnixListener::bind(socket).map_err(|source| VirtiofsdError::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
        let listen_fd = OwnedFd::from(listener);
        let mut cmd = Command::new(binary);
        cmd.args(arguments(share, running_as_root()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let raw = listen_fd.as_raw_fd();
        // SAFETY: the hook runs between fork and exec and makes only async-signal-safe calls
        // (dup2, fcntl, setpgid, prctl, getppid, kill); `raw` stays open in the parent until
        // spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                place_listener(raw)?;
                leave_terminal_signals()?;
                die_with_parent()
            });
        }
        let child = cmd.spawn().map_err(|source| VirtiofsdError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        // Only virtiofsd holds the listener now: if it dies, connecting fails at once.
        drop(listen_fd);
        Ok(Self {
            child,
            socket: socket.to_path_buf(),
        })
    }

    /// The socket the VMM connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id, for tests and messages.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process: SIGTERM, then SIGKILL after [`STOP_GRACE`], and reaps it.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own unreaped child; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// virtiofsd's arguments for `share`. As root it sandboxes itself in namespaces and can act
/// as the guest's users; as an ordinary user it cannot, and runs unsandboxed, creating files
/// as that user.
pub fn arguments(share: &ShareSpec, as_root: bool) -> Vec<OsString> {
    let mut dir = OsString::from("--shared-dir=");
    dir.push(&share.dir);
    let mut args = vec![
        OsString::from(format!("--fd={LISTEN_FD}")),
        dir,
        // A read-only share cannot change under the guest through it; let the guest cache.
        OsString::from(if share.read_only {
            "--cache=always"
        } else {
            "--cache=auto"
        }),
        OsString::from("--log-level=error"),
    ];
    if share.read_only {
        args.push("--readonly".into());
    }
    if !as_root {
        args.push("--sandbox=none".into());
    }
    args
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// In a child before exec: puts the listening socket at [`LISTEN_FD`], open across exec.
fn place_listener(raw: i32) -> std::io::Result<()> {
    // SAFETY: dup2 and fcntl on descriptors this process holds; both are async-signal-safe.
    let ok = unsafe {
        if raw == LISTEN_FD {
            // dup2 onto itself would keep close-on-exec.
            libc::fcntl(raw, libc::F_SETFD, 0) == 0
        } else {
            libc::dup2(raw, LISTEN_FD) >= 0
        }
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// In a child before exec: a process group of its own, so that Ctrl-C at the terminal (sent
/// to the whole foreground group) reaches kvmbuild, which stops the guest and then its
/// virtiofsd, rather than killing virtiofsd under a running guest.
fn leave_terminal_signals() -> std::io::Result<()> {
    // SAFETY: setpgid on the calling process; async-signal-safe.
    if unsafe { libc::setpgid(0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// In a child before exec: ask for SIGKILL when the parent goes, and go now if it already has.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; getppid and kill have no
    // preconditions. All are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before prctl: then we were re-parented.
        if libc::getppid() == 1 {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_follow_the_share_and_the_user() {
        let ro = ShareSpec {
            dir: "/srv/a b".into(),
            read_only: true,
        };
        let args: Vec<String> = arguments(&ro, true)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--fd=3",
                "--shared-dir=/srv/a b",
                "--cache=always",
                "--log-level=error",
                "--readonly"
            ]
        );
        let rw = ShareSpec {
            read_only: false,
            ..ro
        };
        let args = arguments(&rw, false);
        assert!(args.contains(&"--cache=auto".into()));
        assert!(args.contains(&"--sandbox=none".into()));
        assert!(!args.contains(&"--readonly".into()));
    }

    #[test]
    fn explicit_binary_must_be_executable() {
        assert!(matches!(
            find(Some(Path::new("/nonexistent/virtiofsd"))),
            Err(VirtiofsdError::BadBinary(_))
        ));
        assert_eq!(
            find(Some(Path::new("/bin/sh"))).unwrap(),
            Path::new("/bin/sh")
        );
    }
}
