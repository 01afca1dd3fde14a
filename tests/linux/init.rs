//! kvmbuild's own initrd and init under the stock Debian cloud kernel: `kvmbuild initrd`
//! builds the image, the init loads the virtio modules, runs the command named on the kernel
//! command line and reports its exit status on the exit port.

use std::time::Duration;

use super::guest::{boot, cloud_kernel, includes_for, kvmbuild_initrd, scratch, Run};

const GUARD: Duration = Duration::from_secs(180);
/// The kvmbuild-init statuses these tests expect (initrd::status).
const NOT_FOUND: i32 = 127;

fn boot_with_command(test: &str, includes: &[String], command: &str) -> Run {
    let kernel = cloud_kernel();
    let dir = scratch(test);
    let initrd = dir.join("initrd.img");
    kvmbuild_initrd(&kernel, includes, &initrd);
    let cmdline = format!("console=ttyS0 panic=1 quiet kvmbuild.cmd={command}");
    let run = boot(&kernel.bzimage, &initrd, &cmdline, &["--mem", "256"], GUARD);
    println!(
        "{test}: booted to the command's exit in {:.1} s",
        run.elapsed.as_secs_f64()
    );
    std::fs::remove_dir_all(dir).unwrap();
    run
}

/// `/bin/uname -r`, included from the host with its libraries, prints the guest's release.
pub fn init_runs_an_included_command() {
    let release = cloud_kernel().release;
    let run = boot_with_command("uname", &includes_for("/bin/uname"), "/bin/uname,-r");
    run.check(
        run.status == Some(0),
        "uname's status 0 should be kvmbuild's",
    );
    run.check(
        run.console.lines().any(|l| l.trim() == release),
        "uname -r should print the guest kernel's release",
    );
    run.check(
        !run.console.contains("kvmbuild-init: error"),
        "the init should report no error",
    );
}

/// The command's exit status is kvmbuild's.
pub fn init_passes_the_exit_status_through() {
    let run = boot_with_command(
        "exit7",
        &includes_for("/bin/busybox"),
        "/bin/busybox,sh,-c,exit%207",
    );
    run.check(
        run.status == Some(7),
        "a command that exits 7 should make kvmbuild exit 7",
    );
}

/// A missing command is reported on the console and with the documented status.
pub fn init_reports_a_missing_command() {
    let run = boot_with_command("missing", &[], "/bin/no-such-command");
    run.check(
        run.status == Some(NOT_FOUND),
        "a missing command should give status 127",
    );
    run.check(
        run.console.contains("kvmbuild-init: error")
            && run.console.contains("/bin/no-such-command"),
        "the init should name the missing command on the console",
    );
}
