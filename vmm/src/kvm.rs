//! Opening KVM, and saying clearly why it cannot be used.
//!
//! kvmbuild has no software-emulation fallback: a missing or unusable /dev/kvm is a distinct,
//! explained failure, never a slow run.

use std::os::fd::FromRawFd;
use std::path::Path;

use kvm_ioctls::Kvm;

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Present when the host's KVM is PVM (see DESIGN.md §6).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";
/// Where KVM lives.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("KVM is not available: {KVM_DEVICE}: {0}. kvmbuild needs hardware virtualisation and has no software-emulation fallback")]
    Open(std::io::Error),
    /// /dev/kvm is something else.
    #[error("KVM is not available: {KVM_DEVICE} is not a KVM device ({0}). kvmbuild needs hardware virtualisation and has no software-emulation fallback")]
    NotKvm(String),
}

/// Opens /dev/kvm and checks that it speaks the KVM API.
pub fn open() -> Result<Kvm, KvmError> {
    let fd = Kvm::open_with_cloexec(true)
        .map_err(|e| KvmError::Open(std::io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: `fd` was just opened by us and is owned by nobody else.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    // A device that is not KVM (say /dev/null bound over /dev/kvm) fails this ioctl.
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        v if v < 0 => Err(KvmError::NotKvm(
            std::io::Error::last_os_error().to_string(),
        )),
        v => Err(KvmError::NotKvm(format!(
            "API version {v}, expected {KVM_API_VERSION}"
        ))),
    }
}

/// True when the host's KVM is PVM, which interprets an ordinary kernel's ring-0 code and
/// cannot run stock Linux guests (only PVM-aware kernels and purpose-built guests).
pub fn is_pvm_host() -> bool {
    Path::new(PVM_MODULE).exists()
}

/// The warning printed on a PVM host.
pub const PVM_WARNING: &str = "the host's KVM is PVM (kvm_pvm is loaded): it interprets guest \
kernel code and cannot run ordinary Linux kernels; only PVM-aware or purpose-built guests will boot";
