//! vCPUs: their boot state and the thread that runs each one.
//!
//! The boot vCPU starts in 64-bit mode at the kernel's entry point with the zero page in `rsi`
//! (the boot protocol's "64-bit boot"). The others wait, as on real hardware, in the in-kernel
//! LAPIC's wait-for-SIPI state until the kernel wakes them.

use std::cell::Cell;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use devices::bus::Bus;
use devices::exit::{ExitReason, ResetSource, VmExit};
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::{cpuid, layout};

/// Errors from configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: cannot {what}")]
    Kvm {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// The shaped CPUID does not fit KVM's table.
    #[error("vCPU {index}: {entries} CPUID entries are more than KVM takes")]
    Cpuid { index: u8, entries: usize },
    /// KVM accepted only some of the boot MSRs.
    #[error("vCPU {index}: KVM refused MSR {msr:#x}")]
    Msr { index: u8, msr: u32 },
    /// Writing the GDT or page tables failed.
    #[error("cannot write the boot page tables or GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start the vCPU {index} thread")]
    Spawn { index: u8, source: std::io::Error },
}

// Segment descriptor flags (access byte + flags nibble) of the boot GDT.
const CODE64_FLAGS: u16 = 0xa09b; // present, ring 0, code, execute/read, accessed, L, G
const CODE32_FLAGS: u16 = 0xc09b; // present, ring 0, code, execute/read, accessed, D/B, G
const DATA_FLAGS: u16 = 0xc093; // present, ring 0, data, read/write, accessed, D/B, G
const TSS_FLAGS: u16 = 0x808b; // present, 64-bit busy TSS, G
/// GDT indices; the kernel reloads its own GDT early, these only have to be valid.
const GDT_CODE32: u16 = 1;
const GDT_CODE: u16 = 2;
const GDT_DATA: u16 = 3;
const GDT_TSS: u16 = 4;
const GDT_ENTRIES: usize = 5;
/// The GDT's limit: its size less one.
#[allow(clippy::cast_possible_truncation)] // 39
const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 1 << 7;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE: fast-string operations enabled, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default memory type write-back, as firmware leaves it.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A GDT descriptor from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `kvm_segment` that loading `entry` with selector `index * 8` would produce.
fn segment(index: u16, entry: u64) -> kvm_segment {
    let granular = (entry >> 55) & 1 == 1;
    // 20 bits of limit.
    #[allow(clippy::cast_possible_truncation)]
    let raw_limit = (((entry >> 48) & 0xf) << 16 | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn boot_gdt() -> [u64; GDT_ENTRIES] {
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[GDT_CODE32 as usize] = gdt_entry(CODE32_FLAGS, 0, 0xfffff);
    gdt[GDT_CODE as usize] = gdt_entry(CODE64_FLAGS, 0, 0xfffff);
    gdt[GDT_DATA as usize] = gdt_entry(DATA_FLAGS, 0, 0xfffff);
    gdt[GDT_TSS as usize] = gdt_entry(TSS_FLAGS, 0, 0xfffff);
    gdt
}

/// Writes the boot GDT, an empty IDT and identity-mapping page tables for the first 1 GiB.
/// The kernel replaces all of them before it needs more.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))?;
    mem.write_obj(layout::PDPT | PAGE_PRESENT_RW, GuestAddress(layout::PML4))?;
    mem.write_obj(layout::PD | PAGE_PRESENT_RW, GuestAddress(layout::PDPT))?;
    for i in 0..512u64 {
        let entry = (i << 21) | PAGE_SIZE_2M | PAGE_PRESENT_RW;
        mem.write_obj(entry, GuestAddress(layout::PD + i * 8))?;
    }
    Ok(())
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux's 64-bit boot protocol: long mode, identity-mapped, `rsi` = the zero page.
    Linux64(GuestAddress),
    /// PVH: 32-bit protected mode without paging, `ebx` = the `hvm_start_info`.
    Pvh(GuestAddress),
}

/// Configures vCPU `index` of `count`: CPUID (KVM's supported set shaped by
/// [`cpuid::shape`] with `extras`), MSRs, FPU and LAPIC for every vCPU, and the entry state
/// for the boot vCPU.
pub fn configure(
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    supported_cpuid: &CpuId,
    extras: cpuid::Extras,
    entry: BootEntry,
) -> Result<(), VcpuError> {
    let kvm_err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    let mut entries = supported_cpuid.as_slice().to_vec();
    cpuid::shape(&mut entries, index, count, extras);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::Cpuid {
        index,
        entries: entries.len(),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    set_boot_msrs(vcpu, index)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("set FPU state"))?;
    set_lint_delivery(vcpu, index)?;
    if index == 0 {
        set_entry_mode(vcpu, index, entry)?;
        let mut regs = kvm_regs {
            rflags: 0x2, // bit 1 is reserved and always set; interrupts off
            rsp: layout::BOOT_STACK,
            rbp: layout::BOOT_STACK,
            ..Default::default()
        };
        match entry {
            BootEntry::Linux64(rip) => (regs.rip, regs.rsi) = (rip.0, layout::ZERO_PAGE),
            BootEntry::Pvh(rip) => (regs.rip, regs.rbx) = (rip.0, layout::PVH_START_INFO),
        }
        vcpu.set_regs(&regs).map_err(kvm_err("set registers"))?;
    }
    Ok(())
}

fn set_boot_msrs(vcpu: &VcpuFd, index: u8) -> Result<(), VcpuError> {
    let values = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let entries: Vec<_> = values
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fits the FAM wrapper");
    let set = vcpu.set_msrs(&msrs).map_err(|source| VcpuError::Kvm {
        index,
        what: "set MSRs",
        source,
    })?;
    match values.get(set) {
        Some(&(msr, _)) => Err(VcpuError::Msr { index, msr }),
        None => Ok(()),
    }
}

/// Segments, control registers and EFER for the entry: long mode with paging for
/// [`BootEntry::Linux64`], flat 32-bit protected mode without paging for [`BootEntry::Pvh`].
fn set_entry_mode(vcpu: &VcpuFd, index: u8, entry: BootEntry) -> Result<(), VcpuError> {
    let kvm_err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("get special registers"))?;
    let gdt = boot_gdt();
    let code = match entry {
        BootEntry::Linux64(_) => GDT_CODE,
        BootEntry::Pvh(_) => GDT_CODE32,
    };
    let data = segment(GDT_DATA, gdt[GDT_DATA as usize]);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = segment(code, gdt[code as usize]);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(GDT_TSS, gdt[GDT_TSS as usize]);
    match entry {
        BootEntry::Linux64(_) => {
            sregs.cr3 = layout::PML4;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh(_) => {
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            sregs.cr4 &= !CR4_PAE;
            sregs.efer &= !(EFER_LME | EFER_LMA);
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err("set special registers"))
}

/// LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as the MP spec's virtual-wire mode has it.
fn set_lint_delivery(vcpu: &VcpuFd, index: u8) -> Result<(), VcpuError> {
    let kvm_err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC state"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC state"))
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where a vCPU reports that the VM must end.
    pub exit: Arc<VmExit>,
    /// Guest memory, read to describe emulation failures.
    pub mem: GuestMemoryMmap,
}

