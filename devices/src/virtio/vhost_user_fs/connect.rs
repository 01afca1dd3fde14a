//! Connecting to the back end's socket within the set-up's limit.
//!
//! A blocking connect(2) to a Unix socket whose listen backlog is full waits until the back end
//! accepts, for ever if it never does, and no signal ends that wait (the call restarts). The
//! standard library has no non-blocking connect for Unix sockets, so the socket is made here,
//! non-blocking: a full backlog then fails at once with EAGAIN, and the connect is tried again,
//! with the run's deadline and stop requests looked at between tries, until the limit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::watchdog::{Cut, Limit};
use crate::exit::VmExit;

/// How long to wait between tries while the backlog is full.
const RETRY: Duration = Duration::from_millis(10);
/// How long a refused connection is tried again: a back end may have bound its socket and not
/// yet be listening, but a socket file with nobody behind it should fail quickly.
const REFUSED_GRACE: Duration = Duration::from_millis(500);

/// Why connecting failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The socket could not be made or connected.
    Io(io::Error),
    /// The limit, the run's deadline or a stop came before a connection.
    Cut(Cut),
}

/// Connects to the back end listening at `path`, within `limit`; the stream is blocking.
pub fn connect(path: &Path, limit: Limit, exit: &VmExit) -> Result<UnixStream, ConnectError> {
    let address = SocketAddress::new(path).map_err(ConnectError::Io)?;
    let started = Instant::now();
    loop {
        let socket = nonblocking_socket().map_err(ConnectError::Io)?;
        match address.connect(&socket) {
            Ok(()) => {
                let stream = UnixStream::from(socket);
                stream.set_nonblocking(false).map_err(ConnectError::Io)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && started.elapsed() < REFUSED_GRACE => {}
            Err(e) => return Err(ConnectError::Io(e)),
        }
        if let Some(cut) = limit.cut(exit) {
            return Err(ConnectError::Cut(cut));
        }
        std::thread::sleep(RETRY);
    }
}

fn nonblocking_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the descriptor it returns is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A filesystem socket address.
struct SocketAddress {
    raw: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl SocketAddress {
    fn new(path: &Path) -> io::Result<Self> {
        // SAFETY: sockaddr_un is plain data, for which all zeros is a valid value.
        let mut raw: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        raw.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
            .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?;
        let bytes = path.as_os_str().as_bytes();
        // One byte stays for the terminating NUL.
        if bytes.is_empty() || bytes.len() >= raw.sun_path.len() || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a usable Unix socket path (empty, too long or with a NUL byte)",
            ));
        }
        for (to, &from) in raw.sun_path.iter_mut().zip(bytes) {
            *to = from as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        let len = libc::socklen_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        Ok(Self { raw, len })
    }

    fn connect(&self, socket: &OwnedFd) -> io::Result<()> {
        // SAFETY: `raw` is a valid sockaddr_un of `len` bytes that outlives the call; the
        // socket is a descriptor we own.
        let ret = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                std::ptr::from_ref(&self.raw).cast(),
                self.len,
            )
        };
        match ret {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A listener whose backlog (set to its minimum) is full.
    fn full_backlog(dir: &Path) -> (UnixListener, UnixStream, std::path::PathBuf) {
        let path = dir.join("full.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) on a socket we own; a second listen only changes the backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut held = Vec::new();
        // Fill it: with a backlog of 0 Linux queues one connection; stop at the first refusal.
        loop {
            let socket = nonblocking_socket().unwrap();
            match SocketAddress::new(&path).unwrap().connect(&socket) {
                Ok(()) => held.push(UnixStream::from(socket)),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                    break;
                }
            }
        }
        (listener, held.remove(0), path)
    }

    #[test]
    fn a_listening_socket_connects_and_the_stream_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let exit = VmExit::new().unwrap();
        let stream = connect(&path, Limit::from_now(Duration::from_secs(5)), &exit).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        // A blocking stream: a read with a timeout waits for it rather than failing at once.
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let started = Instant::now();
        let err = std::io::Read::read(&mut &stream, &mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn a_full_backlog_is_cut_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, _held, path) = full_backlog(dir.path());
        let exit = VmExit::new().unwrap();
        let started = Instant::now();
        let bound = Duration::from_millis(300);
        let err = connect(&path, Limit::from_now(bound), &exit).unwrap_err();
        assert!(
            matches!(err, ConnectError::Cut(Cut::Bound(b)) if b == bound),
            "{err:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= bound && took < bound + Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn a_full_backlog_is_cut_at_the_run_s_deadline_when_it_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, _held, path) = full_backlog(dir.path());
        let exit = VmExit::new().unwrap();
        exit.set_deadline(Some(Instant::now() + Duration::from_millis(200)));
        let started = Instant::now();
        let err = connect(&path, Limit::from_now(Duration::from_secs(30)), &exit).unwrap_err();
        assert!(matches!(err, ConnectError::Cut(Cut::Timeout)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_full_backlog_is_cut_by_a_stop_request() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, _held, path) = full_backlog(dir.path());
        let exit = VmExit::new().unwrap();
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        exit.set_stop_event(&stop).unwrap();
        stop.write(1).unwrap();
        let err = connect(&path, Limit::from_now(Duration::from_secs(30)), &exit).unwrap_err();
        assert!(matches!(err, ConnectError::Cut(Cut::Stopped)), "{err:?}");
    }

    #[test]
    fn nobody_listening_fails_soon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap());
        let exit = VmExit::new().unwrap();
        let started = Instant::now();
        let err = connect(&path, Limit::from_now(Duration::from_secs(30)), &exit).unwrap_err();
        assert!(
            matches!(&err, ConnectError::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn unusable_paths_are_refused() {
        let long = "x".repeat(200);
        for path in ["", long.as_str()] {
            assert!(SocketAddress::new(Path::new(path)).is_err(), "{path:?}");
        }
    }
}
