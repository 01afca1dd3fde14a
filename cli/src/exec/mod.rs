//! `kvmbuild exec`: run one command in a fresh microVM and exit with its status.
//!
//! The steps, in order: check the arguments and every input (nothing is started before they
//! pass); choose the kernel ([`kernel`]); get the initrd for it from the cache ([`cache`]),
//! building it on first use; start one virtiofsd per share ([`virtiofsd`]); boot with the
//! per-run settings in a small cpio archive in front of the cached image; connect the
//! command's stdin, stdout and stderr to three virtio-console ports; and exit with the
//! command's status. The virtiofsd processes are stopped on every way out.

pub mod cache;
pub mod kernel;
mod options;
pub mod virtiofsd;
pub mod warm;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use initrd::config::{Config, Share as GuestShare, SETTINGS_PORT_NAME, STDIO_PORT_NAMES};
use initrd::guest::error_chain;
use initrd::{InitBinary, InitrdSpec};
use vmm::device_manager::mmio::VirtioError;
use vmm::device_manager::{ConsoleConfig, DeviceError, PortConfig, ShareConfig};
use vmm::exit::{BootPhase, ExitReason};
use vmm::snapshot::Snapshot;
use vmm::vm::{self, RunReport, VmConfig};

pub use options::ExecArgs;
use options::Plan;
use virtiofsd::Virtiofsd;
use warm::Warm;

use crate::initrd::EMBEDDED_INIT;
use crate::{exit_code, fail, run, terminal, vm_error};

pub const EXEC_HELP: &str = concat!(
    "Examples:
  kvmbuild exec -- uname -a
  kvmbuild exec --share $PWD -- make -j4
  printf 'b\\na\\n' | kvmbuild exec -- sort
  kvmbuild exec --no-root --share /srv/tools:/tools:ro -- /tools/check
  kvmbuild exec --disk scratch.img -- mkfs.ext4 -q /dev/vda

By default the guest's root is the host's / (read-only, with tmpfs on /tmp, /run and /var/tmp).
The command's stdout and stderr arrive here separately and unchanged; kernel messages go only
to --console-log. kvmbuild exits with the command's status (128+N if signal N killed it).

",
    exit_code::help_table!()
);

/// The virtio-fs tag of the host's root.
const ROOT_TAG: &str = "kvmbuild-root";
/// What follows the per-run settings on the kernel command line.
const CMDLINE: &str = "console=ttyS0 panic=1";
/// How much of the console a failed boot shows.
const CONSOLE_TAIL: usize = 4096;

pub fn exec(args: ExecArgs) -> ExitCode {
    let verbose = args.verbose;
    let plan = match options::plan(args) {
        Ok(plan) => plan,
        Err(e) => return fail(exit_code::BAD_INPUT, format!("{e:#}")),
    };
    if vmm::kvm::is_pvm_host() {
        return fail(
            exit_code::KVM_UNAVAILABLE,
            "this host's /dev/kvm is PVM, which cannot run an ordinary Linux kernel; run kvmbuild exec inside the test host: tests/host-vm/run -- kvmbuild exec ...",
        );
    }
    let stop = match terminal::stop_vm_on_signals() {
        Ok(stop) => stop,
        Err(code) => return code,
    };
    let log = Log { verbose };
    log.say(format_args!(
        "kernel {} ({})",
        plan.kernel.kernel.display(),
        plan.kernel.why
    ));
    let run_dir = match tempfile::Builder::new().prefix("kvmbuild-exec.").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            return fail(
                exit_code::INTERNAL,
                format!("cannot create a run directory: {e}"),
            )
        }
    };
    let initrd = match cached_initrd(&plan, run_dir.path(), &log) {
        Ok(path) => path,
        Err(e) => return fail(exit_code::INTERNAL, format!("{e:#}")),
    };
    // The binary and the directories were checked with the plan; what fails here is the host.
    let mut daemons = match start_virtiofsd(&plan, run_dir.path(), &log) {
        Ok(daemons) => daemons,
        Err(e) => return fail(exit_code::INTERNAL, format!("{e:#}")),
    };
    let console = ConsoleTail::default();
    let result = match run_vm(
        &plan,
        &initrd,
        &mut daemons,
        &console,
        run_dir.path(),
        stop,
        &log,
    ) {
        Ok(result) => result,
        Err(code) => return code,
    };
    // Stopped before the status is reported: nothing of this run outlives it.
    drop(daemons);
    drop(run_dir);
    match result {
        Ok(mut report) => {
            crate::keep_finished_vm(report.remains.take());
            outcome(&report, &plan, &console, &log)
        }
        Err(e) => vm_error(e),
    }
}

