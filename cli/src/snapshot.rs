//! `kvmbuild snapshot`: the warm-start snapshots `exec --warm` keeps in the cache.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::exec::warm::snapshots_dir;
use crate::{exit_code, fail};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Boot to the snapshot point and save a snapshot, as the first `exec --warm` run would:
    /// `kvmbuild snapshot create [EXEC OPTIONS]` (the command run is `true`).
    Create {
        /// `exec`'s options (kernel, memory, vCPUs, shares, disks), which the snapshot is for.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// List the saved snapshots: key, size on disk (the memory file is sparse), age.
    List,
    /// Remove every saved snapshot.
    Clear,
}

pub fn snapshot(command: SnapshotCommand) -> ExitCode {
    match command {
        SnapshotCommand::Create { args } => create(args),
        SnapshotCommand::List => list(&snapshots_dir()),
        SnapshotCommand::Clear => clear(&snapshots_dir()),
    }
}

fn create(args: Vec<std::ffi::OsString>) -> ExitCode {
    use clap::Parser;
    let argv = ["kvmbuild", "exec", "--warm"]
        .map(std::ffi::OsString::from)
        .into_iter()
        .chain(args)
        .chain(["--", "true"].map(std::ffi::OsString::from));
    match crate::Cli::try_parse_from(argv) {
        Ok(crate::Cli {
            command: crate::Command::Exec(exec_args),
        }) => crate::exec::exec(exec_args),
        Ok(_) => fail(
            exit_code::INTERNAL,
            "snapshot create: not an exec command line",
        ),
        Err(e) => fail(
            exit_code::BAD_INPUT,
            format!("snapshot create: {}", crate::one_line(&e)),
        ),
    }
}

fn list(dir: &Path) -> ExitCode {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return ExitCode::SUCCESS;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let bytes = disk_usage(&path.join("state")) + disk_usage(&path.join("memory"));
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map_or_else(|| "?".to_string(), |d| format!("{} s", d.as_secs()));
        println!(
            "{}  {:.1} MiB  {age} old",
            name.to_string_lossy(),
            bytes as f64 / f64::from(1 << 20)
        );
    }
    ExitCode::SUCCESS
}

/// Bytes a file occupies on disk (a sparse file's holes take none).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn clear(dir: &Path) -> ExitCode {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ExitCode::SUCCESS,
        Err(e) => fail(
            exit_code::INTERNAL,
            format!("cannot remove {}: {e}", dir.display()),
        ),
    }
}
