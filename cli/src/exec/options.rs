//! `kvmbuild exec`'s options, and the checked plan they make: every input is looked at here,
//! before anything is started.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use vmm::device_manager::DiskConfig;

use super::kernel::{self, KernelChoice};
use super::root_scratch_dirs;
use super::virtiofsd::{self, ShareSpec};
use crate::output::create_output;
use crate::run::{parse_disk, parse_timeout};

/// Host variables a command run on the host's root keeps (when set): they describe the host
/// whose programs it runs.
const PASSED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "TERM", "LANG", "LC_ALL", "TZ",
];

#[derive(Args)]
pub struct ExecArgs {
    /// Kernel to boot [default: $KVMBUILD_KERNEL, the host's /boot/vmlinuz-$(uname -r), or
    /// the newest kernel scripts/guest-kernels fetched].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The kernel's module directory (lib/modules/RELEASE) [default: found beside the kernel
    /// or in /lib/modules].
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// Share a host directory at GUEST (default: the same path), writable unless `:ro`;
    /// repeatable. Paths cannot contain ':'.
    #[arg(long = "share", value_name = "HOST[:GUEST][:ro]", value_parser = parse_share)]
    shares: Vec<Share>,
    /// The host's / as the guest's root, read-only, with tmpfs on /tmp, /run and /var/tmp
    /// (the default).
    #[arg(long, overrides_with = "no_root")]
    root: bool,
    /// The guest's root is only kvmbuild's initrd and the shares.
    #[arg(long, overrides_with = "root")]
    no_root: bool,
    /// A raw disk image on virtio-blk (/dev/vda, /dev/vdb, ...), `,ro` for read-only;
    /// repeatable. It is attached, not mounted.
    #[arg(long, value_name = "PATH[,ro]", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u64,
    /// An environment variable for the command; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(OsString, OsString)>,
    /// The command's working directory in the guest [default: the current directory when the
    /// guest sees it (through the root or a share), else /].
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Stop the guest after this many seconds (status 124).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Write the kernel's and the init's messages to FILE.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// The virtiofsd binary [default: virtiofsd on PATH].
    #[arg(long, value_name = "PATH")]
    virtiofsd: Option<PathBuf>,
    /// Say what kvmbuild does: the kernel and why, the initrd, virtiofsd, timings (and, with
    /// --console-log, the kernel's and init's full messages there).
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Start from a snapshot of this kernel, initrd, memory size, vCPU count and device set
    /// booted to kvmbuild's init, made by the first --warm run and kept in the cache (see
    /// `kvmbuild snapshot`); a damaged or stale one is replaced after a cold boot.
    #[arg(long)]
    warm: bool,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND",
        value_parser = clap::value_parser!(OsString)
    )]
    command: Vec<OsString>,
}

/// One `--share`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The host directory.
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

/// `HOST[:GUEST][:ro]`, with HOST an existing directory and GUEST absolute.
pub fn parse_share(s: &str) -> Result<Share, String> {
    let mut parts: Vec<&str> = s.split(':').collect();
    let read_only = parts.len() > 1 && parts.last() == Some(&"ro");
    if read_only {
        parts.pop();
    }
    let (host, guest) = match parts.as_slice() {
        [host] => (*host, *host),
        [host, guest] => (*host, *guest),
        _ => return Err(format!("'{s}' is not HOST[:GUEST][:ro]")),
    };
    if host.is_empty() {
        return Err(format!("'{s}': no host directory"));
    }
    let host_path = Path::new(host);
    if !host_path.is_dir() {
        return Err(format!("'{host}' is not a directory"));
    }
    let host = host_path
        .canonicalize()
        .map_err(|e| format!("'{host}': {e}"))?;
    let guest = if parts.len() == 1 {
        host.clone()
    } else {
        PathBuf::from(guest)
    };
    if !guest.is_absolute() || guest.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "guest path '{}' must be absolute, without '..'",
            guest.display()
        ));
    }
    if guest == Path::new("/") {
        return Err("guest path '/' is the root; use --root, or share elsewhere".to_string());
    }
    Ok(Share {
        host,
        guest,
        read_only,
    })
}

/// `NAME=VALUE` with a non-empty NAME.
pub fn parse_env(s: &str) -> Result<(OsString, OsString), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.into(), value.into())),
        _ => Err(format!("'{s}' is not NAME=VALUE")),
    }
}

/// Everything `exec` will do, checked.
pub struct Plan {
    pub kernel: KernelChoice,
    pub virtiofsd: PathBuf,
    pub root: bool,
    pub shares: Vec<Share>,
    pub disks: Vec<DiskConfig>,
    pub mem: u64,
    pub vcpus: u8,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub timeout: Option<Duration>,
    pub console_log: Option<File>,
    pub verbose: bool,
    pub warm: bool,
    pub command: Vec<OsString>,
}

impl Plan {
    /// What each virtiofsd serves, in device order (the root first), with its share (None for
    /// the root).
    pub fn served(&self) -> impl Iterator<Item = (ShareSpec, Option<&Share>)> {
        let root = self.root.then(|| {
            (
                ShareSpec {
                    dir: "/".into(),
                    read_only: true,
                },
                None,
            )
        });
        root.into_iter().chain(self.shares.iter().map(|s| {
            (
                ShareSpec {
                    dir: s.host.clone(),
                    read_only: s.read_only,
                },
                Some(s),
            )
        }))
    }
}

