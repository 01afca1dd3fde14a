//! A minimal bzImage packer, and a parser to check it, after Documentation/arch/x86/boot.rst.
//!
//! A bzImage is a boot sector (whose tail, from 0x1f1, is the start of the setup header),
//! `setup_sects` sectors of real-mode setup code (the header continues at 0x200 with a jump, then
//! "HdrS" at 0x202), and then the protected-mode code, which a boot loader copies to
//! `code32_start` (0x100000). A 64-bit boot loader enters it at load address + 0x200 when
//! `xloadflags` has XLF_KERNEL_64. The real-mode code here only halts: kvmbuild never runs it.

/// `loadflags`: the protected-mode code is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags`: the kernel has the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// The setup header's magic, "HdrS".
pub const HDRS: u32 = u32::from_le_bytes(*b"HdrS");
/// Where boot loaders put the protected-mode code of a non-relocatable kernel.
pub const CODE32_START: u32 = 0x10_0000;

const SECTOR: usize = 512;
/// Where the real-mode stub sits, right after the setup header's last field (boot protocol 2.15).
const REAL_MODE_STUB: usize = 0x26c;
/// Where the kernel version string sits (must be within the setup sectors).
const VERSION_STRING: usize = 0x280;
/// `cli; hlt; jmp $-1`: the whole of the real-mode code.
const HALT_LOOP: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// The header fields a test may want to vary.
#[derive(Clone, Debug)]
pub struct SetupOptions {
    /// Number of 512-byte setup sectors after the boot sector (at least 1 here, since the setup
    /// header spills into the first of them).
    pub setup_sects: u8,
    /// Boot protocol version (0x020c = 2.12, the first with `xloadflags`).
    pub version: u16,
    pub loadflags: u8,
    pub xloadflags: u16,
    /// Longest command line the kernel accepts, without its NUL.
    pub cmdline_size: u32,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    /// Shown by `file` and boot loaders.
    pub kernel_version: String,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            setup_sects: 1,
            version: 0x020c,
            loadflags: LOADED_HIGH,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            kernel_version: "kvmbuild tiny guest".to_owned(),
        }
    }
}

/// The setup header as read back from an image (the fields the packer writes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    pub setup_sects: u8,
    pub syssize: u32,
    pub boot_flag: u16,
    pub jump: u16,
    pub header: u32,
    pub version: u16,
    pub kernel_version: String,
    pub loadflags: u8,
    pub code32_start: u32,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable_kernel: u8,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub pref_address: u64,
    pub init_size: u32,
}

impl SetupHeader {
    /// Offset of the protected-mode code in the file.
    pub fn payload_offset(&self) -> usize {
        // Boot protocol: setup_sects == 0 means 4.
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (usize::from(sects) + 1) * SECTOR
    }
}

fn put<const N: usize>(image: &mut [u8], offset: usize, bytes: [u8; N]) {
    image[offset..offset + N].copy_from_slice(&bytes);
}

