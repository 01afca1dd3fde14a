//! `kvmbuild qemu-compat`: the subset of QEMU's command line that nixpkgs' `vmTools` uses, so
//! stock `runInLinuxVM` can run on kvmbuild through its `customQemu` hook (DESIGN.md §3).
//!
//! Every option outside the subset is refused with its name: silently ignoring one could change
//! what the guest sees. The same entry point runs when kvmbuild is invoked under a QEMU binary's
//! name (`qemu-kvm`, `qemu-system-x86_64`), e.g. through a symlink.
//!
//! Where QEMU's semantics differ from `kvmbuild run`'s, this entry point keeps QEMU's: with
//! `-no-reboot` a guest reset ends the process with status 0 (vmTools' stage 2 panics the guest
//! when a builder fails, and vmTools then reports the missing exit code itself).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use vmm::device_manager::{DiskConfig, ShareConfig};
use vmm::exit::ExitReason;

use crate::run::{self, ConsoleDevice, RunArgs};
use crate::vm_error;
use crate::{exit_code, fail};

/// Names under which kvmbuild behaves as QEMU.
pub const QEMU_NAMES: &[&str] = &["qemu-kvm", "qemu-system-x86_64"];

/// The options this entry point understands, for the error message.
const SUPPORTED: &str = "-nographic -no-reboot -enable-kvm -kernel -initrd -append -m -smp -cpu \
max|host -machine memory-backend=ID|accel=kvm -object memory-backend-memfd,... -chardev \
socket,id=ID,path=SOCK -device vhost-user-fs-pci,chardev=ID,tag=TAG -device virtio-rng-pci \
-drive file=IMG,if=virtio[,format=raw][,cache=...][,werror=report][,readonly=on]";

/// Appended to `-append`: kvmbuild has no PCI, and the kernel's PCI set-up would otherwise log
/// "PCI: Fatal: No config space access function found" on every boot. `pci=off` alone does not
/// stop that line (x86's `pci_arch_init` prints it whenever no config-space access method was
/// found, which `pci=off` guarantees), so that one initcall is skipped too; the kernel reports
/// blacklisted initcalls only at debug level.
const NO_PCI_PARAMS: &str = "pci=off initcall_blacklist=pci_arch_init";

/// Parses `key=value,key=value` option lists; a leading bare word is returned as the kind.
fn options(spec: &str) -> (Option<&str>, HashMap<&str, &str>) {
    let mut kind = None;
    let mut map = HashMap::new();
    for (i, part) in spec.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, v)) => {
                map.insert(k, v);
            }
            None if i == 0 => kind = Some(part),
            None => {
                map.insert(part, "");
            }
        }
    }
    (kind, map)
}

/// Checks that `map` has no keys beyond `allowed`.
fn only(option: &str, map: &HashMap<&str, &str>, allowed: &[&str]) -> Result<(), String> {
    match map.keys().find(|k| !allowed.contains(k)) {
        Some(k) => Err(format!("{option}: unsupported setting '{k}'")),
        None => Ok(()),
    }
}

/// QEMU's `-m` size: MiB by default, or with an M or G suffix.
fn mem_mib(value: &str) -> Result<u64, String> {
    let value = value.strip_prefix("size=").unwrap_or(value);
    let (digits, scale) = match value.as_bytes().last() {
        Some(b'G' | b'g') => (&value[..value.len() - 1], 1024),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 1),
        _ => (value, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("-m: '{value}' is not a memory size"))
}

/// What a QEMU command line asks for, before devices are matched to their chardevs.
#[derive(Default)]
struct Parsed {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    mem_mib: Option<u64>,
    cpus: Option<u64>,
    chardevs: HashMap<String, PathBuf>,
    shares: Vec<(String, String)>,
    disks: Vec<DiskConfig>,
    rng: bool,
    no_reboot: bool,
}

