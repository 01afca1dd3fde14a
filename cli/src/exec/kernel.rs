//! Which kernel `kvmbuild exec` boots, and where its modules are.
//!
//! In order: `--kernel`; `$KVMBUILD_KERNEL`; the host's own `/boot/vmlinuz-$(uname -r)` with
//! `/lib/modules/$(uname -r)`, when both are readable; else the newest kernel that
//! `scripts/guest-kernels` cached (`$XDG_CACHE_HOME/kvmbuild/kernels/*/boot/vmlinuz-*`, the cloud
//! flavour first among equals; its extracted ELF `vmlinux` when there is one, which boots
//! without decompressing). A kernel's modules are `--modules DIR` when given, else
//! `lib/modules/RELEASE` beside its `boot/` directory or under `/lib/modules`, where RELEASE is
//! read from the bzImage's header.

use std::cmp::Ordering;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use vmm::host_file::{open_input, InputKind};

/// Errors choosing a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No kernel was given and none was found.
    #[error("no kernel: give --kernel, set KVMBUILD_KERNEL, or fetch one with scripts/guest-kernels fetch cloud")]
    NoneFound,
    /// The chosen kernel cannot be read.
    #[error("{what} {}: cannot read it", path.display())]
    Unreadable {
        /// Where the path came from (`--kernel`, `$KVMBUILD_KERNEL`).
        what: &'static str,
        /// The kernel.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--modules` is not a module directory.
    #[error("--modules {}: not a kernel module directory (no modules.dep)", .0.display())]
    BadModules(PathBuf),
}

/// The kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    /// The bzImage or vmlinux.
    pub kernel: PathBuf,
    /// Its `lib/modules/RELEASE` directory, if it has one.
    pub modules: Option<PathBuf>,
    /// Why this one, for `-v`.
    pub why: String,
}

/// Chooses the kernel as the module documentation says.
pub fn choose(
    explicit: Option<&Path>,
    modules: Option<&Path>,
) -> Result<KernelChoice, KernelError> {
    let env_kernel = std::env::var_os("KVMBUILD_KERNEL").filter(|v| !v.is_empty());
    let (kernel, why) = if let Some(path) = explicit {
        check_readable("--kernel", path)?;
        (path.to_path_buf(), "given with --kernel".to_string())
    } else if let Some(path) = env_kernel {
        let path = PathBuf::from(path);
        check_readable("$KVMBUILD_KERNEL", &path)?;
        (path, "from $KVMBUILD_KERNEL".to_string())
    } else if let Some(found) = host_kernel() {
        return Ok(found);
    } else if let Some(found) = newest_cached_kernel(&cache_dir()) {
        return Ok(found);
    } else {
        return Err(KernelError::NoneFound);
    };
    let modules = match modules {
        Some(dir) if dir.join("modules.dep").is_file() => Some(dir.to_path_buf()),
        Some(dir) => return Err(KernelError::BadModules(dir.to_path_buf())),
        None => modules_for(&kernel),
    };
    Ok(KernelChoice {
        kernel,
        modules,
        why,
    })
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), KernelError> {
    open_input(path, InputKind::Regular, false)
        .map(drop)
        .map_err(|source| KernelError::Unreadable {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// The running kernel's image and modules, when this host keeps them readable.
fn host_kernel() -> Option<KernelChoice> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim();
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    let modules = PathBuf::from(format!("/lib/modules/{release}"));
    let readable = File::open(&kernel).is_ok() && modules.join("modules.dep").is_file();
    readable.then(|| KernelChoice {
        kernel,
        modules: Some(modules),
        why: format!("the host's own kernel ({release})"),
    })
}

/// `$XDG_CACHE_HOME/kvmbuild/kernels`, where `scripts/guest-kernels` keeps Debian's kernels.
pub fn cache_dir() -> PathBuf {
    super::cache::xdg_cache_home().join("kvmbuild/kernels")
}

/// The newest cached kernel: each `DIR/*/boot/vmlinuz-RELEASE` with its
/// `lib/modules/RELEASE/modules.dep`, by release; the cloud flavour wins a tie.
pub fn newest_cached_kernel(dir: &Path) -> Option<KernelChoice> {
    let mut found: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(boot) = std::fs::read_dir(entry.path().join("boot")) else {
            continue;
        };
        for image in boot.flatten() {
            let name = image.file_name().to_string_lossy().into_owned();
            let Some(release) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            let modules = entry.path().join("lib/modules").join(release);
            if modules.join("modules.dep").is_file() {
                // The ELF kernel the script extracts boots through PVH, without the bzImage's
                // decompression (seconds when nested).
                let vmlinux = entry.path().join("vmlinux");
                let kernel = if vmlinux.is_file() {
                    vmlinux
                } else {
                    image.path()
                };
                found.push((release.to_string(), kernel, modules));
            }
        }
    }
    found.sort_by(|a, b| compare_releases(&a.0, &b.0));
    let (release, kernel, modules) = found.pop()?;
    Some(KernelChoice {
        kernel,
        modules: Some(modules),
        why: format!(
            "the newest kernel in {} ({release}); the host's own is not readable",
            dir.display()
        ),
    })
}

/// Orders kernel releases by their numbers (6.1.0-9 before 6.1.0-10), and a cloud kernel after
/// (so above) another flavour of the same numbers.
pub fn compare_releases(a: &str, b: &str) -> Ordering {
    let numbers = |r: &str| -> Vec<u64> {
        r.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    numbers(a)
        .cmp(&numbers(b))
        .then_with(|| a.contains("cloud").cmp(&b.contains("cloud")))
        .then_with(|| a.cmp(b))
}

/// The module directory for a kernel image: `../lib/modules/RELEASE` beside its directory (the
/// layout of an unpacked package and of the guest-kernel cache), else `/lib/modules/RELEASE`.
pub fn modules_for(kernel: &Path) -> Option<PathBuf> {
    let release = bzimage_release(kernel)?;
    let beside = kernel
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("lib/modules").join(&release));
    beside
        .into_iter()
        .chain(std::iter::once(Path::new("/lib/modules").join(&release)))
        .find(|dir| dir.join("modules.dep").is_file())
}

/// The kernel release a bzImage names in its setup header (`kernel_version`, boot protocol
/// 2.00+): the first word of the version string.
pub fn bzimage_release(kernel: &Path) -> Option<String> {
    let mut head = vec![0u8; 0x8000];
    let mut file = File::open(kernel).ok()?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => return None,
        }
    }
    release_from_header(&head[..filled])
}

