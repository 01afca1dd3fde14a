//! Faults from outside kvmbuild: a vhost-user back end that stalls, answers wrongly or hangs up
//! at each step of the set-up and while the guest runs. Each case runs `kvmbuild run` with the
//! tiny guest `vhostfs` (which drives the share to DRIVER_OK, where the queues are handed over)
//! and asserts the status, the message and how long kvmbuild took.
//!
//! Also the disk's host file system filling up under the guest's writes (a small tmpfs), and
//! a reader of the console's output that stops reading.
//!
//! The back end is the `vhost-user-backend` crate's daemon (what virtiofsd is built on) serving
//! a do-nothing file system; faults come from a relay between kvmbuild and it, which stops,
//! cuts or garbles the conversation at a chosen request, and from the back end itself refusing
//! the memory table.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::{
    exit, guest, run_command_signalled, run_command_with_unread_stdout, scratch_path, Run, KVMBUILD,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// kvmbuild's bound on each set-up phase when the run has no timeout (SETUP_BOUND).
const SETUP_BOUND: Duration = Duration::from_secs(20);
/// How much later than its deadline kvmbuild may end: process start, KVM set-up, teardown.
const SLACK: Duration = Duration::from_secs(4);

// vhost-user request codes (the vhost-user specification's numbering).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_KICK: u32 = 12;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_VRING_ENABLE: u32 = 18;

// ---- the back end: the crate's daemon serving a file system that never answers requests ----

struct QuietFs {
    refuse_memory: bool,
}

impl VhostUserBackend for QuietFs {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        // VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
        (1 << 32) | (1 << 30)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // REPLY_ACK: every set-up request then waits for the back end's answer.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _: bool) {}