fn parse_one(option: &str, value: Option<&str>, p: &mut Parsed) -> Result<bool, String> {
    let value = || value.ok_or_else(|| format!("{option} needs a value"));
    match option {
        "-no-reboot" => {
            p.no_reboot = true;
            return Ok(false);
        }
        "-nographic" | "-enable-kvm" => return Ok(false),
        "-kernel" => p.kernel = Some(value()?.into()),
        "-initrd" => p.initrd = Some(value()?.into()),
        "-append" => p.append = Some(value()?.to_string()),
        "-m" => p.mem_mib = Some(mem_mib(value()?)?),
        "-smp" => {
            let v = value()?;
            let (kind, map) = options(v);
            only(option, &map, &["cpus"])?;
            let n = map.get("cpus").copied().or(kind).unwrap_or_default();
            p.cpus = Some(
                n.parse()
                    .map_err(|_| format!("-smp: '{v}' is not a CPU count"))?,
            );
        }
        "-cpu" => match value()? {
            "max" | "host" => {}
            other => {
                return Err(format!(
                    "-cpu {other}: only 'max' and 'host' (KVM's own CPU)"
                ))
            }
        },
        "-accel" => match value()? {
            "kvm" => {}
            other => return Err(format!("-accel {other}: kvmbuild only runs on KVM")),
        },
        "-machine" => {
            let (kind, map) = options(value()?);
            only(option, &map, &["memory-backend", "accel"])?;
            if kind.is_some_and(|k| !matches!(k, "pc" | "q35" | "microvm")) {
                return Err(format!(
                    "-machine {}: unsupported machine type",
                    kind.unwrap_or("")
                ));
            }
            if map.get("accel").is_some_and(|a| *a != "kvm") {
                return Err("-machine accel: kvmbuild only runs on KVM".into());
            }
        }
        "-object" => {
            // Guest RAM is always a shared memfd, which is what this object asks for.
            let (kind, map) = options(value()?);
            if kind != Some("memory-backend-memfd") {
                return Err(format!(
                    "-object {}: only memory-backend-memfd",
                    kind.unwrap_or("")
                ));
            }
            only(option, &map, &["id", "size", "share"])?;
            if let Some(size) = map.get("size") {
                p.mem_mib.get_or_insert(mem_mib(size)?);
            }
        }
        "-chardev" => {
            let (kind, map) = options(value()?);
            if kind != Some("socket") {
                return Err(format!("-chardev {}: only socket", kind.unwrap_or("")));
            }
            only(option, &map, &["id", "path"])?;
            let (Some(id), Some(path)) = (map.get("id"), map.get("path")) else {
                return Err("-chardev socket needs id= and path=".into());
            };
            p.chardevs.insert(id.to_string(), path.into());
        }
        "-device" => {
            let (kind, map) = options(value()?);
            match kind {
                Some("virtio-rng-pci" | "virtio-rng-device") => {
                    only(option, &map, &[])?;
                    p.rng = true;
                }
                Some("vhost-user-fs-pci" | "vhost-user-fs-device") => {
                    only(option, &map, &["chardev", "tag", "queue-size"])?;
                    let (Some(chardev), Some(tag)) = (map.get("chardev"), map.get("tag")) else {
                        return Err("-device vhost-user-fs-pci needs chardev= and tag=".into());
                    };
                    p.shares.push((chardev.to_string(), tag.to_string()));
                }
                other => {
                    return Err(format!(
                        "-device {}: unsupported device",
                        other.unwrap_or("")
                    ))
                }
            }
        }
        "-drive" => {
            let (_, map) = options(value()?);
            only(
                option,
                &map,
                &["file", "if", "format", "cache", "werror", "readonly"],
            )?;
            if map.get("if").is_some_and(|i| *i != "virtio")
                || map.get("format").is_some_and(|f| *f != "raw")
            {
                return Err("-drive: only if=virtio with raw images".into());
            }
            let file = map.get("file").ok_or("-drive needs file=")?;
            let read_only = map.get("readonly").is_some_and(|r| matches!(*r, "on" | ""));
            p.disks.push(DiskConfig {
                path: file.into(),
                read_only,
            });
        }
        other => {
            return Err(format!(
                "unsupported QEMU option '{other}' (kvmbuild's QEMU subset: {SUPPORTED})"
            ))
        }
    }
    Ok(true)
}

/// A QEMU command line as `kvmbuild run`'s arguments, plus the QEMU semantics to keep.
struct Translated {
    run: RunArgs,
    /// `-no-reboot`: a guest reset ends the VM with status 0, as QEMU's does.
    no_reboot: bool,
}

/// The kernel command line: `-append` with [`NO_PCI_PARAMS`], unless it says `pci=` itself.
fn kernel_cmdline(append: Option<String>) -> Option<String> {
    append.map(|line| {
        if line.split_whitespace().any(|p| p.starts_with("pci=")) {
            line
        } else {
            format!("{} {NO_PCI_PARAMS}", line.trim_end())
        }
    })
}

