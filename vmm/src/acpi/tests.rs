//! The ACPI tables, checked byte by byte and (where installed) by iasl.

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use vm_memory::GuestMemoryMmap;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

fn two_devices() -> Vec<MmioDeviceAcpi> {
    (0..2)
        .map(|i| MmioDeviceAcpi {
            addr: mmio::VIRTIO_MMIO_BASE + i * mmio::VIRTIO_MMIO_SIZE,
            len: mmio::VIRTIO_MMIO_SIZE,
            gsi: mmio::FIRST_DEVICE_GSI + i as u32,
        })
        .collect()
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Reads the table at `addr`, checks its signature and checksum, and returns it.
fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let mut header = [0u8; SDT_HEADER_LEN];
    mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
    assert_eq!(&header[..4], signature, "table at {addr:#x}");
    let len = u32_at(&header, 4) as usize;
    assert!(len >= SDT_HEADER_LEN);
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    assert_eq!(
        sum(&bytes),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert!(addr >= layout::ACPI_START && addr + len as u64 <= layout::ACPI_TABLES_END);
    bytes
}

/// Every table, as found by following the pointers from the RSDP.
struct Tables {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn parse(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
    assert_eq!(rsdp_addr.0, layout::ACPI_START);
    assert_eq!(
        rsdp_addr.0 % 16,
        0,
        "the legacy scan looks at 16-byte boundaries"
    );
    let mut rsdp = vec![0u8; 36];
    mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(u32_at(&rsdp, 20), 36, "length");
    assert_eq!(sum(&rsdp), 0, "extended checksum");

    let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = xsdt[SDT_HEADER_LEN..]
        .chunks(8)
        .map(|e| u64_at(e, 0))
        .collect();
    assert_eq!(entries.len(), 2);
    let fadt = table(mem, entries[0], b"FACP");
    let madt = table(mem, entries[1], b"APIC");
    // FADT: DSDT (32-bit) at 40, X_DSDT at 140.
    assert_eq!(u32_at(&fadt, 40), 0, "only X_DSDT is used");
    let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");
    Tables {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
    }
}

fn check_fadt(fadt: &[u8]) {
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "FADT major revision");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
    assert_ne!(flags & Flags::ResetRegSup as u32, 0);
    assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
    // RESET_REG (GAS at 116), RESET_VALUE at 128.
    let port_gas = |at: usize, port: u16| {
        assert_eq!(
            &fadt[at..at + 4],
            &[1, 8, 0, 1],
            "SystemIO, 8 bits, byte access"
        );
        assert_eq!(u64_at(fadt, at + 4), u64::from(port));
    };
    port_gas(116, legacy::acpi_pm_port(acpi_pm::RESET));
    assert_eq!(fadt[128], acpi_pm::RESET_VALUE);
    // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256, hypervisor vendor at 268.
    port_gas(244, legacy::acpi_pm_port(acpi_pm::SLEEP_CONTROL));
    port_gas(256, legacy::acpi_pm_port(acpi_pm::SLEEP_STATUS));
    assert_eq!(&fadt[268..276], b"KVMBUILD");
}

fn check_madt(madt: &[u8], vcpus: u8) {
    assert_eq!(u32_at(madt, 36) as u64, layout::LAPIC_ADDR);
    assert_eq!(u32_at(madt, 40) & MADT_PCAT_COMPAT, MADT_PCAT_COMPAT);
    let mut lapic_ids = Vec::new();
    let mut ioapics = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let (kind, len) = (madt[at], madt[at + 1] as usize);
        assert!(len >= 2 && at + len <= madt.len());
        let entry = &madt[at..at + len];
        match kind {
            0 => {
                assert_eq!(len, 8);
                assert_eq!(entry[2], entry[3], "processor UID = APIC ID");
                assert_eq!(u32_at(entry, 4), 1, "enabled");
                lapic_ids.push(entry[3]);
            }
            1 => {
                assert_eq!(len, 12);
                ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8)));
            }
            other => panic!("unexpected MADT entry type {other}"),
        }
        at += len;
    }
    assert_eq!(lapic_ids, (0..vcpus).collect::<Vec<_>>());
    assert_eq!(ioapics, vec![(IOAPIC_ID, layout::IOAPIC_ADDR as u32, 0)]);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn tables_parse_back() {
    for vcpus in [1u8, 4] {
        let mem = memory();
        let devices = two_devices();
        let rsdp = write_acpi_tables(&mem, vcpus, &devices).unwrap();
        let t = parse(&mem, rsdp);
        check_fadt(&t.fadt);
        check_madt(&t.madt, vcpus);
        assert_eq!(t.madt.len(), 44 + 8 * vcpus as usize + 12);
        assert_eq!(&t.rsdp[9..15], &OEM_ID);
        assert_eq!(t.dsdt[8], DSDT_REVISION);
        for needle in [
            &b"_S5_"[..],
            b"LNRO0005",
            b"COM1",
            b"V000",
            b"V001",
            b"_SB_",
        ] {
            assert!(contains(&t.dsdt, needle), "DSDT lacks {needle:?}");
        }
        assert!(!contains(&t.dsdt, b"V002"));
    }
}

