//! The VMMs `bench` times as whole processes: kvmbuild itself (`kvmbuild run`), QEMU (microvm,
//! KVM) and Firecracker (its JSON config file, `--no-api`), all on the same kernel, initrd,
//! command line, memory and vCPUs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;

use super::process::{run_process, ProcessRun};
use super::stats::Expect;
use crate::exit_code;

/// How long `--version` may take: it prints one line and exits, but QEMU took over 10 s for it
/// inside the loaded TCG test host.
const VERSION_PROBE_LIMIT: Duration = Duration::from_secs(60);

/// A VMM timed as a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kvmbuild,
    Qemu,
    Firecracker,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kvmbuild => "kvmbuild",
            Kind::Qemu => "qemu",
            Kind::Firecracker => "firecracker",
        }
    }

    /// The name as its makers write it.
    fn proper_name(self) -> &'static str {
        match self {
            Kind::Kvmbuild => "kvmbuild",
            Kind::Qemu => "QEMU",
            Kind::Firecracker => "Firecracker",
        }
    }

    /// What `BINARY --version` prints first.
    fn version_prefix(self) -> &'static str {
        match self {
            Kind::Kvmbuild => "kvmbuild ",
            Kind::Qemu => "QEMU emulator version",
            Kind::Firecracker => "Firecracker v",
        }
    }
}

/// One VMM and its binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vmm {
    pub kind: Kind,
    pub binary: PathBuf,
}

/// `qemu`, `firecracker`, or either with `=PATH` (a bare name is looked up on PATH).
impl FromStr for Vmm {
    type Err = String;

    fn from_str(s: &str) -> Result<Vmm, String> {
        let (name, path) = match s.split_once('=') {
            Some((name, path)) if !path.is_empty() => (name, Some(PathBuf::from(path))),
            Some(_) => return Err(format!("{s}: the path after '=' is empty")),
            None => (s, None),
        };
        let (kind, default) = match name {
            "qemu" => (Kind::Qemu, "qemu-system-x86_64"),
            "firecracker" => (Kind::Firecracker, "firecracker"),
            other => return Err(format!("{other}: not qemu or firecracker")),
        };
        Ok(Vmm {
            kind,
            binary: path.unwrap_or_else(|| default.into()),
        })
    }
}

/// The guest every VMM boots.
pub struct Guest<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    pub cpus: u64,
    pub timeout: Duration,
    pub expect: Expect,
    /// Extra arguments for QEMU, after its own.
    pub qemu_args: &'a [String],
    /// Where Firecracker's config file goes.
    pub scratch: &'a Path,
}

/// Checks that `vmm.binary` is what it claims, so that a wrong binary (one that exits 1 at
/// once, as QEMU does when the guest reports 0 through isa-debug-exit) is not timed as a boot.
pub fn check_version(vmm: &Vmm) -> anyhow::Result<()> {
    let flag = format!("--{}", vmm.kind.name());
    let run = run_process(
        Command::new(&vmm.binary).arg("--version"),
        VERSION_PROBE_LIMIT,
    )
    .with_context(|| format!("{flag} {}", vmm.binary.display()))?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let prefix = vmm.kind.version_prefix();
    if run.code != Some(0) || !stdout.starts_with(prefix) {
        bail!(
            "{flag} {}: not {} (`--version` did not print \"{prefix}...\"; it exited {:?})",
            vmm.binary.display(),
            vmm.kind.proper_name(),
            run.code
        );
    }
    Ok(())
}

/// Boots the guest once in `vmm` and checks that it ended as expected.
pub fn boot(vmm: &Vmm, guest: &Guest) -> anyhow::Result<ProcessRun> {
    let mut cmd = match vmm.kind {
        Kind::Kvmbuild => kvmbuild_command(&vmm.binary, guest),
        Kind::Qemu => qemu_command(&vmm.binary, guest),
        Kind::Firecracker => firecracker_command(&vmm.binary, guest)?,
    };
    let what = || format!("{} {}", vmm.kind.name(), vmm.binary.display());
    let run = run_process(&mut cmd, guest.timeout).with_context(what)?;
    if !ended_as_expected(vmm.kind, &run, guest.expect) {
        let stderr = String::from_utf8_lossy(&run.stderr);
        let last = stderr.lines().last().unwrap_or("no message");
        bail!(
            "{} did not boot cleanly (exit {:?}): {last}",
            what(),
            run.code
        );
    }
    Ok(run)
}