/// Checks every input and makes the plan.
pub fn plan(args: ExecArgs) -> anyhow::Result<Plan> {
    let root = !args.no_root;
    let kernel = kernel::choose(args.kernel.as_deref(), args.modules.as_deref())?;
    let vcpus = vmm::vm::vcpu_count(args.cpus).map_err(anyhow::Error::msg)?;
    for disk in &args.disk {
        check_disk(&disk.path)?;
    }
    if root {
        for share in &args.shares {
            check_mount_point_in_root(share)?;
        }
    }
    let virtiofsd = match (root || !args.shares.is_empty(), &args.virtiofsd) {
        (true, explicit) => virtiofsd::find(explicit.as_deref())?,
        (false, _) => PathBuf::new(),
    };
    let mut inputs: Vec<&Path> = vec![&kernel.kernel];
    inputs.extend(args.disk.iter().map(|d| d.path.as_path()));
    let console_log = match &args.console_log {
        Some(path) => Some(create_output(path, &inputs, "--console-log")?),
        None => None,
    };
    let caller_dir = std::env::current_dir().ok();
    let cwd = args
        .cwd
        .clone()
        .unwrap_or_else(|| default_cwd(caller_dir.as_deref(), root, &args.shares));
    let mut env = Vec::new();
    if root {
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                env.push((OsString::from(name), value));
            }
        }
    }
    env.extend(args.env);
    Ok(Plan {
        kernel,
        virtiofsd,
        root,
        shares: args.shares,
        disks: args.disk,
        mem: args.mem,
        vcpus,
        env,
        cwd,
        timeout: args.timeout,
        console_log,
        verbose: args.verbose,
        warm: args.warm,
        command: args.command,
    })
}

fn check_disk(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("--disk {}", path.display()))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        bail!(
            "--disk {}: not a regular file or block device",
            path.display()
        );
    }
    Ok(())
}

/// With the host's root, a share's mount point must already exist there (the root is
/// read-only), unless it lies in one of the tmpfs directories, where the init can make it.
fn check_mount_point_in_root(share: &Share) -> anyhow::Result<()> {
    let in_scratch = root_scratch_dirs().any(|dir| share.guest.starts_with(dir));
    if !in_scratch && !share.guest.is_dir() {
        bail!(
            "--share {}: {} is not a directory in the host's root, which the guest sees read-only (use --no-root, or an existing directory)",
            share.host.display(),
            share.guest.display()
        );
    }
    Ok(())
}

/// The guest directory where the caller's directory `dir` is visible: through the share that
/// holds it (the deepest), else as itself on the host's root when it is not hidden by a tmpfs;
/// else `/`.
pub fn default_cwd(dir: Option<&Path>, root: bool, shares: &[Share]) -> PathBuf {
    let Some(dir) = dir else {
        return "/".into();
    };
    let through_share = shares
        .iter()
        .filter_map(|s| dir.strip_prefix(&s.host).ok().map(|rest| (s, rest)))
        .max_by_key(|(s, _)| s.host.components().count())
        .map(|(s, rest)| s.guest.join(rest));
    if let Some(path) = through_share {
        return path;
    }
    let hidden = root_scratch_dirs().any(|scratch| dir.starts_with(scratch));
    if root && !hidden {
        dir.to_path_buf()
    } else {
        "/".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_forms() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().canonicalize().unwrap();
        let h = host.to_str().unwrap();
        let s = parse_share(h).unwrap();
        assert_eq!((s.guest.as_path(), s.read_only), (host.as_path(), false));
        let s = parse_share(&format!("{h}:ro")).unwrap();
        assert_eq!((s.guest.as_path(), s.read_only), (host.as_path(), true));
        let s = parse_share(&format!("{h}:/mnt/x")).unwrap();
        assert_eq!(
            (s.guest.as_path(), s.read_only),
            (Path::new("/mnt/x"), false)
        );
        let s = parse_share(&format!("{h}:/mnt/x:ro")).unwrap();
        assert_eq!(
            (s.guest.as_path(), s.read_only),
            (Path::new("/mnt/x"), true)
        );
        assert!(parse_share(&format!("{h}:relative")).is_err());
        assert!(parse_share(&format!("{h}:/a/../b")).is_err());
        assert!(parse_share(&format!("{h}:/")).is_err());
        assert!(parse_share(&format!("{h}:/a:rw")).is_err());
        assert!(parse_share("/nonexistent/dir").is_err());
        assert!(parse_share(":/x").is_err());
    }

    #[test]
    fn env_needs_a_name() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A").is_err());
    }

    #[test]
    fn cwd_follows_what_the_guest_sees() {
        let share = |host: &str, guest: &str| Share {
            host: host.into(),
            guest: guest.into(),
            read_only: false,
        };
        let shares = [share("/home/u", "/work"), share("/home/u/src", "/src")];
        let cwd = |dir: &str, root| default_cwd(Some(Path::new(dir)), root, &shares);
        assert_eq!(cwd("/home/u/src/a", false), Path::new("/src/a"));
        assert_eq!(cwd("/home/u/doc", false), Path::new("/work/doc"));
        assert_eq!(cwd("/srv", false), Path::new("/"));
        assert_eq!(cwd("/srv", true), Path::new("/srv"));
        assert_eq!(cwd("/tmp/build", true), Path::new("/"));
        assert_eq!(default_cwd(None, true, &shares), Path::new("/"));
    }
}
