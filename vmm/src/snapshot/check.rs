//! A restored VM's memory file, checked beside the guest.
//!
//! A restore must never run a command from a damaged snapshot, yet reading and checksumming
//! the whole memory file (tens of MiB) before the guest resumes puts that read on the
//! critical path of every warm run: 0.5-0.9 s of a 2.7 s run in the nested test host, and
//! the largest part of a warm start on hardware. When the VM's owner holds back the run's
//! input until the check passes ([`HeldInput`]: `exec`'s settings, which carry the command,
//! its environment, the shares, the clock and the seed), the check runs on its own thread
//! while the guest resumes and binds its devices instead. Pages the guest touches meanwhile
//! come from a file not yet checked, but the guest learns nothing of this run, so runs none
//! of it, until the whole file has matched its checksum. A mismatch stops the VM and the run
//! reports the damage ([`SnapshotError::Corrupt`]) as a check before the resume would have,
//! so its owner boots cold; a guest that a damaged page made fail first is reported the same
//! way, because the check always finishes before the run's outcome is decided.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::exit::{ExitReason, VmExit};
use devices::thread_kind::ThreadKind;

use super::memory::{self, MappedFile};
use super::SnapshotError;

/// How long a blocked write of the held input sleeps before it looks again whether the VM
/// has ended (a guest that stopped reading must not keep the thread).
const WRITE_POLL: Duration = Duration::from_millis(50);

/// Input a restored guest gets only once its memory has passed the check.
pub struct HeldInput {
    /// The write end of the pipe whose read end the guest reads the input from.
    pipe: File,
    /// Makes the input when it is released, so that a clock in it is read then.
    render: Box<dyn FnOnce() -> Vec<u8> + Send>,
}

impl HeldInput {
    /// A pipe for input made by `render` once it may be released: the read end, to give the
    /// guest (a console port's input), and the held input, for [`crate::vm::VmConfig`].
    pub fn pipe(render: Box<dyn FnOnce() -> Vec<u8> + Send>) -> std::io::Result<(File, HeldInput)> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given, which has room.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        set_nonblocking(&write)?;
        Ok((
            read,
            HeldInput {
                pipe: write,
                render,
            },
        ))
    }

    /// Writes the input into the pipe and closes it (the guest reads to its end). Gives up
    /// once the VM has ended or the guest's side is closed.
    fn release(self, exit: &VmExit) {
        let HeldInput { mut pipe, render } = self;
        let bytes = render();
        let mut left = &bytes[..];
        while !left.is_empty() {
            match pipe.write(left) {
                Ok(0) => return,
                Ok(n) => left = &left[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if exit.is_requested() {
                        return;
                    }
                    wait_writable(&pipe, WRITE_POLL);
                }
                Err(_) => return,
            }
        }
    }
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL on a descriptor this process owns change only its flags.
    let ok = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    match ok {
        true => Ok(()),
        false => Err(std::io::Error::last_os_error()),
    }
}

