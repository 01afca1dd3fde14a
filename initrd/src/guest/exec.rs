//! Finding the command, running it, and reaping every child until it ends.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::stdio::StdioPorts;
use super::{sys, Error, Log};
use crate::config::Config;
use crate::status;

/// A command ready to start: found, with its directory entered and its streams chosen.
#[derive(Debug)]
pub struct Prepared {
    command: Command,
    program: PathBuf,
}

/// Finds the program, enters the working directory and opens the terminal, so that every
/// failure that is not the command's own is reported before it starts.
pub fn prepare(config: &Config, streams: Option<StdioPorts>) -> Result<Prepared, Error> {
    let (argv0, args) = config
        .command
        .split_first()
        .filter(|(a, _)| !a.is_empty())
        .ok_or(Error::NoCommand)?;
    let env = config.command_env();
    let path_var = env
        .iter()
        .find(|(n, _)| n == "PATH")
        .map(|(_, v)| v.as_os_str());
    let program = find_program(argv0, path_var)?;
    let cwd = config.cwd.clone().unwrap_or_else(|| PathBuf::from("/"));
    // The init enters the directory itself so a failure is told apart from an exec failure.
    std::env::set_current_dir(&cwd).map_err(|source| Error::Cwd { path: cwd, source })?;
    let mut command = Command::new(&program);
    command.arg0(argv0).args(args).env_clear().envs(env);
    if let Some(ports) = streams {
        command
            .stdin(Stdio::from(ports.stdin))
            .stdout(Stdio::from(ports.stdout))
            .stderr(Stdio::from(ports.stderr));
    } else if let Some(tty) = &config.tty {
        let open = || OpenOptions::new().read(true).write(true).open(tty);
        let tty_error = |source| Error::Tty {
            path: tty.clone(),
            source,
        };
        let (a, b, c) = (
            open().map_err(tty_error)?,
            open().map_err(tty_error)?,
            open().map_err(tty_error)?,
        );
        command
            .stdin(Stdio::from(a))
            .stdout(Stdio::from(b))
            .stderr(Stdio::from(c));
    }
    // SAFETY: the hook runs between fork and exec and makes only async-signal-safe calls.
    unsafe { command.pre_exec(sys::become_session_leader) };
    Ok(Prepared { command, program })
}

/// Starts the command and waits for it, reaping orphans that get re-parented to PID 1 on the
/// way. Returns the status to report. Processes the command leaves behind are not waited for:
/// powering off ends them.
pub fn run(mut prepared: Prepared, log: &Log) -> Result<u8, Error> {
    log.step(format_args!("running {}", prepared.program.display()));
    let child = prepared
        .command
        .spawn()
        .map_err(|source| exec_error(&prepared.program, source))?;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| Error::Internal("child pid out of range".into()))?;
    // The child is reaped below with waitpid(-1); `Child` must not wait for it too.
    drop(child);
    loop {
        match sys::wait_any() {
            Ok((reaped, raw)) if reaped == pid => return Ok(status::from_wait_status(raw)),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(Error::Internal(format!("waitpid: {e}"))),
        }
    }
}

/// Classifies a spawn failure: an ENOENT for a program that exists means its `#!`
/// interpreter or its dynamic loader is missing.
fn exec_error(program: &Path, source: std::io::Error) -> Error {
    match source.raw_os_error() {
        Some(libc::ENOENT) if program.exists() => Error::MissingInterpreter(program.to_path_buf()),
        Some(libc::EAGAIN | libc::ENOMEM) => {
            Error::Internal(format!("cannot start {}: {source}", program.display()))
        }
        _ => Error::Exec {
            program: program.to_path_buf(),
            source,
        },
    }
}

/// Resolves the command name as a shell does: a name with a `/` is used as is, others are
/// looked up in `PATH`. A name found only without execute permission is "not executable".
pub fn find_program(name: &OsStr, path_var: Option<&OsStr>) -> Result<PathBuf, Error> {
    if name.as_bytes().contains(&b'/') {
        let path = PathBuf::from(name);
        return match path.symlink_metadata() {
            Ok(_) => Ok(path),
            Err(_) => Err(Error::NotFound(name.to_os_string())),
        };
    }
    let mut not_executable = None;
    for dir in std::env::split_paths(path_var.unwrap_or_default()) {
        // An empty PATH entry means the current directory.
        let candidate = if dir.as_os_str().is_empty() {
            PathBuf::from(name)
        } else {
            dir.join(name)
        };
        match candidate.metadata() {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(candidate)
            }
            Ok(meta) if meta.is_file() => not_executable = not_executable.or(Some(candidate)),
            _ => {}
        }
    }
    match not_executable {
        Some(program) => Err(Error::Exec {
            program,
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        }),
        None => Err(Error::NotFound(OsString::from(name))),
    }
}

/// Opens the console and makes it fds 0–2 where those are not open (the kernel opens it for
/// init only when the initrd has a `/dev/console` node).
pub fn ensure_console() {
    if (0..3).all(sys::fd_is_open) {
        return;
    }
    if let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in (0..3).filter(|&fd| !sys::fd_is_open(fd)) {
            let _ = sys::dup_to(&console, fd);
        }
        // The descriptors now hold the console open.
        drop::<File>(console);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(path: &Path, mode: u32) {
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn path_lookup_prefers_the_first_executable() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write(&a.path().join("tool"), 0o644);
        write(&b.path().join("tool"), 0o755);
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(
            find_program(OsStr::new("tool"), Some(&path)).unwrap(),
            b.path().join("tool")
        );
    }

    #[test]
    fn non_executable_only_is_126_and_missing_is_127() {
        let a = tempfile::tempdir().unwrap();
        write(&a.path().join("data"), 0o644);
        let path = a.path().as_os_str();
        let err = find_program(OsStr::new("data"), Some(path)).unwrap_err();
        assert_eq!(err.status(), status::NOT_EXECUTABLE);
        let err = find_program(OsStr::new("nope"), Some(path)).unwrap_err();
        assert_eq!(err.status(), status::NOT_FOUND);
        assert_eq!(err.to_string(), "command not found: \"nope\"");
        let err = find_program(OsStr::new("/no/such/file"), None).unwrap_err();
        assert_eq!(err.status(), status::NOT_FOUND);
    }

    #[test]
    fn directories_are_not_commands() {
        let a = tempfile::tempdir().unwrap();
        fs::create_dir(a.path().join("sub")).unwrap();
        assert!(find_program(OsStr::new("sub"), Some(a.path().as_os_str())).is_err());
    }

    #[test]
    fn exec_errors_classify() {
        let exists = Path::new("/");
        let gone = Path::new("/no/such/thing");
        let enoent = || std::io::Error::from_raw_os_error(libc::ENOENT);
        assert!(matches!(
            exec_error(exists, enoent()),
            Error::MissingInterpreter(_)
        ));
        assert_eq!(exec_error(exists, enoent()).status(), status::NOT_FOUND);
        assert_eq!(exec_error(gone, enoent()).status(), status::NOT_FOUND);
        let eacces = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(exec_error(exists, eacces).status(), status::NOT_EXECUTABLE);
    }
}
