//! Choosing where the real-Linux tests run, and running them.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// Set inside the test host, so the binary runs its tests instead of crossing again.
const IN_TEST_HOST: &str = "KVMBUILD_IN_TEST_HOST";

/// One test: a name and a function that panics on failure.
pub struct Test {
    pub name: &'static str,
    pub run: fn(),
}

/// Where the tests can reach a KVM that runs an ordinary Linux kernel.
enum Route {
    /// Here: /dev/kvm has hardware-virtualisation semantics.
    Direct(&'static str),
    /// Through the test host: /dev/kvm here is PVM.
    TestHost,
    /// Nowhere: no usable /dev/kvm.
    Unavailable(String),
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

fn choose_route() -> Route {
    if std::env::var_os(IN_TEST_HOST).is_some() {
        return Route::Direct("inside the test host (nested SVM)");
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Route::Unavailable(format!("/dev/kvm: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        Route::TestHost
    } else {
        Route::Direct("directly (/dev/kvm is hardware-backed)")
    }
}

/// Runs this same binary inside the test host and passes its status on.
fn cross_into_test_host(pass_on: &[&str]) -> ExitCode {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let runner = repo_root().join("tests/host-vm/run");
    println!(
        "linux tests: /dev/kvm here is PVM; running them inside the test host ({})",
        runner.display()
    );
    let mut cmd = Command::new(&runner);
    cmd.args(["--timeout", "2400", "-e", &format!("{IN_TEST_HOST}=1")]);
    for var in ["CI", "RUST_BACKTRACE", "XDG_CACHE_HOME", "HOME"]
        .iter()
        .chain(pass_on)
    {
        if std::env::var_os(var).is_some() {
            cmd.args(["-e", var]);
        }
    }
    cmd.arg("--").arg(exe).args(std::env::args_os().skip(1));
    let started = Instant::now();
    match cmd.status() {
        Ok(status) => {
            println!(
                "linux tests: test host finished in {:.1} s with {status}",
                started.elapsed().as_secs_f64()
            );
            ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
        }
        Err(e) => {
            eprintln!("linux tests: cannot start {}: {e}", runner.display());
            ExitCode::FAILURE
        }
    }
}

/// The name filter libtest would take: the first argument that is not a flag.
fn filter() -> Option<String> {
    std::env::args().skip(1).find(|a| !a.starts_with('-'))
}

pub fn main(tests: &[Test]) -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        for t in tests {
            println!("{}: test", t.name);
        }
        return ExitCode::SUCCESS;
    }
    let route = choose_route();
    let pass_on = match route {
        Route::Unavailable(_) => Vec::new(),
        _ => {
            let mut vars = super::guest::resolve_kernels();
            vars.push(super::guest::build_static_init());
            vars
        }
    };
    match route {
        Route::TestHost => return cross_into_test_host(&pass_on),
        Route::Unavailable(why) if in_ci() => {
            eprintln!(
                "linux tests: FAILED: no usable KVM ({why}); under CI real-Linux tests never skip"
            );
            return ExitCode::FAILURE;
        }
        Route::Unavailable(why) => {
            println!("linux tests: skipped: no usable KVM ({why})");
            return ExitCode::SUCCESS;
        }
        Route::Direct(how) => println!("linux tests: running {how}"),
    }
    run_all(tests, filter().as_deref())
}

fn run_all(tests: &[Test], filter: Option<&str>) -> ExitCode {
    let selected: Vec<_> = tests
        .iter()
        .filter(|t| filter.is_none_or(|f| t.name.contains(f)))
        .collect();
    let started = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for test in &selected {
        // Named before it runs too, so that a run that stops shows where.
        println!("starting {}", test.name);
        let t0 = Instant::now();
        let ok = std::panic::catch_unwind(test.run).is_ok();
        println!(
            "test {} ... {} ({:.1} s)",
            test.name,
            if ok { "ok" } else { "FAILED" },
            t0.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(test.name);
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len(),
        tests.len() - selected.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
