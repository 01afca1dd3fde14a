//! kvmbuild's init: PID 1 of a kvmbuild guest, with no shell.
//!
//! In order: mark "init started" on the marker port, mount `/proc`, `/sys`, `/dev` (devtmpfs),
//! `/dev/pts` and `/dev/shm`, read the settings ([`crate::config`]), load the modules listed in
//! `/etc/kvmbuild/modules` ([`crate::modules::parse_load_list`]), mount the shares and disks,
//! mark "command started", run the command and reap children until it ends, mark "command
//! finished", flush the disks (not the virtio-fs shares: see [`flush`]), and report the status
//! on the exit port, which ends the VM. Should the VM still run, the init powers it off with
//! `reboot(RB_POWER_OFF)`. Every failure is printed on the
//! console and reported as one of the statuses in [`crate::status`]; a panic is reported too.

mod exec;
mod flush;
mod mount;
mod root;
mod stdio;
mod sys;
mod warm;

use std::ffi::{CString, OsString};
use std::fmt;

use abi::BootPhase;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use exec::find_program;
pub use mount::{parse_filesystems, parse_options};
pub use root::SCRATCH_DIRS;
pub use stdio::find_ports;

use crate::config::{self, Config};
use crate::modules::{parse_load_list, LoadEntry};
use crate::{compress, status};

