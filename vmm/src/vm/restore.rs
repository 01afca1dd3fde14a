//! Starting a VM from a snapshot instead of a kernel: its memory (served on demand or copied,
//! and checked), its vCPUs and its own state, on a host that offers the saved processor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::exit::VmExit;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::{kvm_err, VmError};
use crate::cpuid;
use crate::memory::Backing;
use crate::snapshot::check::{HeldInput, MemoryCheck, ToCheck};
use crate::snapshot::on_demand::{self, OnDemand};
use crate::snapshot::{memory, SavedState, Snapshot, SnapshotError};

/// What restoring guest memory from a snapshot took, for `-v` and benchmarks.
#[derive(Clone, Debug)]
pub struct Restored {
    /// Bytes of the snapshot's memory file with content (the pages the guest had touched):
    /// what the check reads.
    pub bytes: u64,
    /// Making the memory ready for the guest: checking it first (unless it is checked beside
    /// the guest) and copying it (when it is copied).
    pub took: Duration,
    /// How the pages reach guest memory.
    pub fill: Fill,
}

/// How a restored VM's memory is filled from its snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Each page as the guest first touches it ([`on_demand`]), after `ahead` pages of the
    /// snapshot's hot list placed ahead of it. With `beside`, the memory file is checked
    /// while the guest runs, and the run's input is held until it passed
    /// ([`crate::snapshot::check`]); else it was checked before the guest resumed.
    OnDemand { ahead: usize, beside: bool },
    /// All at once before the guest resumed, for the reason `why`. With `beside`, the memory
    /// file is checked while the guest runs, as for [`Fill::OnDemand`]; else it was checked
    /// before the guest resumed.
    Copied { why: String, beside: bool },
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "restored {} MiB of guest memory in {} ms",
            self.bytes >> 20,
            self.took.as_millis()
        )?;
        match &self.fill {
            Fill::OnDemand { ahead, beside } => {
                let checked = if *beside {
                    "checked beside the guest"
                } else {
                    "checked"
                };
                write!(f, " ({checked}; pages served as the guest touches them")?;
                match ahead {
                    0 => write!(f, ")"),
                    n => write!(f, ", {n} hot pages ahead of it)"),
                }
            }
            Fill::Copied { why, beside } => {
                write!(f, " (copied: {why}")?;
                match beside {
                    true => write!(f, "; checked beside the guest)"),
                    false => write!(f, ")"),
                }
            }
        }
    }
}

/// A restored VM's memory, ready for the guest, and the threads that keep it so.
pub struct RestoredMemory {
    /// What it took.
    pub restored: Restored,
    /// The server of the pages, when they are served on demand.
    pub on_demand: Option<OnDemand>,
    /// The check of the memory file, or only the release of the held input, when there is
    /// held input.
    pub check: Option<MemoryCheck>,
}

/// Arranges for fresh guest memory to hold a snapshot's: served as the guest touches it where
/// userfaultfd allows, read in now for hugetlb memory, else copied now. The memory file is
/// checked before the guest resumes, or, when the owner holds back the run's input (`held`)
/// and the pages are served or read in, beside the guest, with the input released only once
/// it passed.
pub fn restore_memory(
    mem: &GuestMemoryMmap,
    snapshot: &Snapshot,
    backing: &Backing,
    held: Option<HeldInput>,
    exit: &Arc<VmExit>,
) -> Result<RestoredMemory, VmError> {
    let started = Instant::now();
    let registered = match backing {
        // UFFDIO_COPY into hugetlb memory goes by whole 2 MiB pages: reading it all in now
        // is as good.
        Backing::Hugetlb => return read_into_huge_pages(mem, snapshot, held, exit, started),
        Backing::ShmemThp | Backing::SmallPages => on_demand::Registered::new(mem),
    };
    let registered = match registered {
        Ok(registered) => registered,
        Err(e) => return copy_memory(mem, snapshot, e.to_string(), held, exit, started),
    };
    let content = memory::content(mem, &snapshot.memory)?;
    let bytes = content.iter().map(|(start, end)| end - start).sum();
    let check = check_memory(snapshot, &content, held, exit)?;
    let on_demand = registered.serve(&snapshot.memory, content, snapshot.hot.clone(), exit)?;
    let restored = Restored {
        bytes,
        took: started.elapsed(),
        fill: Fill::OnDemand {
            ahead: snapshot.hot.len(),
            beside: check.is_some(),
        },
    };
    Ok(RestoredMemory {
        restored,
        on_demand: Some(on_demand),
        check,
    })
}

/// Checks the snapshot's memory file, whose data is `content`: beside the guest when the
/// owner holds back the run's input (the returned check releases it once the file passed),
/// else now, before the guest resumes.
fn check_memory(
    snapshot: &Snapshot,
    content: &[(u64, u64)],
    held: Option<HeldInput>,
    exit: &Arc<VmExit>,
) -> Result<Option<MemoryCheck>, VmError> {
    let Some(held) = held else {
        let source = memory::MappedFile::map(&snapshot.memory)
            .map_err(|e| SnapshotError::Io("map the memory file", e))?;
        let checked = memory::check(content, &source, &|| true)?.unwrap_or_default();
        matches_saved(checked.crc, snapshot)?;
        return Ok(None);
    };
    let to_check = ToCheck {
        file: snapshot
            .memory
            .try_clone()
            .map_err(|e| SnapshotError::Io("open the memory file", e))?,
        content: content.to_vec(),
        crc: snapshot.state.memory_crc,
    };
    Ok(Some(MemoryCheck::start(Some(to_check), held, exit)?))
}

