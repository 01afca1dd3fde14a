//! The state KVM holds for each vCPU and for the VM, read out and written back.
//!
//! The order of the writes follows what KVM requires: CPUID before the MSRs it gates, the
//! multiprocessing state before the registers, the LAPIC before the pending events (which may
//! name a LAPIC interrupt), and the MSRs late, since writing some of them (the TSC deadline)
//! depends on the LAPIC.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The FPU, SSE and AVX state (the legacy area holds what KVM_GET_FPU would).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Each MSR KVM could read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The guest TSC's frequency, so a restore on a host with another can keep it.
    pub tsc_khz: u32,
}

/// What KVM keeps for the VM itself: the interrupt controllers, the clock and the PIT.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub clock: kvm_clock_data,
    /// Present when the VM has an in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// How many MSRs one `KVM_GET_MSRS` call asks for (KVM's own limit is `KVM_MAX_MSR_ENTRIES`).
const MSR_BATCH: usize = 256;

/// Reads every MSR in `indices` that KVM lets this vCPU read. `KVM_GET_MSRS` stops at the
/// first MSR it cannot read and returns how many it read, so that one is skipped and the read
/// resumes after it.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut values = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<_> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Msrs)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
        values.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the one KVM refused, if it stopped early.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(values)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread has returned it), with any
    /// I/O it was in the middle of completed (see `vcpu::spawn`).
    pub fn save(kvm: &Kvm, vcpu: &VcpuFd, cpuid: &CpuId) -> Result<Self, SnapshotError> {
        let indices = kvm.get_msr_index_list().map_err(kvm_err("list the MSRs"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: vcpu.get_mp_state().map_err(kvm_err("read the MP state"))?,
            regs: vcpu.get_regs().map_err(kvm_err("read registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(kvm_err("read special registers"))?,
            xsave: vcpu.get_xsave().map_err(kvm_err("read the XSAVE area"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_err("read the XCRs"))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("read the debug registers"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("read the LAPIC"))?,
            msrs: read_msrs(vcpu, indices.as_slice())?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("read pending events"))?,
            tsc_khz: vcpu
                .get_tsc_khz()
                .map_err(kvm_err("read the TSC frequency"))?,
        })
    }

    /// Writes this state into a freshly created vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Cpuid)?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        // A host whose TSC runs at another rate scales the guest's; the same rate needs nothing.
        if vcpu.get_tsc_khz().ok() != Some(self.tsc_khz) {
            vcpu.set_tsc_khz(self.tsc_khz)
                .map_err(kvm_err("set the TSC frequency"))?;
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("set the MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_err("set registers"))?;
        vcpu.set_sregs(&sregs_for_restore(&self.sregs, &self.cpuid))
            .map_err(kvm_err("set special registers"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` read by KVM_GET_XSAVE on this host
        // kind; set_xsave reads exactly that structure.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("set the XSAVE area"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("set the XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err("set the debug registers"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("set the LAPIC"))?;
        self.restore_msrs(vcpu)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("set pending events"))?;
        Ok(())
    }

    fn restore_msrs(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        for batch in self.msrs.chunks(MSR_BATCH) {
            let entries: Vec<_> = batch
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Msrs)?;
            let written = vcpu.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
            if written != entries.len() {
                return Err(SnapshotError::MsrRefused(entries[written].index));
            }
        }
        Ok(())
    }
}

/// The "busy" bit of a system segment's type: a busy 64-bit TSS is type 11, an available one 9.
const TSS_BUSY: u8 = 0x2;

/// The special registers to restore: as saved, except that on AMD the task register is
/// restored as an available TSS (type 9) rather than the busy one (11) KVM reports.
///
/// Why: KVM's SVM code sets the busy bit when it reports TR (hardware caches it busy after
/// LTR, and VMX requires it on entry), while AMD's VMRUN/VMLOAD never look at the type. QEMU's
/// TCG emulation of SVM, which runs kvmbuild's nested test host, does: it refuses user-mode
/// port I/O (a #GP) unless the cached type is 9, so a restored guest's init could not report
/// its status there. On Intel the busy type is kept, as VM entry requires.
fn sregs_for_restore(saved: &kvm_sregs, cpuid: &[kvm_cpuid_entry2]) -> kvm_sregs {
    let mut sregs = *saved;
    if is_amd(cpuid) {
        sregs.tr.type_ &= !TSS_BUSY;
    }
    sregs
}

/// Whether CPUID leaf 0 names AMD ("AuthenticAMD") or Hygon, whose CPUs implement SVM.
fn is_amd(cpuid: &[kvm_cpuid_entry2]) -> bool {
    cpuid.iter().find(|e| e.function == 0).is_some_and(|e| {
        let vendor = [e.ebx, e.edx, e.ecx].map(u32::to_le_bytes).concat();
        vendor == *b"AuthenticAMD" || vendor == *b"HygonGenuine"
    })
}

impl VmState {
    /// Reads the VM's interrupt controllers, clock and (if `pit`) PIT.
    pub fn save(vm: &VmFd, pit: bool) -> Result<Self, SnapshotError> {
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_err("read the interrupt controllers"))?;
            irqchips.push(chip);
        }
        Ok(Self {
            irqchips,
            clock: vm.get_clock().map_err(kvm_err("read the clock"))?,
            pit: match pit {
                true => Some(vm.get_pit2().map_err(kvm_err("read the PIT"))?),
                false => None,
            },
        })
    }

    /// Writes the interrupt controllers and the PIT into a VM created with the same irqchip
    /// and PIT, before its vCPUs.
    pub fn restore_chips(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(kvm_err("set the interrupt controllers"))?;
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit).map_err(kvm_err("set the PIT"))?;
        }
        Ok(())
    }

    /// Sets the guest's clock (kvmclock) to where it was saved: it sees no time pass while it
    /// was stored. Its wall clock is set by kvmbuild's init from the run's settings.
    ///
    /// Call it right after the vCPUs' state (their TSC) is written. The TSC and kvmclock each
    /// resume from their saved values when they are written; the time between the two writes
    /// becomes a skew between them, and Linux's clocksource watchdog, which compares them
    /// across the restore, marks the TSC unstable once that skew passes its margin (about
    /// 100 us). Creating the vCPUs between the two writes made it tens of milliseconds.
    pub fn restore_clock(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("set the clock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor_leaf(vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            function: 0,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }
    }

    #[test]
    fn only_amd_restores_tr_as_an_available_tss() {
        let mut saved = kvm_sregs::default();
        saved.tr.type_ = 11;
        let amd = sregs_for_restore(&saved, &[vendor_leaf(b"AuthenticAMD")]);
        assert_eq!(amd.tr.type_, 9);
        let intel = sregs_for_restore(&saved, &[vendor_leaf(b"GenuineIntel")]);
        assert_eq!(intel.tr.type_, 11);
        assert_eq!(sregs_for_restore(&saved, &[]).tr.type_, 11);
    }
}