#[test]
fn no_devices_is_fine() {
    let mem = memory();
    let rsdp = write_acpi_tables(&mem, 1, &[]).unwrap();
    let t = parse(&mem, rsdp);
    assert!(!contains(&t.dsdt, b"LNRO0005"));
    assert!(contains(&t.dsdt, b"COM1"));
}

#[test]
fn bad_inputs_are_errors() {
    let mem = memory();
    assert!(matches!(
        write_acpi_tables(&mem, 0, &[]),
        Err(AcpiError::NoVcpus)
    ));
    // The most a u8 allows: APIC IDs 0..=254, never the broadcast ID 0xff.
    let t = parse(&mem, write_acpi_tables(&mem, 255, &[]).unwrap());
    check_madt(&t.madt, 255);

    let high = MmioDeviceAcpi {
        addr: 0xffff_f000,
        len: 0x2000,
        gsi: 5,
    };
    assert!(matches!(
        write_acpi_tables(&mem, 1, &[high]),
        Err(AcpiError::DeviceNot32Bit { index: 0, .. })
    ));
    let mut devices = two_devices();
    devices[1].gsi = mmio::LAST_DEVICE_GSI + 1;
    assert!(matches!(
        write_acpi_tables(&mem, 1, &devices),
        Err(AcpiError::GsiOutOfRange { index: 1, gsi: 24 })
    ));
}

#[test]
fn too_many_devices_is_an_error() {
    let mem = memory();
    let many = |n: u64| -> Vec<MmioDeviceAcpi> {
        (0..n)
            .map(|i| MmioDeviceAcpi {
                addr: mmio::VIRTIO_MMIO_BASE + i * mmio::VIRTIO_MMIO_SIZE,
                len: mmio::VIRTIO_MMIO_SIZE,
                gsi: mmio::FIRST_DEVICE_GSI,
            })
            .collect()
    };
    // Nameable but too big for the 128 KiB area.
    let err = write_acpi_tables(&mem, 1, &many(4000)).unwrap_err();
    assert!(matches!(err, AcpiError::TooLarge { .. }), "{err}");
    // Beyond the names V000..VFFF.
    let err = write_acpi_tables(&mem, 1, &many(0x1001)).unwrap_err();
    assert!(matches!(err, AcpiError::TooManyDevices(0x1001)), "{err}");
    // Nothing was written on failure.
    let mut head = [0u8; 8];
    mem.read_slice(&mut head, GuestAddress(layout::ACPI_START))
        .unwrap();
    assert_eq!(head, [0; 8]);
}

#[test]
fn memory_without_the_acpi_area_is_an_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(
        write_acpi_tables(&mem, 1, &two_devices()),
        Err(AcpiError::Write(_))
    ));
}

/// A fresh, empty directory for one test's files.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmbuild-acpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `iasl` can be run. Under CI its absence is a failure, elsewhere a skip.
fn have_iasl() -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(_) => true,
        Err(e) => {
            let msg = format!(
                "iasl (Debian package acpica-tools) is needed to check the ACPI tables: {e}"
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}");
            }
            eprintln!("note: skipping: {msg}");
            false
        }
    }
}

