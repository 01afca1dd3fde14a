//! The archives this crate writes, read back by GNU cpio.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use initrd::cpio::{Archive, Kind};

/// True when GNU cpio can be run. Without it the test is skipped with a note, except under CI,
/// where a missing tool must not pass silently.
fn have_cpio() -> bool {
    if Command::new("cpio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "GNU cpio is required under CI (apt-get install cpio)"
    );
    eprintln!("note: GNU cpio not found; skipping (apt-get install cpio)");
    false
}

fn sample() -> Archive {
    let mut a = Archive::new().with_mtime(1_700_000_000);
    a.add_file("init", b"#!/bin/init\n".to_vec(), 0o755)
        .unwrap();
    a.add_file(
        "etc/kvmbuild/modules",
        b"/lib/modules/v/a.ko\n".to_vec(),
        0o644,
    )
    .unwrap();
    a.add_file("lib/modules/v/kernel/odd-size.ko", vec![0xab; 4097], 0o644)
        .unwrap();
    a.add_file("empty", Vec::new(), 0o600).unwrap();
    a.add_symlink("bin/sh", "../init").unwrap();
    a.add_dir("tmp", 0o1777).unwrap();
    a
}

fn cpio(dir: &Path, args: &[&str], input: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("cpio")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cpio {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn gnu_cpio_lists_the_archive() {
    if !have_cpio() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listing = cpio(dir.path(), &["-t", "--quiet"], &sample().to_bytes());
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(
        names,
        [
            "bin",
            "bin/sh",
            "empty",
            "etc",
            "etc/kvmbuild",
            "etc/kvmbuild/modules",
            "init",
            "lib",
            "lib/modules",
            "lib/modules/v",
            "lib/modules/v/kernel",
            "lib/modules/v/kernel/odd-size.ko",
            "tmp",
        ]
    );
}

#[test]
fn gnu_cpio_unpacks_identical_contents() {
    if !have_cpio() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    cpio(
        dir.path(),
        &["-idm", "--quiet", "--no-absolute-filenames"],
        &sample().to_bytes(),
    );
    let root = dir.path();
    assert_eq!(fs::read(root.join("init")).unwrap(), b"#!/bin/init\n");
    assert_eq!(
        fs::read(root.join("lib/modules/v/kernel/odd-size.ko")).unwrap(),
        vec![0xab; 4097]
    );
    assert_eq!(fs::read(root.join("empty")).unwrap(), b"");
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("../init")
    );
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("init"), 0o755);
    assert_eq!(mode("empty"), 0o600);
    assert_eq!(mode("etc/kvmbuild/modules"), 0o644);
    // -m keeps the archive's modification time.
    assert_eq!(
        fs::metadata(root.join("init")).unwrap().mtime(),
        1_700_000_000
    );
}

#[test]
fn gnu_cpio_lists_device_nodes() {
    if !have_cpio() {
        return;
    }
    let mut a = Archive::new();
    a.add_node("dev/console", Kind::CharDevice(5, 1), 0o600)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listing = cpio(dir.path(), &["-tv", "--quiet"], &a.to_bytes());
    let console = listing
        .lines()
        .find(|l| l.ends_with("dev/console"))
        .unwrap();
    assert!(console.starts_with("crw-------"), "{console}");
    assert!(
        console.contains("5,   1") || console.contains("5, 1"),
        "{console}"
    );
}
