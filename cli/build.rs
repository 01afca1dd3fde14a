//! Builds kvmbuild's guest init (`kvmbuild-init`, PID 1 of every `kvmbuild exec` guest) as a
//! static executable, so that the CLI can embed its bytes and `cargo build` alone gives a
//! kvmbuild whose `initrd` and `exec` work at once.
//!
//! Why a nested `cargo build` rather than one static kvmbuild that is its own init: a static
//! glibc binary needs `-C target-feature=+crt-static`, which Cargo applies to build scripts and
//! proc macros too unless `--target` is explicit, and `cargo install` ignores a project's
//! `.cargo/config.toml` where that could be set. Building only the init this way keeps
//! kvmbuild an ordinary dynamic program and the init a small static one.
//!
//! The init is built in release mode into `<target-dir>/kvmbuild-init/` (shared by the debug and
//! release builds of kvmbuild; Cargo's own lock serialises concurrent builds there), from the
//! workspace's `Cargo.lock`. Packagers who build the init themselves (e.g. a Nix derivation)
//! set `KVMBUILD_PREBUILT_INIT=/path/to/static/kvmbuild-init` and nothing is built here.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Environment the outer build sets that must not leak into the init's build: flags for the
/// host binary, wrappers that belong to `cargo clippy`, and target overrides.
const OUTER_ONLY_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CARGO_PRIMARY_PACKAGE",
];

fn main() {
    println!("cargo:rerun-if-env-changed=KVMBUILD_PREBUILT_INIT");
    let init = match env::var_os("KVMBUILD_PREBUILT_INIT").filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => build_static_init(),
    };
    println!("cargo:rerun-if-changed={}", init.display());
    println!("cargo:rustc-env=KVMBUILD_EMBEDDED_INIT={}", init.display());
    // The exec initrd cache keys on the init's hash; computed here, it costs nothing per run.
    let bytes = std::fs::read(&init)
        .unwrap_or_else(|e| panic!("cannot read the init {}: {e}", init.display()));
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=KVMBUILD_EMBEDDED_INIT_SHA256={digest}");
}

fn build_static_init() -> PathBuf {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by Cargo"));
    let workspace = manifest_dir.parent().expect("cli/ is inside the workspace");
    for input in [
        "initrd/src",
        "initrd/Cargo.toml",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    let target = env::var("TARGET").expect("set by Cargo");
    let target_dir = init_target_dir();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--quiet"])
        .args(["-p", "kvmbuild-initrd", "--bin", "kvmbuild-init"])
        .args(["--target", &target, "--target-dir"])
        .arg(&target_dir);
    for var in OUTER_ONLY_ENV {
        cmd.env_remove(var);
    }
    // Symbols are stripped: the init is copied into every initrd, and the guest loads it.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols",
    );
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build kvmbuild-init: {e}"));
    if !status.success() {
        panic!(
            "building the static kvmbuild-init failed ({status}); it needs the C library's static \
             archive (Debian: libc6-dev; Nix: glibc.static), or set KVMBUILD_PREBUILT_INIT"
        );
    }
    target_dir.join(target).join("release/kvmbuild-init")
}

/// `<target-dir>/kvmbuild-init`, found from `OUT_DIR` (`<target-dir>/[<triple>/]<profile>/build/
/// <pkg>/out`), so that every profile of kvmbuild shares one build of the init.
fn init_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by Cargo"));
    let profile_dir = out_dir.ancestors().nth(3).unwrap_or(Path::new("."));
    let base = profile_dir.parent().unwrap_or(profile_dir);
    base.join("kvmbuild-init")
}
