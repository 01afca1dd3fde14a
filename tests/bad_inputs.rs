//! Bad inputs to every front end (`run`, `exec`, `initrd`, `bench`, `qemu-compat` and the
//! `qemu-system-x86_64` name), as one table. Each case must end quickly with its status (64)
//! and one stderr line starting with "kvmbuild: " that names the problem, and must leave
//! every input file exactly as it was (compared by checksum before and after).
//!
//! FIFOs stand for every non-regular input: opening one must not wait for a peer. Cases whose
//! input is only checked while a VM is built (the kernel, initrd and disks are loaded after
//! KVM is opened) need /dev/kvm and are skipped without it, unless CI=true.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod support;

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::{exit, guest, run_command, Run};

/// Far below the hang guard: a bad input is refused at once.
const QUICK: Duration = Duration::from_secs(20);

/// The input files of every case, in one scratch directory.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn arg(&self, name: &str) -> OsString {
        self.path(name).into_os_string()
    }

    fn new() -> Self {
        let dir = support::scratch_path("bad-inputs");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("dir")).unwrap();
        let f = Fixture { dir };
        let poweroff = guest("poweroff");
        fs::copy(&poweroff.bzimage, f.path("bzImage")).unwrap();
        fs::copy(&poweroff.elf, f.path("init.elf")).unwrap();
        fs::write(
            f.path("initrd"),
            b"initrd bytes, not cpio, never read by the guest",
        )
        .unwrap();
        fs::File::create(f.path("disk.img"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        fs::write(f.path("empty"), b"").unwrap();
        fs::write(f.path("text"), "#!/bin/sh\necho not a kernel\n".repeat(40)).unwrap();
        std::os::unix::fs::symlink(f.path("bzImage"), f.path("kernel-link")).unwrap();
        mkfifo(&f.path("fifo"));
        std::os::unix::fs::symlink(support::KVMBUILD, f.path("qemu-system-x86_64")).unwrap();
        std::os::unix::fs::symlink(support::KVMBUILD, f.path("qemu-kvm")).unwrap();
        f.write_bad_kernels();
        f.write_module_trees();
        f
    }

    fn write_bad_kernels(&self) {
        fs::write(self.path("huge-note.elf"), elf(0x10_0000, Some(4 << 30))).unwrap();
        fs::write(self.path("entry-outside.elf"), elf(1 << 40, None)).unwrap();
        let mut bz = fs::read(self.path("bzImage")).unwrap();
        // As the boot protocol reads setup_sects: 0 means 4.
        let setup_sects = match bz[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let setup_len = (setup_sects + 1) * 512;
        bz.truncate(setup_len + 0x100);
        fs::write(self.path("truncated.bzImage"), bz).unwrap();
    }

    fn write_module_trees(&self) {
        let tree = |name: &str, dep: &str| {
            let dir = self.path(name).join("6.1.0-test");
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("modules.dep"), dep).unwrap();
        };
        fs::write(self.path("secret"), b"a host file outside any module tree").unwrap();
        tree(
            "mods-escape",
            "kernel/ok.ko:\n../../../secret: kernel/ok.ko\n",
        );
        let absolute = format!("{}:\n", self.path("secret").display());
        tree("mods-absolute", &absolute);
        let mut deep = String::from("m0.ko:\n");
        for i in 1..200_000 {
            deep += &format!("m{i}.ko: m{}.ko\n", i - 1);
        }
        tree("mods-deep", &deep);
        // A module that is a FIFO, and a modules.dep that is one: reading either must not wait
        // for a writer.
        tree("mods-fifo-module", "kernel/fifo.ko:\n");
        let module_dir = self.path("mods-fifo-module").join("6.1.0-test/kernel");
        fs::create_dir_all(&module_dir).unwrap();
        mkfifo(&module_dir.join("fifo.ko"));
        let dep_dir = self.path("mods-fifo-dep").join("6.1.0-test");
        fs::create_dir_all(&dep_dir).unwrap();
        mkfifo(&dep_dir.join("modules.dep"));
    }

    /// Every regular file's checksum (FIFOs are not read: that would block).
    fn checksums(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut sums = BTreeMap::new();
        let mut pending = vec![self.dir.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                let meta = fs::symlink_metadata(entry.path()).unwrap();
                if meta.is_dir() {
                    pending.push(entry.path());
                } else if meta.is_file() {
                    let bytes = fs::read(entry.path()).unwrap();
                    sums.insert(entry.path(), Sha256::digest(&bytes).to_vec());
                }
            }
        }
        sums
    }
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo keeps no pointer.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A minimal x86-64 ELF kernel (one PT_LOAD at 0x100000 of `hlt`s) entered at `entry`, with a
/// PT_NOTE segment of `note_size` bytes if given (its notes are not in the file).
fn elf(entry: u64, note_size: Option<u64>) -> Vec<u8> {
    let phdr = |kind: u32, offset: u64, paddr: u64, size: u64| {
        let mut h = Vec::new();
        h.extend(kind.to_le_bytes());
        h.extend(7u32.to_le_bytes());
        for v in [offset, paddr, paddr, size, size, 0x1000] {
            h.extend(v.to_le_bytes());
        }
        h
    };
    let phnum = 1 + u16::from(note_size.is_some());
    let mut f = vec![0u8; 64];
    f[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
    f[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes());
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    f.extend(phdr(1, 0x1000, 0x10_0000, 16));
    if let Some(size) = note_size {
        f.extend(phdr(4, 0x800, 0, size));
    }
    f.resize(0x1010, 0xf4);
    f
}

/// One bad invocation.
struct Case {
    name: &'static str,
    /// Run under this name (a symlink in the fixture) instead of `kvmbuild`.
    argv0: Option<&'static str>,
    args: Vec<OsString>,
    /// Whether the input is only checked once KVM is open.
    needs_kvm: bool,
    parts: Vec<String>,
}

fn case(name: &'static str, args: Vec<OsString>, parts: &[&str]) -> Case {
    Case {
        name,
        argv0: None,
        args,
        needs_kvm: false,
        parts: parts.iter().map(|p| p.to_string()).collect(),
    }
}

impl Case {
    fn with_kvm(mut self) -> Self {
        self.needs_kvm = true;
        self
    }

    fn named(mut self, argv0: &'static str) -> Self {
        self.argv0 = Some(argv0);
        self
    }
}

/// `--flag` and path arguments as OsStrings.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(OsString::from($a)),*] };
}