/// Where the init finds its settings file and its module list.
pub const CONFIG_FILE: &str = "/etc/kvmbuild/config";
/// The module load list the host writes into the initrd.
pub const MODULES_FILE: &str = "/etc/kvmbuild/modules";
/// How long the init waits for a device to appear once its driver is loaded (a console port,
/// a disk, a virtio-fs tag), by the guest's clock. Generous on purpose: on a loaded host, or a
/// nested one, probing takes seconds, and the host's `--timeout` already bounds the whole run;
/// a short wait here only turned a slow probe into a failed run.
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The command's stderr port, once open: the init's own errors are copied there.
static ERROR_PORT: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Everything that stops the init from running the command, with the status it reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A settings file could not be read.
    #[error("cannot read {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The settings are malformed.
    #[error("bad settings")]
    Config(#[from] config::Error),
    /// No `kvmbuild.cmd` was given.
    #[error("no command: set kvmbuild.cmd on the kernel command line or in {CONFIG_FILE}")]
    NoCommand,
    /// A mount point of `/` cannot be mounted over from an initramfs.
    #[error("cannot mount over /: choose another mount point")]
    RootMountPoint,
    /// The terminal named by `kvmbuild.tty` cannot be opened.
    #[error("cannot open terminal {path}")]
    Tty {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A kernel module failed to load.
    #[error("cannot load module {path}")]
    Module {
        /// The module file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A module file could not be decompressed.
    #[error("cannot decompress module {path}")]
    Decompress {
        /// The module file.
        path: String,
        /// Why.
        #[source]
        source: compress::Error,
    },
    /// A filesystem failed to mount.
    #[error("cannot mount {what} on {}", target.display())]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// One of /proc, /sys, /dev, /dev/pts, /dev/shm failed to mount.
    #[error("cannot mount {fstype} on {target}")]
    BasicMount {
        /// The filesystem type.
        fstype: &'static str,
        /// Where.
        target: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The working directory cannot be entered.
    #[error("cannot enter working directory {}", path.display())]
    Cwd {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command is in no `PATH` directory, or the named file does not exist.
    #[error("command not found: {0:?}")]
    NotFound(OsString),
    /// The program exists, but its `#!` interpreter or dynamic loader does not.
    #[error("cannot execute {}: its #! interpreter or dynamic loader is missing", .0.display())]
    MissingInterpreter(PathBuf),
    /// The program exists but cannot be executed.
    #[error("cannot execute {}", program.display())]
    Exec {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Something that should not fail did.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The status reported on the exit port for this failure.
    pub fn status(&self) -> u8 {
        match self {
            Self::ReadConfig { .. }
            | Self::Config(_)
            | Self::NoCommand
            | Self::RootMountPoint
            | Self::Tty { .. } => status::BAD_CONFIG,
            Self::Module { .. } | Self::Decompress { .. } => status::MODULE_FAILED,
            Self::Mount { .. } => status::MOUNT_FAILED,
            // Without /proc or /dev the init cannot work at all.
            Self::BasicMount { .. } => status::INTERNAL,
            Self::Cwd { .. } => status::BAD_CWD,
            Self::NotFound(_) | Self::MissingInterpreter(_) => status::NOT_FOUND,
            Self::Exec { source, .. } => {
                status::from_exec_errno(source.raw_os_error().unwrap_or(0))
            }
            Self::Internal(_) => status::INTERNAL,
        }
    }
}

/// Console output: errors always, steps when `kvmbuild.verbose` is set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Log {
    verbose: bool,
}

impl Log {
    /// Prints a progress line, with the time since boot, when verbose.
    pub fn step(&self, message: fmt::Arguments<'_>) {
        if self.verbose {
            let _ = writeln!(
                io::stderr(),
                "[{:12.6}] kvmbuild-init: {message}",
                sys::uptime()
            );
        }
    }

    /// Prints an error and the chain of its causes on one line, on the console and, once the
    /// command's stderr port is open, there too: that is where the user looks.
    pub fn error(&self, error: &dyn std::error::Error) {
        let line = format!("kvmbuild-init: error: {}\n", error_chain(error));
        let _ = io::stderr().write_all(line.as_bytes());
        if let Some(mut port) = ERROR_PORT.get() {
            let _ = port.write_all(line.as_bytes());
        }
    }
}

/// `outer: cause: root cause`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The init's entry point. Never returns: it ends the VM.
pub fn main() -> ! {
    if std::process::id() != 1 {
        eprintln!("kvmbuild-init: this is kvmbuild's guest init; it runs only as PID 1 (the initrd's /init)");
        std::process::exit(2);
    }
    let ports = sys::Ports::open();
    ports.mark(BootPhase::InitStarted);
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("kvmbuild-init: internal error: {info}");
        finish(ports, status::INTERNAL)
    }));
    let status = run(ports).unwrap_or_else(|e| {
        Log::default().error(&e);
        e.status()
    });
    finish(ports, status)
}

/// Everything between "init started" and reporting the status.
fn run(ports: sys::Ports) -> Result<u8, Error> {
    mount::mount_basics()?;
    exec::ensure_console();
    let mut config = read_config()?;
    let mut log = Log {
        verbose: config.verbose,
    };
    log.step(format_args!("settings read"));
    load_modules(&log)?;
    if config.warm {
        warm::wait_for_console(&log)?;
        ports.snapshot_point();
        ports.mark(BootPhase::Resumed);
        warm::probe_run_devices(&log)?;
        ports.mark(BootPhase::DevicesReady);
        warm::read_run_settings(&mut config, &log)?;
        log.verbose = config.verbose;
    } else {
        ports.mark(BootPhase::DevicesReady);
    }
    let streams = match config.stdio_ports {
        true => Some(open_stdio_ports(&log)?),
        false => None,
    };
    if let Some(tag) = &config.root {
        root::enter(tag, &log)?;
    }
    mount_all(&config, &log)?;
    let prepared = exec::prepare(&config, streams)?;
    ports.mark(BootPhase::CommandStarted);
    let status = exec::run(prepared, &log)?;
    ports.mark(BootPhase::CommandFinished);
    if let Some(tty) = &config.tty {
        if let Ok(file) = std::fs::File::open(tty) {
            drain_terminals(vec![file]);
        }
    }
    log.step(format_args!("command exited with status {status}"));
    Ok(status)
}

/// Opens the host's stdio ports and sends the init's own errors to the stderr port from now on.
fn open_stdio_ports(log: &Log) -> Result<stdio::StdioPorts, Error> {
    let ports = stdio::open()?;
    if let Ok(copy) = ports.stderr.try_clone() {
        let _ = ERROR_PORT.set(copy);
    }
    log.step(format_args!("stdio ports open"));
    Ok(ports)
}

/// Reads the config file (if any) and then the kernel command line.
fn read_config() -> Result<Config, Error> {
    let mut config = Config::default();
    if let Some(text) = read_optional(Path::new(CONFIG_FILE))? {
        config.apply_file(&text)?;
    }
    let cmdline = read_optional(Path::new("/proc/cmdline"))?.unwrap_or_default();
    config.apply_cmdline(&cmdline)?;
    check_mount_points(&config)?;
    Ok(config)
}

fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Rejects `/` as a mount point: mounting over the initramfs root would hide the init's own
/// files without changing the command's root.
pub fn check_mount_points(config: &Config) -> Result<(), Error> {
    let points = config
        .shares
        .iter()
        .map(|s| &s.mountpoint)
        .chain(config.disks.iter().map(|d| &d.mountpoint));
    for point in points {
        if point.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::CurDir
            )
        }) {
            return Err(Error::RootMountPoint);
        }
    }
    Ok(())
}

