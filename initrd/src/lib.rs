//! Initrd images for kvmbuild: a deterministic cpio writer, kernel-module closures and
//! kvmbuild's own init program.
pub mod compress;
pub mod cpio;
pub mod modules;
