//! Shaping KVM's supported CPUID into what one vCPU of this VM should report.
//!
//! KVM reports what it can virtualise; it does not know our topology. Each vCPU gets its own
//! APIC ID and a flat topology: one socket, `vcpus` cores, one thread per core. Linux reads
//! this to number its CPUs and size its per-CPU data, so it must agree with the MADT.
//!
//! Timers: kvmbuild creates no in-kernel PIT unless asked (`VmConfig::pit`), so Linux keeps
//! time with kvmclock (KVM's paravirtual leaves 0x4000_0000.., passed through as KVM reports
//! them) and the LAPIC timer. The TSC-deadline bit is added when KVM emulates that mode
//! (`KVM_CAP_TSC_DEADLINE_TIMER`); KVM_GET_SUPPORTED_CPUID leaves it out because it depends
//! on the in-kernel LAPIC. With it, Linux uses the LAPIC timer without calibrating it.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: the LAPIC timer has a TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 EBX[15:8]: CLFLUSH line size in 8-byte units (64-byte lines).
const CLFLUSH_LINE_8_BYTE_UNITS: u32 = 8;
/// Extended topology level types (leaves 0xb and 0x1f, ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The first of the three leaves that hold the processor brand string.
const BRAND_LEAF: u32 = 0x8000_0002;
/// The brand string offered when KVM passes none on (48 bytes with the NUL padding).
pub const BRAND: &str = "kvmbuild virtual CPU";

/// What the host's KVM can offer beyond its supported CPUID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// KVM emulates the LAPIC timer's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// The registers of `KVM_GET_SUPPORTED_CPUID` that say what the processor and KVM offer a
/// guest, as (leaf, subleaf, mask of EAX, EBX, ECX, EDX). Only these are compared: the rest
/// describe the physical CPU that ran the ioctl (KVM executes CPUID there: leaf 1 EBX holds
/// its APIC ID, leaves 0xb and 0x1f its x2APIC ID, 0x8000_001e its core and node), or caches
/// and topology that the guest's own CPUID replaces.
const FEATURE_REGISTERS: [(u32, u32, [u32; 4]); 13] = [
    // Vendor and highest leaf; family, model and stepping; the feature flags.
    (0x0, 0, [!0, !0, !0, !0]),
    (0x1, 0, [!0, 0, !0, !0]),
    // Structured extended features.
    (0x7, 0, [!0, !0, !0, !0]),
    (0x7, 1, [!0, !0, !0, !0]),
    // XSAVE: the state components offered, and the XSAVE variants.
    (0xd, 0, [!0, 0, 0, !0]),
    (0xd, 1, [!0, 0, 0, 0]),
    // KVM's paravirtual features (kvmclock and the rest).
    (0x4000_0001, 0, [!0, 0, 0, !0]),
    // Extended leaves: highest leaf, features, power management (invariant TSC), address
    // sizes and AMD's extra features, SVM.
    (0x8000_0000, 0, [!0, !0, !0, !0]),
    (0x8000_0001, 0, [0, 0, !0, !0]),
    (0x8000_0007, 0, [0, 0, 0, !0]),
    (0x8000_0008, 0, [!0, !0, 0, 0]),
    (0x8000_000a, 0, [!0, 0, 0, !0]),
    (0x8000_0021, 0, [!0, 0, 0, 0]),
];

/// Whether two lists from `KVM_GET_SUPPORTED_CPUID` offer a guest the same processor
/// ([`FEATURE_REGISTERS`]), whatever CPU each was read on.
pub fn same_features(a: &[kvm_cpuid_entry2], b: &[kvm_cpuid_entry2]) -> bool {
    features(a) == features(b)
}

fn features(entries: &[kvm_cpuid_entry2]) -> Vec<Option<[u32; 4]>> {
    FEATURE_REGISTERS
        .iter()
        .map(|&(function, index, mask)| {
            entries
                .iter()
                .find(|e| e.function == function && e.index == index)
                .map(|e| {
                    let regs = [e.eax, e.ebx, e.ecx, e.edx];
                    std::array::from_fn(|i| regs[i] & mask[i])
                })
        })
        .collect()
}

