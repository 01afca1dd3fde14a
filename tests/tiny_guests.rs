//! KVM tests with tiny purpose-built guests (tests/guests/*.s), booted through `kvmbuild run`
//! both as bzImage and as ELF kernels. The guests print what they find on COM1 and report a
//! status on the exit port; the tests check the output and the exit code.
//!
//! Without a usable /dev/kvm the KVM tests print a skip note, unless CI=true, where they fail.
//! The packer and guest-image tests need only binutils.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod support;

use std::fs;
use std::process::Command;

use support::{bzimage, exit, guest, run_guest, Run};

const MEM_MIB: u32 = 64;
/// The guests finish in milliseconds; this only stops one that never ends (which then fails
/// on its exit code, 124).
const TIMEOUT_S: u32 = 30;

// ---- the images themselves (no KVM) ----

#[test]
fn bzimage_packer_writes_a_setup_header_that_parses_back() {
    let g = guest("hello");
    let image = fs::read(&g.bzimage).unwrap();
    let hdr = bzimage::parse(&image).unwrap();
    assert_eq!(hdr.header, bzimage::HDRS);
    assert_eq!(hdr.boot_flag, 0xaa55);
    assert_eq!(hdr.setup_sects, 1);
    assert!(hdr.version >= 0x0206, "version {:#x}", hdr.version);
    assert_eq!(hdr.loadflags & bzimage::LOADED_HIGH, bzimage::LOADED_HIGH);
    assert_eq!(
        hdr.xloadflags & bzimage::XLF_KERNEL_64,
        bzimage::XLF_KERNEL_64
    );
    assert_eq!(hdr.code32_start, 0x10_0000);
    assert_eq!(hdr.pref_address, 0x10_0000);
    assert_eq!(hdr.relocatable_kernel, 0);
    assert_eq!(hdr.cmdline_size, 2047);
    assert_eq!(hdr.initrd_addr_max, 0x7fff_ffff);
    assert_eq!(hdr.kernel_version, "kvmbuild tiny guest hello");
    // The jump at 0x200 lands inside the setup sectors, past the header.
    assert_eq!(hdr.jump & 0xff, 0xeb);
    let target = 0x202 + usize::from((hdr.jump >> 8) as u8);
    assert!(
        target >= 0x26c && target < hdr.payload_offset(),
        "jump to {target:#x}"
    );
    // The protected-mode code follows the setup sectors, whole.
    assert_eq!(hdr.payload_offset(), 0x400);
    assert_eq!(&image[hdr.payload_offset()..], &g.payload[..]);
    assert_eq!(hdr.syssize as usize, g.payload.len().div_ceil(16));
    assert!(hdr.init_size as usize >= g.payload.len());
}

#[test]
fn bzimage_packer_honours_its_options_and_rejects_garbage() {
    let payload = vec![0x90u8; 0x300];
    let opts = bzimage::SetupOptions {
        setup_sects: 4,
        version: 0x0206,
        xloadflags: 0,
        cmdline_size: 64,
        initrd_addr_max: 0x37ff_ffff,
        kernel_version: "custom".to_owned(),
        ..Default::default()
    };
    let image = bzimage::pack(&payload, &opts);
    let hdr = bzimage::parse(&image).unwrap();
    assert_eq!(hdr.payload_offset(), 5 * 512);
    assert_eq!(image.len(), 5 * 512 + 0x300);
    assert_eq!(
        (
            hdr.version,
            hdr.xloadflags,
            hdr.cmdline_size,
            hdr.initrd_addr_max
        ),
        (0x0206, 0, 64, 0x37ff_ffff)
    );
    assert_eq!(hdr.kernel_version, "custom");

    let mut bad = image.clone();
    bad[0x202] = b'X';
    assert!(bzimage::parse(&bad).unwrap_err().contains("HdrS"));
    let mut bad = image.clone();
    bad[0x1fe] = 0;
    assert!(bzimage::parse(&bad).unwrap_err().contains("boot_flag"));
    assert!(bzimage::parse(&image[..600]).is_err());
}

