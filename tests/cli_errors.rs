//! One test per bad input to `kvmbuild run`: each must end with one line on stderr starting
//! with "kvmbuild: " that names the problem, and the documented exit code (64 for bad
//! arguments or inputs, 69 when KVM is not available), never a panic or a usage dump.
//!
//! Tests whose input is only wrong relative to what KVM or the host can do (memory size, vCPU
//! count, initrd and command line against the loaded kernel) need /dev/kvm and skip without it,
//! unless CI=true. Hiding /dev/kvm uses a private mount namespace (unshare, as root).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{bzimage, exit, guest, kvmbuild, run_command, Run};

/// A bootable kernel for the tests whose error lies elsewhere.
fn kernel() -> PathBuf {
    guest("poweroff").bzimage
}

fn run(args: &[&str]) -> Run {
    kvmbuild(args)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

#[test]
fn missing_kernel_file() {
    let path = support::scratch_path("no-such-kernel");
    let _ = fs::remove_file(&path);
    let r = run(&["run", "--kernel", s(&path), "--mem", "16"]);
    r.assert_error(exit::BAD_INPUT, &[s(&path)]);
}

#[test]
fn kernel_path_is_a_directory() {
    // As root, chmod 000 does not make a file unreadable; a directory cannot be read either.
    let dir = support::scratch_path("kernel-dir");
    fs::create_dir_all(&dir).unwrap();
    let r = run(&["run", "--kernel", s(&dir), "--mem", "16"]);
    let _ = fs::remove_dir(&dir);
    r.assert_error(exit::BAD_INPUT, &[s(&dir)]);
}

#[test]
fn kernel_path_under_a_regular_file() {
    let file = support::scratch_path("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let path = file.join("bzImage");
    let r = run(&["run", "--kernel", s(&path), "--mem", "16"]);
    let _ = fs::remove_file(&file);
    r.assert_error(exit::BAD_INPUT, &[s(&path)]);
}

#[test]
fn kernel_that_is_neither_bzimage_nor_elf() {
    let path = support::scratch_path("text-kernel");
    fs::write(&path, "#!/bin/sh\necho this is not a kernel\n".repeat(40)).unwrap();
    let r = run(&["run", "--kernel", s(&path), "--mem", "16"]);
    let _ = fs::remove_file(&path);
    r.assert_error(exit::BAD_INPUT, &[s(&path), "not a bzImage or ELF kernel"]);
}

#[test]
fn empty_kernel_file() {
    let path = support::scratch_path("empty-kernel");
    fs::write(&path, b"").unwrap();
    let r = run(&["run", "--kernel", s(&path), "--mem", "16"]);
    let _ = fs::remove_file(&path);
    r.assert_error(exit::BAD_INPUT, &[s(&path), "not a bzImage or ELF kernel"]);
}

#[test]
fn bzimage_without_a_64_bit_entry_point() {
    require_kvm!();
    let payload = guest("poweroff").payload;
    let opts = bzimage::SetupOptions {
        xloadflags: 0,
        ..Default::default()
    };
    let path = support::scratch_path("bzImage-32bit-only");
    fs::write(&path, bzimage::pack(&payload, &opts)).unwrap();
    let r = run(&[
        "run",
        "--kernel",
        s(&path),
        "--mem",
        "16",
        "--timeout",
        "10",
    ]);
    let _ = fs::remove_file(&path);
    r.assert_error(exit::BAD_INPUT, &[s(&path), "64-bit"]);
}

#[test]
fn initrd_too_large_for_the_memory() {
    require_kvm!();
    let initrd = support::scratch_path("big-initrd");
    let file = fs::File::create(&initrd).unwrap();
    file.set_len(32 << 20).unwrap(); // sparse: 32 MiB of holes
    drop(file);
    let k = kernel();
    let r = run(&[
        "run",
        "--kernel",
        s(&k),
        "--initrd",
        s(&initrd),
        "--mem",
        "16",
        "--timeout",
        "10",
    ]);
    let _ = fs::remove_file(&initrd);
    r.assert_error(exit::BAD_INPUT, &[s(&initrd)]);
}

#[test]
fn command_line_longer_than_the_kernel_accepts() {
    require_kvm!();
    let payload = guest("poweroff").payload;
    let opts = bzimage::SetupOptions {
        cmdline_size: 64,
        ..Default::default()
    };
    let path = support::scratch_path("bzImage-cmdline-64");
    fs::write(&path, bzimage::pack(&payload, &opts)).unwrap();
    let cmdline = "x".repeat(100);
    let r = run(&[
        "run",
        "--kernel",
        s(&path),
        "--cmdline",
        &cmdline,
        "--mem",
        "16",
        "--timeout",
        "10",
    ]);
    let _ = fs::remove_file(&path);
    r.assert_error(
        exit::BAD_INPUT,
        &["command line is ", " bytes; the kernel accepts at most 64"],
    );
    // kvmbuild may add its own parameters, never fewer bytes than the user gave.
    let line = r
        .stderr_lines()
        .into_iter()
        .find(|l| l.contains("command line is "))
        .unwrap();
    let n: usize = line
        .split("command line is ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line:?}"));
    assert!(n >= cmdline.len(), "{line}");
}

#[test]
fn missing_disk_image() {
    require_kvm!();
    let k = kernel();
    let r = run(&["run", "--kernel", s(&k), "--disk", "/nonexistent/disk.img"]);
    r.assert_error(exit::BAD_INPUT, &["/nonexistent/disk.img"]);
}

#[test]
fn disk_image_in_use_by_another_process() {
    use std::os::unix::io::AsRawFd;
    require_kvm!();
    let k = kernel();
    let image = support::scratch_path("locked-disk");
    let file = fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    file.set_len(1 << 20).unwrap();
    // The kind of lock a second kvmbuild (or QEMU) writing this image holds.
    // SAFETY: flock is plain data; all-zero is valid and the fields used are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the fd is open; F_OFD_SETLK only reads the flock.
    let locked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    assert_eq!(locked, 0, "{}", std::io::Error::last_os_error());
    for disk in [s(&image).to_string(), format!("{},ro", s(&image))] {
        let r = run(&["run", "--kernel", s(&k), "--disk", &disk, "--timeout", "10"]);
        r.assert_error(exit::BAD_INPUT, &[s(&image), "in use by another process"]);
    }
    drop(file);
    fs::remove_file(image).unwrap();
}

#[test]
fn memory_size_zero() {
    let k = kernel();
    let r = run(&["run", "--kernel", s(&k), "--mem", "0"]);
    r.assert_error(exit::BAD_INPUT, &["--mem"]);
}

#[test]
fn memory_size_not_a_number() {
    let k = kernel();
    let r = run(&["run", "--kernel", s(&k), "--mem", "lots"]);
    r.assert_error(exit::BAD_INPUT, &["--mem"]);
}

#[test]
fn memory_larger_than_the_host_can_map() {
    require_kvm!();
    let k = kernel();
    let mib = (1u64 << 40).to_string();
    let r = run(&["run", "--kernel", s(&k), "--mem", &mib, "--timeout", "10"]);
    r.assert_error(exit::BAD_INPUT, &[&mib]);
}

#[test]
fn zero_cpus() {
    let k = kernel();
    let r = run(&["run", "--kernel", s(&k), "--mem", "16", "--cpus", "0"]);
    r.assert_error(exit::BAD_INPUT, &["--cpus"]);
}

#[test]
fn more_cpus_than_kvm_allows() {
    require_kvm!();
    let k = kernel();
    let r = run(&[
        "run",
        "--kernel",
        s(&k),
        "--mem",
        "16",
        "--cpus",
        "100000",
        "--timeout",
        "10",
    ]);
    r.assert_error(exit::BAD_INPUT, &["100000"]);
}

#[test]
fn unknown_option() {
    let k = kernel();
    let r = run(&["run", "--kernel", s(&k), "--no-such-option"]);
    r.assert_error(exit::BAD_INPUT, &["--no-such-option"]);
}

#[test]
fn no_kernel_given() {
    let r = run(&["run", "--mem", "16"]);
    r.assert_error(exit::BAD_INPUT, &["--kernel"]);
}

#[test]
fn help_lists_the_exit_codes() {
    let r = run(&["run", "--help"]);
    r.assert_code(exit::OK);
    for code in ["64", "69", "70", "124", "125"] {
        assert!(
            r.stdout.contains(code),
            "--help does not mention exit code {code}\n{r}"
        );
    }
}

/// Runs `kvmbuild run` on a good kernel in a private mount namespace prepared by `setup` (a
/// shell snippet). None when this host cannot make mount namespaces (outside CI).
fn run_in_mount_namespace(setup: &str) -> Option<Run> {
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and unshare cannot make a mount namespace: {why}");
        }
        eprintln!("SKIPPED: unshare cannot make a mount namespace here: {why}");
        return None;
    }
    let k = kernel();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{setup} && exec \"$0\" \"$@\""))
        .arg(support::KVMBUILD)
        .args(["run", "--kernel", s(&k), "--mem", "16", "--timeout", "10"]);
    Some(run_command(cmd))
}

