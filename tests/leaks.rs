//! Nothing grows with the number of runs: 100 sequential runs in this process leave its open
//! files and threads as they were, and 8 concurrent `kvmbuild run` processes all succeed and
//! leave no process behind (not even the keepers that release each VM after its process
//! exits).
//!
//! The guest is `markers` (marks its boot phases, exits 0) with a disk, an RNG and hvc0, so
//! every run starts the device thread, a console writer and the vCPU thread.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{guest, scratch_path, KVMBUILD};
use vmm::device_manager::{ConsoleConfig, DiskConfig};
use vmm::exit::ExitReason;
use vmm::vm::{self, VmConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SEQUENTIAL_RUNS: usize = 100;
const CONCURRENT_RUNS: usize = 8;
/// How long the VM keepers of finished runs may take to exit (they wait only for their
/// kvmbuild to exit, then for the kernel to destroy the VM: tens of milliseconds).
const KEEPER_GRACE: Duration = Duration::from_secs(10);

fn disk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    path
}

fn config(kernel: &Path, disk: &Path) -> VmConfig {
    VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        initrd_prefix: Vec::new(),
        cmdline: "console=ttyS0".into(),
        mem_mib: 64,
        vcpus: 1,
        console: Box::new(std::io::sink()),
        serial_input: None,
        disks: vec![DiskConfig {
            path: disk.to_path_buf(),
            read_only: false,
        }],
        shares: Vec::new(),
        virtio_console: Some(ConsoleConfig::Hvc0 {
            output: Box::new(std::io::sink()),
            input: None,
        }),
        rng: true,
        pit: false,
        setup_deadline: None,
        seccomp: None,
        confine_runner: false,
        snapshot_to: None,
        defer_per_run: false,
        restore: None,
        held_input: None,
    }
}

fn count_entries(dir: &str) -> usize {
    fs::read_dir(dir).unwrap().count()
}

/// Open fds and threads of this process.
fn footprint() -> (usize, usize) {
    (
        count_entries("/proc/self/fd"),
        count_entries("/proc/self/task"),
    )
}

fn run_once(kernel: &Path, disk: &Path) {
    let stop = EventFd::new(EFD_NONBLOCK).unwrap();
    let timeout = Some(Duration::from_secs(30));
    let mut report = vm::run(config(kernel, disk), &stop, timeout).unwrap();
    // Released here, at once (kvmbuild hands it to a keeper process at exit).
    drop(report.remains.take());
    assert_eq!(report.reason, ExitReason::GuestStatus(0));
    assert!(report.stuck_vcpus.is_empty());
    assert_eq!(report.console_error, None);
}

/// One test, so that nothing else runs in this process while it counts.
#[test]
fn runs_leak_no_fd_thread_or_process() {
    require_kvm!();
    sequential_runs_leak_no_fd_and_no_thread();
    concurrent_runs_all_succeed_and_leave_no_process();
}

fn sequential_runs_leak_no_fd_and_no_thread() {
    let dir = scratch_path("leaks-sequential");
    fs::create_dir_all(&dir).unwrap();
    let kernel = guest("markers").bzimage;
    let disk = disk(&dir, "disk.img");
    // The first run sets up what lives as long as the process (the vCPU kick handler).
    run_once(&kernel, &disk);
    let before = footprint();
    for _ in 0..SEQUENTIAL_RUNS {
        run_once(&kernel, &disk);
    }
    let after = footprint();
    assert_eq!(
        after, before,
        "(open fds, threads) after {SEQUENTIAL_RUNS} runs, against before"
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// Makes this process the reaper of its orphaned descendants, so the VM keepers of the
/// kvmbuild processes it starts come back to it when those exit.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
}

/// Reaps children until there are none; fails if some still run after `grace`.
fn reap_all_children(grace: Duration) {
    let started = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a pointer to a live int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ECHILD)
            );
            return;
        }
        if pid == 0 {
            assert!(
                started.elapsed() < grace,
                "descendants of the kvmbuild runs still run after {grace:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn concurrent_runs_all_succeed_and_leave_no_process() {
    become_subreaper();
    let dir = scratch_path("leaks-concurrent");
    fs::create_dir_all(&dir).unwrap();
    let kernel = guest("markers").bzimage;
    let children: Vec<_> = (0..CONCURRENT_RUNS)
        .map(|i| {
            let disk = disk(&dir, &format!("disk{i}.img"));
            Command::new(KVMBUILD)
                .args(["run", "--mem", "64", "--timeout", "30", "--rng"])
                .args(["--console-device", "hvc0", "--kernel"])
                .arg(&kernel)
                .arg("--disk")
                .arg(&disk)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("exiting with 0"), "{stdout}");
    }
    reap_all_children(KEEPER_GRACE);
    fs::remove_dir_all(&dir).unwrap();
}
