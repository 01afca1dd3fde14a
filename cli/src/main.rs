//! The `kvmbuild` command.

mod exit_code;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vmm::exit::{ExitReason, ResetSource};
use vmm::vm::{self, ErrorClass, RunReport, VmConfig};

/// The command line used when `--cmdline` is not given.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Parser)]
#[command(
    name = "kvmbuild",
    version,
    about = "Boot a Linux kernel and initrd straight into KVM: no firmware, no QEMU.",
    after_help = exit_code::help_table!()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel and run the guest until it powers off.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
}

const RUN_HELP: &str = concat!(
    "Examples:
  kvmbuild run --kernel bzImage --initrd initrd.img --cmdline 'console=ttyS0 panic=1'
  kvmbuild run --kernel vmlinux --mem 2048 --cpus 2 --console boot.log --timeout 60

",
    exit_code::help_table!()
);

#[derive(Args)]
struct RunArgs {
    /// Kernel to boot: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line, passed as given.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u64,
    /// Where the serial console goes: stdout, none, or a file path.
    #[arg(long, value_name = "stdout|none|PATH", default_value = "stdout")]
    console: String,
    /// End the guest after this many seconds (fractions allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("'{s}' is not a positive number of seconds"))
}

fn open_console(spec: &str) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match spec {
        "stdout" => Box::new(std::io::stdout()),
        "none" => Box::new(std::io::sink()),
        path => Box::new(
            File::create(path)
                .with_context(|| format!("--console {path}: cannot create the file"))?,
        ),
    })
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("kvmbuild: {message}");
    ExitCode::from(code)
}

fn run(args: RunArgs) -> ExitCode {
    let console = match open_console(&args.console) {
        Ok(c) => c,
        Err(e) => return fail(exit_code::BAD_INPUT, format!("{e:#}")),
    };
    let vcpus = match vm::vcpu_count(args.cpus) {
        Ok(n) => n,
        Err(e) => return fail(exit_code::BAD_INPUT, e),
    };
    if vmm::kvm::is_pvm_host() {
        eprintln!("kvmbuild: warning: {}", vmm::kvm::PVM_WARNING);
    }
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem,
        vcpus,
        console,
        timeout: args.timeout,
    };
    match vm::run(config) {
        Ok(report) => report_outcome(&report, args.timeout),
        Err(e) => {
            let code = match e.class() {
                ErrorClass::KvmUnavailable => exit_code::KVM_UNAVAILABLE,
                ErrorClass::BadInput => exit_code::BAD_INPUT,
                ErrorClass::Internal => exit_code::INTERNAL,
            };
            fail(code, e)
        }
    }
}

fn report_outcome(report: &RunReport, timeout: Option<Duration>) -> ExitCode {
    if let Some(e) = &report.console_error {
        eprintln!("kvmbuild: warning: console output was lost: {e}");
    }
    match &report.reason {
        ExitReason::PowerOff => ExitCode::from(exit_code::SUCCESS),
        ExitReason::GuestStatus(status) => ExitCode::from(*status),
        ExitReason::Reset(source) => {
            let how = match source {
                ResetSource::I8042 => "through the i8042 controller",
                ResetSource::AcpiReset => "through the ACPI reset register",
                ResetSource::TripleFault => "by triple-faulting",
            };
            fail(
                exit_code::GUEST_RESET,
                format!("the guest reset itself {how}; kvmbuild does not reboot guests"),
            )
        }
        ExitReason::Timeout => fail(
            exit_code::TIMEOUT,
            format!(
                "the guest was stopped after the {:?} timeout",
                timeout.unwrap_or_default()
            ),
        ),
        ExitReason::Internal(message) => fail(exit_code::INTERNAL, message),
    }
}

/// A clap error as one line: its first paragraph (the message and any details clap lists under
/// it, such as missing arguments), without clap's "error: " prefix, usage and hints.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first_paragraph = rendered.split("\n\n").next().unwrap_or_default();
    let words: Vec<&str> = first_paragraph.lines().map(str::trim).collect();
    words.join(" ").trim_start_matches("error: ").to_string()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => return fail(exit_code::BAD_INPUT, one_line(&e)),
        Err(e) => {
            // --help and --version: clap's own output, on stdout.
            let _ = e.print();
            return ExitCode::from(exit_code::SUCCESS);
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
    }
}
