//! Building kvmbuild's initrd for the default module set (what `kvmbuild exec` does on a cache
//! miss): module closure, reading the modules, cpio, uncompressed and zstd.
//!
//! `cargo bench -p kvmbuild-initrd --bench build`. The modules come from
//! `$KVMBUILD_BENCH_MODULES`, else `/lib/modules/$(uname -r)`, else the newest kernel
//! `scripts/guest-kernels` cached; the init is `$KVMBUILD_BENCH_INIT` or /bin/busybox (any
//! static binary will do). Without them the bench says so and measures nothing.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use initrd::compress::Compression;
use initrd::{build_initrd, InitBinary, InitrdSpec};

fn modules_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KVMBUILD_BENCH_MODULES") {
        return Some(dir.into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let host = PathBuf::from("/lib/modules").join(release.trim());
    if host.join("modules.dep").is_file() {
        return Some(host);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
        .join("kvmbuild/kernels");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .flat_map(|kernel| std::fs::read_dir(kernel.path().join("lib/modules")).into_iter())
        .flatten()
        .flatten()
        .map(|release| release.path())
        .filter(|dir| dir.join("modules.dep").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn build(c: &mut Criterion) {
    let init = std::env::var_os("KVMBUILD_BENCH_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/bin/busybox".into());
    let (Some(modules), true) = (modules_dir(), init.is_file()) else {
        eprintln!("skipped: no kernel modules or no init binary (see this bench's doc comment)");
        return;
    };
    eprintln!(
        "modules from {}, init {}",
        modules.display(),
        init.display()
    );
    let spec = InitrdSpec::new(InitBinary::File(init), Some(modules));
    let size = build_initrd(&spec)
        .expect("the default module set builds")
        .image
        .len();
    eprintln!("uncompressed image: {size} bytes");
    let mut group = c.benchmark_group("initrd_default_modules");
    group.sample_size(20);
    group.bench_function("uncompressed", |b| {
        b.iter(|| build_initrd(&spec).unwrap().image.len())
    });
    let zstd = InitrdSpec {
        compression: Compression::Zstd,
        ..spec.clone()
    };
    group.bench_function("zstd", |b| {
        b.iter(|| build_initrd(&zstd).unwrap().image.len())
    });
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