thread_local! {
    /// This thread's vCPU `immediate_exit` flag, so the kick handler can stop `KVM_RUN`.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is set by this thread's vCPU loop to its own kvm_run mapping,
        // and cleared before that mapping is dropped; a volatile byte write is signal-safe.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the handler of the kick signal (once per process); without it, a kick would kill
/// the process.
pub(crate) fn install_kick_handler() -> Result<(), VcpuError> {
    static HANDLER: Once = Once::new();
    let mut installed = Ok(());
    HANDLER.call_once(|| installed = register_signal_handler(kick_signal(), handle_kick));
    installed.map_err(VcpuError::Signal)
}

/// Starts the thread that runs `vcpu` until the VM ends; joining it gives the vCPU back, its
/// state intact, for whoever wants to read or save it.
pub fn spawn(
    mut vcpu: VcpuFd,
    index: u8,
    ctx: VcpuContext,
) -> Result<JoinHandle<VcpuFd>, VcpuError> {
    install_kick_handler()?;
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            ctx.exit
                .thread_started(devices::thread_kind::ThreadKind::Vcpu);
            IMMEDIATE_EXIT.with(|flag| flag.set(&mut vcpu.get_kvm_run().immediate_exit));
            if let Some(reason) = run_until_exit(&mut vcpu, index, &ctx) {
                ctx.exit.request(reason);
            }
            IMMEDIATE_EXIT.with(|flag| flag.set(std::ptr::null_mut()));
            complete_pending_io(&mut vcpu);
            vcpu
        })
        .map_err(|source| VcpuError::Spawn { index, source })
}

/// Leaves the vCPU between two instructions. An exit for port or MMIO I/O completes the
/// instruction only when `KVM_RUN` is next entered; with `immediate_exit` set, that entry
/// completes it and returns at once without running the guest (KVM's API documentation,
/// `KVM_CAP_IMMEDIATE_EXIT`). A state saved afterwards then resumes after the instruction,
/// not at it (which would, for instance, hit the snapshot port again).
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; any other leaves the vCPU as it was, to be dropped.
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// Interrupts a vCPU thread's `KVM_RUN` so it notices that the VM is ending.
pub fn kick<T>(thread: &JoinHandle<T>) {
    // ESRCH only means the thread has already finished.
    let _ = thread.kill(kick_signal());
}

/// What one KVM exit asks of the loop.
enum Step {
    Continue,
    Exit(ExitReason),
    EmulationFailure,
}