/// Loads the modules of the load list, in order.
fn load_modules(log: &Log) -> Result<(), Error> {
    let Some(list) = read_optional(Path::new(MODULES_FILE))? else {
        return Ok(());
    };
    for entry in parse_load_list(&list) {
        log.step(format_args!("loading {}", entry.path));
        load_module(&entry)?;
    }
    Ok(())
}

/// Loads one module with finit_module, letting the kernel decompress a compressed file; a
/// kernel that cannot (no `CONFIG_MODULE_DECOMPRESS`, older than 5.17) gets the decompressed
/// image through init_module. A module that is already loaded is fine.
fn load_module(entry: &LoadEntry) -> Result<(), Error> {
    let module_error = |source| Error::Module {
        path: entry.path.clone(),
        source,
    };
    let params = CString::new(entry.params.as_bytes())
        .map_err(|_| module_error(io::ErrorKind::InvalidInput.into()))?;
    let file = std::fs::File::open(&entry.path).map_err(module_error)?;
    let compressed = is_compressed_name(&entry.path);
    let result = match sys::finit_module(&file, &params, compressed) {
        Err(e) if needs_fallback(&e, compressed) => {
            let raw = std::fs::read(&entry.path).map_err(module_error)?;
            let decompress_error = |source| Error::Decompress {
                path: entry.path.clone(),
                source,
            };
            let image = compress::decompress(&raw)
                .map_err(decompress_error)?
                .unwrap_or(raw);
            sys::init_module(&image, &params)
        }
        result => result,
    };
    match result {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(module_error(e)),
        _ => Ok(()),
    }
}

/// True for the module file names the kernel may be asked to decompress.
fn is_compressed_name(path: &str) -> bool {
    [".xz", ".zst", ".gz"].iter().any(|s| path.ends_with(s))
}

/// Whether a finit_module failure means "load it from memory instead": the call is missing,
/// or the kernel cannot decompress (EOPNOTSUPP) or does not know the flag (EINVAL).
fn needs_fallback(e: &io::Error, compressed: bool) -> bool {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => true,
        Some(libc::EOPNOTSUPP | libc::EINVAL) => compressed,
        _ => false,
    }
}

/// Mounts the shares, then the disks.
fn mount_all(config: &Config, log: &Log) -> Result<(), Error> {
    for share in &config.shares {
        mount::mount_share(share, log)?;
    }
    for disk in &config.disks {
        mount::mount_disk(disk, log)?;
    }
    Ok(())
}

/// Flushes data and ends the VM: the exit port first, then a power-off; if both fail, exiting
/// PID 1 makes the kernel panic, which a `panic=N` command line turns into a reset.
fn finish(ports: sys::Ports, status: u8) -> ! {
    let console: Vec<_> = [1, 2].iter().filter_map(|&fd| dup_fd(fd)).collect();
    drain_terminals(console);
    flush::flush_disks();
    ports.exit(status);
    let error = sys::power_off();
    eprintln!("kvmbuild-init: cannot power off: {error}");
    std::process::exit(i32::from(status))
}