/// Runs the VM: cold, or with `--warm` from the saved snapshot (saving one when there is
/// none). A snapshot that fails to restore (damaged memory, another host CPU, a host that
/// refuses its state) is discarded and the run boots cold instead, with fresh virtiofsd
/// daemons (the failed restore may have connected the first ones, and each serves one
/// connection), saving a new snapshot.
fn run_vm(
    plan: &Plan,
    initrd: &Path,
    daemons: &mut Vec<Virtiofsd>,
    console: &ConsoleTail,
    run_dir: &Path,
    stop: &vmm_sys_util::eventfd::EventFd,
    log: &Log,
) -> Result<Result<RunReport, vm::VmError>, ExitCode> {
    let Some(warm) = plan
        .warm
        .then(|| Warm::new(plan, initrd, &cmdline(plan), daemons.len()))
    else {
        let config = vm_config(plan, initrd, daemons, console, None)?;
        return Ok(vm::run(config, stop, plan.timeout));
    };
    let restore = warm.saved();
    let restoring = restore.is_some();
    let config = vm_config(
        plan,
        initrd,
        daemons,
        console,
        Some((&warm, restore, run_dir)),
    )?;
    let result = match restoring {
        true => run_on_own_thread(config, stop, plan.timeout),
        false => vm::run(config, stop, plan.timeout),
    };
    match result {
        Err(vm::VmError::Snapshot(e)) if restoring => {
            warm.discard(&e);
            daemons.clear();
            *daemons = start_virtiofsd(plan, run_dir, log)
                .map_err(|e| fail(exit_code::INTERNAL, format!("{e:#}")))?;
            let config = vm_config(plan, initrd, daemons, console, Some((&warm, None, run_dir)))?;
            Ok(vm::run(config, stop, plan.timeout))
        }
        Ok(report) => {
            if let Some(served) = &report.served_on_demand {
                warm.keep_hot_list(&served.faulted);
            }
            Ok(Ok(report))
        }
        result => Ok(result),
    }
}

/// Runs a restored VM on a thread of its own. The thread that runs a VM confines itself
/// before the guest starts (no new program or socket: [`VmConfig::confine_runner`]), and a
/// restored VM's memory is checked beside the guest: should the check fail, this (main)
/// thread must still be free to start new virtiofsd daemons and boot cold.
fn run_on_own_thread(
    config: VmConfig,
    stop: &vmm_sys_util::eventfd::EventFd,
    timeout: Option<std::time::Duration>,
) -> Result<RunReport, vm::VmError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("kvmbuild-restored".into())
            .spawn_scoped(scope, || vm::run(config, stop, timeout))
            .map_err(|e| vm::VmError::Setup("the thread that runs the restored VM", e))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The kernel command line: the same for every run of a plan's kernel and verbosity.
fn cmdline(plan: &Plan) -> String {
    let quiet = if plan.verbose && plan.console_log.is_some() {
        ""
    } else {
        " quiet"
    };
    let warm = if plan.warm { " kvmbuild.warm=1" } else { "" };
    format!("{CMDLINE}{quiet}{warm}")
}

/// A VM that could not start. Its shares are virtiofsd processes this run started, so a
/// share that fails is kvmbuild's problem (70), not the user's input.
fn vm_error(e: vm::VmError) -> ExitCode {
    if vm_error::setup_stop_status(&e).is_some() {
        return vm_error::report(&e, &vm_error::EXEC);
    }
    if let vm::VmError::Device(DeviceError::Virtio(VirtioError::Share { source, .. })) = &e {
        return fail(
            exit_code::INTERNAL,
            format!("cannot connect to virtiofsd: {}", error_chain(source)),
        );
    }
    vm_error::report(&e, &vm_error::EXEC)
}

/// The directories that get a tmpfs over the host's root in the guest, as absolute paths.
fn root_scratch_dirs() -> impl Iterator<Item = PathBuf> {
    initrd::guest::SCRATCH_DIRS
        .iter()
        .map(|(dir, _)| Path::new("/").join(dir))
}

/// `-v` output: kvmbuild's own steps, on stderr.
#[derive(Clone, Copy)]
struct Log {
    verbose: bool,
}

impl Log {
    fn say(&self, message: std::fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!("kvmbuild: {message}");
        }
    }
}

fn cached_initrd(plan: &Plan, run_dir: &Path, log: &Log) -> anyhow::Result<PathBuf> {
    let init = match initrd::init_from_env() {
        Some(path) => InitBinary::File(path),
        None => InitBinary::Embedded(EMBEDDED_INIT),
    };
    let spec = InitrdSpec::new(init, plan.kernel.modules.clone());
    let started = Instant::now();
    let cached = cache::get_or_build(&cache::initrd_dir(), &spec, run_dir)?;
    if let Some(e) = &cached.not_cached {
        eprintln!(
            "kvmbuild: warning: {}; the initrd is built for this run only",
            error_chain(e)
        );
    }
    log.say(format_args!(
        "initrd {} ({} in {} ms)",
        cached.path.display(),
        if cached.built { "built" } else { "cached" },
        started.elapsed().as_millis()
    ));
    Ok(cached.path)
}