/// Runs `iasl ARGS` in `dir`, asserts it succeeded, and returns everything it printed.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("iasl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{log}");
    log
}

/// Disassembles `dir/file` with `iasl -d` and returns the `.dsl` text.
fn disassemble(dir: &Path, file: &str, bytes: &[u8]) -> String {
    std::fs::write(dir.join(file), bytes).unwrap();
    let log = iasl(dir, &["-d", file]);
    // iasl reports bad checksums and malformed tables as warnings, not failures.
    for bad in ["Incorrect checksum", "Invalid", "Error", "Warning"] {
        assert!(!log.contains(bad), "iasl -d {file} complained:\n{log}");
    }
    let dsl = dir.join(file).with_extension("dsl");
    std::fs::read_to_string(&dsl).unwrap_or_else(|e| panic!("{}: {e}\n{log}", dsl.display()))
}

/// Asserts `dsl` has a line containing all of `parts`.
fn assert_line(dsl: &str, parts: &[&str]) {
    assert!(
        dsl.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "no line with {parts:?} in:\n{dsl}"
    );
}

#[test]
fn iasl_accepts_the_tables() {
    if !have_iasl() {
        return;
    }
    for vcpus in [1u8, 4] {
        let dir = scratch_dir(&format!("iasl-{vcpus}"));
        let mem = memory();
        let devices = two_devices();
        let t = parse(&mem, write_acpi_tables(&mem, vcpus, &devices).unwrap());

        // iasl 20200925 cannot disassemble a bare RSDP ("does not contain a valid ACPI
        // table"); `parse` has checked its signature, revision and both checksums.
        let xsdt = disassemble(&dir, "xsdt.dat", &t.xsdt);
        assert_line(&xsdt, &["ACPI Table Address   0", "00000000000E0060"]);

        let fadt = disassemble(&dir, "facp.dat", &t.fadt);
        assert_line(&fadt, &["Hardware Reduced (V5)", ": 1"]);
        assert_line(&fadt, &["Reset Register Supported (V2)", ": 1"]);
        assert_line(&fadt, &["VGA Not Present (V4)", ": 1"]);
        assert_line(&fadt, &["8042 Present on ports 60/64 (V2)", ": 0"]);
        assert_line(&fadt, &["Hypervisor ID", "444C4955424D564B"]);

        let madt = disassemble(&dir, "apic.dat", &t.madt);
        assert_line(&madt, &["Local Apic Address", "FEE00000"]);
        assert_line(&madt, &["PC-AT Compatibility", ": 1"]);
        assert_line(&madt, &["Address", "FEC00000"]);
        let lapics = madt.matches("Processor Local APIC").count();
        assert_eq!(lapics, vcpus as usize, "{madt}");

        let dsdt = disassemble(&dir, "dsdt.dat", &t.dsdt);
        assert_line(&dsdt, &["Name (_S5,", "Package"]);
        assert_line(&dsdt, &["Device (COM1)"]);
        assert_line(&dsdt, &["_HID", "EisaId (\"PNP0501\")"]);
        assert_line(&dsdt, &["IO (Decode16,"]);
        assert_line(&dsdt, &["0x03F8"]);
        for (i, dev) in devices.iter().enumerate() {
            assert_line(&dsdt, &[&format!("Device (V00{i})")]);
            assert_line(&dsdt, &[&format!("0x{:08X}", dev.addr)]);
            assert_line(&dsdt, &[&format!("0x{:08X}", dev.gsi)]);
        }
        assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 2, "{dsdt}");
        assert_line(&dsdt, &["Memory32Fixed (ReadWrite,"]);
        assert_line(
            &dsdt,
            &["Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"],
        );

        // Recompiling the disassembly checks the AML's semantics, not just its shape.
        let log = iasl(&dir, &["dsdt.dsl"]);
        assert!(
            log.contains(" 0 Errors, 0 Warnings"),
            "iasl dsdt.dsl:\n{log}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