/// The number of APIC ID bits needed to number `count` cores (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`, adding
/// what `extras` allows and a brand string when KVM passes none on.
pub fn shape(entries: &mut Vec<kvm_cpuid_entry2>, index: u8, count: u8, extras: Extras) {
    let (apic_id, count) = (u32::from(index), u32::from(count));
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_LINE_8_BYTE_UNITS << 8);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if extras.tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache -
                // 1; the last-level cache (level 3) is shared by every core.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                entry.edx = apic_id;
                (entry.eax, entry.ebx, entry.ecx) = match entry.index {
                    0 => (0, 1, (LEVEL_TYPE_SMT << 8)),
                    1 => (id_bits(count), count, (LEVEL_TYPE_CORE << 8) | 1),
                    i => (0, 0, i),
                };
            }
            0x8000_0008 => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID bits that number the cores.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            0x8000_001e => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff; // core id; threads per core - 1 = 0
                entry.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
    offer_brand_string(entries);
}

/// Fills leaves 0x8000_0002..4 with [`BRAND`] when they are absent or all zero, provided the
/// extended range reaches them (0x8000_0000 EAX); a brand string KVM passes on is kept.
fn offer_brand_string(entries: &mut Vec<kvm_cpuid_entry2>) {
    let reaches_brand = entries
        .iter()
        .any(|e| e.function == 0x8000_0000 && e.eax >= BRAND_LEAF + 2);
    let brand_leaves = |e: &&kvm_cpuid_entry2| (BRAND_LEAF..BRAND_LEAF + 3).contains(&e.function);
    let has_brand = entries
        .iter()
        .filter(brand_leaves)
        .any(|e| e.eax | e.ebx | e.ecx | e.edx != 0);
    if !reaches_brand || has_brand {
        return;
    }
    entries.retain(|e| !brand_leaves(&e));
    let mut bytes = [0u8; 48];
    bytes[..BRAND.len()].copy_from_slice(BRAND.as_bytes());
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4-byte chunk")))
        .collect();
    for (function, regs) in (BRAND_LEAF..).zip(words.chunks_exact(4)) {
        entries.push(kvm_cpuid_entry2 {
            function,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn shaped(index: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
        shaped_with(index, count, Extras::default())
    }

    #[test]
    fn features_differ_in_a_flag_but_not_in_the_cpu_that_read_them() {
        let with = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            eax,
            ebx,
            ecx,
            edx,
            ..entry(function, index)
        };
        let a = vec![
            with(0x1, 0, 0xa20f10, 1 << 24 | 0x800, 0x7ed8_320b, 0x178b_fbff),
            with(0x7, 0, 0, 0x219c_91a9, 0x0040_069c, 0x10),
            with(0xb, 0, 1, 2, 0x100, 1),
            with(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
        ];
        let mut reordered = a.clone();
        reordered.reverse();
        assert!(same_features(&a, &reordered));
        // Read on another physical CPU: another APIC ID in leaf 1 and in 0xb.
        let mut elsewhere = a.clone();
        for e in elsewhere.iter_mut() {
            match e.function {
                0x1 => e.ebx |= 3 << 24,
                0xb => e.edx = 3,
                _ => {}
            }
        }
        assert!(same_features(&a, &elsewhere));
        let mut fewer = a.clone();
        for e in fewer
            .iter_mut()
            .filter(|e| e.function == 0x7 && e.index == 0)
        {
            e.ebx &= !(1 << 5);
        }
        assert!(!same_features(&a, &fewer), "AVX2 gone");
        let mut no_leaf = a.clone();
        no_leaf.retain(|e| e.function != 0x8000_0001);
        assert!(!same_features(&a, &no_leaf));
    }

    fn shaped_with(index: u8, count: u8, extras: Extras) -> Vec<kvm_cpuid_entry2> {
        let mut leaf4_l3 = entry(0x4, 3);
        leaf4_l3.eax = 3 << 5 | 0x3; // level 3, unified cache
        let mut leaf1 = entry(0x1, 0);
        leaf1.edx = LEAF1_EDX_HTT | 1;
        let mut entries = vec![
            entry(0x0, 0),
            leaf1,
            leaf4_l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        shape(&mut entries, index, count, extras);
        entries
    }

    /// The brand string the guest would read from leaves 0x8000_0002..4.
    fn brand(entries: &[kvm_cpuid_entry2]) -> String {
        let bytes: Vec<u8> = (BRAND_LEAF..BRAND_LEAF + 3)
            .flat_map(|f| {
                let e = find(entries, f, 0);
                [e.eax, e.ebx, e.ecx, e.edx]
            })
            .flat_map(u32::to_le_bytes)
            .collect();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn tsc_deadline_is_offered_only_when_kvm_emulates_it() {
        let without = find(&shaped(0, 1), 0x1, 0);
        assert_eq!(without.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let with = find(&shaped_with(0, 1, Extras { tsc_deadline: true }), 0x1, 0);
        assert_ne!(with.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(with.ecx & LEAF1_ECX_HYPERVISOR, 0);
    }

    #[test]
    fn an_empty_brand_string_is_filled_in() {
        let mut max = entry(0x8000_0000, 0);
        max.eax = 0x8000_0008;
        // KVM reports the brand leaves, but empty; one is missing altogether.
        let mut entries = vec![max, entry(0x8000_0002, 0), entry(0x8000_0003, 0)];
        shape(&mut entries, 0, 1, Extras::default());
        let text = brand(&entries);
        assert_eq!(text.len(), 48);
        assert_eq!(text.trim_end_matches('\0'), BRAND);
        let count = |f| entries.iter().filter(|e| e.function == f).count();
        assert_eq!(
            [0x8000_0002, 0x8000_0003, 0x8000_0004].map(count),
            [1, 1, 1]
        );
    }

    #[test]
    fn the_host_brand_string_is_kept() {
        let mut max = entry(0x8000_0000, 0);
        max.eax = 0x8000_0004;
        let mut leaf2 = entry(0x8000_0002, 0);
        leaf2.eax = u32::from_le_bytes(*b"Host");
        let mut entries = vec![max, leaf2, entry(0x8000_0003, 0), entry(0x8000_0004, 0)];
        shape(&mut entries, 0, 1, Extras::default());
        assert_eq!(brand(&entries).trim_end_matches('\0'), "Host");
    }

    #[test]
    fn no_brand_string_beyond_the_extended_range() {
        let mut max = entry(0x8000_0000, 0);
        max.eax = 0x8000_0001;
        let mut entries = vec![max];
        shape(&mut entries, 0, 1, Extras::default());
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let e = find(&shaped(3, 4), 0x1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e.edx & 1, 1, "other feature bits are kept");
        let single = find(&shaped(0, 1), 0x1, 0);
        assert_eq!(single.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_numbers_cores() {
        let entries = shaped(2, 3);
        let smt = find(&entries, 0xb, 0);
        let core = find(&entries, 0xb, 1);
        let end = find(&entries, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        assert_eq!((end.ebx, end.ecx & 0xff00), (0, 0));
    }

    #[test]
    fn amd_leaves_agree_with_the_count() {
        let entries = shaped(1, 2);
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx, (1 << 12) | 1);
        assert_eq!(find(&entries, 0x8000_001e, 0).eax, 1);
        let l3 = find(&entries, 0x4, 3);
        assert_eq!(
            (l3.eax >> 26, (l3.eax >> 14) & 0xfff, l3.eax & 0x3fff),
            (1, 1, 3 << 5 | 3)
        );
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
