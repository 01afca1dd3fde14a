//! kvmbuild's virtual machine monitor: a KVM VM, guest memory, vCPUs and the boot path that
//! takes a Linux kernel from a file to its first instruction, and the VM to a clean exit.
//!
//! The boot sequence reads top to bottom in [`vm::Vm::build`].
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod device_manager;
pub mod firmware;
pub mod kvm;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod pvh;
pub mod release;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

/// The guest ABI kvmbuild's init and test guests share with the VMM.
pub use abi;
/// Why a VM ended, shared with the devices that end it.
pub use devices::exit;
/// Opening the host files a VM reads and writes, the one way every front end does it.
pub use devices::host_file;
