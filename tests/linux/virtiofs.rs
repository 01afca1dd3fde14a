//! virtio-fs through a real virtiofsd: kvmbuild's init mounts the share, the guest reads what the
//! host put there and writes files that the host then reads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::guest::{boot, cloud_kernel, includes_for, kvmbuild_initrd, run_guarded, scratch};

const GUARD: Duration = Duration::from_secs(180);
const TAG: &str = "shared";
const FROM_HOST: &str = "written by the host for the guest";

/// A virtiofsd serving one directory, killed when dropped.
pub struct Virtiofsd {
    child: Child,
    pub socket: PathBuf,
}

impl Virtiofsd {
    pub fn start(dir: &Path, socket: PathBuf) -> Self {
        let binary = which_virtiofsd();
        let child = Command::new(&binary)
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", dir.display()))
            .args([
                "--sandbox",
                "none",
                "--seccomp",
                "none",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run .ci/install-deps)", binary.display()));
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "virtiofsd made no socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn which_virtiofsd() -> PathBuf {
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd"));
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .map(|d| d.join("virtiofsd"))
        .chain(cargo_bin)
        .find(|p| p.is_file())
        .expect("virtiofsd is installed (cargo install virtiofsd)")
}

/// vmTools' two virtio-fs shares as QEMU arguments: `store` and `xchg`, each a
/// `vhost-user-fs-pci` device on a socket chardev of the same name.
pub fn vmtools_share_args(store: &Virtiofsd, xchg: &Virtiofsd) -> Vec<String> {
    [("store", store), ("xchg", xchg)]
        .into_iter()
        .flat_map(|(tag, fs)| {
            [
                "-chardev".to_string(),
                format!("socket,id={tag},path={}", fs.socket.display()),
                "-device".to_string(),
                format!("vhost-user-fs-pci,chardev={tag},tag={tag}"),
            ]
        })
        .collect()
}

/// Percent-encodes a value for a `kvmbuild.*` setting, as the init's own format does.
fn encode(value: &str) -> String {
    initrd::config::encode(value.as_bytes())
}

/// The guest reads a host file through virtio-fs and writes two files back; the host sees them.
pub fn guest_and_host_share_files_through_virtiofsd() {
    let kernel = cloud_kernel();
    // The shared directory must not itself be on virtiofs (inside the test host the temporary
    // directory is a tmpfs), or virtiofsd's file handles go stale.
    let dir = scratch("virtiofs");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("from-host.txt"), format!("{FROM_HOST}\n")).unwrap();
    let virtiofsd = Virtiofsd::start(&share, dir.join("fs.sock"));

    let initrd = dir.join("initrd.img");
    kvmbuild_initrd(&kernel, &includes_for("/bin/busybox"), &initrd);
    let script = "/bin/busybox cat /mnt/from-host.txt && echo from-guest > /mnt/from-guest.txt \
                  && /bin/busybox seq 1 50000 > /mnt/numbers.txt";
    let cmdline = format!(
        "console=ttyS0 panic=1 quiet kvmbuild.fs={TAG}:/mnt kvmbuild.env=PATH=/bin \
         kvmbuild.cmd=/bin/busybox,sh,-c,{}",
        encode(script)
    );
    let share_arg = format!("{},tag={TAG}", virtiofsd.socket.display());
    let args = ["--mem", "256", "--vhost-user-fs", share_arg.as_str()];
    let run = boot(&kernel.bzimage, &initrd, &cmdline, &args, GUARD);
    println!(
        "virtiofs: guest booted, shared files and exited in {:.1} s",
        run.elapsed.as_secs_f64()
    );
    drop(virtiofsd);

    run.check(run.status == Some(0), "the guest's command should succeed");
    run.check(
        run.console.contains(FROM_HOST),
        "the guest should read the host's file through virtio-fs",
    );
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "from-guest\n"
    );
    let numbers: String = (1..=50_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(
        std::fs::read_to_string(share.join("numbers.txt")).unwrap(),
        numbers
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// When virtiofsd dies under a running guest, the guest's file-system requests could never
/// complete: kvmbuild ends the VM with an internal error naming the back end instead of hanging.
pub fn a_vanished_virtiofsd_ends_the_vm() {
    use std::io::{BufRead, BufReader};

    let kernel = cloud_kernel();
    let dir = scratch("virtiofs-gone");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let virtiofsd = Virtiofsd::start(&share, dir.join("fs.sock"));
    let initrd = dir.join("initrd.img");
    kvmbuild_initrd(&kernel, &includes_for("/bin/busybox"), &initrd);
    let script = "echo KVMBUILD-SHARE-MOUNTED && while true; do /bin/busybox ls /mnt; /bin/busybox sleep 1; done";
    let cmdline = format!(
        "console=ttyS0 panic=1 quiet kvmbuild.fs={TAG}:/mnt kvmbuild.cmd=/bin/busybox,sh,-c,{}",
        encode(script)
    );
    let share_arg = format!("{},tag={TAG}", virtiofsd.socket.display());
    let mut kvmbuild = Command::new(env!("CARGO_BIN_EXE_kvmbuild"))
        .args([
            "run",
            "--mem",
            "256",
            "--timeout",
            "240",
            "--vhost-user-fs",
            &share_arg,
        ])
        .arg("--kernel")
        .arg(&kernel.bzimage)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvmbuild starts");
    let console = BufReader::new(kvmbuild.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in console.lines().map_while(Result::ok) {
        let ready = line.contains("KVMBUILD-SHARE-MOUNTED");
        seen.push(line);
        if ready {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("KVMBUILD-SHARE-MOUNTED")),
        "the share never mounted:\n{}",
        seen.join("\n")
    );
    drop(virtiofsd);
    let out = kvmbuild.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(70),
        "kvmbuild should end with an internal error:\n{stderr}"
    );
    assert!(
        stderr.contains("went away"),
        "the error should say the back end went away:\n{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The vmTools shape through `kvmbuild qemu-compat`: QEMU's arguments for two virtiofsd shares
/// (`store`, `xchg`), a virtio disk and virtio-rng. The guest reads the store, reports through
/// `xchg/in-vm-exit` as vmTools' stage 2 does, and the host finds it there.
pub fn qemu_compat_runs_the_vmtools_device_set() {
    let kernel = cloud_kernel();
    let dir = scratch("qemu-compat");
    let (store, xchg) = (dir.join("store"), dir.join("xchg"));
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&xchg).unwrap();
    std::fs::write(store.join("hello"), "KVMBUILD-FROM-STORE\n").unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let store_fs = Virtiofsd::start(&store, dir.join("store.sock"));
    let xchg_fs = Virtiofsd::start(&xchg, dir.join("xchg.sock"));

    let initrd = dir.join("initrd.img");
    kvmbuild_initrd(&kernel, &includes_for("/bin/busybox"), &initrd);
    let script = "/bin/busybox cat /store/hello \
                  && /bin/busybox cat /sys/block/vda/size > /xchg/vda-sectors \
                  && /bin/busybox test -c /dev/hwrng \
                  && echo 0 > /xchg/in-vm-exit";
    // Not quiet: this test once hung (1 run in ~22) with nothing on the console after the
    // kernel's first seconds; the full log shows how far the guest gets if it happens again.
    let append = format!(
        "console=ttyS0 panic=1 kvmbuild.fs=store:/store kvmbuild.fs=xchg:/xchg \
         kvmbuild.cmd=/bin/busybox,sh,-c,{}",
        encode(script)
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmbuild"));
    cmd.arg("qemu-compat")
        .args([
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "cpus=1",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args([
            "-machine",
            "memory-backend=mem",
            "-device",
            "virtio-rng-pci",
        ])
        .args(vmtools_share_args(&store_fs, &xchg_fs))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,cache=unsafe,werror=report",
            disk.display()
        ))
        .arg("-kernel")
        .arg(&kernel.bzimage)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append]);
    let run = run_guarded(cmd, GUARD);
    drop((store_fs, xchg_fs));
    run.check(run.status == Some(0), "kvmbuild qemu-compat should exit 0");
    run.check(
        run.console.contains("KVMBUILD-FROM-STORE"),
        "the guest should read the store",
    );
    assert_eq!(
        std::fs::read_to_string(xchg.join("in-vm-exit")).unwrap(),
        "0\n"
    );
    assert_eq!(
        std::fs::read_to_string(xchg.join("vda-sectors")).unwrap(),
        "16384\n"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