/// What the one line must say when KVM cannot be used, whatever the reason.
const NO_KVM_MESSAGE: &[&str] = &[
    "KVM is not available",
    "/dev/kvm",
    "no software-emulation fallback",
];

#[test]
fn kvm_device_absent() {
    let Some(r) = run_in_mount_namespace("mount -t tmpfs none /dev") else {
        return;
    };
    r.assert_error(exit::NO_KVM, NO_KVM_MESSAGE);
}

#[test]
fn kvm_device_is_not_kvm() {
    // A character device named /dev/kvm that is really /dev/null (1:3), on a fresh /dev.
    let Some(r) = run_in_mount_namespace("mount -t tmpfs none /dev && mknod /dev/kvm c 1 3") else {
        return;
    };
    r.assert_error(exit::NO_KVM, NO_KVM_MESSAGE);
}

// `kvmbuild exec`: every input is checked before anything starts, so a bad one leaves no
// virtiofsd and no run directory behind (each test gives exec a TMPDIR of its own and checks
// that it stays empty).

/// `kvmbuild exec ARGS` with a private, empty TMPDIR and cache; the TMPDIR must stay empty.
fn exec_bad(tag: &str, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let tmp = support::scratch_path(&format!("exec-{tag}"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(tmp.join("tmp")).unwrap();
    let mut cmd = Command::new(support::KVMBUILD);
    cmd.arg("exec")
        .args(args)
        .env("TMPDIR", tmp.join("tmp"))
        .env("XDG_CACHE_HOME", tmp.join("cache"))
        .env_remove("KVMBUILD_KERNEL");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let r = run_command(cmd);
    let left: Vec<_> = fs::read_dir(tmp.join("tmp")).unwrap().flatten().collect();
    assert!(left.is_empty(), "exec left {left:?} behind\n{r}");
    r
}

#[test]
fn exec_missing_kernel() {
    let path = support::scratch_path("exec-no-such-kernel");
    let r = exec_bad("kernel", &["--kernel", s(&path), "--", "true"], &[]);
    r.assert_error(exit::BAD_INPUT, &["--kernel", s(&path)]);
}

#[test]
fn exec_kernel_from_an_unreadable_environment_variable() {
    let r = exec_bad(
        "env-kernel",
        &["--", "true"],
        &[("KVMBUILD_KERNEL", "/no/such/bzImage")],
    );
    r.assert_error(exit::BAD_INPUT, &["KVMBUILD_KERNEL", "/no/such/bzImage"]);
}

#[test]
fn exec_share_that_does_not_exist() {
    let k = kernel();
    let r = exec_bad(
        "share",
        &["--kernel", s(&k), "--share", "/no/such/dir", "--", "true"],
        &[],
    );
    r.assert_error(exit::BAD_INPUT, &["--share", "/no/such/dir"]);
}

#[test]
fn exec_share_guest_path_not_absolute() {
    let k = kernel();
    let dir = support::scratch_path("exec-share-rel-input");
    fs::create_dir_all(&dir).unwrap();
    let arg = format!("{}:relative/path", s(&dir));
    let r = exec_bad(
        "share-rel",
        &["--kernel", s(&k), "--share", &arg, "--", "true"],
        &[],
    );
    r.assert_error(exit::BAD_INPUT, &["--share", "relative/path", "absolute"]);
}

#[test]
fn exec_share_mount_point_missing_from_the_host_root() {
    let k = kernel();
    let dir = support::scratch_path("exec-share-root-input");
    fs::create_dir_all(&dir).unwrap();
    let arg = format!("{}:/no/such/mount/point", s(&dir));
    let r = exec_bad(
        "share-root",
        &["--kernel", s(&k), "--share", &arg, "--", "true"],
        &[],
    );
    r.assert_error(exit::BAD_INPUT, &["/no/such/mount/point", "--no-root"]);
}

#[test]
fn exec_virtiofsd_missing() {
    let k = kernel();
    let r = exec_bad(
        "virtiofsd",
        &[
            "--kernel",
            s(&k),
            "--virtiofsd",
            "/no/such/virtiofsd",
            "--",
            "true",
        ],
        &[],
    );
    r.assert_error(exit::BAD_INPUT, &["--virtiofsd", "/no/such/virtiofsd"]);
    let distro_paths = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
    if distro_paths.iter().all(|p| !Path::new(p).exists()) {
        let r = exec_bad(
            "no-virtiofsd",
            &["--kernel", s(&k), "--", "true"],
            &[("PATH", "/nonexistent")],
        );
        r.assert_error(exit::BAD_INPUT, &["virtiofsd not found"]);
    }
}

#[test]
fn exec_console_log_that_is_the_kernel_is_refused_and_the_kernel_kept() {
    let dir = support::scratch_path("exec-console-kernel-input");
    fs::create_dir_all(&dir).unwrap();
    let k = dir.join("bzImage");
    fs::copy(kernel(), &k).unwrap();
    let before = fs::read(&k).unwrap();
    let r = exec_bad(
        "console-kernel",
        &["--kernel", s(&k), "--console-log", s(&k), "--", "true"],
        &[],
    );
    r.assert_error(exit::BAD_INPUT, &["--console-log", "overwritten"]);
    assert_eq!(fs::read(&k).unwrap(), before, "the kernel is unchanged");
}

#[test]
fn exec_missing_disk() {
    let k = kernel();
    let r = exec_bad(
        "disk",
        &[
            "--kernel",
            s(&k),
            "--disk",
            "/no/such/disk.img",
            "--",
            "true",
        ],
        &[],
    );
    r.assert_error(exit::BAD_INPUT, &["--disk", "/no/such/disk.img"]);
}

#[test]
fn exec_without_a_command() {
    let r = exec_bad("no-command", &["--no-root"], &[]);
    r.assert_error(exit::BAD_INPUT, &["COMMAND"]);
}

/// On PVM, whose KVM cannot run an ordinary kernel, exec says so in one line (status 69)
/// instead of booting into a hang.
#[test]
fn exec_on_a_pvm_host_says_where_to_run_it() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        return;
    }
    let k = kernel();
    let r = exec_bad("pvm", &["--kernel", s(&k), "--no-root", "--", "true"], &[]);
    r.assert_error(exit::NO_KVM, &["PVM", "tests/host-vm/run"]);
}
