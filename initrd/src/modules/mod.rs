//! The closure of a set of kernel modules and the order to load it in.
//!
//! A [`ModuleTree`] reads the index files that `depmod` writes into `lib/modules/VERSION`:
//!
//! - `modules.dep`: `kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko` — every
//!   module (paths relative to the directory) and all of its hard dependencies, transitively,
//!   listed so that loading them last-to-first works;
//! - `modules.softdep`: `softdep ext4 pre: crypto-crc32c` — modules (or aliases) to load before
//!   (`pre:`) or after (`post:`) a module although no symbol links them;
//! - `modules.alias`: `alias fs-ext4 ext4` — alternative names, possibly `fnmatch` patterns;
//! - `modules.builtin` (and the aliases in `modules.builtin.modinfo`): what the kernel has built
//!   in and so never needs loading.
//!
//! Names are compared as the kernel does, with `-` and `_` the same. A name is looked up as
//! `modprobe` does: a module of that name, else every module an alias matches, else a built-in.
//! The load order puts dependencies first and lists each module once; it depends only on the
//! tree and the order of the roots.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

/// Errors reading a module tree or resolving modules in it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An index file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line of `modules.dep` has no `:`.
    #[error("{path}:{line}: malformed modules.dep line")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// One-based line number.
        line: usize,
    },
    /// A `modules.dep` entry names a file outside the modules directory (absolute, or with
    /// `..`): it would copy a host file into the initrd.
    #[error("{path}:{line}: module path {entry:?} is outside the modules directory")]
    OutsideTree {
        /// The file.
        path: PathBuf,
        /// One-based line number.
        line: usize,
        /// The module path as written.
        entry: String,
    },
    /// The name is neither a module, an alias nor built in.
    #[error("module {module:?} not found for kernel {version}")]
    NotFound {
        /// The name that was asked for.
        module: String,
        /// The kernel version, the name of the modules directory.
        version: String,
    },
    /// `modules.dep` names a dependency that it does not list as a module.
    #[error("module {module:?} depends on {dependency}, which modules.dep does not list (kernel {version})")]
    MissingDependency {
        /// The module with the dangling dependency.
        module: String,
        /// The dependency's path.
        dependency: String,
        /// The kernel version.
        version: String,
    },
}

/// The names of the modules kvmbuild's devices need: the virtio-mmio transport and the block,
/// console, entropy and virtio-fs drivers. Their dependencies are added by the closure.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtiofs",
];

/// One module to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// The normalised name (`virtio_rng` for `virtio-rng.ko`).
    pub name: String,
    /// The file, relative to the modules directory (`kernel/drivers/char/hw_random/virtio-rng.ko`).
    pub path: String,
}

/// Soft dependencies of one module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SoftDep {
    pre: Vec<String>,
    post: Vec<String>,
}

/// The contents of a modules directory's index files, for [`ModuleTree::from_indexes`]; an
/// optional file that is missing is empty.
#[derive(Clone, Copy, Debug, Default)]
pub struct Indexes<'a> {
    /// `modules.dep` (required by [`ModuleTree::open`]).
    pub dep: &'a str,
    /// `modules.softdep`.
    pub softdep: &'a str,
    /// `modules.alias`.
    pub alias: &'a str,
    /// `modules.builtin`.
    pub builtin: &'a str,
    /// `modules.builtin.modinfo` (NUL-separated, not necessarily UTF-8).
    pub builtin_modinfo: &'a [u8],
}

/// How a name resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Resolved {
    /// These modules (sorted, so the result is deterministic).
    Modules(Vec<String>),
    /// Built into the kernel: nothing to load.
    Builtin,
    /// Nothing by that name.
    Missing,
}

/// The dependency indexes of one kernel's module directory.
#[derive(Clone, Debug, Default)]
pub struct ModuleTree {
    dir: PathBuf,
    version: String,
    /// Module name → (path, hard dependencies by name, in modules.dep order).
    modules: BTreeMap<String, (String, Vec<String>)>,
    softdeps: BTreeMap<String, SoftDep>,
    /// (normalised pattern, module) in file order.
    aliases: Vec<(String, String)>,
    builtin: BTreeSet<String>,
    builtin_aliases: Vec<(String, String)>,
}