#[test]
fn file_recognises_the_bzimage() {
    let g = guest("hello");
    let Ok(out) = Command::new("file").arg("-b").arg(&g.bzimage).output() else {
        eprintln!("SKIPPED: file(1) is not installed");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Linux kernel x86 boot executable") && text.contains("bzImage"),
        "file(1) says: {text}"
    );
    assert!(
        text.contains("kvmbuild tiny guest hello"),
        "file(1) says: {text}"
    );
}

#[test]
fn guest_elf_is_an_x86_64_executable_with_one_physical_load_segment() {
    let g = guest("hello");
    let out = Command::new("readelf")
        .args(["-W", "-h", "-l"])
        .arg(&g.elf)
        .output()
        .expect("readelf (binutils) is needed");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "Class:                             ELF64",
        "Data:                              2's complement, little endian",
        "Type:                              EXEC",
        "Machine:                           Advanced Micro Devices X86-64",
        "Entry point address:               0x1000200",
    ] {
        assert!(
            text.contains(expected),
            "readelf lacks {expected:?}:\n{text}"
        );
    }
    let loads: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.first() == Some(&"LOAD"))
        .collect();
    assert_eq!(loads.len(), 1, "{text}");
    // Type Offset VirtAddr PhysAddr FileSiz MemSiz Flg Align
    assert_eq!(loads[0][2], "0x0000000001000000", "{text}");
    assert_eq!(loads[0][3], "0x0000000001000000", "{text}");
    assert_eq!(loads[0][4], loads[0][5], "no .bss to zero: {text}");
    // No notes: a PVH note would send the kernel down the 32-bit PVH path.
    assert!(!text.contains("NOTE"), "{text}");
}

// ---- booting them ----

/// One e820 entry as the hello guest prints it.
#[derive(Debug, PartialEq, Eq)]
struct E820 {
    addr: u64,
    size: u64,
    ram: bool,
}

fn hex_after(line: &str, key: &str) -> u64 {
    let rest = line
        .split(key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    let digits: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&digits, 16).unwrap_or_else(|e| panic!("{key:?} in {line:?}: {e}"))
}

fn e820_entries(run: &Run) -> Vec<E820> {
    run.stdout
        .lines()
        .filter(|l| l.starts_with("e820: "))
        .map(|l| E820 {
            addr: hex_after(l, "addr=0x"),
            size: hex_after(l, "size=0x"),
            ram: l.ends_with(" ram"),
        })
        .collect()
}

/// The checks common to every boot of the hello guest.
fn check_hello(run: &Run, cmdline: &str) {
    run.assert_code(42);
    run.assert_stdout_has("hello: started\n");
    run.assert_stdout_has("hello: exiting with 42\n");
    // Linux's 64-bit boot protocol, as kvmbuild promises it.
    run.assert_stdout_has("boot_params: 0x0000000000007000\n");
    run.assert_stdout_has("cs: 0x0010 ds: 0x0018");
    run.assert_stdout_has("interrupts: off\n");
    run.assert_stdout_has("long mode: yes\n");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or_else(|| panic!("no cmdline line\n{run}"));
    assert!(line.contains(cmdline), "the guest saw {line:?}\n{run}");

    let e820 = e820_entries(run);
    let count = run
        .stdout
        .lines()
        .find(|l| l.starts_with("e820 entries: "))
        .map(|l| hex_after(l, "0x"))
        .unwrap_or_else(|| panic!("no e820 count\n{run}"));
    assert!(count > 0 && count as usize == e820.len(), "{run}");
    let mem = u64::from(MEM_MIB) << 20;
    assert!(
        e820.iter()
            .any(|e| e.ram && e.addr == 0 && e.size > 0 && e.size <= 0xa0000),
        "no low-memory RAM entry at 0: {e820:x?}\n{run}"
    );
    assert!(
        e820.iter()
            .any(|e| e.ram && e.addr == 0x10_0000 && e.addr + e.size == mem),
        "no RAM entry from 0x100000 to {mem:#x}: {e820:x?}\n{run}"
    );
    for (i, a) in e820.iter().enumerate() {
        for b in &e820[i + 1..] {
            assert!(
                a.addr + a.size <= b.addr || b.addr + b.size <= a.addr,
                "e820 entries overlap: {a:x?} {b:x?}\n{run}"
            );
        }
    }
    run.assert_stdout_has(&format!("ram top: 0x{mem:016x} writable\n"));
    // The RSDP kvmbuild points at carries its signature.
    let rsdp = run
        .stdout
        .lines()
        .find(|l| l.starts_with("rsdp: "))
        .unwrap_or_else(|| panic!("no rsdp line\n{run}"));
    assert!(rsdp.ends_with("signature ok"), "{rsdp}\n{run}");
}

