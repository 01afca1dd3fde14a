//! `kvmbuild exec` on Debian's cloud kernel: shares through the virtiofsd it starts, the host's
//! root, the command's streams and status, virtiofsd's lifetime, and the initrd cache.
//!
//! Every run uses the cached kernel that `exec` would choose itself, with its own cache
//! directory (`XDG_CACHE_HOME`) so that the tests can tell a built initrd from a reused one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::guest::{cloud_kernel, run_guarded, scratch, wait_until, Run};
use super::virtiofs::which_virtiofsd;

const GUARD: Duration = Duration::from_secs(300);

/// `kvmbuild exec` with the cloud kernel, a private cache and the test's virtiofsd.
pub fn exec_command(cache: &Path, args: &[&str]) -> Command {
    let kernel = cloud_kernel();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmbuild"));
    cmd.arg("exec")
        .arg("--kernel")
        .arg(&kernel.vmlinux)
        .arg("--modules")
        .arg(&kernel.modules)
        .arg("--virtiofsd")
        .arg(which_virtiofsd())
        .args(["--timeout", "240"])
        .args(args)
        .env("XDG_CACHE_HOME", cache);
    cmd
}

/// Runs `exec` to the end with `stdin` as its input, under the hang guard.
pub fn exec(cache: &Path, args: &[&str], stdin: &[u8]) -> Run {
    let mut cmd = exec_command(cache, args);
    let input = std::env::temp_dir().join(format!(
        "kvmbuild-linux-exec-stdin-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::write(&input, stdin).unwrap();
    cmd.stdin(std::fs::File::open(&input).unwrap());
    // The open file is all the run needs; the name can go now.
    std::fs::remove_file(&input).unwrap();
    run_guarded(cmd, GUARD)
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    bytes
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn share_arg(host: &Path, guest: &str, ro: bool) -> String {
    format!(
        "--share={}:{guest}{}",
        host.display(),
        if ro { ":ro" } else { "" }
    )
}

/// A 64 MiB random file goes from a read-only share to a writable one; the copy matches, and
/// the read-only share refuses writes with its files unchanged.
pub fn exec_copies_through_two_shares_and_ro_refuses_writes() {
    let dir = scratch("exec-shares");
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(src.join("random.bin"), random_bytes(64 << 20)).unwrap();
    let before = sha256(&src.join("random.bin"));
    let script = "cp /tmp/src/random.bin /tmp/dst/copy.bin || exit 10; \
                  if echo x > /tmp/src/new; then exit 11; fi; \
                  if echo x >> /tmp/src/random.bin; then exit 12; fi; \
                  echo done";
    let run = exec(
        &dir.join("cache"),
        &[
            &share_arg(&src, "/tmp/src", true),
            &share_arg(&dst, "/tmp/dst", false),
            "--",
            "sh",
            "-c",
            script,
        ],
        b"",
    );
    run.check(
        run.status == Some(0),
        "the copy should succeed and the writes fail",
    );
    run.check(run.console == "done\n", "stdout is the command's alone");
    assert_eq!(sha256(&dst.join("copy.bin")), before, "the copy matches");
    assert_eq!(
        sha256(&src.join("random.bin")),
        before,
        "the read-only file is unchanged"
    );
    assert!(
        !src.join("new").exists(),
        "nothing was created in the read-only share"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// On the host's root (the default), host programs run and host files are there.
pub fn exec_runs_host_programs_on_the_host_root() {
    let dir = scratch("exec-root");
    let run = exec(
        &dir.join("cache"),
        &[
            "--",
            "sh",
            "-c",
            "python3 -c 'print(1+1)' && cat /etc/os-release",
        ],
        b"",
    );
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    run.check(run.status == Some(0), "python3 and cat should run");
    run.check(
        run.console == format!("2\n{os_release}"),
        "the guest printed 2 and the host's /etc/os-release",
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// 1 MiB of binary on stdout and stdin sorted onto stderr: separate, exact, and stdin ends.
pub fn exec_streams_are_separate_exact_and_stdin_ends() {
    let dir = scratch("exec-streams");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let blob: Vec<u8> = random_bytes(1 << 20);
    std::fs::write(data.join("blob"), &blob).unwrap();
    let mut cmd = exec_command(
        &dir.join("cache"),
        &[
            &share_arg(&data, "/tmp/data", true),
            "--",
            "sh",
            "-c",
            "cat /tmp/data/blob && sort -r >&2",
        ],
    );
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"a\nb\n").unwrap();
    let out = wait_output(child, GUARD);
    assert_eq!(
        out.status,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == blob,
        "stdout is the blob, byte for byte ({} bytes)",
        out.stdout.len()
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "b\na\n");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The command's status is kvmbuild's: 3, 127 for a missing command, 137 for SIGKILL.
pub fn exec_passes_the_status_through() {
    let dir = scratch("exec-status");
    let cache = dir.join("cache");
    for (args, expected) in [
        (&["sh", "-c", "exit 3"][..], 3),
        (&["no-such-command-here"][..], 127),
        (&["sh", "-c", "kill -9 $$"][..], 137),
    ] {
        let mut all = vec!["--"];
        all.extend_from_slice(args);
        let run = exec(&cache, &all, b"");
        run.check(
            run.status == Some(expected),
            &format!("{args:?} should exit {expected}"),
        );
        if expected == 127 {
            run.check(
                run.stderr.contains("command not found"),
                "a missing command is named on stderr",
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// What a finished child gave back.
struct Output {
    status: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Waits for `child`, reading its pipes, killing it after `guard`.
fn wait_output(mut child: Child, guard: Duration) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let status = exit_within(&mut child, guard);
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The pids of `parent`'s children.
fn children(parent: u32) -> Vec<u32> {
    let path = format!("/proc/{parent}/task/{parent}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purpose: it holds nothing but its status.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Starts `exec` running a command that marks a shared file and then sleeps; returns once
/// the mark is there, with kvmbuild's virtiofsd children.
fn start_sleeper(dir: &Path) -> (Child, Vec<u32>) {
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let mut child = exec_command(
        &dir.join("cache"),
        &[
            &share_arg(&marks, "/tmp/marks", false),
            "--",
            "sh",
            "-c",
            "touch /tmp/marks/started && sleep 600",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + GUARD;
    while !marks.join("started").exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = wait_output_stderr(child);
            panic!("the command never started:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let daemons = children(child.id());
    assert_eq!(
        daemons.len(),
        2,
        "a virtiofsd for the root and one for the share"
    );
    (child, daemons)
}

fn wait_output_stderr(mut child: Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
    }
    let _ = child.wait();
    text
}

/// Waits up to `limit` for `child` to exit; its status code.
fn exit_within(child: &mut Child, limit: Duration) -> Option<i32> {
    match wait_until(child, Instant::now() + limit) {
        Some(status) => status.code(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

fn none_alive(pids: &[u32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A virtiofsd killed under a running command ends kvmbuild with status 70 within a second,
/// and the other virtiofsd goes too.
pub fn exec_ends_when_a_virtiofsd_dies() {
    let dir = scratch("exec-virtiofsd-dies");
    let (mut child, daemons) = start_sleeper(&dir);
    let victim = *daemons.last().unwrap();
    // SAFETY: kill(2) on a pid this test found as kvmbuild's child.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let status = exit_within(&mut child, Duration::from_secs(10));
    let took = killed.elapsed();
    let stderr = wait_output_stderr(child);
    assert_eq!(status, Some(70), "{stderr}");
    assert!(
        took < Duration::from_secs(1),
        "kvmbuild took {took:?} to notice"
    );
    assert!(
        none_alive(&daemons, Duration::from_secs(2)),
        "a virtiofsd survived"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGTERM stops the guest (status 143) and every virtiofsd is reaped before kvmbuild exits.
pub fn exec_sigterm_stops_everything() {
    let dir = scratch("exec-sigterm");
    let (mut child, daemons) = start_sleeper(&dir);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = exit_within(&mut child, Duration::from_secs(10));
    let stderr = wait_output_stderr(child);
    assert_eq!(status, Some(143), "{stderr}");
    assert!(
        none_alive(&daemons, Duration::ZERO),
        "a virtiofsd outlived kvmbuild"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// SIGKILL leaves kvmbuild no chance to clean up; its virtiofsd die with it anyway.
pub fn exec_sigkill_leaves_no_virtiofsd() {
    let dir = scratch("exec-sigkill");
    let (mut child, daemons) = start_sleeper(&dir);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        none_alive(&daemons, Duration::from_secs(2)),
        "a virtiofsd outlived kvmbuild"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The first run builds the initrd, the second reuses it; two first runs at once both succeed
/// and leave one image.
pub fn exec_caches_the_initrd() {
    let dir = scratch("exec-cache");
    let cache = dir.join("cache");
    let first = exec(&cache, &["-v", "--", "true"], b"");
    first.check(first.status == Some(0), "first run");
    first.check(
        first.stderr.contains(" (built in "),
        "the first run builds the initrd",
    );
    let images = cached_images(&cache);
    assert_eq!(images.len(), 1);
    let built_at = std::fs::metadata(&images[0]).unwrap().modified().unwrap();
    let second = exec(&cache, &["-v", "--", "true"], b"");
    second.check(second.status == Some(0), "second run");
    second.check(
        second.stderr.contains(" (cached in "),
        "the second run reuses it",
    );
    assert_eq!(cached_images(&cache), images);
    assert_eq!(
        std::fs::metadata(&images[0]).unwrap().modified().unwrap(),
        built_at
    );

    let fresh = dir.join("fresh-cache");
    let spawn = || {
        exec_command(&fresh, &["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    // Both are waited for before either is judged, so a failure leaves neither running.
    let outputs = [wait_output(a, GUARD), wait_output(b, GUARD)];
    for out in outputs {
        assert_eq!(
            out.status,
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        cached_images(&fresh).len(),
        1,
        "one image, no temporary files"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn cached_images(cache: &Path) -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(cache.join("kvmbuild/initrd"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    images.sort();
    images
}

/// Disks: an ext4 made and filled by the command is e2fsck-clean on the host and holds the
/// file; bytes written raw to a second disk, with no fsync by the command, are on the host
/// too (the init flushes block devices before the VM ends).
pub fn exec_disks_written_in_the_guest_are_on_the_host() {
    let dir = scratch("exec-disks");
    let (ext4, raw) = (dir.join("ext4.img"), dir.join("raw.img"));
    for image in [&ext4, &raw] {
        std::fs::File::create(image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let script = "mkfs.ext4 -q /dev/vda && mount /dev/vda /mnt && echo made-in-guest > /mnt/f \
                  && umount /mnt && printf raw-from-guest > /dev/vdb";
    let run = exec(
        &dir.join("cache"),
        &[
            &format!("--disk={}", ext4.display()),
            &format!("--disk={}", raw.display()),
            "--env=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "--",
            "sh",
            "-c",
            script,
        ],
        b"",
    );
    run.check(
        run.status == Some(0),
        "mkfs, mount, write, umount and the raw write",
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&ext4)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /f"])
        .arg(&ext4)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "made-in-guest\n");
    let head = std::fs::read(&raw).unwrap();
    assert_eq!(&head[..14], b"raw-from-guest");
    std::fs::remove_dir_all(dir).unwrap();
}