    fn update_memory(&self, _: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        if self.refuse_memory {
            return Err(std::io::Error::other("this back end refuses guest memory"));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        _: u16,
        _: EventSet,
        _: &[VringRwLock],
        _: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the daemon on `socket` (listening before this returns) for one connection.
fn start_backend(socket: &Path, refuse_memory: bool) {
    let mut listener = Listener::new(socket, true).unwrap();
    thread::spawn(move || {
        let backend = Arc::new(QuietFs { refuse_memory });
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("quiet-fs".into(), backend, memory).unwrap();
        if daemon.start(&mut listener).is_ok() {
            let _ = daemon.wait();
        }
    });
}

// ---- the relay that injects the faults ----

/// Where and how the back end misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// None: everything is relayed.
    None,
    /// The request with this code is never relayed, nor anything after it.
    Stall(u32),
    /// Both connections are closed when the request with this code arrives.
    HangUp(u32),
    /// The answer to the request with this code comes back under another request code.
    Garble(u32),
    /// Both connections are closed once both queues are enabled (the guest is running).
    HangUpWhileRunning,
}

const HEADER_LEN: usize = 12;

/// One vhost-user message: header and payload, and the file descriptor it carries, if any.
struct Message {
    bytes: Vec<u8>,
    fd: Option<File>,
}

impl Message {
    fn code(&self) -> u32 {
        u32::from_le_bytes(self.bytes[..4].try_into().unwrap())
    }
}

fn read_message(from: &UnixStream) -> Option<Message> {
    let mut header = [0u8; HEADER_LEN];
    let (n, fd) = from.recv_with_fd(&mut header).ok()?;
    if n == 0 {
        return None;
    }
    (&*from).read_exact(&mut header[n..]).ok()?;
    let size = u32::from_le_bytes(header[8..].try_into().unwrap()) as usize;
    let mut bytes = header.to_vec();
    bytes.resize(HEADER_LEN + size, 0);
    (&*from).read_exact(&mut bytes[HEADER_LEN..]).ok()?;
    Some(Message { bytes, fd })
}

fn write_message(to: &UnixStream, message: &Message) -> Option<()> {
    match &message.fd {
        Some(fd) => {
            let sent = to.send_with_fd(&message.bytes[..], fd.as_raw_fd()).ok()?;
            (&*to).write_all(&message.bytes[sent..]).ok()
        }
        None => (&*to).write_all(&message.bytes).ok(),
    }
}

fn hang_up(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

/// Relays kvmbuild's requests to the back end, misbehaving as `fault` says.
fn relay_requests(front: UnixStream, back: UnixStream, fault: Fault, garble: &AtomicBool) {
    let mut enabled = 0;
    while let Some(message) = read_message(&front) {
        let code = message.code();
        match fault {
            Fault::Stall(at) if at == code => loop {
                // Holds both connections open, answering nothing.
                thread::park();
            },
            Fault::HangUp(at) if at == code => return hang_up(&front, &back),
            Fault::Garble(at) if at == code => garble.store(true, Ordering::SeqCst),
            _ => {}
        }
        if write_message(&back, &message).is_none() {
            return;
        }
        if code == SET_VRING_ENABLE {
            enabled += 1;
            if enabled == 2 && matches!(fault, Fault::HangUpWhileRunning) {
                // Time for the last answer to get back and the guest to go on running.
                thread::sleep(Duration::from_millis(300));
                return hang_up(&front, &back);
            }
        }
    }
}

/// Relays the back end's answers to kvmbuild, garbling one when asked to.
fn relay_answers(back: UnixStream, front: UnixStream, garble: &AtomicBool) {
    while let Some(mut message) = read_message(&back) {
        if garble.swap(false, Ordering::SeqCst) {
            let wrong = message.code() ^ 0x40;
            message.bytes[..4].copy_from_slice(&wrong.to_le_bytes());
        }
        if write_message(&front, &message).is_none() {
            return;
        }
    }
}

/// A back end behind a faulty relay, for one connection. Returns the socket kvmbuild is given.
fn faulty_backend(tag: &str, fault: Fault, refuse_memory: bool) -> PathBuf {
    let dir = scratch_dir(tag);
    let backend_socket = dir.join("backend.sock");
    start_backend(&backend_socket, refuse_memory);
    let front_socket = dir.join("front.sock");
    let listener = UnixListener::bind(&front_socket).unwrap();
    thread::spawn(move || {
        let (front, _) = listener.accept().unwrap();
        let back = UnixStream::connect(&backend_socket).unwrap();
        let garble = Arc::new(AtomicBool::new(false));
        let answers = {
            let (back, front, garble) = (
                back.try_clone().unwrap(),
                front.try_clone().unwrap(),
                garble.clone(),
            );
            thread::spawn(move || relay_answers(back, front, &garble))
        };
        relay_requests(front, back, fault, &garble);
        let _ = answers.join();
    });
    front_socket
}

/// A socket that is listened on but never accepted.
fn never_accepting(tag: &str) -> (PathBuf, UnixListener) {
    let socket = scratch_dir(tag).join("never.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    (socket, listener)
}

/// A socket whose listen backlog is full (set to its minimum, then filled), so that a blocking
/// connect(2) to it would wait until the listener accepts, which it never does. Returns the
/// socket, the listener and the connection that fills the backlog.
fn full_backlog(tag: &str) -> (PathBuf, UnixListener, UnixStream) {
    let socket = scratch_dir(tag).join("full.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // SAFETY: listen(2) on a socket we own; listening again only changes the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    // With a backlog of 0, Linux queues one connection; this one fills it.
    let filler = UnixStream::connect(&socket).unwrap();
    (socket, listener, filler)
}

/// A socket whose one connection is accepted and then never answered.
fn never_answering(tag: &str) -> PathBuf {
    let socket = scratch_dir(tag).join("silent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    thread::spawn(move || {
        let (_held, _) = listener.accept().unwrap();
        loop {
            thread::park();
        }
    });
    socket
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = scratch_path(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- running kvmbuild ----

/// How a case runs kvmbuild.
struct Case<'a> {
    socket: &'a Path,
    timeout_s: Option<u32>,
    /// The guest spins after DRIVER_OK instead of exiting.
    stay: bool,
    /// SIGTERM is sent this long after the start.
    sigterm_after: Option<Duration>,
}

impl Case<'_> {
    fn new(socket: &Path) -> Case<'_> {
        Case {
            socket,
            timeout_s: None,
            stay: false,
            sigterm_after: None,
        }
    }

    fn run(&self) -> Run {
        let kernel = guest("vhostfs").bzimage;
        let share = format!("{},tag=fs", self.socket.display());
        let mut cmd = Command::new(KVMBUILD);
        cmd.args(["run", "--mem", "64", "--kernel"])
            .arg(kernel)
            .args(["--vhost-user-fs", &share]);
        if let Some(t) = self.timeout_s {
            cmd.args(["--timeout", &t.to_string()]);
        }
        if self.stay {
            cmd.args(["--cmdline", "stay console=ttyS0"]);
        }
        run_command_signalled(cmd, self.sigterm_after)
    }
}

/// Asserts the status, that one message line holds every part, and that kvmbuild ended no
/// sooner than `at_least` and within `SLACK` of `deadline`.
fn assert_ended(run: &Run, code: i32, parts: &[&str], at_least: Duration, deadline: Duration) {
    run.assert_error(code, parts);
    assert!(
        run.elapsed >= at_least && run.elapsed <= deadline + SLACK,
        "ended after {:?}, expected {at_least:?}..{:?}\n{run}",
        run.elapsed,
        deadline + SLACK
    );
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---- set-up, before the guest runs ----

#[test]
fn a_back_end_that_never_accepts_ends_at_the_timeout() {
    require_kvm!();
    let (socket, _listener) = never_accepting("never-accepts-timeout");
    let run = Case {
        timeout_s: Some(2),
        ..Case::new(&socket)
    }
    .run();
    let parts = [
        "cannot read its features",
        "no answer before the run's timeout",
    ];
    assert_ended(&run, exit::TIMEOUT, &parts, secs(2), secs(2));
}

#[test]
fn a_back_end_that_never_accepts_ends_at_the_set_up_bound_without_a_timeout() {
    require_kvm!();
    let (socket, _listener) = never_accepting("never-accepts-bound");
    let run = Case::new(&socket).run();
    let parts = [
        "--vhost-user-fs",
        "cannot read its features",
        "no answer within 20s",
    ];
    assert_ended(&run, exit::BAD_INPUT, &parts, SETUP_BOUND, SETUP_BOUND);
}

#[test]
fn sigterm_ends_the_wait_for_a_back_end_that_never_answers() {
    require_kvm!();
    let socket = never_answering("never-answers-sigterm");
    assert_sigterm_ends_the_set_up(&socket);
}

#[test]
fn a_back_end_with_a_full_backlog_ends_at_the_timeout() {
    require_kvm!();
    let (socket, _listener, _filler) = full_backlog("full-backlog-timeout");
    let run = Case {
        timeout_s: Some(2),
        ..Case::new(&socket)
    }
    .run();
    let parts = ["cannot connect", "no answer before the run's timeout"];
    assert_ended(&run, exit::TIMEOUT, &parts, secs(2), secs(2));
}

#[test]
fn sigterm_ends_the_wait_to_connect_to_a_full_backlog() {
    require_kvm!();
    let (socket, _listener, _filler) = full_backlog("full-backlog-sigterm");
    assert_sigterm_ends_the_set_up(&socket);
}

/// SIGTERM half a second into the set-up with the back end at `socket` ends kvmbuild at once,
/// with 143 and the message for a stop during set-up.
fn assert_sigterm_ends_the_set_up(socket: &Path) {
    let after = Duration::from_millis(500);
    let run = Case {
        sigterm_after: Some(after),
        ..Case::new(socket)
    }
    .run();
    assert_ended(
        &run,
        143,
        &["stopped the guest on SIGTERM during set-up"],
        after,
        after,
    );
}

#[test]
fn a_stall_at_each_set_up_step_ends_at_the_timeout() {
    require_kvm!();
    for (step, code) in [
        ("read its features", GET_FEATURES),
        ("read its protocol features", GET_PROTOCOL_FEATURES),
    ] {
        let socket = faulty_backend(&format!("stall-{code}"), Fault::Stall(code), false);
        let run = Case {
            timeout_s: Some(2),
            ..Case::new(&socket)
        }
        .run();
        assert_ended(&run, exit::TIMEOUT, &[step, "timeout"], secs(2), secs(2));
    }
}

#[test]
fn a_hang_up_or_a_wrong_answer_at_set_up_is_refused_at_once() {
    require_kvm!();
    for (step, fault) in [
        ("read its features", Fault::HangUp(GET_FEATURES)),
        (
            "read its protocol features",
            Fault::HangUp(GET_PROTOCOL_FEATURES),
        ),
        ("read its features", Fault::Garble(GET_FEATURES)),
        (
            "read its protocol features",
            Fault::Garble(GET_PROTOCOL_FEATURES),
        ),
    ] {
        let socket = faulty_backend(&format!("{fault:?}"), fault, false);
        let run = Case {
            timeout_s: Some(30),
            ..Case::new(&socket)
        }
        .run();
        assert_ended(
            &run,
            exit::BAD_INPUT,
            &["--vhost-user-fs", step],
            secs(0),
            secs(0),
        );
    }
}

// ---- at DRIVER_OK, when the guest hands over its queues ----

#[test]
fn a_working_back_end_takes_the_queues_and_the_guest_goes_on() {
    require_kvm!();
    let socket = faulty_backend("healthy", Fault::None, false);
    let run = Case {
        timeout_s: Some(30),
        ..Case::new(&socket)
    }
    .run();
    run.assert_code(exit::OK);
    run.assert_stdout_has("vhostfs: driver ok");
}

#[test]
fn without_seccomp_the_same_set_up_works() {
    require_kvm!();
    let socket = faulty_backend("healthy-unfiltered", Fault::None, false);
    let share = format!("{},tag=fs", socket.display());
    let kernel = guest("vhostfs").bzimage;
    let mut cmd = Command::new(KVMBUILD);
    cmd.args(["run", "--seccomp", "off", "--mem", "64", "--timeout", "30"])
        .args(["--vhost-user-fs", &share, "--kernel"])
        .arg(kernel);
    let run = run_command_signalled(cmd, None);
    run.assert_code(exit::OK);
    run.assert_stdout_has("vhostfs: driver ok");
}

#[test]
fn a_stall_at_each_queue_step_ends_at_the_timeout() {
    require_kvm!();
    for code in [
        SET_FEATURES,
        SET_MEM_TABLE,
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_KICK,
    ] {
        let socket = faulty_backend(&format!("stall-queues-{code}"), Fault::Stall(code), false);
        let run = Case {
            timeout_s: Some(3),
            ..Case::new(&socket)
        }
        .run();
        assert_ended(&run, exit::TIMEOUT, &["timeout"], secs(3), secs(3));
    }
}

#[test]
fn a_stall_at_the_memory_table_ends_at_the_set_up_bound_without_a_timeout() {
    require_kvm!();
    let socket = faulty_backend("stall-mem-bound", Fault::Stall(SET_MEM_TABLE), false);
    let run = Case::new(&socket).run();
    let parts = ["cannot set the memory table", "no answer within 20s"];
    assert_ended(&run, exit::INTERNAL, &parts, SETUP_BOUND, SETUP_BOUND);
}

#[test]
fn sigterm_ends_a_stalled_queue_set_up() {
    require_kvm!();
    let socket = faulty_backend("stall-kick-sigterm", Fault::Stall(SET_VRING_KICK), false);
    let after = Duration::from_secs(1);
    let run = Case {
        sigterm_after: Some(after),
        ..Case::new(&socket)
    }
    .run();
    assert_ended(&run, 143, &["SIGTERM"], after, after);
}

#[test]
fn a_hang_up_or_a_wrong_answer_at_the_queues_ends_the_vm() {
    require_kvm!();
    for (step, fault, refuse_memory) in [
        ("set the memory table", Fault::HangUp(SET_MEM_TABLE), false),
        (
            "set a vring's kick fd",
            Fault::HangUp(SET_VRING_KICK),
            false,
        ),
        (
            "set a vring's addresses",
            Fault::Garble(SET_VRING_ADDR),
            false,
        ),
        ("enable a vring", Fault::Garble(SET_VRING_ENABLE), false),
        ("set the memory table", Fault::None, true),
    ] {
        let tag = format!("queues-{fault:?}-{refuse_memory}");
        let socket = faulty_backend(&tag, fault, refuse_memory);
        let run = Case {
            timeout_s: Some(30),
            ..Case::new(&socket)
        }
        .run();
        assert_ended(
            &run,
            exit::INTERNAL,
            &["vhost-user back end", step],
            secs(0),
            secs(0),
        );
    }
}

// ---- while the guest runs ----

#[test]
fn a_back_end_that_hangs_up_while_the_guest_runs_ends_the_vm() {
    require_kvm!();
    let socket = faulty_backend("hang-up-running", Fault::HangUpWhileRunning, false);
    let run = Case {
        timeout_s: Some(30),
        stay: true,
        ..Case::new(&socket)
    }
    .run();
    run.assert_stdout_has("vhostfs: staying");
    assert_ended(
        &run,
        exit::INTERNAL,
        &["back end", "went away"],
        secs(0),
        secs(1),
    );
}

// ---- the disk's host file system fills up ----

/// A tmpfs of `size` mounted on a directory for one test; unmounted when dropped.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    /// Mounts it, or says why not and returns None (mounting needs root; CI runs as root).
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = c(dir.to_str().unwrap());
        let options = c(&format!("size={size}"));
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c("tmpfs").as_ptr(),
                target.as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and a tmpfs cannot be mounted ({e})"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs ({e}); run as root");
            return None;
        }
        Some(Self(dir.to_path_buf()))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_full_disk_fails_the_guest_s_writes_and_kvmbuild_goes_on() {
    require_kvm!();
    let dir = scratch_dir("disk-full");
    let Some(_tmpfs) = SmallTmpfs::mount(&dir, "1m") else {
        return;
    };
    // 8 MiB, sparse, on a 1 MiB file system: the guest's writes fill it.
    let disk = dir.join("disk.img");
    File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let kernel = guest("diskfull").bzimage;
    let run = support::run_guest(&kernel, 64, 30, &["--disk", disk.to_str().unwrap()]);
    run.assert_code(exit::OK);
    run.assert_stdout_has("failed with status 01");
    run.assert_stdout_has("rewrite status 00");
}

// ---- a console reader that stops reading ----

/// `kvmbuild run` of the `hvcflood` guest, which writes 16 MiB to hvc0.
fn hvcflood(timeout_s: u32) -> Command {
    let mut cmd = Command::new(KVMBUILD);
    cmd.args([
        "run",
        "--mem",
        "64",
        "--console-device",
        "hvc0",
        "--timeout",
    ])
    .arg(timeout_s.to_string())
    .arg("--kernel")
    .arg(guest("hvcflood").bzimage);
    cmd
}

#[test]
fn hvc0_output_that_is_read_arrives_whole() {
    require_kvm!();
    let run = run_command_signalled(hvcflood(30), None);
    run.assert_code(exit::OK);
    run.assert_stdout_has("hvcflood: done");
    let flooded = run.stdout.bytes().filter(|&b| b == b'x').count();
    assert_eq!(flooded, 16 << 20, "hvc0 output lost or duplicated");
}

#[test]
fn hvc0_output_nobody_reads_ends_at_the_timeout() {
    require_kvm!();
    // The pipe fills; the guest waits for its buffers; the timeout must still end the run,
    // and the flush of the unread output must give up in time.
    let run = run_command_with_unread_stdout(hvcflood(2));
    assert_ended(&run, exit::TIMEOUT, &["timeout"], secs(2), secs(2));
}