/// Boots the hello guest from `kernel` without an initrd and checks what it reports.
fn hello_sees_its_boot_params(kernel: &std::path::Path) {
    let cmdline = "hello from the test";
    let run = run_guest(kernel, MEM_MIB, TIMEOUT_S, &["--cmdline", cmdline]);
    check_hello(&run, cmdline);
    run.assert_stdout_has("initrd: none\n");
}

#[test]
fn hello_as_bzimage_sees_its_boot_params() {
    require_kvm!();
    hello_sees_its_boot_params(&guest("hello").bzimage);
}

#[test]
fn hello_as_elf_sees_its_boot_params() {
    require_kvm!();
    hello_sees_its_boot_params(&guest("hello").elf);
}

#[test]
fn hello_finds_its_initrd() {
    require_kvm!();
    let data = b"tiny-initrd-bytes and more that are not printed";
    let initrd = support::scratch_path("hello.initrd");
    fs::write(&initrd, data).unwrap();
    let hello = guest("hello");
    let run = run_guest(
        &hello.bzimage,
        MEM_MIB,
        TIMEOUT_S,
        &[
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "with an initrd",
        ],
    );
    let _ = fs::remove_file(&initrd);
    check_hello(&run, "with an initrd");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("initrd: addr="))
        .unwrap_or_else(|| panic!("the guest found no initrd\n{run}"));
    let addr = hex_after(line, "addr=0x");
    let size = hex_after(line, "size=0x");
    assert_eq!(size, data.len() as u64, "{run}");
    assert!(line.ends_with(" data=tiny-initrd-byte"), "{line}\n{run}");
    assert_eq!(addr % 4096, 0, "initrd not page-aligned\n{run}");
    let kernel_end = support::BZIMAGE_LOAD_ADDR + hello.payload.len() as u64;
    assert!(
        addr >= kernel_end,
        "initrd over the kernel (ends at {kernel_end:#x})\n{run}"
    );
    assert!(
        addr + size <= u64::from(MEM_MIB) << 20,
        "initrd beyond RAM\n{run}"
    );
}

#[test]
fn console_none_prints_nothing() {
    require_kvm!();
    let run = run_guest(
        &guest("hello").bzimage,
        MEM_MIB,
        TIMEOUT_S,
        &["--console", "none"],
    );
    run.assert_code(42);
    assert_eq!(run.stdout, "", "{run}");
}

#[test]
fn console_to_a_file() {
    require_kvm!();
    let path = support::scratch_path("console.log");
    let run = run_guest(
        &guest("hello").elf,
        MEM_MIB,
        TIMEOUT_S,
        &[
            "--console",
            path.to_str().unwrap(),
            "--cmdline",
            "into a file",
        ],
    );
    let log = fs::read_to_string(&path).unwrap_or_default();
    let _ = fs::remove_file(&path);
    run.assert_code(42);
    assert_eq!(run.stdout, "", "{run}");
    assert!(
        log.contains("cmdline: ") && log.contains("into a file"),
        "log: {log:?}\n{run}"
    );
    assert!(
        log.contains("hello: exiting with 42\n"),
        "log: {log:?}\n{run}"
    );
}

#[test]
fn poweroff_through_the_acpi_sleep_register_exits_0() {
    require_kvm!();
    for kernel in [guest("poweroff").bzimage, guest("poweroff").elf] {
        let run = run_guest(&kernel, MEM_MIB, TIMEOUT_S, &[]);
        run.assert_code(exit::OK);
        run.assert_stdout_has("poweroff: writing");
        assert!(!run.stdout.contains("still running"), "{run}");
    }
}

