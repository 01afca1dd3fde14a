//! Files kvmbuild writes (the console, `--console-log`, bench reports, initrd images), opened
//! the one way that cannot destroy an input of the same command.
//!
//! An output that is one of the command's inputs (the same device and inode: also through a
//! symlink, a hard link or `/dev/stdout`) is refused before it is opened for writing. Opening
//! never blocks (a FIFO without a reader is refused at once rather than waited for, since that
//! wait would come before any `--timeout` or signal handling), and only a regular file is
//! truncated: a FIFO, a terminal or `/dev/null` is written as it is.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};
use vmm::host_file;

/// Opens `path` (named `what` in messages, e.g. `--console`) for writing, refusing it when it
/// is also one of `inputs`.
pub fn create_output(path: &Path, inputs: &[&Path], what: &str) -> anyhow::Result<File> {
    if let Ok(existing) = std::fs::metadata(path) {
        refuse_an_input(path, &existing, inputs, what)?;
    }
    let file = host_file::open_output(path)
        .with_context(|| format!("{what} {}: cannot create the file", path.display()))?;
    let opened = file
        .metadata()
        .with_context(|| format!("{what} {}: cannot examine it", path.display()))?;
    // Checked again on what was opened: the path may have been replaced in between.
    refuse_an_input(path, &opened, inputs, what)?;
    if opened.is_file() {
        file.set_len(0)
            .with_context(|| format!("{what} {}: cannot truncate it", path.display()))?;
    }
    Ok(file)
}

fn refuse_an_input(
    path: &Path,
    out: &Metadata,
    inputs: &[&Path],
    what: &str,
) -> anyhow::Result<()> {
    for input in inputs {
        let Ok(meta) = std::fs::metadata(input) else {
            continue;
        };
        if meta.dev() == out.dev() && meta.ino() == out.ino() {
            bail!(
                "{what} {}: that is also the input {}; it would be overwritten",
                path.display(),
                input.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_that_is_an_input_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("bzImage");
        std::fs::write(&kernel, b"kernel bytes").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&kernel, &link).unwrap();
        let hard = tmp.path().join("hard");
        std::fs::hard_link(&kernel, &hard).unwrap();
        for path in [&kernel, &link, &hard] {
            let err = create_output(path, &[&kernel], "--console-log").unwrap_err();
            assert!(
                err.to_string().ends_with("it would be overwritten"),
                "{err}"
            );
        }
        assert_eq!(std::fs::read(&kernel).unwrap(), b"kernel bytes");
        let log = tmp.path().join("log");
        std::fs::write(&log, b"old").unwrap();
        create_output(&log, &[&kernel], "--console-log").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"");
    }

    #[test]
    fn a_fifo_without_a_reader_is_refused_at_once_and_dev_null_is_fine() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo keeps no pointer.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = create_output(&fifo, &[], "--console").unwrap_err();
        assert!(
            format!("{err:#}").ends_with("a FIFO with no reader"),
            "{err:#}"
        );
        assert!(create_output(Path::new("/dev/null"), &[], "--console").is_ok());
        let missing = tmp.path().join("no/such/dir/out.json");
        assert!(create_output(&missing, &[], "--json").is_err());
    }
}
