//! Shared by the integration tests: building the tiny guests (GNU as + ld, at test time),
//! packing them as bzImages, checking for KVM, and running the kvmbuild binary with a hang guard.
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

pub mod bzimage;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The kvmbuild binary Cargo built for these tests.
pub const KVMBUILD: &str = env!("CARGO_BIN_EXE_kvmbuild");

/// Exit codes of `kvmbuild run` (the contract under test).
pub mod exit {
    pub const OK: i32 = 0;
    pub const BAD_INPUT: i32 = 64;
    pub const NO_KVM: i32 = 69;
    pub const INTERNAL: i32 = 70;
    pub const TIMEOUT: i32 = 124;
    pub const RESET: i32 = 125;
}

/// Where the ELF variant of each guest is linked: away from 0x100000, so that a loader which
/// ignored p_paddr would visibly fail.
pub const ELF_LOAD_ADDR: u64 = 0x100_0000;
/// Where a bzImage's protected-mode code is loaded.
pub const BZIMAGE_LOAD_ADDR: u64 = bzimage::CODE32_START as u64;

/// A hang guard, not a timing assertion: a kvmbuild run that has not ended after this long is
/// killed and the test fails.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// The source folder of the tiny guests.
pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests")
}

/// Where built guests and other test files go.
pub fn work_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-guests");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A unique scratch path in [`work_dir`] for one test's files (`tag` names the test).
pub fn scratch_path(tag: &str) -> PathBuf {
    work_dir().join(format!("{tag}.{}", std::process::id()))
}

/// One tiny guest, built both ways.
#[derive(Clone, Debug)]
pub struct Guest {
    /// The ELF kernel, linked at [`ELF_LOAD_ADDR`].
    pub elf: PathBuf,
    /// The bzImage, protected-mode code linked at [`BZIMAGE_LOAD_ADDR`].
    pub bzimage: PathBuf,
    /// The protected-mode code packed into the bzImage.
    pub payload: Vec<u8>,
}

fn run_tool(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {shown}: {e} (the tests need binutils: as, ld, objcopy)")
    });
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles `tests/guests/<name>.s` into `<dir>/<name>.o`.
fn assemble(name: &str, dir: &Path) -> PathBuf {
    let obj = dir.join(format!("{name}.o"));
    let src = guests_dir().join(format!("{name}.s"));
    run_tool(
        Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(guests_dir())
            .arg("-o")
            .arg(&obj)
            .arg(&src),
    );
    obj
}

/// Links `obj` for `load_addr` with tests/guests/guest.ld.
fn link(obj: &Path, load_addr: u64, out: &Path) {
    run_tool(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-z", "max-page-size=0x1000", "-T"])
            .arg(guests_dir().join("guest.ld"))
            .arg(format!("--defsym=LOAD_ADDR={load_addr:#x}"))
            .arg("-o")
            .arg(out)
            .arg(obj),
    );
}

fn build(name: &str) -> Guest {
    // Build in a private folder, then rename into place: parallel test processes never see a
    // half-written file.
    let scratch = work_dir().join(format!("build-{name}-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let obj = assemble(name, &scratch);

    let elf_tmp = scratch.join(format!("{name}.elf"));
    link(&obj, ELF_LOAD_ADDR, &elf_tmp);

    let low_elf = scratch.join(format!("{name}.low.elf"));
    link(&obj, BZIMAGE_LOAD_ADDR, &low_elf);
    let bin = scratch.join(format!("{name}.bin"));
    run_tool(
        Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&low_elf)
            .arg(&bin),
    );
    let payload = fs::read(&bin).unwrap();
    let opts = bzimage::SetupOptions {
        kernel_version: format!("kvmbuild tiny guest {name}"),
        ..Default::default()
    };
    let bz_tmp = scratch.join(format!("{name}.bzImage"));
    fs::write(&bz_tmp, bzimage::pack(&payload, &opts)).unwrap();

    let elf = work_dir().join(format!("{name}.elf"));
    let bzimage = work_dir().join(format!("{name}.bzImage"));
    fs::rename(&elf_tmp, &elf).unwrap();
    fs::rename(&bz_tmp, &bzimage).unwrap();
    let _ = fs::remove_dir_all(&scratch);
    Guest {
        elf,
        bzimage,
        payload,
    }
}

/// The PVH guest (tests/guests/pvh.s), an ELF linked with tests/guests/pvh.ld.
pub fn pvh_guest() -> PathBuf {
    let scratch = work_dir().join(format!("build-pvh-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let obj = assemble("pvh", &scratch);
    let elf = work_dir().join(format!("pvh-{}.elf", std::process::id()));
    run_tool(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-z", "max-page-size=0x1000", "-T"])
            .arg(guests_dir().join("pvh.ld"))
            .arg(format!("--defsym=LOAD_ADDR={ELF_LOAD_ADDR:#x}"))
            .arg("-o")
            .arg(&elf)
            .arg(obj),
    );
    let _ = fs::remove_dir_all(&scratch);
    elf
}

/// The guest built from `tests/guests/<name>.s` (built once per test process).
pub fn guest(name: &str) -> Guest {
    static BUILT: OnceLock<Mutex<HashMap<String, Guest>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    built
        .entry(name.to_owned())
        .or_insert_with(|| build(name))
        .clone()
}

/// Whether the KVM tests can run here. Under `CI=true` an unusable /dev/kvm fails the test;
/// elsewhere the test prints why it is skipped and returns.
pub fn kvm_usable() -> bool {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and /dev/kvm is not usable ({e}): the KVM tests must run in CI");
            }
            eprintln!("SKIPPED: /dev/kvm is not usable ({e}); set CI=true to make this a failure");
            false
        }
    }
}