fn text(path: PathBuf) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

fn cases(f: &Fixture) -> Vec<Case> {
    let p = |name: &str| text(f.path(name));
    let a = |name: &str| f.arg(name);
    let out = |name: &str| f.dir.join("out").join(name).into_os_string();
    let missing_dir = p("no/such/dir/out");
    let quick_run = || args!["run", "--mem", "16", "--timeout", "10"];
    let run = |more: Vec<OsString>| {
        let mut v = quick_run();
        v.extend(more);
        v
    };
    let k = || a("bzImage");
    vec![
        case(
            "run seccomp neither on nor off",
            run(args!["--kernel", k(), "--seccomp", "maybe"]),
            &["--seccomp", "maybe"],
        ),
        // kvmbuild run: the kernel.
        case(
            "run kernel FIFO",
            run(args!["--kernel", a("fifo")]),
            &[&p("fifo"), "a FIFO"],
        )
        .with_kvm(),
        case(
            "run kernel directory",
            run(args!["--kernel", a("dir")]),
            &[&p("dir"), "a directory"],
        )
        .with_kvm(),
        case(
            "run kernel /dev/zero",
            run(args!["--kernel", "/dev/zero"]),
            &["/dev/zero", "a character device"],
        )
        .with_kvm(),
        case(
            "run kernel missing",
            run(args!["--kernel", a("nonexistent")]),
            &[&p("nonexistent")],
        )
        .with_kvm(),
        case(
            "run kernel empty",
            run(args!["--kernel", a("empty")]),
            &[&p("empty"), "not a bzImage or ELF kernel"],
        )
        .with_kvm(),
        case(
            "run kernel text",
            run(args!["--kernel", a("text")]),
            &[&p("text"), "not a bzImage or ELF kernel"],
        )
        .with_kvm(),
        case(
            "run ELF with 4 GiB of notes",
            run(args!["--kernel", a("huge-note.elf")]),
            &[&p("huge-note.elf"), "note segment"],
        )
        .with_kvm(),
        case(
            "run ELF entry outside RAM",
            run(args!["--kernel", a("entry-outside.elf")]),
            &[&p("entry-outside.elf"), "outside guest RAM"],
        )
        .with_kvm(),
        case(
            "run truncated bzImage",
            run(args!["--kernel", a("truncated.bzImage")]),
            &[&p("truncated.bzImage"), "truncated"],
        )
        .with_kvm(),
        // The initrd.
        case(
            "run initrd FIFO",
            run(args!["--kernel", k(), "--initrd", a("fifo")]),
            &[&p("fifo"), "a FIFO"],
        )
        .with_kvm(),
        case(
            "run initrd /dev/zero",
            run(args!["--kernel", k(), "--initrd", "/dev/zero"]),
            &["/dev/zero", "a character device"],
        )
        .with_kvm(),
        case(
            "run initrd empty",
            run(args!["--kernel", k(), "--initrd", a("empty")]),
            &[&p("empty"), "the initrd is empty"],
        )
        .with_kvm(),
        case(
            "run initrd directory",
            run(args!["--kernel", k(), "--initrd", a("dir")]),
            &[&p("dir"), "a directory"],
        )
        .with_kvm(),
        // Disks.
        case(
            "run disk FIFO",
            run(args!["--kernel", k(), "--disk", a("fifo")]),
            &["--disk", &p("fifo"), "a FIFO"],
        )
        .with_kvm(),
        case(
            "run disk FIFO ro",
            run(args![
                "--kernel",
                k(),
                "--disk",
                format!("{},ro", p("fifo"))
            ]),
            &["--disk", &p("fifo"), "a FIFO"],
        )
        .with_kvm(),
        case(
            "run disk directory",
            run(args!["--kernel", k(), "--disk", a("dir")]),
            &["--disk", &p("dir")],
        )
        .with_kvm(),
        case(
            "run disk directory ro",
            run(args!["--kernel", k(), "--disk", format!("{},ro", p("dir"))]),
            &["--disk", &p("dir"), "a directory"],
        )
        .with_kvm(),
        case(
            "run disk /dev/zero",
            run(args!["--kernel", k(), "--disk", "/dev/zero"]),
            &["--disk", "/dev/zero", "a character device"],
        )
        .with_kvm(),
        case(
            "run disk missing",
            run(args!["--kernel", k(), "--disk", a("nonexistent.img")]),
            &["--disk", &p("nonexistent.img")],
        )
        .with_kvm(),
        case(
            "run disk bad option",
            run(args![
                "--kernel",
                k(),
                "--disk",
                format!("{},rw", p("disk.img"))
            ]),
            &["unknown disk option 'rw'"],
        ),
        // The console: never an input, never a wait.
        case(
            "run console is the kernel",
            run(args!["--kernel", k(), "--console", k()]),
            &["--console", "also the input", "overwritten"],
        ),
        case(
            "run console is the initrd",
            run(args![
                "--kernel",
                k(),
                "--initrd",
                a("initrd"),
                "--console",
                a("initrd")
            ]),
            &["--console", &p("initrd"), "overwritten"],
        ),
        case(
            "run console is a disk",
            run(args![
                "--kernel",
                k(),
                "--disk",
                a("disk.img"),
                "--console",
                a("disk.img")
            ]),
            &["--console", &p("disk.img"), "overwritten"],
        ),
        case(
            "run console is a link to the kernel",
            run(args!["--kernel", k(), "--console", a("kernel-link")]),
            &["--console", &p("kernel-link"), "overwritten"],
        ),
        case(
            "run console FIFO without a reader",
            run(args!["--kernel", k(), "--console", a("fifo")]),
            &["--console", &p("fifo"), "a FIFO with no reader"],
        ),
        case(
            "run console in a missing directory",
            run(args!["--kernel", k(), "--console", &missing_dir]),
            &["--console", &missing_dir],
        ),
        // Other arguments.
        case(
            "run mem 0",
            args!["run", "--kernel", k(), "--mem", "0"],
            &["--mem"],
        ),
        case(
            "run cpus 0",
            args!["run", "--kernel", k(), "--mem", "16", "--cpus", "0"],
            &["--cpus"],
        ),
        case(
            "run zero timeout",
            args!["run", "--kernel", k(), "--timeout", "0"],
            &["--timeout", "'0' is not a positive number"],
        ),
        case(
            "run without a kernel",
            args!["run", "--mem", "16"],
            &["--kernel"],
        ),
        // kvmbuild exec: everything is checked before anything starts.
        case(
            "exec kernel FIFO",
            args!["exec", "--no-root", "--kernel", a("fifo"), "--", "true"],
            &["--kernel", &p("fifo"), "a FIFO"],
        ),
        case(
            "exec kernel directory",
            args!["exec", "--no-root", "--kernel", a("dir"), "--", "true"],
            &["--kernel", &p("dir"), "a directory"],
        ),
        case(
            "exec console-log is the kernel",
            args![
                "exec",
                "--no-root",
                "--kernel",
                k(),
                "--console-log",
                k(),
                "--",
                "true"
            ],
            &["--console-log", "overwritten"],
        ),
        case(
            "exec console-log is a disk",
            args![
                "exec",
                "--no-root",
                "--kernel",
                k(),
                "--disk",
                a("disk.img"),
                "--console-log",
                a("disk.img"),
                "--",
                "true"
            ],
            &["--console-log", &p("disk.img"), "overwritten"],
        ),
        case(
            "exec console-log FIFO without a reader",
            args![
                "exec",
                "--no-root",
                "--kernel",
                k(),
                "--console-log",
                a("fifo"),
                "--",
                "true"
            ],
            &["--console-log", "a FIFO with no reader"],
        ),
        case(
            "exec disk FIFO",
            args![
                "exec",
                "--no-root",
                "--kernel",
                k(),
                "--disk",
                a("fifo"),
                "--",
                "true"
            ],
            &["--disk", &p("fifo"), "not a regular file or block device"],
        ),
        case(
            "exec disk directory",
            args![
                "exec",
                "--no-root",
                "--kernel",
                k(),
                "--disk",
                a("dir"),
                "--",
                "true"
            ],
            &["--disk", &p("dir"), "not a regular file or block device"],
        ),
        // kvmbuild initrd.
        case(
            "initrd modules.dep entry escapes the tree",
            args![
                "initrd",
                "--modules-dir",
                f.path("mods-escape").join("6.1.0-test"),
                "-o",
                out("escape.img")
            ],
            &["../../../secret", "outside the modules directory"],
        ),
        case(
            "initrd modules.dep entry is absolute",
            args![
                "initrd",
                "--modules-dir",
                f.path("mods-absolute").join("6.1.0-test"),
                "-o",
                out("absolute.img")
            ],
            &[&p("secret"), "outside the modules directory"],
        ),
        case(
            "initrd 200000-deep dependency chain",
            args![
                "initrd",
                "--modules-dir",
                f.path("mods-deep").join("6.1.0-test"),
                "--module",
                "m199999",
                "-o",
                out("deep.img")
            ],
            &["m0.ko"],
        ),
        case(
            "initrd output is the init",
            args!["initrd", "--init", a("init.elf"), "-o", a("init.elf")],
            &["-o", &p("init.elf"), "overwritten"],
        ),
        case(
            "initrd output is an include",
            args![
                "initrd",
                "--include",
                format!("{}:/data", p("initrd")),
                "-o",
                a("initrd")
            ],
            &["-o", &p("initrd"), "overwritten"],
        ),
        case(
            "initrd output in a missing directory",
            args!["initrd", "-o", &missing_dir],
            &["-o", &missing_dir],
        ),
        case(
            "initrd module FIFO",
            args![
                "initrd",
                "--modules-dir",
                f.path("mods-fifo-module").join("6.1.0-test"),
                "--module",
                "fifo",
                "-o",
                out("fifo-module.img")
            ],
            &["fifo.ko", "a FIFO, not a regular file"],
        ),
        case(
            "initrd modules.dep FIFO",
            args![
                "initrd",
                "--modules-dir",
                f.path("mods-fifo-dep").join("6.1.0-test"),
                "-o",
                out("fifo-dep.img")
            ],
            &["modules.dep", "a FIFO, not a regular file"],
        ),
        case(
            "initrd include FIFO",
            args![
                "initrd",
                "--include",
                format!("{}:/fifo", p("fifo")),
                "-o",
                out("fifo-include.img")
            ],
            &[&p("fifo")],
        ),
        case(
            "initrd init FIFO",
            args!["initrd", "--init", a("fifo"), "-o", out("fifo-init.img")],
            &[&p("fifo")],
        ),
        // kvmbuild bench: its reports are outputs like any other.
        case(
            "bench json is the kernel",
            args!["bench", "--kernel", k(), "--json", k()],
            &["--json", "overwritten"],
        ),
        case(
            "bench svg is the initrd",
            args![
                "bench",
                "--kernel",
                k(),
                "--initrd",
                a("initrd"),
                "--svg",
                a("initrd")
            ],
            &["--svg", &p("initrd"), "overwritten"],
        ),
        case(
            "bench json in a missing directory",
            args!["bench", "--kernel", k(), "--json", &missing_dir],
            &["--json", &missing_dir],
        ),
        case(
            "bench qemu is not QEMU",
            args![
                "bench",
                "--kernel",
                k(),
                "--runs",
                "1",
                "--warmup",
                "0",
                "--qemu",
                "/bin/false"
            ],
            &["--qemu /bin/false", "not QEMU"],
        ),
        case(
            "bench kernel FIFO",
            args![
                "bench",
                "--kernel",
                a("fifo"),
                "--runs",
                "1",
                "--warmup",
                "0",
                "--timeout",
                "10"
            ],
            &[&p("fifo"), "a FIFO"],
        )
        .with_kvm(),
        case(
            "bench initrd empty",
            args![
                "bench",
                "--kernel",
                k(),
                "--initrd",
                a("empty"),
                "--runs",
                "1",
                "--warmup",
                "0",
                "--timeout",
                "10"
            ],
            &[&p("empty"), "the initrd is empty"],
        )
        .with_kvm(),
        // QEMU's command line, as a subcommand and under QEMU's names.
        case(
            "qemu-compat kernel FIFO",
            args!["qemu-compat", "-kernel", a("fifo"), "-m", "16"],
            &[&p("fifo"), "a FIFO"],
        )
        .with_kvm(),
        case(
            "qemu-compat drive directory",
            args![
                "qemu-compat",
                "-kernel",
                k(),
                "-m",
                "16",
                "-drive",
                format!("file={},if=virtio,readonly=on", p("dir"))
            ],
            // The QEMU entry point names QEMU's option, not `run`'s.
            &["-drive", &p("dir"), "a directory"],
        )
        .with_kvm(),
        case(
            "qemu-compat initrd /dev/zero",
            args![
                "qemu-compat",
                "-kernel",
                k(),
                "-m",
                "16",
                "-initrd",
                "/dev/zero"
            ],
            &["/dev/zero", "a character device"],
        )
        .with_kvm(),
        case(
            "qemu-compat unknown option",
            args!["qemu-compat", "-kernel", k(), "-netdev", "user,id=n"],
            &["'-netdev'"],
        ),
        case(
            "qemu-compat non-UTF-8 argument",
            vec![
                "qemu-compat".into(),
                "-kernel".into(),
                OsString::from_vec(b"k\xff".to_vec()),
            ],
            &["UTF-8"],
        ),
        case(
            "qemu-system-x86_64 non-UTF-8 argument",
            vec![
                "-kernel".into(),
                OsString::from_vec(b"bz\xffImage".to_vec()),
            ],
            &["qemu-compat", "argument 2", "not valid UTF-8"],
        )
        .named("qemu-system-x86_64"),
        case(
            "qemu-system-x86_64 kernel FIFO",
            args!["-kernel", a("fifo"), "-m", "16"],
            &[&p("fifo"), "a FIFO"],
        )
        .named("qemu-system-x86_64")
        .with_kvm(),
        case(
            "qemu-kvm unsupported device",
            args!["-kernel", k(), "-device", "e1000"],
            &["-device e1000"],
        )
        .named("qemu-kvm"),
    ]
}