/// Translates a QEMU command line into `kvmbuild run`'s arguments.
fn translate(args: &[String]) -> Result<Translated, String> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let option = args[i].as_str();
        // QEMU accepts --option as well as -option.
        let option = option
            .strip_prefix('-')
            .filter(|o| o.starts_with('-'))
            .unwrap_or(option);
        let value = args.get(i + 1).map(String::as_str);
        i += if parse_one(option, value, &mut parsed)? {
            2
        } else {
            1
        };
    }
    let shares = parsed
        .shares
        .into_iter()
        .map(|(chardev, tag)| match parsed.chardevs.get(&chardev) {
            Some(socket) => Ok(ShareConfig {
                socket: socket.clone(),
                tag,
            }),
            None => Err(format!(
                "-device vhost-user-fs-pci: no -chardev with id={chardev}"
            )),
        })
        .collect::<Result<_, _>>()?;
    let run = RunArgs {
        kernel: parsed
            .kernel
            .ok_or("-kernel is required (kvmbuild boots kernels directly)")?,
        initrd: parsed.initrd,
        cmdline: kernel_cmdline(parsed.append),
        // QEMU's default.
        mem: parsed.mem_mib.unwrap_or(128),
        cpus: parsed.cpus.unwrap_or(1),
        console: "stdout".into(),
        console_device: ConsoleDevice::Ttys0,
        disk: parsed.disks,
        vhost_user_fs: shares,
        rng: parsed.rng,
        // QEMU's machines have a PIT; the kernels vmTools boots keep time without one.
        pit: false,
        timeout: None,
        verbose: false,
        snapshot: None,
        restore: None,
    };
    Ok(Translated {
        run,
        no_reboot: parsed.no_reboot,
    })
}

/// Runs a guest described by QEMU arguments.
pub fn qemu_compat(args: &[String]) -> ExitCode {
    let translated = match translate(args) {
        Ok(translated) => translated,
        Err(message) => return fail(exit_code::BAD_INPUT, format!("qemu-compat: {message}")),
    };
    let timeout = translated.run.timeout;
    match run::run_vm(translated.run, &vm_error::QEMU) {
        Ok(mut report) => {
            if translated.no_reboot {
                end_resets_as_qemu_does(&mut report.reason);
            }
            run::report_outcome(&report, timeout)
        }
        Err(code) => code,
    }
}

