//! Initrd images for kvmbuild: a deterministic cpio writer, kernel-module closures and
//! kvmbuild's own init program. Nothing here touches KVM.
//!
//! - [`cpio`]: the newc writer (sorted entries, uid/gid 0, one mtime, same input → same bytes).
//! - [`compress`]: gzip/zstd for images; gzip/xz/zstd decompression for modules.
//! - [`modules`]: the closure of module names from `modules.dep`, `modules.softdep`,
//!   `modules.alias` and `modules.builtin`, in load order; [`DEFAULT_MODULES`].
//! - [`image`]: [`build_initrd`], which the CLI's `kvmbuild initrd` calls.
//! - [`config`]: the init's settings (`kvmbuild.*` on the kernel command line or in
//!   `/etc/kvmbuild/config`), parsed by the guest and rendered by the host.
//! - [`status`]: the exit statuses the init reports.
//! - [`guest`]: the init itself (binary `kvmbuild-init`).
//!
//! # The init
//!
//! `kvmbuild-init` is PID 1 of a kvmbuild guest, installed as `/init`. It writes 1 to the marker
//! port 0x6f0, mounts `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts` and `/dev/shm`, reads its
//! settings, loads the modules listed in `/etc/kvmbuild/modules` in order (`finit_module`;
//! compressed files the kernel cannot decompress are decompressed in memory and loaded with
//! `init_module`; "already loaded" is fine), mounts the virtio-fs shares and disks, writes 2,
//! runs the command with its arguments, environment and working directory while reaping
//! orphans, writes 3, flushes the disks (`syncfs` of each block-backed mount, `fsync` of each
//! block device; not the virtio-fs shares, whose writes are already on the host) and writes the
//! status byte to the exit port 0x6f1, which ends the VM. If the VM is still running after that, it calls `reboot(RB_POWER_OFF)`. Errors are
//! printed on the console (`kvmbuild-init: error: ...`) and reported with the statuses below;
//! nothing waits forever (a device that has not appeared is waited for at most 3 s).
//!
//! Settings (details in [`config`]):
//!
//! ```text
//! kvmbuild.cmd=ARG0,ARG1,...                      the command (required), percent-encoded args
//! kvmbuild.env=NAME=VALUE                         repeatable; PATH defaults to a standard one
//! kvmbuild.cwd=PATH                               default /
//! kvmbuild.fs=TAG:MOUNTPOINT[:OPTIONS]            virtio-fs, repeatable
//! kvmbuild.disk=DEVICE:MOUNTPOINT[:FSTYPE[:OPTIONS]]   block device, repeatable
//! kvmbuild.tty=PATH                               the command's stdin/stdout/stderr
//! kvmbuild.verbose=1                              print each step with a timestamp
//! ```
//!
//! Exit statuses (see [`status`]):
//!
//! | status | meaning |
//! |---|---|
//! | 0–255 | the command's exit status |
//! | 128+N | the command was killed by signal N |
//! | 119 | the init failed internally (fork, mounting `/proc`/`/sys`/`/dev`, a panic) |
//! | 120 | bad settings: unknown key, malformed value, no `kvmbuild.cmd`, unusable `kvmbuild.tty`, mount point `/` |
//! | 121 | a kernel module failed to load |
//! | 122 | a virtio-fs share or disk failed to mount |
//! | 123 | the working directory cannot be entered |
//! | 126 | the command cannot be executed |
//! | 127 | the command was not found (or its interpreter/dynamic loader is missing) |
//!
//! # Building the init
//!
//! It must be static, since the initrd holds no dynamic loader or libc. kvmbuild's `build.rs`
//! (cli/build.rs) builds it with `-C target-feature=+crt-static` and an explicit `--target`
//! (which keeps `crt-static` away from build scripts and proc macros, which must stay dynamic),
//! and kvmbuild embeds the result. By hand:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p kvmbuild-initrd \
//!     --bin kvmbuild-init --target x86_64-unknown-linux-gnu
//! ```
//!
//! [`build_initrd`] refuses an init that has an ELF interpreter.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod compress;
pub mod config;
pub mod cpio;
pub mod guest;
pub mod host_input;
pub mod image;
pub mod modules;
pub mod status;

pub use image::{build_initrd, init_from_env, Include, InitBinary, Initrd, InitrdSpec};
pub use modules::DEFAULT_MODULES;