/// Runs one case with a private TMPDIR and cache (exec must leave nothing in either).
fn run_case(f: &Fixture, c: &Case) -> Run {
    let program: OsString = match c.argv0 {
        Some(name) => f.arg(name),
        None => support::KVMBUILD.into(),
    };
    let tmp = f.dir.join("tmp");
    let mut cmd = Command::new(&program);
    cmd.args(&c.args)
        .env("TMPDIR", &tmp)
        .env("XDG_CACHE_HOME", f.dir.join("cache"))
        .env_remove("KVMBUILD_KERNEL")
        .env_remove("KVMBUILD_INIT");
    run_command(cmd)
}

#[test]
fn every_bad_input_is_one_line_status_64_and_changes_no_input() {
    let f = Fixture::new();
    fs::create_dir_all(f.dir.join("out")).unwrap();
    fs::create_dir_all(f.dir.join("tmp")).unwrap();
    let kvm = support::kvm_usable();
    let cases = cases(&f);
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let before = f.checksums();
    let mut failures = Vec::new();
    let mut ran = 0;
    for c in &cases {
        if c.needs_kvm && !kvm {
            eprintln!("SKIPPED (no KVM): {}", c.name);
            continue;
        }
        ran += 1;
        let r = run_case(&f, c);
        let parts: Vec<&str> = c.parts.iter().map(String::as_str).collect();
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            r.assert_error(exit::BAD_INPUT, &parts);
            assert!(r.elapsed < QUICK, "took {:?}\n{r}", r.elapsed);
        }));
        if let Err(e) = checked {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "panicked".into());
            failures.push(format!("=== {} ===\n{why}", c.name));
        }
        let after = f.checksums();
        let changed: Vec<_> = before
            .iter()
            .filter(|(path, sum)| after.get(*path) != Some(*sum))
            .map(|(path, _)| path.display().to_string())
            .collect();
        if !changed.is_empty() {
            failures.push(format!("=== {} ===\nchanged inputs: {changed:?}", c.name));
        }
        let left: Vec<_> = fs::read_dir(f.dir.join("tmp")).unwrap().flatten().collect();
        if !left.is_empty() {
            failures.push(format!("=== {} ===\nleft {left:?} in TMPDIR", c.name));
        }
    }
    eprintln!("{ran} of {} cases ran", cases.len());
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = fs::remove_dir_all(&f.dir);
}