/// Boots `name`'s bzImage, which does something that must end the VM at once: asserts the
/// exit code, that the guest got as far as `says`, and that it never ran past that point.
fn assert_guest_ends(name: &str, code: i32, says: &str) {
    let run = run_guest(&guest(name).bzimage, MEM_MIB, TIMEOUT_S, &[]);
    run.assert_code(code);
    run.assert_stdout_has(says);
    assert!(!run.stdout.contains("still running"), "{run}");
}

/// Whether the host's KVM emulates the LAPIC timer's TSC-deadline mode.
fn kvm_has_tsc_deadline() -> bool {
    use std::os::fd::AsRawFd;
    const KVM_CHECK_EXTENSION: libc::c_ulong = 0xae03;
    const KVM_CAP_TSC_DEADLINE_TIMER: libc::c_ulong = 72;
    let kvm = fs::File::open("/dev/kvm").unwrap();
    // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and touches no memory.
    unsafe {
        libc::ioctl(
            kvm.as_raw_fd(),
            KVM_CHECK_EXTENSION,
            KVM_CAP_TSC_DEADLINE_TIMER,
        ) > 0
    }
}

#[test]
fn cpuid_offers_kvmclock_tsc_deadline_and_a_brand_string() {
    require_kvm!();
    let run = run_guest(&guest("cpuid").bzimage, MEM_MIB, TIMEOUT_S, &[]);
    run.assert_code(exit::OK);
    let value = |key: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} line\n{run}"))
            .to_string()
    };
    let leaf1_ecx = u64::from_str_radix(&value("leaf1 ecx: 0x"), 16).unwrap();
    assert_ne!(leaf1_ecx & (1 << 31), 0, "hypervisor bit\n{run}");
    assert_eq!(
        leaf1_ecx & (1 << 24) != 0,
        kvm_has_tsc_deadline(),
        "the TSC-deadline bit should follow KVM_CAP_TSC_DEADLINE_TIMER\n{run}"
    );
    assert_eq!(value("signature: "), "KVMKVMKVM", "{run}");
    let features = u64::from_str_radix(&value("kvm features: 0x"), 16).unwrap();
    assert_ne!(
        features & (1 << 3),
        0,
        "kvmclock (KVM_FEATURE_CLOCKSOURCE2)\n{run}"
    );
    let brand = value("brand: ");
    assert!(brand.len() > 1 && brand.ends_with('|'), "{run}");
}

#[test]
fn a_vm_with_the_pit_boots_and_ends_as_one_without() {
    require_kvm!();
    // Only that KVM accepts the PIT after the memory and irqchip, and that the VM ends the same
    // way; the guest does not probe for the PIT.
    for extra in [&[][..], &["--pit"][..]] {
        let run = run_guest(&guest("poweroff").bzimage, MEM_MIB, TIMEOUT_S, extra);
        run.assert_code(exit::OK);
    }
}

#[test]
fn reboot_through_the_i8042_exits_125() {
    require_kvm!();
    assert_guest_ends("reboot", exit::RESET, "reboot: writing 0xfe");
}

#[test]
fn reset_through_the_acpi_reset_register_exits_125() {
    require_kvm!();
    assert_guest_ends("acpireset", exit::RESET, "acpireset: writing 1");
}

#[test]
fn triple_fault_exits_125() {
    require_kvm!();
    assert_guest_ends("triple", exit::RESET, "triple: loading an empty IDT");
}

#[test]
fn spinning_past_the_timeout_exits_124() {
    require_kvm!();
    // The hang guard in run_guest bounds this; no timing is asserted.
    let run = run_guest(&guest("spin").bzimage, MEM_MIB, 1, &[]);
    run.assert_stdout_has("spin: spinning\n");
    // The report says where the guest was: a spinning vCPU is running, not halted.
    run.assert_error(exit::TIMEOUT, &["timeout", "(vCPU 0 running at RIP 0x"]);
}

#[test]
fn boot_markers_are_harmless() {
    require_kvm!();
    let run = run_guest(&guest("markers").elf, MEM_MIB, TIMEOUT_S, &[]);
    run.assert_code(exit::OK);
    run.assert_stdout_has("markers: phase 1\nmarkers: phase 2\nmarkers: phase 3, exiting with 0\n");
}

