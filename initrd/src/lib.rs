//! Initrd images for kvmbuild: a deterministic cpio writer, kernel-module closures and
//! kvmbuild's own init program.
pub mod compress;
pub mod config;
pub mod cpio;
pub mod guest;
pub mod image;
pub mod modules;
pub mod status;

pub use image::{build_initrd, Include, Initrd, InitrdSpec};
pub use modules::DEFAULT_MODULES;
