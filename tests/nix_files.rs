//! The Nix files: every `.nix` file in the repository parses (`nix-instantiate --parse`), and
//! the native runInLinuxVM's host side maps its attributes to `kvmbuild exec` as documented
//! (evaluated with `nix-instantiate --eval`, then run with a stand-in kvmbuild that records its
//! arguments: no store, no KVM).
//!
//! Without `nix-instantiate` these tests say they skipped, except under `CI=true`, where they
//! fail (`.ci/install-deps` installs Debian's nix-bin).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// Whether nix-instantiate is there; outside CI a missing one skips the test.
fn have_nix(test: &str) -> bool {
    let found = Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("nix-instantiate is missing (install Debian's nix-bin: .ci/install-deps)");
        }
        eprintln!("{test}: skipped: nix-instantiate is not installed");
    }
    found
}

fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let file_type = entry.file_type().unwrap();
        if file_type.is_dir() {
            if name != "target" && name != ".git" {
                nix_files(&path, found);
            }
        } else if file_type.is_file() && path.extension().is_some_and(|e| e == "nix") {
            found.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    if !have_nix("every_nix_file_parses") {
        return;
    }
    let mut files = Vec::new();
    nix_files(&repo_root(), &mut files);
    for expected in [
        "flake.nix",
        "nix/package.nix",
        "nix/lib/run-in-linux-vm.nix",
        "nix/lib/make-disk-image.nix",
        "tests/linux/nix/disk-image.nix",
        "tests/linux/nix/vmtools.nix",
    ] {
        assert!(
            files.contains(&repo_root().join(expected)),
            "{expected} should exist"
        );
    }
    let mut failures = Vec::new();
    for file in &files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(file)
            .output()
            .unwrap();
        if !out.status.success() {
            failures.push(format!(
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "nix-instantiate --parse failed:\n{}",
        failures.join("\n")
    );
}

/// The native runInLinuxVM applied to `attrs` (Nix text) with stand-in inputs, as JSON of
/// its derivation attributes. Only strings: nothing is added to a store.
fn native_drv(kvmbuild: &Path, attrs: &str) -> serde_json::Value {
    let expr = format!(
        r#"
let
  run = import {lib} {{
    kvmbuild = "{kvmbuild}";
    kernel = "/kernel/bzImage";
    modules = "/kernel/lib/modules/6.1.0";
    virtiofsd = "/bin/virtiofsd";
    shell = "/bin/sh";
    coreutils = "/usr";
  }};
in
(run ({{ name = "t"; system = "x86_64-linux"; builder = "/bin/sh"; }} // {attrs})).drvAttrs
"#,
        lib = repo_root().join("nix/lib/run-in-linux-vm.nix").display(),
        kvmbuild = kvmbuild.display(),
    );
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-instantiate --eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the derivation's host side as Nix would (its builder and args, its attributes as the
/// environment) in a fresh build directory, with a stand-in kvmbuild that records its
/// arguments, checks the guest's stage 2 and xchg/saved-env are there, and reports status 0
/// in xchg/in-vm-exit. Returns (status, stderr, recorded arguments).
fn run_host_side(drv: &serde_json::Value, top: &Path) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(drv["builder"].as_str().unwrap());
    for arg in drv["args"].as_array().unwrap() {
        cmd.arg(arg.as_str().unwrap());
    }
    // PATH for the stand-in kvmbuild only: the host side itself uses absolute paths.
    cmd.env_clear()
        .current_dir(top)
        .env("NIX_BUILD_TOP", top)
        .env("PATH", "/usr/bin:/bin");
    for (name, value) in drv.as_object().unwrap() {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(true) => "1".into(),
            serde_json::Value::Bool(false) | serde_json::Value::Null => String::new(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        if name != "args" {
            cmd.env(name, text);
        }
    }
    let out = cmd.output().unwrap();
    let recorded = std::fs::read_to_string(top.join("kvmbuild-args")).unwrap_or_default();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        recorded,
    )
}

/// A stand-in `bin/kvmbuild`: records its arguments one per line, checks the exchange
/// directory, and writes the builder's status 0; with the attribute `fakeVm = "vanish"` it
/// exits 70 without a status, with `"fail3"` the builder's status is 3.
fn fake_kvmbuild(dir: &Path) -> PathBuf {
    let bin = dir.join("fake/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("kvmbuild");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         for a in \"$@\"; do printf '%s\\n' \"$a\"; done > \"$NIX_BUILD_TOP/kvmbuild-args\"\n\
         grep -q '^export memSize=' \"$NIX_BUILD_TOP/xchg/saved-env\" || exit 50\n\
         grep -q 'in-vm-exit' \"$NIX_BUILD_TOP/xchg/stage2\" || exit 51\n\
         case ${fakeVm-} in\n\
           vanish) exit 70 ;;\n\
           fail3) echo 3 > \"$NIX_BUILD_TOP/xchg/in-vm-exit\"; exit 3 ;;\n\
         esac\n\
         echo 0 > \"$NIX_BUILD_TOP/xchg/in-vm-exit\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin.parent().unwrap().to_path_buf()
}

#[test]
fn native_run_in_linux_vm_maps_its_attributes_to_exec() {
    if !have_nix("native_run_in_linux_vm_maps_its_attributes_to_exec") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kvmbuild = fake_kvmbuild(tmp.path());

    let drv = native_drv(
        &kvmbuild,
        r#"{ args = [ "-c" "echo 'quoted arg'" ]; memSize = 768; QEMU_OPTS = "-m 2G -smp cpus=3 -cpu max -nographic";
             requiredSystemFeatures = [ "big-parallel" ]; postVM = "echo post > $NIX_BUILD_TOP/post"; }"#,
    );
    assert_eq!(
        drv["requiredSystemFeatures"],
        serde_json::json!(["big-parallel", "kvm"])
    );
    assert_eq!(drv["origBuilder"], "/bin/sh");
    assert_eq!(drv["kvmbuildArgs"], "'-c' 'echo '\\''quoted arg'\\'''");
    let top = tmp.path().join("build1");
    std::fs::create_dir_all(&top).unwrap();
    let (status, stderr, args) = run_host_side(&drv, &top);
    assert_eq!(status, Some(0), "host side failed: {stderr}");
    let args: Vec<&str> = args.lines().collect();
    let after = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .map(|i| args[i + 1])
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
    };
    assert_eq!(args[0], "exec");
    assert!(
        !args.contains(&"-v"),
        "quiet unless kvmbuildVerbose: {args:?}"
    );
    assert!(args.contains(&"--no-root"), "{args:?}");
    assert_eq!(after("--mem"), "2048", "QEMU_OPTS' -m wins over memSize");
    assert_eq!(after("--cpus"), "3");
    assert_eq!(after("--kernel"), "/kernel/bzImage");
    assert_eq!(after("--modules"), "/kernel/lib/modules/6.1.0");
    let shares: Vec<&str> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| **a == "--share")
        .map(|(i, _)| args[i + 1])
        .collect();
    let xchg = format!("{}/xchg:/tmp/xchg", top.display());
    assert_eq!(shares, ["/nix/store:/nix/store", xchg.as_str()]);
    assert_eq!(
        &args[args.len() - 3..],
        ["--", "/bin/sh", "/tmp/xchg/stage2"]
    );
    assert!(top.join("post").exists(), "postVM ran after a good build");

    // memSize alone, and enableParallelBuilding giving NIX_BUILD_CORES vCPUs.
    let drv = native_drv(
        &kvmbuild,
        r#"{ memSize = 300; enableParallelBuilding = true; NIX_BUILD_CORES = "5"; kvmbuildVerbose = true; }"#,
    );
    let top = tmp.path().join("build2");
    std::fs::create_dir_all(&top).unwrap();
    let (status, stderr, args) = run_host_side(&drv, &top);
    assert_eq!(status, Some(0), "host side failed: {stderr}");
    assert!(
        args.contains("--mem\n300\n") && args.contains("--cpus\n5\n"),
        "{args}"
    );
    assert!(
        args.starts_with("exec\n-v\n"),
        "kvmbuildVerbose is -v: {args}"
    );

    // An option with no kvmbuild equivalent fails the build by name, before any VM.
    let drv = native_drv(&kvmbuild, r#"{ QEMU_OPTS = "-m 512 -vga std"; }"#);
    let top = tmp.path().join("build3");
    std::fs::create_dir_all(&top).unwrap();
    let (status, stderr, args) = run_host_side(&drv, &top);
    assert_eq!(status, Some(1));
    assert!(
        stderr.contains("-vga has no kvmbuild equivalent"),
        "{stderr}"
    );
    assert!(args.is_empty(), "kvmbuild must not start: {args}");

    // A qcow2 disk image is refused; mountDisk too.
    let top = tmp.path().join("build4");
    std::fs::create_dir_all(&top).unwrap();
    std::fs::write(top.join("disk.qcow2"), b"QFI\xfb\0\0\0\x03rest").unwrap();
    let drv = native_drv(
        &kvmbuild,
        r#"{ preVM = "diskImage=$NIX_BUILD_TOP/disk.qcow2"; }"#,
    );
    let (status, stderr, _) = run_host_side(&drv, &top);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("is qcow2"), "{stderr}");
    let drv = native_drv(&kvmbuild, r#"{ mountDisk = true; }"#);
    let top = tmp.path().join("build5");
    std::fs::create_dir_all(&top).unwrap();
    let (status, stderr, _) = run_host_side(&drv, &top);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("mountDisk"), "{stderr}");

    // A VM that reports nothing fails the build with kvmbuild's status and says so; a
    // builder's failure is the build's status, and postVM does not run.
    let post = r#"postVM = "echo post > $NIX_BUILD_TOP/post";"#;
    for (fake, want_status, want_text) in [
        (
            "vanish",
            70,
            "produced no exit code (kvmbuild exec exited 70)",
        ),
        ("fail3", 3, ""),
    ] {
        let drv = native_drv(&kvmbuild, &format!(r#"{{ fakeVm = "{fake}"; {post} }}"#));
        let top = tmp.path().join(fake);
        std::fs::create_dir_all(&top).unwrap();
        let (status, stderr, _) = run_host_side(&drv, &top);
        assert_eq!(status, Some(want_status), "{fake}: {stderr}");
        assert!(stderr.contains(want_text), "{fake}: {stderr}");
        assert!(
            !top.join("post").exists(),
            "{fake}: postVM ran after a failure"
        );
    }
}