fn wait_writable(file: &File, at_most: Duration) {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(at_most.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

/// A memory file to check beside the guest, and the checksum it must have.
pub struct ToCheck {
    /// The snapshot's memory file.
    pub file: File,
    /// Where it has data, as [`memory::content`] found it (which also checked its size).
    pub content: Vec<(u64, u64)>,
    /// The checksum saved with it.
    pub crc: u32,
}

/// The thread that checks a restored VM's memory file and then releases the held input.
pub struct MemoryCheck {
    thread: JoinHandle<Result<Option<Duration>, SnapshotError>>,
}

impl MemoryCheck {
    /// Starts checking `to_check` (when given) beside the guest; `held` is released once the
    /// check passed, or at once when there is nothing to check. A failed check ends the VM
    /// through `exit`, and `held` is never released.
    pub fn start(
        to_check: Option<ToCheck>,
        held: HeldInput,
        exit: &Arc<VmExit>,
    ) -> Result<MemoryCheck, SnapshotError> {
        let exit = exit.clone();
        // Mapped here: the check thread's filter has no fstat or mmap.
        let to_check = to_check
            .map(|c| {
                MappedFile::map(&c.file)
                    .map(|source| (c, source))
                    .map_err(|e| SnapshotError::Io("map the memory file", e))
            })
            .transpose()?;
        let thread = std::thread::Builder::new()
            .name("kvmbuild-check".into())
            .spawn(move || {
                exit.thread_started(ThreadKind::MemoryCheck);
                let checked = match to_check {
                    Some((to_check, source)) => check(to_check, &source, &exit),
                    None => Ok(None),
                };
                match &checked {
                    Ok(Some(_)) | Ok(None) if !stopping(&exit) => held.release(&exit),
                    Ok(_) => {}
                    Err(_) => exit.request(ExitReason::Internal(
                        "the snapshot's memory failed its check".into(),
                    )),
                }
                checked
            })
            .map_err(|e| SnapshotError::Io("start the memory check", e))?;
        Ok(MemoryCheck { thread })
    }

    /// Waits for the check and says how it went: how long it took (`None` when there was
    /// nothing to check, or the run was stopped first), or why the memory file was refused.
    /// Call it once the VM has ended: a writer still blocked on the guest gives up then.
    /// (Dropped instead, the thread is left to end by itself: its read is bounded by the
    /// file, and its writer by the VM's end or the pipe's other end closing.)
    pub fn finish(self) -> Result<Option<Duration>, SnapshotError> {
        self.thread.join().unwrap_or_else(|_| {
            Err(SnapshotError::Io(
                "check the memory file",
                std::io::Error::other("the check panicked"),
            ))
        })
    }
}

/// Whether the run is being stopped by its owner or its timeout: the check may end early
/// then, since no outcome will depend on it.
fn stopping(exit: &VmExit) -> bool {
    exit.stop_requested()
        || matches!(
            exit.reason(),
            Some(ExitReason::Timeout | ExitReason::Stopped)
        )
}

fn check(
    to_check: ToCheck,
    source: &MappedFile,
    exit: &VmExit,
) -> Result<Option<Duration>, SnapshotError> {
    let started = Instant::now();
    let go_on = || !stopping(exit);
    match memory::check(&to_check.content, source, &go_on)? {
        None => Ok(None),
        Some(checked) if checked.crc == to_check.crc => Ok(Some(started.elapsed())),
        Some(_) => Err(SnapshotError::Corrupt("the memory file's checksum")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vm_memory::{Bytes, GuestAddress};

    /// A saved memory file, ready to check.
    fn saved(mem_size: u64) -> ToCheck {
        let mem = crate::memory::create(mem_size).unwrap();
        mem.write_slice(b"saved", GuestAddress(0x1000)).unwrap();
        let file = tempfile::tempfile().unwrap();
        let crc = memory::save(&mem, &file).unwrap();
        let fresh = crate::memory::create(mem_size).unwrap();
        let content = memory::content(&fresh, &file).unwrap();
        ToCheck { file, content, crc }
    }

    fn held(text: &'static str) -> (File, HeldInput) {
        HeldInput::pipe(Box::new(move || text.as_bytes().to_vec())).unwrap()
    }

    /// Checks `to_check` with some input held, reads what the guest would (to the end) and
    /// says how the check went.
    fn check_and_read(
        to_check: ToCheck,
        exit: &Arc<VmExit>,
    ) -> (String, Result<Option<Duration>, SnapshotError>) {
        let (mut read, input) = held("cmd=true\n");
        let check = MemoryCheck::start(Some(to_check), input, exit).unwrap();
        let mut got = String::new();
        read.read_to_string(&mut got).unwrap();
        (got, check.finish())
    }

    #[test]
    fn the_input_is_released_once_the_memory_passed() {
        let exit = Arc::new(VmExit::new().unwrap());
        let (got, checked) = check_and_read(saved(4 << 20), &exit);
        assert_eq!(got, "cmd=true\n");
        assert!(checked.unwrap().is_some());
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn a_damaged_memory_file_ends_the_vm_and_keeps_the_input() {
        let to_check = saved(4 << 20);
        std::os::unix::fs::FileExt::write_all_at(&to_check.file, b"X", 0x1001).unwrap();
        let exit = Arc::new(VmExit::new().unwrap());
        let (got, checked) = check_and_read(to_check, &exit);
        // The write end is closed unwritten: end of file, nothing read.
        assert_eq!(got, "");
        assert!(matches!(checked, Err(SnapshotError::Corrupt(_))));
        assert!(matches!(exit.reason(), Some(ExitReason::Internal(_))));
    }

    #[test]
    fn input_larger_than_the_pipe_reaches_a_slow_reader() {
        let exit = Arc::new(VmExit::new().unwrap());
        let text: &'static str = Box::leak("x".repeat(1 << 20).into_boxed_str());
        let (mut read, input) = held(text);
        let check = MemoryCheck::start(None, input, &exit).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut got = String::new();
        read.read_to_string(&mut got).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert_eq!(check.finish().unwrap(), None);
    }

    #[test]
    fn a_writer_blocked_on_a_guest_that_stopped_reading_ends_with_the_vm() {
        let exit = Arc::new(VmExit::new().unwrap());
        let text: &'static str = Box::leak("x".repeat(1 << 20).into_boxed_str());
        let (_read, input) = held(text);
        let check = MemoryCheck::start(None, input, &exit).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        exit.request(ExitReason::PowerOff);
        assert_eq!(check.finish().unwrap(), None);
    }

    /// The child half of the next test: a check and a release on a thread confined by the
    /// memory check's seccomp filter.
    #[test]
    fn filtered_check_child() {
        if std::env::var_os("KVMBUILD_CHECK_SECCOMP_CHILD").is_none() {
            return;
        }
        let filters = crate::seccomp::Filters::enable().unwrap();
        let to_check = saved(4 << 20);
        let exit = Arc::new(VmExit::new().unwrap());
        exit.set_thread_start(filters.thread_start());
        let (got, checked) = check_and_read(to_check, &exit);
        assert_eq!(got, "cmd=true\n");
        assert!(checked.unwrap().is_some());
        eprintln!("checked and released under the filter");
    }

    #[test]
    fn the_check_runs_under_its_seccomp_filter() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "snapshot::check::tests::filtered_check_child",
                "--nocapture",
            ])
            .env("KVMBUILD_CHECK_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("checked and released under the filter"),
            "{stderr}"
        );
    }
}