impl ModuleTree {
    /// Reads the indexes of `dir`, a `lib/modules/VERSION` directory on which `depmod` has run.
    /// `modules.dep` is required; the other files are optional.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        let dep_path = dir.join("modules.dep");
        let dep = read(&dep_path)?.ok_or_else(|| Error::Read {
            path: dep_path.clone(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no modules.dep (run depmod -b ROOT VERSION)",
            ),
        })?;
        let indexes = Indexes {
            dep: &dep,
            softdep: &read(&dir.join("modules.softdep"))?.unwrap_or_default(),
            alias: &read(&dir.join("modules.alias"))?.unwrap_or_default(),
            builtin: &read(&dir.join("modules.builtin"))?.unwrap_or_default(),
            builtin_modinfo: &read_bytes(&dir.join("modules.builtin.modinfo"))?,
        };
        Self::from_indexes(dir, &indexes)
    }

    /// A tree from index contents already in memory, as [`ModuleTree::open`] reads them from
    /// `dir` (which only names the tree: its last component is the kernel version, and errors
    /// name `dir/modules.dep`). Nothing is read from disk.
    pub fn from_indexes(dir: impl Into<PathBuf>, indexes: &Indexes<'_>) -> Result<Self, Error> {
        let dir = dir.into();
        let version = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            modules: parse_dep(indexes.dep, &dir.join("modules.dep"))?,
            softdeps: parse_softdep(indexes.softdep),
            aliases: parse_alias(indexes.alias),
            builtin: parse_builtin(indexes.builtin),
            builtin_aliases: parse_builtin_modinfo(indexes.builtin_modinfo),
            version,
            dir,
        })
    }

    /// The kernel version: the name of the modules directory.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The modules directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The modules to load, in order, so that `roots` (module or alias names) work. Built-in
    /// modules are left out. A root that cannot be found is an error; a soft dependency that
    /// cannot be found is skipped, as `modprobe` does.
    pub fn closure<S: AsRef<str>>(&self, roots: &[S]) -> Result<Vec<Module>, Error> {
        let mut walk = Walk {
            tree: self,
            order: Vec::new(),
            done: BTreeSet::new(),
            active: BTreeSet::new(),
            stack: Vec::new(),
        };
        for root in roots {
            match self.resolve(root.as_ref()) {
                Resolved::Modules(names) => {
                    for name in names {
                        walk.visit(&name)?;
                    }
                }
                Resolved::Builtin => {}
                Resolved::Missing => {
                    return Err(Error::NotFound {
                        module: root.as_ref().to_owned(),
                        version: self.version.clone(),
                    });
                }
            }
        }
        Ok(walk.order)
    }

    /// Looks a name up the way modprobe does: module, alias, built-in.
    fn resolve(&self, name: &str) -> Resolved {
        let name = normalise(name);
        if self.modules.contains_key(&name) {
            return Resolved::Modules(vec![name]);
        }
        let matches = match_aliases(&self.aliases, &normalise_alias(&name));
        if !matches.is_empty() {
            // An alias may name a built-in module too; only loadable ones are kept.
            let loadable: Vec<String> = matches
                .into_iter()
                .filter(|m| self.modules.contains_key(m))
                .collect();
            return if loadable.is_empty() {
                Resolved::Builtin
            } else {
                Resolved::Modules(loadable)
            };
        }
        if self.builtin.contains(&name)
            || !match_aliases(&self.builtin_aliases, &normalise_alias(&name)).is_empty()
        {
            return Resolved::Builtin;
        }
        Resolved::Missing
    }
}