/// Under `-no-reboot`, QEMU treats a guest reset (a reboot, a panic with `panic=N`, a triple
/// fault) as a shutdown and exits 0; the caller (vmTools) then looks for its own exit file.
/// One line on stderr still says what happened, since a triple fault is worth knowing about.
fn end_resets_as_qemu_does(reason: &mut ExitReason) {
    if let ExitReason::Reset(source) = reason {
        eprintln!(
            "kvmbuild: qemu-compat: the guest reset itself {}; with -no-reboot that ends the VM (status 0, as QEMU)",
            run::reset_how(source)
        );
        *reason = ExitReason::PowerOff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        // Good enough for these tests: no quoting inside values except -append, given last.
        let (head, append) = line.split_once(" -append ").unwrap_or((line, ""));
        let mut v: Vec<String> = head.split_whitespace().map(String::from).collect();
        if !append.is_empty() {
            v.push("-append".into());
            v.push(append.trim_matches('"').into());
        }
        v
    }

    /// The command line nixpkgs' vmTools builds (DESIGN.md §3), with a disk image.
    const VMTOOLS: &str = "-cpu max -m 2048 -object memory-backend-memfd,id=mem,size=2048M,share=on \
        -machine memory-backend=mem -smp cpus=2 -nographic -no-reboot -device virtio-rng-pci \
        -chardev socket,id=store,path=virtio-store.sock \
        -device vhost-user-fs-pci,chardev=store,tag=store \
        -chardev socket,id=xchg,path=virtio-xchg.sock \
        -device vhost-user-fs-pci,chardev=xchg,tag=xchg \
        -drive file=disk.img,if=virtio,cache=unsafe,werror=report \
        -kernel bzImage -initrd initrd \
        -append \"console=ttyS0 panic=1 command=/nix/store/x-vm-run-stage2 mountDisk=1 loglevel=4\"";

    #[test]
    fn vmtools_command_line_maps_onto_kvmbuild_run() {
        let t = translate(&args(VMTOOLS)).unwrap();
        assert!(t.no_reboot);
        let a = t.run;
        assert_eq!(a.kernel, PathBuf::from("bzImage"));
        assert_eq!(a.initrd, Some(PathBuf::from("initrd")));
        assert_eq!(
            a.cmdline.as_deref(),
            Some(
                "console=ttyS0 panic=1 command=/nix/store/x-vm-run-stage2 mountDisk=1 loglevel=4 \
                 pci=off initcall_blacklist=pci_arch_init"
            )
        );
        assert_eq!((a.mem, a.cpus, a.rng), (2048, 2, true));
        assert_eq!(
            a.disk,
            vec![DiskConfig {
                path: "disk.img".into(),
                read_only: false
            }]
        );
        let shares: Vec<_> = a
            .vhost_user_fs
            .iter()
            .map(|s| (s.socket.to_str().unwrap(), s.tag.as_str()))
            .collect();
        assert_eq!(
            shares,
            vec![("virtio-store.sock", "store"), ("virtio-xchg.sock", "xchg")]
        );
    }

    #[test]
    fn options_outside_the_subset_are_named() {
        for (line, named) in [
            ("-kernel k -netdev user,id=n", "'-netdev'"),
            ("-kernel k -device e1000", "-device e1000"),
            (
                "-kernel k -drive file=x.qcow2,if=virtio,format=qcow2",
                "only if=virtio with raw",
            ),
            (
                "-kernel k -drive file=x,if=virtio,discard=unmap",
                "'discard'",
            ),
            ("-kernel k -cpu qemu64", "-cpu qemu64"),
            ("-kernel k -machine accel=tcg", "only runs on KVM"),
            (
                "-kernel k -device vhost-user-fs-pci,chardev=nope,tag=t",
                "no -chardev with id=nope",
            ),
        ] {
            let err = translate(&args(line))
                .err()
                .unwrap_or_else(|| panic!("{line} was accepted"));
            assert!(err.contains(named), "{line}: {err}");
        }
    }

    #[test]
    fn kernel_is_required_and_sizes_parse() {
        assert!(translate(&args("-m 512"))
            .err()
            .unwrap()
            .contains("-kernel is required"));
        assert_eq!(mem_mib("2G"), Ok(2048));
        assert_eq!(mem_mib("size=512M"), Ok(512));
        assert!(mem_mib("lots").is_err());
        let a = translate(&args(
            "-kernel k -smp 4 --enable-kvm -drive file=r.img,if=virtio,readonly=on",
        ))
        .unwrap();
        assert!(!a.no_reboot);
        assert_eq!(a.run.cpus, 4);
        assert!(a.run.disk[0].read_only);
    }

    #[test]
    fn pci_parameters_are_added_unless_the_line_sets_pci() {
        assert_eq!(kernel_cmdline(None), None);
        assert_eq!(
            kernel_cmdline(Some("console=ttyS0 ".into())).as_deref(),
            Some("console=ttyS0 pci=off initcall_blacklist=pci_arch_init")
        );
        assert_eq!(
            kernel_cmdline(Some("console=ttyS0 pci=nomsi".into())).as_deref(),
            Some("console=ttyS0 pci=nomsi")
        );
        // Only a parameter named pci counts, not one that merely contains it.
        assert!(kernel_cmdline(Some("x.pci=1".into()))
            .unwrap()
            .ends_with(NO_PCI_PARAMS));
    }

    #[test]
    fn a_reset_becomes_a_poweroff_and_nothing_else_changes() {
        use vmm::exit::ResetSource;
        for source in [
            ResetSource::I8042,
            ResetSource::AcpiReset,
            ResetSource::TripleFault,
        ] {
            let mut reason = ExitReason::Reset(source);
            end_resets_as_qemu_does(&mut reason);
            assert!(matches!(reason, ExitReason::PowerOff));
        }
        // Anything else is left alone: a guest's own status, a timeout.
        let mut status = ExitReason::GuestStatus(3);
        end_resets_as_qemu_does(&mut status);
        assert!(matches!(status, ExitReason::GuestStatus(3)));
        let mut timeout = ExitReason::Timeout;
        end_resets_as_qemu_does(&mut timeout);
        assert!(matches!(timeout, ExitReason::Timeout));
    }
}