/// [`bzimage_release`] on the image's first bytes.
pub fn release_from_header(head: &[u8]) -> Option<String> {
    const HDRS_MAGIC: &[u8] = b"HdrS";
    if head.get(0x202..0x206)? != HDRS_MAGIC {
        return None;
    }
    let pointer = u16::from_le_bytes(head.get(0x20e..0x210)?.try_into().ok()?);
    let start = 0x200 + usize::from(pointer);
    let text = head.get(start..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    let release = std::str::from_utf8(&text[..end]).ok()?;
    (!release.is_empty()).then(|| release.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: &str) -> Vec<u8> {
        let mut head = vec![0u8; 0x1000];
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head[0x20e..0x210].copy_from_slice(&0x600u16.to_le_bytes());
        head[0x800..0x800 + version.len()].copy_from_slice(version.as_bytes());
        head
    }

    #[test]
    fn release_comes_from_the_setup_header() {
        let head = header("6.1.0-41-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP");
        assert_eq!(
            release_from_header(&head).as_deref(),
            Some("6.1.0-41-cloud-amd64")
        );
        assert_eq!(release_from_header(&vec![0u8; 0x1000]), None);
        assert_eq!(release_from_header(&head[..0x300]), None);
    }

    #[test]
    fn releases_order_by_number_then_cloud() {
        let mut r = vec![
            "6.1.0-10-amd64",
            "6.1.0-9-cloud-amd64",
            "6.1.0-10-cloud-amd64",
            "5.10.0-30-amd64",
        ];
        r.sort_by(|a, b| compare_releases(a, b));
        assert_eq!(
            r,
            [
                "5.10.0-30-amd64",
                "6.1.0-9-cloud-amd64",
                "6.1.0-10-amd64",
                "6.1.0-10-cloud-amd64"
            ]
        );
    }

    #[test]
    fn newest_cached_kernel_needs_its_modules() {
        let dir = tempfile::tempdir().unwrap();
        let add = |pkg: &str, release: &str, modules: bool| {
            let root = dir.path().join(pkg);
            std::fs::create_dir_all(root.join("boot")).unwrap();
            std::fs::write(
                root.join(format!("boot/vmlinuz-{release}")),
                header(release),
            )
            .unwrap();
            if modules {
                let m = root.join("lib/modules").join(release);
                std::fs::create_dir_all(&m).unwrap();
                std::fs::write(m.join("modules.dep"), "").unwrap();
            }
        };
        add("a", "6.1.0-9-cloud-amd64", true);
        add("b", "6.1.0-12-cloud-amd64", false);
        add("c", "6.1.0-10-amd64", true);
        let found = newest_cached_kernel(dir.path()).unwrap();
        assert!(found.kernel.ends_with("c/boot/vmlinuz-6.1.0-10-amd64"));
        let bzimage = found.kernel.clone();
        assert!(found
            .modules
            .unwrap()
            .ends_with("c/lib/modules/6.1.0-10-amd64"));
        assert_eq!(
            modules_for(&found.kernel).unwrap(),
            dir.path().join("c/lib/modules/6.1.0-10-amd64")
        );
        assert!(newest_cached_kernel(&dir.path().join("none")).is_none());
        assert_eq!(modules_for(&bzimage), found_modules(&dir));
        std::fs::write(dir.path().join("c/vmlinux"), b"\x7fELF").unwrap();
        let found = newest_cached_kernel(dir.path()).unwrap();
        assert_eq!(
            found.kernel,
            dir.path().join("c/vmlinux"),
            "the ELF kernel is preferred"
        );
    }

    fn found_modules(dir: &tempfile::TempDir) -> Option<PathBuf> {
        Some(dir.path().join("c/lib/modules/6.1.0-10-amd64"))
    }
}
