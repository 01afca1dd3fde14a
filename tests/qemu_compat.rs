//! The QEMU entry point's own semantics, with tiny purpose-built guests (tests/guests/*.s):
//! under `-no-reboot` a guest reset ends the process with status 0, as QEMU's does (vmTools
//! then reports the missing exit code itself), while without it kvmbuild's 125 stands; and the
//! kernel command line gains the parameters that keep Linux from probing for PCI.
//!
//! Without a usable /dev/kvm these print a skip note, unless CI=true, where they fail.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod support;

use std::path::Path;
use std::process::Command;

use support::{exit, guest, kvmbuild, run_command, scratch_path, Run, KVMBUILD};

/// What `kvmbuild qemu-compat` appends to `-append` (cli/src/qemu_compat.rs).
const NO_PCI: &str = "pci=off initcall_blacklist=pci_arch_init";

fn qemu_compat(kernel: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["qemu-compat", "-m", "64", "-nographic"];
    args.extend(extra);
    args.extend(["-kernel", kernel.to_str().unwrap()]);
    kvmbuild(args)
}

#[test]
fn the_guest_sees_append_plus_the_no_pci_parameters() {
    require_kvm!();
    let run = qemu_compat(
        &guest("hello").bzimage,
        &["-append", "console=ttyS0 panic=1"],
    );
    run.assert_code(42);
    run.assert_stdout_has(&format!("cmdline: console=ttyS0 panic=1 {NO_PCI}\n"));
}

#[test]
fn an_append_that_sets_pci_is_passed_as_given() {
    require_kvm!();
    let run = qemu_compat(&guest("hello").bzimage, &["-append", "pci=nomsi quiet"]);
    run.assert_code(42);
    run.assert_stdout_has("cmdline: pci=nomsi quiet\n");
}

/// Each way a guest resets: under `-no-reboot` status 0 and a note naming how; without it 125.
#[test]
fn a_reset_under_no_reboot_ends_with_status_0() {
    require_kvm!();
    for (name, printed, how) in [
        (
            "reboot",
            "reboot: writing 0xfe",
            "through the i8042 controller",
        ),
        (
            "acpireset",
            "acpireset: writing 1",
            "through the ACPI reset register",
        ),
        (
            "triple",
            "triple: loading an empty IDT",
            "by triple-faulting",
        ),
    ] {
        let kernel = guest(name).bzimage;
        let run = qemu_compat(&kernel, &["-no-reboot"]);
        run.assert_code(exit::OK);
        run.assert_stdout_has(printed);
        assert!(
            run.stderr.contains(&format!("reset itself {how}"))
                && run.stderr.contains("-no-reboot"),
            "the note should say how the guest reset\n{run}"
        );

        let run = qemu_compat(&kernel, &[]);
        run.assert_error(exit::RESET, &["reset itself", how]);
    }
}

/// Invoked as `qemu-kvm` (the name vmTools' default QEMU has), kvmbuild takes the whole line
/// as QEMU's and keeps the same semantics.
#[test]
fn invoked_as_qemu_kvm_a_reset_under_no_reboot_ends_with_status_0() {
    require_kvm!();
    let dir = scratch_path("qemu-kvm-name");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("qemu-kvm");
    std::os::unix::fs::symlink(KVMBUILD, &link).unwrap();
    let mut cmd = Command::new(&link);
    cmd.args([
        "-cpu",
        "max",
        "-m",
        "64",
        "-nographic",
        "-no-reboot",
        "-kernel",
    ])
    .arg(guest("reboot").bzimage);
    let run = run_command(cmd);
    run.assert_code(exit::OK);
    run.assert_stdout_has("reboot: writing 0xfe");
    std::fs::remove_dir_all(&dir).unwrap();
}