#[test]
fn two_vcpus_report_their_apic_ids() {
    require_kvm!();
    let run = run_guest(&guest("smp").bzimage, MEM_MIB, TIMEOUT_S, &["--cpus", "2"]);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let at = |text: &str| {
        lines
            .iter()
            .position(|l| *l == text)
            .unwrap_or_else(|| panic!("no line {text:?}\n{run}"))
    };
    assert!(!run.stdout.contains("started at the kernel entry"), "{run}");
    let bsp = at("apic 0 (bsp, long mode)");
    let ap = at("apic 1 (ap, real mode)");
    let done = at("smp: ap reported");
    assert!(bsp < ap && ap < done, "{run}");
    run.assert_code(exit::OK);
}

#[test]
fn emulation_failure_names_the_guest_rip() {
    require_kvm!();
    let run = run_guest(&guest("emufail").elf, MEM_MIB, TIMEOUT_S, &[]);
    run.assert_stdout_has("emufail: jumping to unbacked memory\n");
    run.assert_error(
        exit::INTERNAL,
        &["vCPU 0", "could not emulate", "RIP 0x30000000"],
    );
}

#[test]
fn emulation_failure_shows_the_instruction_bytes_on_pvm() {
    require_kvm!();
    let run = run_guest(&guest("popcnt").elf, MEM_MIB, TIMEOUT_S, &[]);
    run.assert_stdout_has("popcnt: executing popcnt\n");
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // Hardware runs popcnt itself; the guest reaches its exit.
        run.assert_code(7);
        return;
    }
    // The image starts at ELF_LOAD_ADDR; _start is at +0x200 and popcnt follows the PRINT.
    run.assert_error(exit::INTERNAL, &["could not emulate", "f3 48 0f b8 d8"]);
    let rip = run
        .stderr
        .split("RIP 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.split(',').next()?, 16).ok())
        .unwrap_or_else(|| panic!("no RIP in the report\n{run}"));
    assert!(
        (support::ELF_LOAD_ADDR + 0x200..support::ELF_LOAD_ADDR + 0x1000).contains(&rip),
        "RIP {rip:#x} is not in the guest's code\n{run}"
    );
}

#[test]
fn pvh_note_selects_the_32_bit_pvh_entry() {
    require_kvm!();
    let elf = support::pvh_guest();
    let run = run_guest(&elf, MEM_MIB, TIMEOUT_S, &["--cmdline", "hello pvh"]);
    run.assert_code(42);
    run.assert_stdout_has("pvh: start info magic ok\n");
    run.assert_stdout_has("pvh: paging off\n");
    run.assert_stdout_has("pvh: cmdline: hello pvh\n");
    // 64 MiB: low RAM, the ACPI area, RAM from 1 MiB; no initrd.
    run.assert_stdout_has("pvh: memmap entries 3, modules 0\n");

    let initrd = support::scratch_path("pvh-initrd");
    fs::write(&initrd, [0x5au8; 4096]).unwrap();
    let run = run_guest(
        &elf,
        MEM_MIB,
        TIMEOUT_S,
        &["--initrd", initrd.to_str().unwrap()],
    );
    run.assert_code(42);
    run.assert_stdout_has(", modules 1\n");
    fs::remove_file(initrd).unwrap();
}