/// Reads a snapshot's memory into hugetlb guest memory now, straight from the file into the
/// mapping ([`memory::read_in`]: hugetlb files refuse `write(2)`), and checks it as a served
/// restore's memory is checked.
fn read_into_huge_pages(
    mem: &GuestMemoryMmap,
    snapshot: &Snapshot,
    held: Option<HeldInput>,
    exit: &Arc<VmExit>,
    started: Instant,
) -> Result<RestoredMemory, VmError> {
    let content = memory::content(mem, &snapshot.memory)?;
    let bytes = memory::read_in(mem, &snapshot.memory, &content)?;
    let check = check_memory(snapshot, &content, held, exit)?;
    let restored = Restored {
        bytes,
        took: started.elapsed(),
        fill: Fill::Copied {
            why: "guest memory is on hugetlb pages".to_owned(),
            beside: check.is_some(),
        },
    };
    Ok(RestoredMemory {
        restored,
        on_demand: None,
        check,
    })
}

/// Copies a snapshot's memory into guest memory now (where it cannot be served on demand,
/// for the reason `why`), checking it on the way; held input is then released at once.
fn copy_memory(
    mem: &GuestMemoryMmap,
    snapshot: &Snapshot,
    why: String,
    held: Option<HeldInput>,
    exit: &Arc<VmExit>,
    started: Instant,
) -> Result<RestoredMemory, VmError> {
    let checked = memory::restore(mem, &snapshot.memory)?;
    matches_saved(checked.crc, snapshot)?;
    let check = held
        .map(|held| MemoryCheck::start(None, held, exit))
        .transpose()?;
    let restored = Restored {
        bytes: checked.bytes,
        took: started.elapsed(),
        fill: Fill::Copied { why, beside: false },
    };
    Ok(RestoredMemory {
        restored,
        on_demand: None,
        check,
    })
}

fn matches_saved(crc: u32, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    match crc == snapshot.state.memory_crc {
        true => Ok(()),
        false => Err(SnapshotError::Corrupt("the memory file's checksum")),
    }
}

/// Restores the VM's interrupt controllers, creates each vCPU and restores its state, then
/// restores the clock: created first, the vCPUs leave only their own state's writes between
/// each TSC and the clock (see [`crate::snapshot::VmState::restore_clock`]).
pub fn restore_vcpus(vm: &VmFd, state: &SavedState) -> Result<Vec<VcpuFd>, VmError> {
    state.vm.restore_chips(vm)?;
    let fds = (0u64..)
        .take(state.vcpus.len())
        .map(|index| vm.create_vcpu(index).map_err(kvm_err("create a vCPU")))
        .collect::<Result<Vec<_>, _>>()?;
    for (fd, saved) in fds.iter().zip(&state.vcpus) {
        saved.restore(fd)?;
    }
    state.vm.restore_clock(vm)?;
    Ok(fds)
}

/// The saved CPUID is restored as it was, so that the guest goes on seeing the processor it
/// booted on; that is only safe on a host that offers the same. A snapshot kept in a cache
/// outlives host kernel updates and may be copied to another machine: what this host's KVM
/// offers must be what the saving host's did.
pub fn check_host_cpu(kvm: &Kvm, state: &SavedState) -> Result<(), SnapshotError> {
    if cpuid::same_features(supported_cpuid(kvm)?.as_slice(), &state.host_cpuid) {
        Ok(())
    } else {
        Err(SnapshotError::OtherHostCpu)
    }
}

pub fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, SnapshotError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| SnapshotError::Kvm {
            what: "read the supported CPUID",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_on(host_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>) -> SavedState {
        SavedState {
            key: "k".into(),
            mem_size: 64 << 20,
            vcpus: Vec::new(),
            vm: crate::snapshot::VmState {
                irqchips: Vec::new(),
                clock: Default::default(),
                pit: None,
            },
            serial: devices::serial::SerialState::default(),
            virtio: Vec::new(),
            memory_crc: 0,
            host_cpuid,
        }
    }

    #[test]
    fn a_snapshot_from_a_host_that_offers_another_cpu_is_refused() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm; not tested");
            return;
        };
        let offered = supported_cpuid(&kvm).unwrap().as_slice().to_vec();
        assert!(check_host_cpu(&kvm, &saved_on(offered.clone())).is_ok());
        let mut other = offered;
        other[0].ecx ^= 1 << 5;
        assert!(matches!(
            check_host_cpu(&kvm, &saved_on(other)),
            Err(SnapshotError::OtherHostCpu)
        ));
        assert!(matches!(
            check_host_cpu(&kvm, &saved_on(Vec::new())),
            Err(SnapshotError::OtherHostCpu)
        ));
    }
}