fn run_until_exit(vcpu: &mut VcpuFd, index: u8, ctx: &VcpuContext) -> Option<ExitReason> {
    loop {
        if ctx.exit.is_requested() {
            return None;
        }
        let step = match vcpu.run() {
            Ok(exit) => handle_exit(exit, index, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Exit(ExitReason::Internal(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        };
        match step {
            Step::Continue => {}
            Step::Exit(reason) => return Some(reason),
            Step::EmulationFailure => {
                return Some(ExitReason::Internal(describe_emulation_failure(
                    vcpu, index, &ctx.mem,
                )))
            }
        }
    }
}

fn handle_exit(exit: VcpuExit<'_>, index: u8, ctx: &VcpuContext) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
        }
        VcpuExit::Intr => {}
        VcpuExit::Shutdown => return Step::Exit(ExitReason::Reset(ResetSource::TripleFault)),
        VcpuExit::SystemEvent(kind, _) => {
            return Step::Exit(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset(ResetSource::AcpiReset),
                KVM_SYSTEM_EVENT_CRASH => {
                    ExitReason::Internal(format!("vCPU {index}: the guest reported a crash"))
                }
                other => ExitReason::Internal(format!("vCPU {index}: unknown system event {other}")),
            })
        }
        VcpuExit::InternalError => return Step::EmulationFailure,
        VcpuExit::FailEntry(reason, cpu) => {
            return Step::Exit(ExitReason::Internal(format!(
                "vCPU {index}: KVM could not enter the guest on host CPU {cpu} (hardware entry failure reason {reason:#x})"
            )))
        }
        other => {
            return Step::Exit(ExitReason::Internal(format!(
                "vCPU {index}: unexpected KVM exit {other:?}"
            )))
        }
    }
    Step::Continue
}

/// The guest RIP and the instruction bytes there, for a `KVM_EXIT_INTERNAL_ERROR`.
fn describe_emulation_failure(vcpu: &mut VcpuFd, index: u8, mem: &GuestMemoryMmap) -> String {
    // SAFETY: KVM filled the `internal` member of the exit union for KVM_EXIT_INTERNAL_ERROR,
    // the exit this function is called for.
    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let Ok(regs) = vcpu.get_regs() else {
        return format!(
            "vCPU {index}: KVM internal error (suberror {suberror}); registers unavailable"
        );
    };
    let bytes = vcpu
        .translate_gva(regs.rip)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| read_up_to(mem, t.physical_address, 15))
        .unwrap_or_default();
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let what = if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
        "KVM could not emulate an instruction"
    } else {
        "KVM internal error"
    };
    format!(
        "vCPU {index}: {what} (suberror {suberror}) at RIP {:#x}, instruction bytes [{}]",
        regs.rip,
        if hex.is_empty() {
            "unreadable".to_string()
        } else {
            hex.join(" ")
        }
    )
}

/// Where a stopped vCPU was: what `--timeout` reports, so that a hung guest says whether it
/// was halted (waiting for an interrupt that never came) or running, and at which RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuPosition {
    pub index: u8,
    pub rip: u64,
    pub halted: bool,
}

impl VcpuPosition {
    /// Reads the position of `vcpu`, which no thread runs; `None` if KVM will not say.
    pub fn read(vcpu: &VcpuFd, index: u8) -> Option<VcpuPosition> {
        let rip = vcpu.get_regs().ok()?.rip;
        let halted = vcpu
            .get_mp_state()
            .is_ok_and(|s| s.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
        Some(VcpuPosition { index, rip, halted })
    }
}

impl std::fmt::Display for VcpuPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.halted { "halted" } else { "running" };
        write!(f, "vCPU {} {state} at RIP {:#x}", self.index, self.rip)
    }
}

/// Up to `len` bytes at `addr`, stopping at the end of guest memory.
fn read_up_to(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map_while(|i| mem.read_obj::<u8>(GuestAddress(addr.checked_add(i)?)).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_kvm_expects() {
        let gdt = boot_gdt();
        let code32 = segment(GDT_CODE32, gdt[GDT_CODE32 as usize]);
        assert_eq!(
            (code32.selector, code32.l, code32.db, code32.type_),
            (0x08, 0, 1, 0xb)
        );
        let code = segment(GDT_CODE, gdt[GDT_CODE as usize]);
        assert_eq!(
            (
                code.selector,
                code.l,
                code.db,
                code.present,
                code.s,
                code.type_
            ),
            (0x10, 1, 0, 1, 1, 0xb)
        );
        assert_eq!((code.base, code.limit, code.g), (0, 0xffff_ffff, 1));
        let data = segment(GDT_DATA, gdt[GDT_DATA as usize]);
        assert_eq!(
            (data.selector, data.l, data.db, data.type_),
            (0x18, 0, 1, 0x3)
        );
        let tss = segment(GDT_TSS, gdt[GDT_TSS as usize]);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x20, 0, 0xb));
    }

    #[test]
    fn gdt_entry_packs_base_and_limit() {
        let e = gdt_entry(0xa09b, 0x1234_5678, 0xabcde);
        let s = segment(1, e);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
    }

    #[test]
    fn boot_page_tables_identity_map_the_first_gigabyte() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4)).unwrap();
        let pdpt: u64 = mem.read_obj(GuestAddress(layout::PDPT)).unwrap();
        let last: u64 = mem.read_obj(GuestAddress(layout::PD + 511 * 8)).unwrap();
        assert_eq!(pml4, layout::PDPT | 3);
        assert_eq!(pdpt, layout::PD | 3);
        assert_eq!(last, (511 << 21) | 0x83);
    }
}