#[test]
fn bench_reports_every_marked_phase_as_json_and_svg() {
    require_kvm!();
    let json = support::scratch_path("bench.json");
    let svg = support::scratch_path("bench.svg");
    let elf = guest("markers").elf;
    let run = support::kvmbuild([
        "bench",
        "--kernel",
        elf.to_str().unwrap(),
        "--mem",
        "64",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    run.assert_code(exit::OK);
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
    let phases: Vec<&str> = report["kvmbuild_phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    // The markers guest marks all three phases, so every phase is measured, in boot order.
    assert_eq!(
        phases,
        ["setup", "kernel", "init", "command", "exit", "teardown"],
        "{report}"
    );
    for p in report["kvmbuild_phases"].as_array().unwrap() {
        let (min, median, max) = (
            p["min_ms"].as_f64().unwrap(),
            p["median_ms"].as_f64().unwrap(),
            p["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 <= min && min <= median && median <= max, "{p}");
        assert_eq!(p["samples"], 3);
    }
    assert!(report["qemu_process_total"].is_null());
    let plot = fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("kvmbuild teardown"),
        "{plot}"
    );
    fs::remove_file(json).unwrap();
    fs::remove_file(svg).unwrap();
}

#[test]
fn bench_counts_a_reset_only_when_expect_allows_it() {
    require_kvm!();
    let elf = guest("reboot").elf;
    let bench = |expect: &str| {
        support::kvmbuild([
            "bench",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--expect",
            expect,
        ])
    };
    let run = bench("reset");
    run.assert_code(exit::OK);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["expect"], "reset");
    assert_eq!(report["kvmbuild_in_process_total"]["samples"], 2);
    bench("any").assert_code(exit::OK);
    let run = bench("exit");
    run.assert_code(exit::INTERNAL);
    assert!(run.stderr.contains("Reset(I8042)"), "{}", run.stderr);
}

// ---- the serial port's input ----

/// A pseudo-terminal: (master, slave).
fn open_pty() -> (fs::File, fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; the other arguments may be
    // null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (fs::File::from_raw_fd(master), fs::File::from_raw_fd(slave)) }
}

/// Whether the terminal on `fd` is in canonical (line-editing) mode.
fn canonical(fd: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data, filled by tcgetattr.
    let mut mode: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid terminal fd and a termios to fill.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut mode) }, 0);
    mode.c_lflag & libc::ICANON != 0
}

#[test]
fn typing_on_the_terminal_reaches_the_serial_port() {
    use std::io::{BufRead, BufReader, Write};
    require_kvm!();
    let g = guest("echo");
    let (mut master, slave) = open_pty();
    let mut child = Command::new(support::KVMBUILD)
        .args(["run", "--mem", "64", "--timeout", "30", "--kernel"])
        .arg(&g.bzimage)
        .stdin(slave.try_clone().unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("echo: ready") {
        line.clear();
        assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "no 'echo: ready'");
    }
    // Enter sends a carriage return; more than the UART's 64-byte FIFO, typed at once.
    let typed = "kvmbuild-".repeat(12);
    master.write_all(typed.as_bytes()).unwrap();
    master.write_all(b"\r").unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains(&typed), "the guest echoed {rest:?}");
    assert_eq!(status.code(), Some(typed.len() as i32));
    assert!(canonical(&slave), "the terminal's mode is restored");
}

// ---- snapshots ----

/// A guest saved at its snapshot point and restored twice goes on from that point both times,
/// with its registers and its memory as they were; a restore on another machine size is
/// refused.
#[test]
fn a_snapshot_restores_registers_and_memory_and_goes_on_from_its_point() {
    if !support::kvm_usable() {
        return;
    }
    let g = guest("counter");
    let dir = support::scratch_path("snapshot-counter");
    let _ = fs::remove_dir_all(&dir);
    let snapshot = dir.to_str().unwrap();

    let cold = run_guest(&g.bzimage, MEM_MIB, TIMEOUT_S, &["--snapshot", snapshot]);
    cold.assert_code(20);
    cold.assert_stdout_has("counter: start");
    cold.assert_stdout_has("counter: after the snapshot point");
    assert!(
        dir.join("state").is_file() && dir.join("memory").is_file(),
        "{cold}"
    );

    for _ in 0..2 {
        let warm = run_guest(&g.bzimage, MEM_MIB, TIMEOUT_S, &["--restore", snapshot]);
        warm.assert_code(20);
        warm.assert_stdout_has("counter: after the snapshot point");
        assert!(!warm.stdout.contains("counter: start"), "{warm}");
    }

    let other_size = run_guest(&g.bzimage, MEM_MIB * 2, TIMEOUT_S, &["--restore", snapshot]);
    other_size.assert_error(64, &["--restore", "memory size"]);
    let other_cpus = run_guest(
        &g.bzimage,
        MEM_MIB,
        TIMEOUT_S,
        &["--restore", snapshot, "--cpus", "2"],
    );
    other_cpus.assert_error(64, &["--restore", "vCPU count"]);
    let other_cmdline = run_guest(
        &g.bzimage,
        MEM_MIB,
        TIMEOUT_S,
        &["--restore", snapshot, "--cmdline", "x"],
    );
    other_cmdline.assert_error(64, &["--restore", "other settings"]);

    // A damaged memory file is caught before the guest runs.
    let memory = dir.join("memory");
    let mut bytes = fs::read(&memory).unwrap();
    let at = bytes.iter().position(|&b| b != 0).unwrap();
    bytes[at] ^= 0xff;
    fs::write(&memory, bytes).unwrap();
    let damaged = run_guest(&g.bzimage, MEM_MIB, TIMEOUT_S, &["--restore", snapshot]);
    damaged.assert_error(64, &["snapshot", "checksum"]);
    let _ = fs::remove_dir_all(&dir);
}

