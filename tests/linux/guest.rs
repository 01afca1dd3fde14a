//! Booting a Debian kernel with kvmbuild from a test: kernels, initrds and the run itself.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use initrd::cpio::{Archive, Kind};
use initrd::modules::ModuleTree;

use super::harness::repo_root;

/// The host's statically linked busybox (Debian's busybox-static), the shell of test initrds.
const BUSYBOX: &str = "/bin/busybox";

/// A Debian kernel from the test-kernel cache (scripts/guest-kernels).
pub struct Kernel {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub release: String,
    /// `lib/modules/<release>`, with modules.dep.
    pub modules: PathBuf,
}

/// Environment variables naming the cloud kernel's files, set once by [`resolve_kernels`] so
/// that tests (and the copy of this binary inside the test host) need not ask again.
const CLOUD_VARS: [(&str, &str); 4] = [
    ("KERNEL_VMLINUZ", "KVMBUILD_TEST_CLOUD_BZIMAGE"),
    ("KERNEL_VMLINUX", "KVMBUILD_TEST_CLOUD_VMLINUX"),
    ("KERNEL_RELEASE", "KVMBUILD_TEST_CLOUD_RELEASE"),
    ("KERNEL_MODULES", "KVMBUILD_TEST_CLOUD_MODULES"),
];

/// Asks scripts/guest-kernels (fetching into the cache if cold) for the cloud kernel and sets
/// the `KVMBUILD_TEST_CLOUD_*` variables; returns their names for passing on.
pub fn resolve_kernels() -> Vec<&'static str> {
    if CLOUD_VARS
        .iter()
        .all(|(_, var)| std::env::var_os(var).is_some())
    {
        return CLOUD_VARS.iter().map(|(_, var)| *var).collect();
    }
    let script = repo_root().join("scripts/guest-kernels");
    let out = Command::new(&script)
        .args(["env", "cloud"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} env cloud failed",
        script.display()
    );
    let text = String::from_utf8(out.stdout).expect("paths are UTF-8");
    for (key, var) in CLOUD_VARS {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{} env cloud printed no {key}", script.display()));
        // Set before any test runs; the harness runs tests on this one thread.
        std::env::set_var(var, value.trim_matches(['\'', '"']));
    }
    CLOUD_VARS.iter().map(|(_, var)| *var).collect()
}

fn var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: resolve_kernels() runs first"))
}

/// Debian's cloud kernel (`linux-image-cloud-amd64`).
pub fn cloud_kernel() -> Kernel {
    Kernel {
        bzimage: var("KVMBUILD_TEST_CLOUD_BZIMAGE").into(),
        vmlinux: var("KVMBUILD_TEST_CLOUD_VMLINUX").into(),
        release: var("KVMBUILD_TEST_CLOUD_RELEASE"),
        modules: var("KVMBUILD_TEST_CLOUD_MODULES").into(),
    }
}

/// What goes into a test initrd besides busybox.
#[derive(Default)]
pub struct InitrdSpec<'a> {
    /// Modules (and, through the closure, their dependencies) that /init loads first.
    pub modules: &'a [&'a str],
    /// The kernel whose modules those are.
    pub kernel: Option<&'a Kernel>,
    /// Host binaries to include at the same path, with the shared libraries `ldd` lists.
    pub binaries: &'a [&'a str],
}

/// An initrd whose /init mounts proc, sys and devtmpfs, loads `spec.modules` in dependency
/// order with busybox `insmod`, then runs the given busybox shell script.
pub fn busybox_initrd(init_script: &str) -> Vec<u8> {
    initrd_with(init_script, &InitrdSpec::default())
}

