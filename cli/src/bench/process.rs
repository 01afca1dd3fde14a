//! A VMM as a child process: wall time spawn to exit, and from `wait4`'s rusage its CPU time
//! and peak RSS.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a killed child may take to be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(10);

/// One finished child process.
#[derive(Debug)]
pub struct ProcessRun {
    /// Just before the spawn.
    pub started: Instant,
    /// Spawn to exit, timed by the thread that waits for it.
    pub wall: Duration,
    /// Its exit code, or None when a signal killed it.
    pub code: Option<i32>,
    /// User plus system CPU time of the process (and any children it waited for).
    pub cpu: Duration,
    /// Peak resident set size, KiB.
    pub peak_rss_kib: u64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What `wait4` reports.
struct Reaped {
    status: libc::c_int,
    usage: libc::rusage,
    at: Instant,
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr to unnamed files, so a chatty child
/// cannot block on a full pipe) to its end, or kills it after `limit`.
pub fn run_process(cmd: &mut Command, limit: Duration) -> anyhow::Result<ProcessRun> {
    let mut out = tempfile::tempfile().context("cannot create an output file")?;
    let mut err = tempfile::tempfile().context("cannot create an output file")?;
    // A no-op pre_exec makes std fork rather than posix_spawn (vfork): a vforked child execs
    // from this process's own address space, and Linux carries that address space's peak into
    // the child's ru_maxrss, so every VMM smaller than bench (which has booted guests in
    // process) read as bench's size. A forked child's copy holds only this process's private
    // pages; guest RAM, a shared memfd mapping, is not copied.
    // SAFETY: the closure runs in the child between fork and exec and does nothing, so it
    // cannot touch a lock or allocator state another thread held at the fork.
    unsafe { cmd.pre_exec(|| Ok(())) };
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .context("cannot start it")?;
    let pid = child.id() as libc::pid_t;
    // `child` is never waited for through std: the thread below reaps it with wait4, which
    // also returns its resource usage. Until then `pid` stays the child's.
    drop(child);
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(wait4(pid));
    });
    let reaped = match finished.recv_timeout(limit) {
        Ok(reaped) => reaped?,
        Err(_) => {
            // SAFETY: kill(2) with the pid of our unreaped child (a zombie at worst, which
            // ignores the signal) and a signal number; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = finished.recv_timeout(REAP_LIMIT);
            bail!("still running after {limit:?}; killed it");
        }
    };
    Ok(ProcessRun {
        started,
        wall: reaped.at - started,
        code: exit_code(reaped.status),
        cpu: timeval(reaped.usage.ru_utime) + timeval(reaped.usage.ru_stime),
        peak_rss_kib: u64::try_from(reaped.usage.ru_maxrss).unwrap_or(0),
        stdout: read_all(&mut out)?,
        stderr: read_all(&mut err)?,
    })
}

fn wait4(pid: libc::pid_t) -> anyhow::Result<Reaped> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes an int and a rusage, both owned by this frame.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            return Ok(Reaped {
                status,
                usage,
                at: Instant::now(),
            });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("cannot wait for it");
        }
    }
}

fn exit_code(status: libc::c_int) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
}

fn read_all(file: &mut File) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.rewind()?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_timed_and_its_usage_read() {
        // The shell burns some CPU and memory, then exits 3 with output on both streams.
        let run = run_process(
            Command::new("sh").args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo out; echo err >&2; exit 3",
            ]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(run.code, Some(3));
        assert_eq!(
            (&run.stdout[..], &run.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );
        assert!(run.cpu > Duration::ZERO && run.cpu <= run.wall + Duration::from_millis(20));
        assert!(run.peak_rss_kib > 100, "{} KiB", run.peak_rss_kib);
    }

    #[test]
    fn shared_guest_memory_here_is_not_counted_in_a_child() {
        // 64 MiB touched through a shared memfd mapping, as guest RAM is after an in-process
        // boot; the child is a shell that exits at once, far smaller.
        let mem = vmm::memory::create(64 << 20).unwrap();
        use vm_memory::{Bytes, GuestAddress};
        mem.write_slice(&vec![1u8; 64 << 20], GuestAddress(0))
            .unwrap();
        let run = run_process(
            Command::new("sh").args(["-c", "exit 0"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(run.peak_rss_kib < 32 << 10, "{} KiB", run.peak_rss_kib);
        drop(mem);
    }

    #[test]
    fn a_child_past_its_limit_is_killed() {
        let started = Instant::now();
        let err =
            run_process(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("killed it"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