/// A guest whose virtio-rng is running at its snapshot point finds it running after each
/// restore: the transport's registers, the queue's position and the device's work come back, so
/// its next request is served as the ring's next entry. A VM without the device is refused.
#[test]
fn a_snapshot_keeps_a_running_virtio_device_where_it_stood() {
    if !support::kvm_usable() {
        return;
    }
    let g = guest("rngsnap");
    let dir = support::scratch_path("snapshot-rng");
    let _ = fs::remove_dir_all(&dir);
    let snapshot = dir.to_str().unwrap();

    let cold = run_guest(
        &g.bzimage,
        MEM_MIB,
        TIMEOUT_S,
        &["--rng", "--snapshot", snapshot],
    );
    cold.assert_code(0);
    cold.assert_stdout_has("rngsnap: done");
    assert!(dir.join("state").is_file(), "{cold}");

    for _ in 0..2 {
        let warm = run_guest(
            &g.bzimage,
            MEM_MIB,
            TIMEOUT_S,
            &["--rng", "--restore", snapshot],
        );
        warm.assert_code(0);
        warm.assert_stdout_has("rngsnap: after the snapshot point");
        warm.assert_stdout_has("rngsnap: done");
        assert!(!warm.stdout.contains("rngsnap: start"), "{warm}");
    }

    let without = run_guest(&g.bzimage, MEM_MIB, TIMEOUT_S, &["--restore", snapshot]);
    without.assert_error(64, &["--restore", "virtio devices"]);
    let _ = fs::remove_dir_all(&dir);
}

/// The threads of a running VM are confined: its vCPU and device threads show seccomp mode 2
/// (a filter) in /proc, and mode 0 with `--seccomp off`. A thread installs its filter as the
/// first thing it does, so the check waits (up to 10 s) for each thread to show the mode.
#[test]
fn vm_threads_run_under_their_seccomp_filters() {
    require_kvm!();
    // "kvmbuild" is the main thread, which runs the VM (the runner's deny list).
    let names = ["vcpu0", "kvmbuild-virtio", "kvmbuild"];
    for (switch, mode) in [("on", "2"), ("off", "0")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvmbuild"))
            .env_remove("KVMBUILD_SECCOMP")
            .args(["run", "--seccomp", switch, "--rng", "--mem", "64"])
            .args(["--timeout", "20", "--console", "none", "--kernel"])
            .arg(&guest("spin").bzimage)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let seen = wait_for_seccomp_modes(child.id(), &names, mode);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen.len(), names.len(), "threads found: {seen:?}");
        for (name, seccomp) in seen {
            assert_eq!(seccomp, mode, "{name} with --seccomp {switch}");
        }
    }
}

/// (name, `Seccomp:` field) of each thread of process `pid` named in `names`, once all of them
/// exist and show `mode` (or as last seen after 10 s).
fn wait_for_seccomp_modes(pid: u32, names: &[&str], mode: &str) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = thread_seccomp(pid, names);
        let all_there = seen.len() == names.len() && seen.iter().all(|(_, m)| m == mode);
        if all_there || std::time::Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// (name, `Seccomp:` field) of each thread of process `pid` named in `names`, now.
fn thread_seccomp(pid: u32, names: &[&str]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let seccomp = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|v| v.trim().to_string());
        if let (true, Some(seccomp)) = (names.contains(&comm.trim()), seccomp) {
            found.push((comm.trim().to_string(), seccomp));
        }
    }
    found
}