/// A depth-first walk that emits each module after everything it needs. It keeps its own
/// stack rather than recursing: `modules.dep` is input, and a dependency chain hundreds of
/// thousands deep must not overflow the thread's stack.
struct Walk<'a> {
    tree: &'a ModuleTree,
    order: Vec<Module>,
    done: BTreeSet<String>,
    /// Modules entered and not yet finished (the current path), so soft-dependency cycles end
    /// instead of going round forever.
    active: BTreeSet<String>,
    /// What is left to do, the next step last.
    stack: Vec<Step>,
}

/// One step of a [`Walk`].
enum Step {
    /// Visit a module: its pre soft dependencies, its hard dependencies, then finish it.
    Enter(String),
    /// Emit a module whose dependencies are done, then visit its post soft dependencies.
    Finish(String),
}

impl Walk<'_> {
    /// Visits `name` and everything it needs.
    fn visit(&mut self, name: &str) -> Result<(), Error> {
        self.stack.push(Step::Enter(name.to_owned()));
        while let Some(step) = self.stack.pop() {
            match step {
                Step::Enter(name) => self.enter(name)?,
                Step::Finish(name) => self.finish(name),
            }
        }
        Ok(())
    }

    fn enter(&mut self, name: String) -> Result<(), Error> {
        if self.done.contains(&name) || !self.active.insert(name.clone()) {
            return Ok(());
        }
        let tree = self.tree;
        let (_, deps) = &tree.modules[&name];
        if let Some(dep) = deps.iter().find(|d| !tree.modules.contains_key(*d)) {
            return Err(Error::MissingDependency {
                module: name,
                dependency: dep.clone(),
                version: tree.version.clone(),
            });
        }
        let pre = tree.softdeps.get(&name).map(|s| self.soft(&s.pre));
        self.stack.push(Step::Finish(name));
        // Pushed in reverse of the order they are visited in: pre soft dependencies first,
        // then the hard ones last-to-first, as modules.dep lists them for loading.
        self.stack.extend(deps.iter().cloned().map(Step::Enter));
        self.stack
            .extend(pre.unwrap_or_default().into_iter().rev().map(Step::Enter));
        Ok(())
    }

    fn finish(&mut self, name: String) {
        let tree = self.tree;
        self.active.remove(&name);
        self.done.insert(name.clone());
        let post = tree.softdeps.get(&name).map(|s| self.soft(&s.post));
        self.order.push(Module {
            path: tree.modules[&name].0.clone(),
            name,
        });
        self.stack
            .extend(post.unwrap_or_default().into_iter().rev().map(Step::Enter));
    }

    /// The modules that soft dependencies `names` resolve to, in order; unknown ones are
    /// skipped, as modprobe skips them.
    fn soft(&self, names: &[String]) -> Vec<String> {
        names
            .iter()
            .filter_map(|soft| match self.tree.resolve(soft) {
                Resolved::Modules(found) => Some(found),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

/// Reads a text index; a missing file is `None`.
fn read(path: &Path) -> Result<Option<String>, Error> {
    match crate::host_input::read_regular_text(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a binary index; a missing file is empty.
fn read_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    match crate::host_input::read_regular(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `-` and `_` are the same in module names; the kernel uses `_`.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// Like [`normalise`], but leaves bracket expressions such as `[0-9]` alone, as kmod does.
fn normalise_alias(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut in_brackets = false;
    for c in pattern.chars() {
        match c {
            '[' => in_brackets = true,
            ']' => in_brackets = false,
            '-' if !in_brackets => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The module name of a file: its base name without `.ko` and any compression suffix.
pub fn name_from_path(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|suffix| base.strip_suffix(suffix))
        .unwrap_or(base);
    normalise(stem)
}

type DepMap = BTreeMap<String, (String, Vec<String>)>;

fn parse_dep(text: &str, path: &Path) -> Result<DepMap, Error> {
    let mut modules = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, deps) = line.split_once(':').ok_or(Error::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
        })?;
        let module = module.trim();
        if !inside_tree(module) {
            return Err(Error::OutsideTree {
                path: path.to_path_buf(),
                line: i + 1,
                entry: module.to_owned(),
            });
        }
        let deps = deps.split_whitespace().map(name_from_path).collect();
        modules.insert(name_from_path(module), (module.to_owned(), deps));
    }
    Ok(modules)
}

/// Whether a module path stays inside the modules directory: relative, without `..` (only
/// module paths are opened; dependencies are looked up by name among them).
fn inside_tree(module: &str) -> bool {
    let path = Path::new(module);
    !module.is_empty()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

fn parse_softdep(text: &str) -> BTreeMap<String, SoftDep> {
    let mut softdeps: BTreeMap<String, SoftDep> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(module) = words.next() else { continue };
        let entry = softdeps.entry(normalise(module)).or_default();
        // Words before any `pre:`/`post:` are ignored, as kmod ignores them.
        let mut list: Option<&mut Vec<String>> = None;
        for word in words {
            match word {
                "pre:" => list = Some(&mut entry.pre),
                "post:" => list = Some(&mut entry.post),
                name => {
                    if let Some(list) = list.as_deref_mut() {
                        list.push(normalise(name));
                    }
                }
            }
        }
    }
    softdeps
}

fn parse_alias(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("alias"), Some(pattern), Some(module)) => {
                    Some((normalise_alias(pattern), normalise(module)))
                }
                _ => None,
            }
        })
        .collect()
}

fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(name_from_path)
        .collect()
}