/// The longest the init waits for terminals to send their output.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits, for at most [`DRAIN_LIMIT`], until the terminals have sent what was written to them.
/// A serial driver transmits from a buffer as the UART asks for more, while the exit port ends
/// the VM at once: without this, a command's last lines could be lost.
fn drain_terminals(files: Vec<std::fs::File>) {
    use std::os::fd::AsRawFd;
    let (done, wait) = std::sync::mpsc::channel();
    // A thread, so a terminal that never drains (flow control) cannot hang the init.
    std::thread::spawn(move || {
        for file in &files {
            // Not a terminal (ENOTTY) means nothing is buffered.
            let _ = sys::drain(file.as_raw_fd());
        }
        let _ = done.send(());
    });
    let _ = wait.recv_timeout(DRAIN_LIMIT);
}

/// A new handle on this process's descriptor `fd`, if it is open.
fn dup_fd(fd: std::os::fd::RawFd) -> Option<std::fs::File> {
    use std::os::fd::BorrowedFd;
    if !sys::fd_is_open(fd) {
        return None;
    }
    // SAFETY: `fd` was just checked to be open, and the borrow ends before this returns.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().ok().map(std::fs::File::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Disk, Share};

    #[test]
    fn statuses_are_distinct_per_failure() {
        let io = || io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(Error::NoCommand.status(), 120);
        assert_eq!(
            Error::Module {
                path: "a.ko".into(),
                source: io()
            }
            .status(),
            121
        );
        let share = Error::Mount {
            what: "virtio-fs share \"store\"".into(),
            target: "/nix/store".into(),
            source: io(),
        };
        assert_eq!(share.status(), 122);
        assert_eq!(
            Error::BasicMount {
                fstype: "proc",
                target: "/proc",
                source: io()
            }
            .status(),
            119
        );
        assert_eq!(
            Error::Cwd {
                path: "/x".into(),
                source: io()
            }
            .status(),
            123
        );
        assert_eq!(Error::NotFound("x".into()).status(), 127);
        assert_eq!(
            Error::Exec {
                program: "/x".into(),
                source: io::Error::from_raw_os_error(libc::EACCES)
            }
            .status(),
            126
        );
    }

    #[test]
    fn messages_carry_their_causes() {
        let e = Error::Module {
            path: "/lib/modules/v/a.ko".into(),
            source: io::Error::from_raw_os_error(libc::ENOEXEC),
        };
        assert_eq!(
            error_chain(&e),
            "cannot load module /lib/modules/v/a.ko: Exec format error (os error 8)"
        );
        let e = Error::from(config::Error::UnknownKey("kvmbuild.x".into()));
        assert_eq!(
            error_chain(&e),
            "bad settings: unknown setting \"kvmbuild.x\""
        );
    }

    #[test]
    fn root_is_not_a_mount_point() {
        let mut config = Config::default();
        config.shares.push(Share {
            tag: "t".into(),
            mountpoint: "/mnt".into(),
            options: "".into(),
        });
        check_mount_points(&config).unwrap();
        config.disks.push(Disk {
            device: "/dev/vda".into(),
            mountpoint: "/".into(),
            fstype: None,
            options: "".into(),
        });
        assert!(matches!(
            check_mount_points(&config),
            Err(Error::RootMountPoint)
        ));
    }

    #[test]
    fn draining_non_terminals_returns_at_once() {
        let start = std::time::Instant::now();
        drain_terminals(vec![std::fs::File::open("/dev/null").unwrap()]);
        assert!(start.elapsed() < DRAIN_LIMIT);
        assert!(dup_fd(-1).is_none());
    }

    #[test]
    fn module_fallback_decisions() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert!(needs_fallback(&e(libc::EOPNOTSUPP), true));
        assert!(needs_fallback(&e(libc::EINVAL), true));
        assert!(!needs_fallback(&e(libc::EINVAL), false));
        assert!(needs_fallback(&e(libc::ENOSYS), false));
        assert!(!needs_fallback(&e(libc::EEXIST), true));
        assert!(is_compressed_name("/lib/modules/v/a.ko.zst"));
        assert!(!is_compressed_name("/lib/modules/v/a.ko"));
    }
}