/// Whether a finished process means the boot ended as `expect` asks.
fn ended_as_expected(kind: Kind, run: &ProcessRun, expect: Expect) -> bool {
    match kind {
        Kind::Kvmbuild => {
            let exited = run.code == Some(i32::from(exit_code::SUCCESS));
            let reset = run.code == Some(i32::from(exit_code::GUEST_RESET));
            match expect {
                Expect::Exit => exited,
                Expect::Reset => reset,
                Expect::Any => exited || reset,
            }
        }
        // With -no-reboot a reset ends QEMU with 0, as a power-off does; isa-debug-exit turns
        // the guest's status 0 into 1, which is also QEMU's own code for "could not start":
        // a boot counts only if QEMU printed no error of its own.
        Kind::Qemu => {
            let stderr = String::from_utf8_lossy(&run.stderr);
            let qemu_error = stderr
                .lines()
                .any(|l| l.contains(": ") && !l.contains("warning"));
            matches!(run.code, Some(0 | 1)) && !qemu_error
        }
        // Firecracker exits 0 when the guest resets (its way of stopping a microVM).
        Kind::Firecracker => run.code == Some(0),
    }
}

fn kvmbuild_command(binary: &Path, guest: &Guest) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest.kernel)
        .args(["--cmdline", guest.cmdline, "--console", "none"])
        .args(["--mem", &guest.mem_mib.to_string()])
        .args(["--cpus", &guest.cpus.to_string()])
        .args(["--timeout", &guest.timeout.as_secs().to_string()]);
    if let Some(initrd) = guest.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    cmd
}

fn qemu_command(binary: &Path, guest: &Guest) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args([
        "-M",
        "microvm,acpi=on",
        "-enable-kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-reboot",
    ])
    .args(["-display", "none", "-serial", "null", "-m"])
    .arg(guest.mem_mib.to_string())
    .arg("-smp")
    .arg(guest.cpus.to_string())
    // The guest's status on kvmbuild's exit port ends QEMU too (status 0 -> exit code 1).
    .args(["-device", "isa-debug-exit,iobase=0x6f1,iosize=1", "-kernel"])
    .arg(guest.kernel)
    .args(["-append", guest.cmdline]);
    if let Some(initrd) = guest.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.args(guest.qemu_args);
    cmd
}

/// Firecracker without its API socket: everything comes from a config file.
fn firecracker_command(binary: &Path, guest: &Guest) -> anyhow::Result<Command> {
    let config = guest.scratch.join("firecracker.json");
    std::fs::write(&config, firecracker_config(guest).to_string())
        .with_context(|| format!("cannot write {}", config.display()))?;
    let mut cmd = Command::new(binary);
    cmd.args(["--no-api", "--level", "Error", "--config-file"])
        .arg(config);
    Ok(cmd)
}

fn firecracker_config(guest: &Guest) -> serde_json::Value {
    let mut boot = json!({
        "kernel_image_path": guest.kernel,
        "boot_args": guest.cmdline,
    });
    if let Some(initrd) = guest.initrd {
        boot["initrd_path"] = json!(initrd);
    }
    json!({
        "boot-source": boot,
        "drives": [],
        "machine-config": { "vcpu_count": guest.cpus, "mem_size_mib": guest.mem_mib, "smt": false },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Guest<'static> {
        Guest {
            kernel: Path::new("/k/vmlinux"),
            initrd: Some(Path::new("/k/initrd")),
            cmdline: "console=ttyS0 reboot=k",
            mem_mib: 128,
            cpus: 2,
            timeout: Duration::from_secs(5),
            expect: Expect::Reset,
            qemu_args: &[],
            scratch: Path::new("/nonexistent"),
        }
    }

    #[test]
    fn compare_names_a_vmm_and_maybe_its_binary() {
        let vmm: Vmm = "qemu".parse().unwrap();
        assert_eq!(vmm.binary, PathBuf::from("qemu-system-x86_64"));
        let vmm: Vmm = "firecracker=/opt/fc".parse().unwrap();
        assert_eq!(
            (vmm.kind, vmm.binary),
            (Kind::Firecracker, "/opt/fc".into())
        );
        assert!("crosvm".parse::<Vmm>().unwrap_err().contains("not qemu"));
        assert!("qemu=".parse::<Vmm>().is_err());
    }

    #[test]
    fn firecracker_gets_the_same_guest() {
        let config = firecracker_config(&guest());
        assert_eq!(config["boot-source"]["kernel_image_path"], "/k/vmlinux");
        assert_eq!(config["boot-source"]["initrd_path"], "/k/initrd");
        assert_eq!(config["boot-source"]["boot_args"], "console=ttyS0 reboot=k");
        assert_eq!(config["machine-config"]["mem_size_mib"], 128);
        assert_eq!(config["machine-config"]["vcpu_count"], 2);
    }

    #[test]
    fn kvmbuild_counts_a_reset_only_when_expected() {
        let finished = |code| ProcessRun {
            started: std::time::Instant::now(),
            wall: Duration::ZERO,
            code: Some(code),
            cpu: Duration::ZERO,
            peak_rss_kib: 0,
            stdout: vec![],
            stderr: vec![],
        };
        let judge = |code, expect| ended_as_expected(Kind::Kvmbuild, &finished(code), expect);
        assert!(judge(125, Expect::Reset) && judge(125, Expect::Any));
        assert!(!judge(125, Expect::Exit));
        assert!(judge(0, Expect::Exit) && !judge(0, Expect::Reset));
        assert!(!judge(70, Expect::Any));
    }
}
