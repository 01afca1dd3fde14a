//! `kvmbuild initrd`: an initrd with kvmbuild's static init, a kernel's modules and host files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use initrd::compress::Compression;
use initrd::{Include, InitBinary, InitrdSpec};
use vmm::host_file::{open_input, InputKind};

/// kvmbuild's static guest init, built by `build.rs` and carried inside kvmbuild itself.
pub const EMBEDDED_INIT: &[u8] = include_bytes!(env!("KVMBUILD_EMBEDDED_INIT"));

use crate::output::create_output;
use crate::{exit_code, fail};

pub const INITRD_HELP: &str = "\
Examples:
  kvmbuild initrd --modules-dir /lib/modules/$(uname -r) -o initrd.img
  kvmbuild initrd --modules-dir DIR --module ext4 --include /srv/tools:/tools --compress zstd -o initrd.img

The init runs the command named on the kernel command line (kvmbuild.cmd=/bin/prog,arg1,...),
reports its exit status on I/O port 0x6f1 and powers off; see the README for its settings.";

#[derive(Args)]
pub struct InitrdArgs {
    /// A kernel's module directory (`lib/modules/VERSION`, with modules.dep).
    #[arg(long, value_name = "DIR")]
    modules_dir: Option<PathBuf>,
    /// A module (or alias) to load at boot, with its dependencies; repeatable. Default:
    /// virtio_mmio, virtio_blk, virtio_console, virtio_rng and virtiofs.
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,
    /// A host file or directory to include, at GUEST_PATH or the same path; repeatable.
    #[arg(long, value_name = "HOST_PATH[:GUEST_PATH]")]
    include: Vec<Include>,
    /// How to compress the image.
    #[arg(long, value_name = "none|gzip|zstd", default_value = "none")]
    compress: Compression,
    /// The static init binary [default: $KVMBUILD_INIT, or the one built into kvmbuild].
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    /// Where to write the image.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
}

fn build(args: InitrdArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let init = match args.init.or_else(initrd::init_from_env) {
        Some(path) => InitBinary::File(path),
        None => InitBinary::Embedded(EMBEDDED_INIT),
    };
    if let InitBinary::File(path) = &init {
        // Checked the way every input is opened, so a FIFO is refused instead of read forever.
        open_input(path, InputKind::Regular, false)
            .with_context(|| format!("--init {}", path.display()))?;
    }
    let mut spec = InitrdSpec::new(init, args.modules_dir);
    if !args.modules.is_empty() {
        spec.modules = args.modules;
    }
    spec.includes = args.include;
    spec.compression = args.compress;
    let built = initrd::build_initrd(&spec)?;
    // Opened only now, so a failed build leaves an existing image alone; never an input.
    let mut inputs: Vec<&Path> = spec.includes.iter().map(|i| i.host.as_path()).collect();
    if let InitBinary::File(init) = &spec.init {
        inputs.push(init);
    }
    create_output(&args.output, &inputs, "-o")?
        .write_all(&built.image)
        .with_context(|| format!("-o {}: cannot write it", args.output.display()))?;
    eprintln!(
        "kvmbuild: wrote {} ({} bytes, {} modules{}) in {} ms",
        args.output.display(),
        built.image.len(),
        built.modules.len(),
        built
            .kernel_version
            .map(|v| format!(" for {v}"))
            .unwrap_or_default(),
        started.elapsed().as_millis()
    );
    Ok(())
}

pub fn initrd(args: InitrdArgs) -> ExitCode {
    match build(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code::BAD_INPUT, format!("{e:#}")),
    }
}