/// One virtiofsd per share (the root first), each on its own socket in `run_dir`.
fn start_virtiofsd(plan: &Plan, run_dir: &Path, log: &Log) -> anyhow::Result<Vec<Virtiofsd>> {
    let mut daemons = Vec::new();
    for (index, (spec, _)) in plan.served().enumerate() {
        let socket = run_dir.join(format!("fs{index}.sock"));
        // A socket of the daemons a failed restore used (the run directory is this run's).
        let _ = std::fs::remove_file(&socket);
        let daemon = Virtiofsd::start(&plan.virtiofsd, &spec, &socket)?;
        log.say(format_args!(
            "virtiofsd {} serving {}{}",
            daemon.pid(),
            spec.dir.display(),
            if spec.read_only { " read-only" } else { "" }
        ));
        daemons.push(daemon);
    }
    Ok(daemons)
}

/// The guest's settings: the command, its environment and directory, the root and shares.
fn guest_settings(plan: &Plan) -> Config {
    let mut config = Config {
        command: plan.command.clone(),
        cwd: Some(plan.cwd.clone()),
        stdio_ports: true,
        verbose: plan.console_log.is_some() && plan.verbose,
        root: plan.root.then(|| OsString::from(ROOT_TAG)),
        ..Config::default()
    };
    for (name, value) in &plan.env {
        config.set_env(name.clone(), value.clone());
    }
    for (index, share) in plan.shares.iter().enumerate() {
        config.shares.push(GuestShare {
            tag: share_tag(index).into(),
            mountpoint: share.guest.clone(),
            options: if share.read_only {
                "ro".into()
            } else {
                OsString::new()
            },
        });
    }
    config
}

fn share_tag(index: usize) -> String {
    format!("kvmbuild-share{index}")
}

fn vm_config(
    plan: &Plan,
    initrd: &Path,
    daemons: &[Virtiofsd],
    console: &ConsoleTail,
    warm: Option<(&Warm, Option<Snapshot>, &Path)>,
) -> Result<VmConfig, ExitCode> {
    let tags = plan
        .root
        .then(|| ROOT_TAG.to_string())
        .into_iter()
        .chain((0..plan.shares.len()).map(share_tag));
    let shares = daemons
        .iter()
        .zip(tags)
        .map(|(daemon, tag)| ShareConfig {
            socket: daemon.socket().to_path_buf(),
            tag,
        })
        .collect();
    let console_out: Box<dyn Write + Send> = match &plan.console_log {
        Some(file) => Box::new(
            file.try_clone()
                .map_err(|e| fail(exit_code::INTERNAL, format!("--console-log: {e}")))?,
        ),
        None => Box::new(console.clone()),
    };
    let mut settings = guest_settings(plan);
    // A warm run's settings travel on their own port, after the snapshot point; a cold run's
    // in front of the initrd.
    let (initrd_prefix, settings_port, snapshot_to, restore, held_input) = match warm {
        None => (settings.archive(), None, None, None, None),
        // Restored: the settings wait for the snapshot's memory check.
        Some((_, Some(restore), _)) => {
            let (port, held) = warm::held_settings(settings).map_err(|e| {
                fail(
                    exit_code::INTERNAL,
                    format!("cannot hold the run's settings: {e}"),
                )
            })?;
            (Vec::new(), Some(port), None, Some(restore), Some(held))
        }
        // Booted cold and saved: the settings are there from the start.
        Some((warm, None, run_dir)) => {
            let file = warm::settings_file(&mut settings, run_dir).map_err(|e| {
                fail(
                    exit_code::INTERNAL,
                    format!("cannot write the run's settings: {e}"),
                )
            })?;
            let snapshot_to = Some((warm.dir.clone(), warm.key.clone()));
            (Vec::new(), Some(file), snapshot_to, None, None)
        }
    };
    Ok(VmConfig {
        kernel: plan.kernel.kernel.clone(),
        initrd: Some(initrd.to_path_buf()),
        initrd_prefix,
        cmdline: cmdline(plan),
        mem_mib: plan.mem,
        vcpus: plan.vcpus,
        console: console_out,
        serial_input: None,
        disks: plan.disks.clone(),
        shares,
        virtio_console: Some(stdio_console(settings_port).map_err(|e| {
            fail(
                exit_code::INTERNAL,
                format!("cannot connect the standard streams: {e}"),
            )
        })?),
        rng: true,
        pit: false,
        setup_deadline: plan.timeout.map(|t| std::time::Instant::now() + t),
        seccomp: crate::seccomp_filters(),
        confine_runner: true,
        snapshot_to,
        // The run's disks come after the snapshot point (see initrd's guest::warm).
        defer_per_run: true,
        restore,
        held_input,
    })
}

