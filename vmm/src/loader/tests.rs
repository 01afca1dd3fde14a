//! Loading kernels and initrds into guest memory, with hand-made images.

use super::*;

fn kernel(end: u64, initrd_addr_max: u64) -> LoadedKernel {
    LoadedKernel {
        format: KernelFormat::BzImage,
        entry: GuestAddress(layout::HIMEM_START + 0x200),
        pvh_entry: None,
        end,
        setup_header: None,
        cmdline_limit: 2048,
        initrd_addr_max,
    }
}

#[test]
fn initrd_goes_page_aligned_to_the_top_of_low_memory() {
    let k = kernel(0x200_0000, 0x7fff_ffff);
    let p = place_initrd(128 << 20, &k, 0x1234).unwrap();
    assert_eq!(p.addr % 0x1000, 0);
    assert_eq!(p.addr, ((128 << 20) - 0x1234) & !0xfff);
    assert!(p.addr + p.size <= 128 << 20);
}

#[test]
fn initrd_respects_the_kernels_highest_address_and_the_hole() {
    let k = kernel(0x200_0000, 0x37ff_ffff);
    let p = place_initrd(2 << 30, &k, 0x1000).unwrap();
    assert_eq!(p.addr + p.size, 0x3800_0000);
    let k = kernel(0x200_0000, u64::from(u32::MAX));
    let p = place_initrd(8 << 30, &k, 0x1000).unwrap();
    assert_eq!(p.addr + p.size, layout::MMIO_HOLE_START);
}

#[test]
fn initrd_that_would_overlap_the_kernel_does_not_fit() {
    let k = kernel(0x300_0000, 0x7fff_ffff);
    assert_eq!(place_initrd(64 << 20, &k, 32 << 20), None);
    assert_eq!(place_initrd(16 << 20, &k, 1 << 40), None);
}

#[test]
fn command_line_limits_are_the_kernels() {
    assert!(check_cmdline(&"a".repeat(2048), 2048).is_ok());
    let err = check_cmdline(&"a".repeat(2049), 2048).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the command line is 2049 bytes; the kernel accepts at most 2048"
    );
    assert!(matches!(
        check_cmdline("a\0b", 2048),
        Err(LoaderError::CmdlineNul)
    ));
}

#[test]
fn unknown_files_are_named_in_the_error() {
    let path = std::env::temp_dir().join(format!("kvmbuild-notakernel-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let mut file = File::open(&path).unwrap();
    let err = detect_format(&path, &mut file).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(err.to_string().ends_with("not a bzImage or ELF kernel"));
}

/// Guest RAM for the loader tests: 64 MiB from 0.
fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
}

/// Writes `bytes` to a fresh file and returns its directory (kept alive) and path.
fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernel");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A program header: type, file offset, physical address, file and memory size.
fn phdr(kind: u32, offset: u64, paddr: u64, size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(56);
    h.extend(kind.to_le_bytes());
    h.extend(7u32.to_le_bytes()); // p_flags: rwx
    h.extend(offset.to_le_bytes());
    h.extend(paddr.to_le_bytes()); // p_vaddr
    h.extend(paddr.to_le_bytes()); // p_paddr
    h.extend(size.to_le_bytes()); // p_filesz
    h.extend(size.to_le_bytes()); // p_memsz
    h.extend(0x1000u64.to_le_bytes()); // p_align
    h
}

/// A minimal x86-64 ELF: one 16-byte PT_LOAD at 0x100000 (file offset 0x1000), entered at
/// `entry`, plus `notes` (file offset, size) as PT_NOTE segments and `note_bytes` at 0x800.
fn elf(entry: u64, notes: &[(u64, u64)], note_bytes: &[u8]) -> Vec<u8> {
    let phnum = 1 + notes.len() as u16;
    let mut f = vec![0u8; 64];
    f[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    f.extend(phdr(1, 0x1000, 0x10_0000, 16));
    for &(offset, size) in notes {
        f.extend(phdr(PT_NOTE, offset, 0, size));
    }
    f.resize(0x800, 0);
    f.extend(note_bytes);
    f.resize(0x1010, 0xf4); // hlt
    f
}

/// A PVH note (XEN_ELFNOTE_PHYS32_ENTRY) naming `entry`.
fn pvh_note(entry: u32) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend(4u32.to_le_bytes()); // namesz
    n.extend(4u32.to_le_bytes()); // descsz
    n.extend(18u32.to_le_bytes()); // type
    n.extend(b"Xen\0");
    n.extend(entry.to_le_bytes());
    n
}

#[test]
fn elf_with_its_entry_in_ram_loads() {
    let (_d, path) = file_with(&elf(0x10_0000, &[], &[]));
    let k = load_kernel(&ram(), &path).unwrap();
    assert_eq!(
        (k.format, k.entry, k.pvh_entry),
        (KernelFormat::Elf, GuestAddress(0x10_0000), None)
    );
    let note = pvh_note(0x10_0008);
    let (_d, path) = file_with(&elf(0x10_0000, &[(0x800, note.len() as u64)], &note));
    let k = load_kernel(&ram(), &path).unwrap();
    assert_eq!(k.pvh_entry, Some(GuestAddress(0x10_0008)));
}

#[test]
fn elf_or_pvh_entry_outside_ram_is_refused() {
    let (_d, path) = file_with(&elf(1 << 40, &[], &[]));
    let err = load_kernel(&ram(), &path).unwrap_err();
    assert!(
        matches!(err, LoaderError::EntryOutsideRam { what: "ELF", entry, .. } if entry == 1 << 40),
        "{err}"
    );
    let note = pvh_note(0xf000_0000);
    let (_d, path) = file_with(&elf(0x10_0000, &[(0x800, note.len() as u64)], &note));
    let err = load_kernel(&ram(), &path).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("the PVH entry point 0xf0000000 is outside guest RAM"),
        "{err}"
    );
}

