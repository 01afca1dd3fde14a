//! Emulated devices for kvmbuild.
//!
//! Nothing here touches KVM: devices see reads and writes on a [`bus::Bus`], raise interrupts
//! through `EventFd`s that the VMM registers as irqfds, and end the VM through [`exit::VmExit`].
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod acpi_pm;
pub mod bus;
pub mod exit;
pub mod exit_port;
pub mod host_file;
pub mod i8042;
pub mod serial;
pub mod thread_kind;
pub mod virtio;