/// [`busybox_initrd`] with modules and host binaries.
pub fn initrd_with(init_script: &str, spec: &InitrdSpec) -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (install busybox-static)"));
    let mut archive = Archive::new();
    archive.add_file("bin/busybox", busybox, 0o755).unwrap();
    archive.add_symlink("bin/sh", "busybox").unwrap();
    for dir in ["proc", "sys", "dev", "mnt", "tmp"] {
        archive.add_dir(dir, 0o755).unwrap();
    }
    archive
        .add_node("dev/console", Kind::CharDevice(5, 1), 0o600)
        .unwrap();
    let mut prelude = String::from(
        "/bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sys /sys\n\
         /bin/busybox mount -t devtmpfs dev /dev\n",
    );
    if !spec.modules.is_empty() {
        let kernel = spec.kernel.expect("modules need the kernel they belong to");
        let tree = ModuleTree::open(&kernel.modules).unwrap();
        for module in tree.closure(spec.modules).unwrap() {
            let data = std::fs::read(kernel.modules.join(&module.path)).unwrap();
            let guest_path = format!("lib/modules/{}", module.path);
            archive.add_file(&guest_path, data, 0o644).unwrap();
            prelude.push_str(&format!("/bin/busybox insmod /{guest_path}\n"));
        }
    }
    for binary in spec.binaries {
        for file in std::iter::once(binary.to_string()).chain(shared_libraries(binary)) {
            if !archive.contains(file.trim_start_matches('/')) {
                let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
                archive
                    .add_file(file.trim_start_matches('/'), data, 0o755)
                    .unwrap();
            }
        }
    }
    let script = format!("#!/bin/busybox sh\nset -e\n{prelude}{init_script}");
    archive
        .add_file("init", script.into_bytes(), 0o755)
        .unwrap();
    archive.to_bytes()
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`, by absolute path;
/// none for a static binary.
fn shared_libraries(binary: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd runs");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    if said.contains("not a dynamic executable") {
        return Vec::new();
    }
    assert!(out.status.success(), "ldd {binary} failed: {said}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_string)
        })
        .collect()
}

/// An empty scratch directory for one test. Whatever an earlier attempt left there is removed
/// first, so that a test the harness runs once more (after a nested failure) starts clean.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmbuild-linux-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One finished `kvmbuild run`.
pub struct Run {
    pub status: Option<i32>,
    pub console: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Panics with the console and stderr unless `cond` holds.
    pub fn check(&self, cond: bool, what: &str) {
        assert!(
            cond,
            "{what}\nexit status: {:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status, self.console, self.stderr
        );
    }
}

/// Boots `kernel` with `initrd` and returns what happened. A hang guard kills kvmbuild after
/// `guard` (kvmbuild's own --timeout is set a little shorter, so a hang shows as exit 124).
pub fn boot(kernel: &Path, initrd: &Path, cmdline: &str, extra: &[&str], guard: Duration) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmbuild"));
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", cmdline, "--timeout"])
        .arg(
            guard
                .saturating_sub(Duration::from_secs(10))
                .as_secs()
                .max(1)
                .to_string(),
        )
        .args(extra);
    run_guarded(cmd, guard)
}

/// Runs `cmd` to completion, killing it if it is still running after `guard`: a hung VMM then
/// fails its test with what it printed (status None, and a note in `stderr`) instead of
/// stalling the whole suite. Output is drained while it runs, so a full pipe cannot block it,
/// and no step waits without a bound: a process that survives SIGKILL (stuck in the kernel) is
/// reported with where its threads are, and left behind.
pub fn run_guarded(mut cmd: Command, guard: Duration) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let stdout = Drain::start(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = Drain::start(child.stderr.take().map(|p| Box::new(p) as _));
    let mut notes = String::new();
    let status = match wait_until(&mut child, started + guard) {
        Some(status) => status.code(),
        None => {
            notes.push_str(&format!(
                "\n[test harness: killed after the {guard:?} hang guard]\n"
            ));
            let stacks = kernel_stacks(child.id());
            let _ = child.kill();
            if wait_until(&mut child, Instant::now() + Duration::from_secs(10)).is_none() {
                notes.push_str(&format!(
                    "[test harness: it survived SIGKILL for 10 s; its threads before the kill:]\n{stacks}"
                ));
            }
            None
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stderr = stderr.take(deadline);
    stderr.push_str(&notes);
    Run {
        status,
        console: stdout.take(deadline),
        stderr,
        elapsed: started.elapsed(),
    }
}

/// Waits for `child` to exit until `deadline`.
pub fn wait_until(child: &mut std::process::Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each thread of process `pid` with its state, wait channel and kernel stack (from /proc).
fn kernel_stacks(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::new();
    for task in tasks.flatten().map(|t| t.path()) {
        let stat = read(task.join("stat"));
        let wchan = read(task.join("wchan"));
        out.push_str(&format!("  {} wchan {wchan}\n", stat.trim_end()));
        for frame in read(task.join("stack")).lines().take(12) {
            out.push_str(&format!("      {frame}\n"));
        }
    }
    out
}

/// A thread reading one of a child's pipes to its end, into a buffer that can also be taken
/// early (a grandchild may hold the pipe open after the child has gone).
struct Drain {
    bytes: Arc<Mutex<Vec<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Drain {
    fn start(pipe: Option<Box<dyn Read + Send>>) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = bytes.clone();
        let thread = std::thread::spawn(move || {
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Self { bytes, thread }
    }

    /// What was read by the end of the pipe, or by `deadline` if the pipe stays open.
    fn take(self, deadline: Instant) -> String {
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let bytes = self.bytes.lock().unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `kvmbuild initrd` with the cloud kernel's default modules and `includes`.
pub fn kvmbuild_initrd(kernel: &Kernel, includes: &[String], out: &Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmbuild"));
    cmd.arg("initrd")
        .arg("--modules-dir")
        .arg(&kernel.modules)
        .arg("-o")
        .arg(out);
    for include in includes {
        cmd.args(["--include", include]);
    }
    let out = cmd.output().expect("kvmbuild starts");
    assert!(
        out.status.success(),
        "kvmbuild initrd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `binary` and its shared libraries, as `--include` arguments at the same paths.
pub fn includes_for(binary: &str) -> Vec<String> {
    std::iter::once(binary.to_string())
        .chain(shared_libraries(binary))
        .collect()
}