#[test]
fn huge_or_out_of_file_note_segments_are_refused_before_the_walk() {
    // 4 GiB of (absent) notes: linux-loader would try to walk them.
    let (_d, path) = file_with(&elf(0x10_0000, &[(0x800, 4 << 30)], &[]));
    let err = load_kernel(&ram(), &path).unwrap_err();
    assert!(
        matches!(err, LoaderError::BadNotes { size, .. } if size == 4 << 30),
        "{err}"
    );
    // Inside the file, but past the limit: a sparse file of empty notes.
    let (_d, path) = file_with(&elf(0x10_0000, &[(0x1000, MAX_ELF_NOTES + 12)], &[]));
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0x1000 + MAX_ELF_NOTES + 12)
        .unwrap();
    let err = load_kernel(&ram(), &path).unwrap_err();
    assert!(matches!(err, LoaderError::BadNotes { .. }), "{err}");
}

/// A bzImage with one setup sector and `code_len` bytes of protected-mode code.
fn bzimage(code_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 1024];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
    f[0x206..0x208].copy_from_slice(&0x20cu16.to_le_bytes()); // version
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    f[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    f.resize(1024 + code_len, 0xf4);
    f
}

#[test]
fn bzimage_truncated_before_its_entry_is_refused() {
    let (_d, path) = file_with(&bzimage(0x400));
    let k = load_kernel(&ram(), &path).unwrap();
    assert_eq!(k.entry, GuestAddress(0x10_0200));
    for short in [0, 0x100, 0x200] {
        let (_d, path) = file_with(&bzimage(short));
        let err = load_kernel(&ram(), &path).unwrap_err();
        assert!(
            matches!(err, LoaderError::TruncatedBzImage(_)),
            "{short:#x}: {err}"
        );
    }
}

#[test]
fn empty_initrd_and_non_regular_inputs_are_refused() {
    let mem = ram();
    let (_d, kpath) = file_with(&bzimage(0x400));
    let k = load_kernel(&mem, &kpath).unwrap();
    let (_e, empty) = file_with(b"");
    let err = load_initrd(&mem, 64 << 20, &k, &empty, &[]).unwrap_err();
    assert!(matches!(err, LoaderError::EmptyInitrd(_)), "{err}");
    let err = load_initrd(&mem, 64 << 20, &k, Path::new("/dev/zero"), &[]).unwrap_err();
    assert!(matches!(err, LoaderError::Read { .. }), "{err}");
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_kernel(&mem, dir.path()),
        Err(LoaderError::Read { .. })
    ));
}

/// Found by the `loader` fuzz target: a PT_LOAD whose memory size (its zero-filled part)
/// reaches past RAM loaded, and the image's reported end lay far outside guest memory.
#[test]
fn elf_whose_memory_size_reaches_past_ram_is_refused() {
    let mut f = elf(0x10_0000, &[], &[]);
    // The PT_LOAD header starts at 64; p_memsz is its field at 40.
    f[64 + 40..64 + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (_d, path) = file_with(&f);
    let err = load_kernel(&ram(), &path).unwrap_err();
    assert!(
        matches!(err, LoaderError::ImageBeyondRam { end, .. } if end == 0x10_0000 + (1 << 40)),
        "{err}"
    );
    assert!(err.to_string().ends_with("beyond guest RAM"), "{err}");
}
