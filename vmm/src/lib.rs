//! kvmbuild: boot a Linux kernel straight into KVM.

pub mod layout;