/// Returns from the calling test (after a skip note) when KVM is not usable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::support::kvm_usable() {
            return;
        }
    };
}

/// What one kvmbuild run did.
#[derive(Debug)]
pub struct Run {
    /// The command, for failure messages.
    pub command: String,
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Wall time, for the record only (never asserted).
    pub elapsed: Duration,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "exit code: {:?} (after {:?})", self.code, self.elapsed)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

impl Run {
    /// Asserts the exit code, showing the whole run when it differs.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "unexpected exit code\n{self}");
    }

    /// Asserts that stdout contains `text`.
    pub fn assert_stdout_has(&self, text: &str) {
        assert!(self.stdout.contains(text), "stdout lacks {text:?}\n{self}");
    }

    /// The stderr lines, without blank ones.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Asserts a failure reported the way the contract says: exit `code`, and one stderr line
    /// starting with "kvmbuild: " that contains every one of `parts`. Other stderr lines may
    /// only be kvmbuild's own one-line notes (such as the PVM warning): no usage text, no
    /// "Caused by" chains, no panics.
    pub fn assert_error(&self, code: i32, parts: &[&str]) {
        self.assert_code(code);
        let lines = self.stderr_lines();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("kvmbuild: ") && parts.iter().all(|p| l.contains(p))),
            "no stderr line starts with \"kvmbuild: \" and contains all of {parts:?}\n{self}"
        );
        assert!(
            lines.iter().all(|l| l.starts_with("kvmbuild: ")),
            "stderr has lines that are not kvmbuild's one-line messages\n{self}"
        );
        assert!(
            !self.stderr.contains("panicked"),
            "kvmbuild panicked\n{self}"
        );
    }
}

/// Runs `cmd` to the end, killing it (and failing) after [`HANG_GUARD`].
pub fn run_command(cmd: Command) -> Run {
    run_command_signalled(cmd, None)
}

/// [`run_command`], sending the command SIGTERM `sigterm_after` its start, if given.
pub fn run_command_signalled(cmd: Command, sigterm_after: Option<Duration>) -> Run {
    run_child(cmd, sigterm_after, Stdio::piped())
}

/// [`run_command`] with stdout a pipe that nobody reads (kept open until the command ends);
/// the run's `stdout` is empty.
pub fn run_command_with_unread_stdout(cmd: Command) -> Run {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (unread, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let run = run_child(cmd, None, Stdio::from(write_end));
    drop(unread);
    run
}

fn run_child(mut cmd: Command, sigterm_after: Option<Duration>, stdout: Stdio) -> Run {
    let command = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    // The Command holds the parent's copy of a given stdout: close it, or a reader of the
    // pipe would wait for it.
    drop(cmd);
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = child.stdout.take().map_or_else(
        || thread::spawn(String::new),
        |pipe| read_all(Box::new(pipe)),
    );
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let mut sigterm_due = sigterm_after;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sigterm_due.is_some_and(|after| start.elapsed() >= after) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            sigterm_due = None;
        }
        if start.elapsed() > HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
            panic!(
                "hang guard: {command} was still running after {HANG_GUARD:?}; killed it\n\
                 --- stdout ---\n{out}\n--- stderr ---\n{err}"
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    let run = Run {
        command,
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        elapsed,
    };
    eprintln!("{} -> {:?} in {:?}", run.command, run.code, run.elapsed);
    run
}

/// Runs `kvmbuild` with `args`.
pub fn kvmbuild<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(KVMBUILD);
    cmd.args(args);
    run_command(cmd)
}

/// `kvmbuild run --kernel <kernel> --mem <mem> --timeout <timeout> <extra...>`: every KVM test
/// passes an explicit memory size and a timeout, so a guest that never ends fails cleanly.
pub fn run_guest(kernel: &Path, mem_mib: u32, timeout_s: u32, extra: &[&str]) -> Run {
    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--kernel".into(), kernel.into()];
    args.extend(["--mem".into(), mem_mib.to_string().into()]);
    args.extend(["--timeout".into(), timeout_s.to_string().into()]);
    args.extend(extra.iter().map(Into::into));
    kvmbuild(args)
}