/// Packs `payload` (protected-mode code linked for 0x100000, 64-bit entry at 0x100200) as a bzImage.
pub fn pack(payload: &[u8], opts: &SetupOptions) -> Vec<u8> {
    assert!(
        opts.setup_sects >= 1,
        "the setup header needs at least one setup sector"
    );
    assert!(
        payload.len() > 0x200,
        "the payload must reach its 64-bit entry at offset 0x200"
    );
    assert!(opts.kernel_version.len() < 0x400 - VERSION_STRING);
    let setup_len = (usize::from(opts.setup_sects) + 1) * SECTOR;
    let mut image = vec![0u8; setup_len];

    // Boot sector: halt, with a note for whoever tries to boot it from a disk.
    put(&mut image, 0, HALT_LOOP);
    let note = b"kvmbuild tiny guest: boot it with kvmbuild run --kernel\r\n";
    image[0x10..0x10 + note.len()].copy_from_slice(note);

    let syssize = u32::try_from(payload.len().div_ceil(16)).expect("payload fits");
    let init_size = u32::try_from(payload.len().next_multiple_of(4096)).expect("payload fits");
    image[0x1f1] = opts.setup_sects;
    put(&mut image, 0x1f4, syssize.to_le_bytes());
    put(&mut image, 0x1fe, 0xaa55u16.to_le_bytes());
    // 0x200: a short jump over the header to the real-mode stub.
    let rel = u8::try_from(REAL_MODE_STUB - 0x202).expect("short jump");
    put(&mut image, 0x200, [0xeb, rel]);
    put(&mut image, 0x202, HDRS.to_le_bytes());
    put(&mut image, 0x206, opts.version.to_le_bytes());
    put(&mut image, 0x20c, 0x1000u16.to_le_bytes()); // start_sys_seg (obsolete)
    let version_ptr = u16::try_from(VERSION_STRING - 0x200).expect("fits");
    put(&mut image, 0x20e, version_ptr.to_le_bytes());
    image[0x211] = opts.loadflags;
    put(&mut image, 0x214, CODE32_START.to_le_bytes());
    put(&mut image, 0x22c, opts.initrd_addr_max.to_le_bytes());
    put(&mut image, 0x230, 0x20_0000u32.to_le_bytes()); // kernel_alignment
    image[0x234] = 0; // relocatable_kernel: load exactly at code32_start
    image[0x235] = 21; // min_alignment (log2)
    put(&mut image, 0x236, opts.xloadflags.to_le_bytes());
    put(&mut image, 0x238, opts.cmdline_size.to_le_bytes());
    put(&mut image, 0x258, u64::from(CODE32_START).to_le_bytes()); // pref_address
    put(&mut image, 0x260, init_size.to_le_bytes());
    put(&mut image, REAL_MODE_STUB, HALT_LOOP);
    let v = opts.kernel_version.as_bytes();
    image[VERSION_STRING..VERSION_STRING + v.len()].copy_from_slice(v);

    image.extend_from_slice(payload);
    image
}

fn u16_at(image: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(image[offset..offset + 2].try_into().unwrap())
}

fn u32_at(image: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(image[offset..offset + 4].try_into().unwrap())
}

fn u64_at(image: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(image[offset..offset + 8].try_into().unwrap())
}

/// Reads the setup header back, checking what every boot loader checks.
pub fn parse(image: &[u8]) -> Result<SetupHeader, String> {
    if image.len() < 2 * SECTOR {
        return Err(format!("{} bytes is too short for a bzImage", image.len()));
    }
    let header = u32_at(image, 0x202);
    if header != HDRS {
        return Err(format!("no HdrS magic at 0x202 (found {header:#x})"));
    }
    let version_ptr = usize::from(u16_at(image, 0x20e)) + 0x200;
    let kernel_version = image
        .get(version_ptr..)
        .and_then(|s| s.split(|&b| b == 0).next())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    let hdr = SetupHeader {
        setup_sects: image[0x1f1],
        syssize: u32_at(image, 0x1f4),
        boot_flag: u16_at(image, 0x1fe),
        jump: u16_at(image, 0x200),
        header,
        version: u16_at(image, 0x206),
        kernel_version,
        loadflags: image[0x211],
        code32_start: u32_at(image, 0x214),
        initrd_addr_max: u32_at(image, 0x22c),
        kernel_alignment: u32_at(image, 0x230),
        relocatable_kernel: image[0x234],
        xloadflags: u16_at(image, 0x236),
        cmdline_size: u32_at(image, 0x238),
        pref_address: u64_at(image, 0x258),
        init_size: u32_at(image, 0x260),
    };
    if hdr.boot_flag != 0xaa55 {
        return Err(format!("boot_flag is {:#x}, not 0xaa55", hdr.boot_flag));
    }
    if image.len() <= hdr.payload_offset() {
        return Err("no protected-mode code after the setup sectors".to_owned());
    }
    Ok(hdr)
}
