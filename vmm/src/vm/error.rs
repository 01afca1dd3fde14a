//! What stops a VM from being built or run, and the checks of its configuration.
//!
//! Errors name the configuration's fields ("memory size", "vCPU count", a disk's path), never
//! a front end's options: `kvmbuild run` says `--mem` where the QEMU entry point says `-m`, and
//! each front end adds its own name through [`VmError::field`].

use kvm_ioctls::Kvm;

use crate::acpi::AcpiError;
use crate::boot_params::BootParamsError;
use crate::device_manager::DeviceError;
use crate::kvm::KvmError;
use crate::loader::LoaderError;
use crate::memory::MemoryError;
use crate::pvh::PvhError;
use crate::vcpu::VcpuError;

/// The most vCPUs kvmbuild gives a guest: xAPIC IDs and the MADT's entries are 8 bits wide.
pub const MAX_VCPUS: u8 = 254;

/// Errors that stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM is missing or unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The kernel, initrd or command line cannot be used.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The memory size is out of range.
    #[error("{0} MiB of memory: {1}")]
    BadMemorySize(u64, String),
    /// The vCPU count is out of range.
    #[error("{0} vCPUs: {1}")]
    BadVcpuCount(u64, String),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A KVM VM-level ioctl failed.
    #[error("cannot {what}")]
    KvmIoctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be configured or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be created or placed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The zero page could not be built.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The PVH start info could not be written.
    #[error(transparent)]
    Pvh(#[from] PvhError),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the boot structures into guest memory: {0}")]
    BootStructures(vm_memory::GuestMemoryError),
    /// A snapshot could not be restored.
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The server of a restored VM's memory could not be started.
    #[error("cannot serve the snapshot's memory")]
    OnDemand(#[from] crate::snapshot::on_demand::OnDemandError),
    /// The thread that runs the VM could not be confined.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The run's own plumbing (its stop event, the exit channel) could not be set up.
    #[error("cannot create the {0}: {1}")]
    Setup(&'static str, std::io::Error),
}

/// The field of [`VmConfig`](super::VmConfig) an error is about, for a front end to name the
/// option that set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigField {
    /// `mem_mib`.
    Memory,
    /// `vcpus`.
    Vcpus,
    /// One of `disks`.
    Disk,
    /// One of `shares` (its back end).
    Share,
    /// `restore` (the snapshot's files).
    Snapshot,
}

impl VmError {
    /// Which configuration field is at fault, when an option set it: `None` for a host problem
    /// or a bug, and for a kernel or initrd (whose errors name the file).
    pub fn field(&self) -> Option<ConfigField> {
        use crate::device_manager::mmio::VirtioError;
        match self {
            VmError::BadMemorySize(..) => Some(ConfigField::Memory),
            VmError::BadVcpuCount(..) => Some(ConfigField::Vcpus),
            VmError::Device(DeviceError::Virtio(VirtioError::Disk { .. })) => {
                Some(ConfigField::Disk)
            }
            VmError::Device(DeviceError::Virtio(VirtioError::Share { .. })) => {
                Some(ConfigField::Share)
            }
            VmError::Snapshot(_) => Some(ConfigField::Snapshot),
            _ => None,
        }
    }
}

/// Checks the memory size before anything is allocated: at least enough for the boot
/// structures and a kernel, at most the host's RAM.
pub(super) fn check_memory_size(mem_mib: u64) -> Result<u64, VmError> {
    const MIN_MIB: u64 = 4;
    let bad = |why: String| VmError::BadMemorySize(mem_mib, why);
    if mem_mib < MIN_MIB {
        return Err(bad(format!("a guest needs at least {MIN_MIB} MiB")));
    }
    let host_mib = host_ram_bytes() >> 20;
    if mem_mib > host_mib {
        return Err(bad(format!("more than the host's {host_mib} MiB of RAM")));
    }
    Ok(mem_mib << 20)
}

fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let non_negative = |n: libc::c_long| u64::try_from(n).unwrap_or(0);
    non_negative(pages).saturating_mul(non_negative(page_size))
}

pub(super) fn check_vcpu_count(kvm: &Kvm, vcpus: u8) -> Result<(), VmError> {
    let bad = |why: String| VmError::BadVcpuCount(u64::from(vcpus), why);
    if vcpus == 0 {
        return Err(bad("a guest needs at least one vCPU".into()));
    }
    let limit = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS));
    if usize::from(vcpus) > limit {
        return Err(bad(format!("more than the {limit} vCPUs KVM allows here")));
    }
    Ok(())
}

/// Validates a requested vCPU count that may not fit a `u8`.
pub fn vcpu_count(requested: u64) -> Result<u8, VmError> {
    u8::try_from(requested)
        .ok()
        .filter(|&n| n <= MAX_VCPUS)
        .ok_or_else(|| {
            VmError::BadVcpuCount(
                requested,
                format!("kvmbuild supports at most {MAX_VCPUS} vCPUs"),
            )
        })
}
