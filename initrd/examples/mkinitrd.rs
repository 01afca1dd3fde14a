//! Builds an initrd the way `kvmbuild initrd` will, and reports what it did and how long it
//! took. For trying the library out and timing it:
//!
//! ```text
//! cargo run --release -p kvmbuild-initrd --example mkinitrd -- \
//!     --init target/x86_64-unknown-linux-gnu/release/kvmbuild-init \
//!     --modules-dir ~/.cache/kvmbuild/kernels/<pkg>/lib/modules/<version> \
//!     [--module NAME]... [--include HOST[:GUEST]]... [--compress none|gzip|zstd] \
//!     [--setting kvmbuild.cmd=...]... [--keep-compressed] [--prepend-settings] -o initrd.img
//! ```
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

use std::time::Instant;

use initrd::config::Config;
use initrd::{InitBinary, InitrdSpec};

fn main() {
    if let Err(e) = run() {
        eprintln!("mkinitrd: {e}");
        std::process::exit(64);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut spec = InitrdSpec::new(InitBinary::File("".into()), None);
    let mut modules = Vec::new();
    let mut settings = Vec::new();
    let mut output = None;
    // Put the settings in a separate cpio archive in front of the image instead of inside it.
    let mut prepend = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--init" => spec.init = InitBinary::File(value()?.into()),
            "--modules-dir" => spec.modules_dir = Some(value()?.into()),
            "--module" => modules.push(value()?),
            "--include" => spec.includes.push(value()?.parse()?),
            "--compress" => spec.compression = value()?.parse()?,
            "--setting" => settings.push(value()?),
            "--keep-compressed" => spec.decompress_modules = false,
            "--prepend-settings" => prepend = true,
            "-o" => output = Some(value()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if !modules.is_empty() {
        spec.modules = modules;
    }
    if !settings.is_empty() {
        let mut config = Config::default();
        config.apply_file(&settings.join("\n"))?;
        spec.config = Some(config);
    }
    let prefix = if prepend {
        spec.config.take().map(|c| c.archive())
    } else {
        None
    };
    let output = output.ok_or("-o FILE is required")?;
    let start = Instant::now();
    let mut built = initrd::build_initrd(&spec)?;
    built.image.splice(0..0, prefix.unwrap_or_default());
    std::fs::write(&output, &built.image)?;
    let elapsed = start.elapsed();
    let names: Vec<&str> = built.modules.iter().map(|m| m.name.as_str()).collect();
    eprintln!(
        "{output}: {} bytes, kernel {}, modules [{}], built in {:.1} ms",
        built.image.len(),
        built.kernel_version.as_deref().unwrap_or("-"),
        names.join(", "),
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}