/// A virtio-console whose three ports carry this process's stdin, stdout and stderr. A
/// stream kvmbuild was started without (`<&-`) is empty input or discarded output.
fn stdio_console(settings: Option<File>) -> std::io::Result<ConsoleConfig> {
    let stdin = match dup_fd(0) {
        Ok(file) => file,
        Err(_) => File::open("/dev/null")?,
    };
    let output = |fd| {
        dup_fd(fd)
            .ok()
            .map(|f| Box::new(f) as Box<dyn Write + Send>)
    };
    let [stdin_name, stdout_name, stderr_name] = STDIO_PORT_NAMES.map(String::from);
    Ok(ConsoleConfig::Ports(
        vec![
            PortConfig {
                name: stdin_name,
                input: Some(Box::new(stdin)),
                output: None,
            },
            PortConfig {
                name: stdout_name,
                input: None,
                output: output(1),
            },
            PortConfig {
                name: stderr_name,
                input: None,
                output: output(2),
            },
        ]
        .into_iter()
        .chain(settings.map(|file| PortConfig {
            name: SETTINGS_PORT_NAME.to_owned(),
            input: Some(Box::new(file)),
            output: None,
        }))
        .collect(),
    ))
}

/// A handle of its own on descriptor `fd` (unbuffered, closed by whoever owns it).
fn dup_fd(fd: i32) -> std::io::Result<File> {
    // SAFETY: dup has no memory-safety preconditions; a bad fd is an error.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(new) })
}

/// The console's last bytes, kept to explain a boot that failed.
#[derive(Clone, Default)]
struct ConsoleTail(Arc<Mutex<Vec<u8>>>);

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend_from_slice(buf);
        if tail.len() > 2 * CONSOLE_TAIL {
            let cut = tail.len() - CONSOLE_TAIL;
            tail.drain(..cut);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleTail {
    fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let start = tail.len().saturating_sub(CONSOLE_TAIL);
        String::from_utf8_lossy(&tail[start..]).into_owned()
    }
}

/// Milliseconds from when kvmbuild's process started to `at`.
fn ms_after_start(at: std::time::Instant) -> u128 {
    at.saturating_duration_since(crate::process_started())
        .as_millis()
}

/// The phases the guest marked, in the order it reached them, each in milliseconds after
/// kvmbuild started: where a run's time went.
fn guest_phases_line(report: &RunReport) -> String {
    let phases: Vec<String> = report
        .markers
        .iter()
        .map(|(phase, at)| format!("{} {}", phase.name(), ms_after_start(*at)))
        .collect();
    format!(
        "guest phases (ms after kvmbuild started): {}",
        phases.join(", ")
    )
}

/// The exit status, with the console's tail when the guest failed before the command ran.
fn outcome(report: &RunReport, plan: &Plan, console: &ConsoleTail, log: &Log) -> ExitCode {
    log.say(format_args!("{}", report.memory_backing));
    if let Some(restored) = &report.restored {
        log.say(format_args!("{restored}"));
    }
    if let Some(served) = &report.served_on_demand {
        log.say(format_args!("{}", crate::run::served_line(served.bytes)));
    }
    if let Some(took) = report.memory_checked {
        log.say(format_args!(
            "snapshot memory checked in {} ms, beside the guest (the run's settings waited for it)",
            took.as_millis()
        ));
    }
    log.say(format_args!(
        "VM set up in {} ms, from {} ms after kvmbuild started",
        report
            .guest_started
            .duration_since(report.started)
            .as_millis(),
        ms_after_start(report.started)
    ));
    if !report.markers.is_empty() {
        log.say(format_args!("{}", guest_phases_line(report)));
    }
    let command_started = report.marked(BootPhase::CommandStarted);
    if let Some(at) = command_started {
        log.say(format_args!(
            "command started {} ms after kvmbuild did, ended {} ms later",
            ms_after_start(at),
            report.ended.duration_since(at).as_millis()
        ));
    }
    if let (Some(started), Some(finished)) =
        (command_started, report.marked(BootPhase::CommandFinished))
    {
        log.say(format_args!(
            "{}",
            crate::bench::marks_line(started, finished)
        ));
    }
    let init_failed =
        matches!(report.reason, ExitReason::GuestStatus(s) if (119..=123).contains(&s));
    let failed_early = command_started.is_none()
        && (init_failed || !matches!(report.reason, ExitReason::GuestStatus(_)));
    if failed_early && plan.console_log.is_none() {
        let tail = console.text();
        if !tail.trim().is_empty() {
            eprintln!("kvmbuild: the guest failed before the command started; its console ended with:\n{tail}");
        }
    }
    run::report_outcome(report, plan.timeout)
}