/// `modules.builtin.modinfo` is a list of NUL-terminated `module.key=value` strings; the
/// `alias` keys make aliases of built-in modules resolvable.
fn parse_builtin_modinfo(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|item| {
            let item = std::str::from_utf8(item).ok()?;
            let (module, rest) = item.split_once('.')?;
            let alias = rest.strip_prefix("alias=")?;
            Some((normalise_alias(alias), normalise(module)))
        })
        .collect()
}

/// Every module whose alias pattern matches `name`, sorted and without repeats.
fn match_aliases(aliases: &[(String, String)], name: &str) -> Vec<String> {
    let found: BTreeSet<&String> = aliases
        .iter()
        .filter(|(p, _)| fnmatch(p, name))
        .map(|(_, m)| m)
        .collect();
    found.into_iter().cloned().collect()
}

/// Shell-style matching of `name` against `pattern`: `*`, `?` and `[...]` (with ranges and
/// `!`/`^` negation), with no special treatment of `/` or leading dots.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point, the position after the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match_bracket(&p[pi..], n[ni]),
            Some(&c) => (c == n[ni]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ni += 1;
            }
            (None, Some((after_star, start))) => {
                // Let the last `*` swallow one more character and try again.
                pi = after_star;
                ni = start + 1;
                star = Some((after_star, start + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the bracket expression at the start of `p`; returns the expression's
/// length when it matches. An unterminated `[` matches itself literally.
fn match_bracket(p: &[char], c: char) -> Option<usize> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        match p.get(i) {
            None => return (c == '[').then_some(1),
            Some(']') if !first => break,
            Some(&lo) => {
                if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&hi| hi != ']') {
                    matched |= (lo..=p[i + 2]).contains(&c);
                    i += 3;
                } else {
                    matched |= lo == c;
                    i += 1;
                }
            }
        }
        first = false;
    }
    (matched != negate).then_some(i + 1)
}

/// The load list the init reads (`/etc/kvmbuild/modules`): one guest path per line, optionally
/// followed by whitespace and module parameters; `#` starts a comment line.
pub fn render_load_list(paths: &[String]) -> String {
    paths.iter().map(|p| format!("{p}\n")).collect()
}

/// One line of the load list: a module file and the parameters to load it with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadEntry {
    /// The module file in the guest.
    pub path: String,
    /// Parameters (`key=value ...`), empty for none.
    pub params: String,
}

/// Parses a load list; see [`render_load_list`].
pub fn parse_load_list(text: &str) -> Vec<LoadEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| match line.split_once(char::is_whitespace) {
            Some((path, params)) => LoadEntry {
                path: path.to_owned(),
                params: params.trim().to_owned(),
            },
            None => LoadEntry {
                path: line.to_owned(),
                params: String::new(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests;
