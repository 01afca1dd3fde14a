//! The `kvmbuild` command.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod bench;
mod exec;
mod exit_code;
mod initrd;
mod output;
mod qemu_compat;
mod run;
mod snapshot;
mod terminal;
mod vm_error;

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kvmbuild",
    version,
    about = "Boot a Linux kernel and initrd straight into KVM: no firmware, no QEMU.",
    after_help = exit_code::help_table!()
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// seccomp filters on the vCPU, device, console-writer and vhost-user threads, and on the
    /// thread that runs the VM once the guest starts; `off` (or KVMBUILD_SECCOMP=off, also for
    /// qemu-compat) to debug a forbidden call.
    #[arg(long, global = true, value_name = "on|off", default_value = "on")]
    seccomp: Switch,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// The seccomp filters every VM this process builds confines its threads with, once built.
/// Like the stop signal and the finished VM, this belongs to the process, so to the CLI: the
/// library takes them in each `VmConfig`.
static SECCOMP_FILTERS: OnceLock<Arc<vmm::seccomp::Filters>> = OnceLock::new();

/// Builds the seccomp filters unless `--seccomp off` or KVMBUILD_SECCOMP=off says not to.
fn start_seccomp(flag: Switch) -> Result<(), ExitCode> {
    let env_off = std::env::var_os("KVMBUILD_SECCOMP").is_some_and(|v| v == "off");
    if flag == Switch::Off || env_off {
        return Ok(());
    }
    let filters = vmm::seccomp::Filters::enable().map_err(|e| fail(exit_code::INTERNAL, e))?;
    let _ = SECCOMP_FILTERS.set(filters);
    Ok(())
}

/// The filters for a `VmConfig` (`None` with seccomp off).
pub(crate) fn seccomp_filters() -> Option<Arc<vmm::seccomp::Filters>> {
    SECCOMP_FILTERS.get().cloned()
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Boot a kernel and run the guest until it powers off.
    #[command(after_help = run::RUN_HELP)]
    Run(run::RunArgs),
    /// Run one command in a fresh microVM: the host's root (read-only) and shares through
    /// virtiofsd, its stdin/stdout/stderr here, its exit status as kvmbuild's.
    #[command(after_help = exec::EXEC_HELP)]
    Exec(exec::ExecArgs),
    /// Run a guest described by QEMU arguments (the subset nixpkgs' vmTools uses).
    #[command(name = "qemu-compat", disable_help_flag = true)]
    QemuCompat {
        /// QEMU's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Boot a kernel many times and report each boot phase (JSON, SVG), optionally beside QEMU.
    #[command(after_help = bench::BENCH_HELP)]
    Bench(bench::BenchArgs),
    /// The warm-start snapshots `exec --warm` keeps: create, list, clear.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Build an initrd with kvmbuild's init, kernel modules and host files.
    #[command(after_help = initrd::INITRD_HELP)]
    Initrd(initrd::InitrdArgs),
}

/// Prints one `kvmbuild:` line on stderr and returns `code`.
pub(crate) fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("kvmbuild: {message}");
    ExitCode::from(code)
}

/// A clap error as one line: its first paragraph (the message and any details clap lists under
/// it, such as missing arguments), without clap's "error: " prefix, usage and hints.
pub(crate) fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first_paragraph = rendered.split("\n\n").next().unwrap_or_default();
    let words: Vec<&str> = first_paragraph.lines().map(str::trim).collect();
    words.join(" ").trim_start_matches("error: ").to_string()
}

/// The arguments as UTF-8, or an error naming the first that is not (shown lossily).
fn utf8_args(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Vec<String>, String> {
    args.enumerate()
        .map(|(i, arg)| {
            arg.into_string().map_err(|bad| {
                format!(
                    "argument {} '{}' is not valid UTF-8",
                    i + 1,
                    bad.to_string_lossy()
                )
            })
        })
        .collect()
}

/// When this process's `main` began: what `exec -v` measures its phases from.
static PROCESS_STARTED: OnceLock<std::time::Instant> = OnceLock::new();

/// When this process's `main` began (the first call, if `main` did not make it).
pub(crate) fn process_started() -> std::time::Instant {
    *PROCESS_STARTED.get_or_init(std::time::Instant::now)
}

fn main() -> ExitCode {
    process_started();
    // Under a QEMU binary's name (a symlink), the whole command line is QEMU's. Arguments
    // are taken as the OS gives them: any bytes, not necessarily UTF-8.
    let mut argv = std::env::args_os();
    let argv0 = argv.next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if qemu_compat::QEMU_NAMES.contains(&name) {
        if let Err(code) = start_seccomp(Switch::On) {
            return code;
        }
        let code = match utf8_args(argv) {
            Ok(args) => qemu_compat::qemu_compat(&args),
            Err(message) => fail(exit_code::BAD_INPUT, format!("qemu-compat: {message}")),
        };
        release_finished_vm();
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => return fail(exit_code::BAD_INPUT, one_line(&e)),
        Err(e) => {
            // --help and --version: clap's own output, on stdout.
            let _ = e.print();
            return ExitCode::from(exit_code::SUCCESS);
        }
    };
    if let Err(code) = start_seccomp(cli.seccomp) {
        return code;
    }
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Exec(args) => exec::exec(args),
        Command::Initrd(args) => initrd::initrd(args),
        Command::Bench(args) => bench::run_bench(args),
        Command::Snapshot(command) => snapshot::snapshot(command),
        Command::QemuCompat { args } => qemu_compat::qemu_compat(&args),
    };
    // Last, with every output written: the kernel's destruction of the VM (SRCU waits, ~10 ms)
    // happens after this process has exited, not in its exit.
    release_finished_vm();
    code
}

/// The VM a front end finished with, until the process is about to exit (see
/// [`vmm::release`]): its destruction is left to a keeper process, after the exit status.
static FINISHED_VM: std::sync::Mutex<Option<vmm::release::Remains>> = std::sync::Mutex::new(None);

/// Keeps a finished VM's fd and memory for [`release_finished_vm`]; a VM kept before is
/// released here.
pub(crate) fn keep_finished_vm(remains: Option<vmm::release::Remains>) {
    let previous = std::mem::replace(
        &mut *FINISHED_VM.lock().unwrap_or_else(|p| p.into_inner()),
        remains,
    );
    drop(previous);
}

fn release_finished_vm() {
    let remains = FINISHED_VM.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(remains) = remains {
        remains.release_after_exit();
    }
}
