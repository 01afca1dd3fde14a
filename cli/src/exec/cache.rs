//! The initrd cache of `kvmbuild exec`: one image per kernel module tree and init, built on
//! first use and reused by every later run.
//!
//! The key is a SHA-256 over what the image is made of: the init's bytes (its hash is computed
//! once per kvmbuild build, or from the file given by `$KVMBUILD_INIT`), the module directory's
//! canonical path and the identity (device, inode, size, modification time; the path alone in
//! the Nix store) of its
//! `modules.dep`, `modules.alias`, `modules.softdep` and `modules.builtin`, which `depmod`
//! rewrites whenever the tree changes, and the list of modules. Images live in
//! `$XDG_CACHE_HOME/kvmbuild/initrd/KEY.cpio`, written to a temporary file and renamed into
//! place, so concurrent first runs each build and the last rename wins with identical bytes;
//! a reader never sees a partial image.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use initrd::{InitBinary, InitrdSpec};
use sha2::{Digest, Sha256};

/// Errors of the initrd cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Building the image failed.
    #[error("cannot build the initrd")]
    Build(#[from] initrd::image::Error),
    /// The image could not be stored.
    #[error("cannot write the initrd to {}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Files of a module tree whose identity stands for the whole tree.
const MODULE_INDEX_FILES: &[&str] = &[
    "modules.dep",
    "modules.alias",
    "modules.softdep",
    "modules.builtin",
];

/// Bumped when the image layout changes in a way the inputs do not show.
const FORMAT: &str = "kvmbuild exec initrd 1";

/// `$XDG_CACHE_HOME`, else `$HOME/.cache`, else `/tmp` (a user with no home still runs).
pub fn xdg_cache_home() -> PathBuf {
    let from = |var| std::env::var_os(var).filter(|v| !v.is_empty());
    from("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| from("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
}

/// `$XDG_CACHE_HOME/kvmbuild/initrd`.
pub fn initrd_dir() -> PathBuf {
    xdg_cache_home().join("kvmbuild/initrd")
}

/// An image in the cache.
#[derive(Debug)]
pub struct CachedInitrd {
    /// The image.
    pub path: PathBuf,
    /// Whether this run built it.
    pub built: bool,
    /// Why it could not be stored in the cache, when it was written to the fallback instead.
    pub not_cached: Option<CacheError>,
}

/// The cache key for an image of `modules` from `modules_dir` with the init `init`.
pub fn key(init: &InitBinary, modules_dir: Option<&Path>, modules: &[String]) -> String {
    let mut hash = Sha256::new();
    hash.update(FORMAT);
    hash.update(init_digest(init));
    if let Some(dir) = modules_dir {
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        hash.update(dir.as_os_str().as_encoded_bytes());
        hash.update([0]);
        for name in MODULE_INDEX_FILES {
            hash.update(identity(&dir.join(name)));
        }
    }
    for module in modules {
        hash.update(module.as_bytes());
        hash.update([0]);
    }
    hex(&hash.finalize())
}

fn init_digest(init: &InitBinary) -> Vec<u8> {
    match init {
        InitBinary::Embedded(_) => env!("KVMBUILD_EMBEDDED_INIT_SHA256").as_bytes().to_vec(),
        // Unreadable here means the build below reports it.
        other => match other.bytes() {
            Ok(bytes) => Sha256::digest(&bytes).to_vec(),
            Err(_) => Vec::new(),
        },
    }
}

/// A file's identity: device, inode, size and modification time (zeros when it is missing).
///
/// A file in the Nix store has none beyond its path (zeros here; callers hash the path): a
/// store path's content never changes once it exists, while Nix resets modification times
/// when it registers a build's output. So an initrd and a snapshot made inside a derivation
/// (nix/lib's warm image) key the same when later builds use them from the store.
pub fn identity(path: &Path) -> [u8; 32] {
    identity_with_store(path, &nix_store())
}

fn identity_with_store(path: &Path, store: &Path) -> [u8; 32] {
    let mut out = [0u8; 32];
    if inside(path, store) {
        return out;
    }
    if let Ok(m) = std::fs::metadata(path) {
        let fields = [
            m.dev(),
            m.ino(),
            m.size(),
            (m.mtime() as u64) ^ ((m.mtime_nsec() as u64) << 34),
        ];
        for (chunk, value) in out.chunks_mut(8).zip(fields) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }
    out
}

/// The Nix store: `$NIX_STORE` (which Nix sets for builders), else `/nix/store`.
fn nix_store() -> PathBuf {
    std::env::var_os("NIX_STORE")
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from("/nix/store"), PathBuf::from)
}

/// Whether `path`, resolved, lies inside the directory `dir`.
fn inside(path: &Path, dir: &Path) -> bool {
    let resolved = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    resolved.starts_with(dir) && resolved != dir
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The image for `spec` from the cache in `dir`, building and storing it when it is missing.
/// When the cache cannot be written (no home directory, a read-only one), the image goes into
/// `fallback_dir` for this run only.
pub fn get_or_build(
    dir: &Path,
    spec: &InitrdSpec,
    fallback_dir: &Path,
) -> Result<CachedInitrd, CacheError> {
    let key = key(&spec.init, spec.modules_dir.as_deref(), &spec.modules);
    let path = dir.join(format!("{key}.cpio"));
    if path.is_file() {
        return Ok(CachedInitrd {
            path,
            built: false,
            not_cached: None,
        });
    }
    let built = initrd::build_initrd(spec)?;
    let not_cached = store(dir, &path, &built.image).err();
    let path = match not_cached {
        None => path,
        Some(_) => {
            let path = fallback_dir.join("initrd.cpio");
            store(fallback_dir, &path, &built.image)?;
            path
        }
    };
    Ok(CachedInitrd {
        path,
        built: true,
        not_cached,
    })
}

/// Writes `image` to a temporary file in `dir` and renames it to `path`.
fn store(dir: &Path, path: &Path, image: &[u8]) -> Result<(), CacheError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CacheError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err(dir))?;
    tmp.write_all(image).map_err(write_err(tmp.path()))?;
    tmp.persist(path).map_err(|e| CacheError::Write {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("lib/modules/6.1.0-t");
        std::fs::create_dir_all(tree.join("kernel")).unwrap();
        std::fs::write(tree.join("kernel/a.ko"), b"\x7fELF module a").unwrap();
        std::fs::write(tree.join("modules.dep"), "kernel/a.ko:\n").unwrap();
        dir
    }

    #[test]
    fn a_store_path_is_identified_by_its_path_alone() {
        let store = tempfile::tempdir().unwrap();
        let file = store.path().join("abc-kernel");
        std::fs::write(&file, b"kernel").unwrap();
        assert_eq!(identity_with_store(&file, store.path()), [0; 32]);
        let elsewhere = tempfile::tempdir().unwrap();
        assert_ne!(identity_with_store(&file, elsewhere.path()), [0; 32]);
        // Through a link from outside the store, too (a `result` link).
        let link = elsewhere.path().join("result");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(identity_with_store(&link, store.path()), [0; 32]);
    }

    #[test]
    fn key_follows_init_modules_and_tree() {
        let dir = module_tree();
        let tree = dir.path().join("lib/modules/6.1.0-t");
        let init = InitBinary::Embedded(b"init one");
        let mods = vec!["a".to_string()];
        let k = key(&init, Some(&tree), &mods);
        assert_eq!(k, key(&init, Some(&tree), &mods), "stable");
        assert_eq!(k.len(), 64);
        let other_init = dir.path().join("init2");
        std::fs::write(&other_init, b"init two").unwrap();
        assert_ne!(k, key(&InitBinary::File(other_init), Some(&tree), &mods));
        assert_ne!(k, key(&init, Some(&tree), &[]));
        assert_ne!(k, key(&init, None, &mods));
        // depmod rewriting the index changes the key.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(tree.join("modules.dep"), "kernel/a.ko:\n\n").unwrap();
        assert_ne!(k, key(&init, Some(&tree), &mods));
    }

    #[test]
    fn second_lookup_reuses_the_image() {
        let cache = tempfile::tempdir().unwrap();
        let init = cache.path().join("init");
        // A minimal static ELF: magic, 64-bit, one PT_LOAD program header.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&init, &elf).unwrap();
        let spec = InitrdSpec::new(InitBinary::File(init), None);
        let dir = cache.path().join("initrd");
        let fallback = cache.path().join("run");
        let first = get_or_build(&dir, &spec, &fallback).unwrap();
        assert!(first.built && first.not_cached.is_none());
        let second = get_or_build(&dir, &spec, &fallback).unwrap();
        assert!(!second.built);
        assert_eq!(first.path, second.path);
        let entries = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(entries, 1, "no temporary files left");
        assert!(!fallback.exists());

        // A cache that cannot be made (a file where its directory should be) still gives an
        // image, for this run only.
        let blocked = cache.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let third = get_or_build(&blocked.join("initrd"), &spec, &fallback).unwrap();
        assert!(third.built && third.not_cached.is_some());
        assert_eq!(third.path, fallback.join("initrd.cpio"));
        let (a, b) = (std::fs::read(&third.path), std::fs::read(&first.path));
        assert_eq!(a.unwrap(), b.unwrap());
    }
}
