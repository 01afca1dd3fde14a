//! What kvmbuild's init is told to do: the `kvmbuild.*` settings.
//!
//! # Format
//!
//! Settings are `key=value` pairs. The init reads them from two places, in this order, later
//! ones overriding earlier ones:
//!
//! 1. `/etc/kvmbuild/config` inside the initrd, one pair per line (blank lines and lines
//!    starting with `#` are ignored). The host can write it into the image, or put it in a
//!    tiny cpio archive of its own in front of a cached base image (the kernel unpacks
//!    concatenated archives in order), so one base image serves every run; see
//!    [`Config::archive`].
//! 2. The kernel command line (`/proc/cmdline`): whitespace-separated words, double quotes
//!    group words as the kernel's own parser does, words not starting with `kvmbuild.` are
//!    ignored and `--` ends the scan (what follows belongs to init's argv).
//!
//! Values are percent-encoded: `%XX` stands for the byte with hex value `XX`, every other byte
//! stands for itself. So a value can hold spaces (`%20`), newlines (`%0A`), the list separators
//! below (`,` is `%2C`, `:` is `%3A`) and non-UTF-8 bytes. The kernel command line is at most
//! 2048 bytes on x86; large environments belong in the config file.
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `kvmbuild.cmd` | `ARG0,ARG1,...` | the command and its arguments (required); `ARG0` without a `/` is looked up in `PATH` |
//! | `kvmbuild.env` | `NAME=VALUE` | one environment variable; repeatable; a later one replaces an earlier one of the same name |
//! | `kvmbuild.cwd` | `PATH` | working directory of the command (default `/`) |
//! | `kvmbuild.fs` | `TAG:MOUNTPOINT[:OPTIONS]` | mount the virtio-fs share `TAG` at `MOUNTPOINT`; repeatable |
//! | `kvmbuild.disk` | `DEVICE:MOUNTPOINT[:FSTYPE[:OPTIONS]]` | mount a block device; without `FSTYPE` each filesystem in `/proc/filesystems` is tried; repeatable |
//! | `kvmbuild.tty` | `PATH` | the device to use as the command's stdin/stdout/stderr (default: init's own, `/dev/console`) |
//! | `kvmbuild.stdio` | `ports` | the command's stdin, stdout and stderr are the virtio-console ports named `kvmbuild.stdin`, `kvmbuild.stdout` and `kvmbuild.stderr` (and the init's own errors go to `kvmbuild.stderr` too) |
//! | `kvmbuild.root` | `TAG` | mount the virtio-fs share `TAG` read-only as the command's root, with tmpfs on `/tmp`, `/run` and `/var/tmp`; shares and disks are then mounted inside it |
//! | `kvmbuild.verbose` | `0` or `1` | print each step on the console |
//!
//! `OPTIONS` is one string of comma-separated `mount(8)` options, decoded as a whole and then
//! split at its commas; flags (`ro`, `noatime`, `nosuid`, ...) are applied as flags, the rest is
//! passed to the filesystem. Shares are mounted first, then disks, each in the order given, with
//! the mount point created if missing; a mount point must not be `/`.
//!
//! The command's environment is exactly the `kvmbuild.env` settings, plus
//! `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin` when none sets `PATH`.
//!
//! Example: `kvmbuild.fs=store:/nix/store kvmbuild.cmd=/bin/sh,-c,echo%20hi kvmbuild.env=HOME=/tmp`.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Errors in the init's settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `%` is not followed by two hex digits.
    #[error("bad percent-encoding in {0:?}")]
    BadEncoding(String),
    /// A key the init does not know, most likely a typo.
    #[error("unknown setting {0:?}")]
    UnknownKey(String),
    /// A value that does not have the shape its key needs.
    #[error("bad value for {key}: {value:?} (expected {expected})")]
    BadValue {
        /// The key.
        key: String,
        /// The raw value.
        value: String,
        /// What the value should look like.
        expected: &'static str,
    },
}

/// The prefix of every setting.
const PREFIX: &str = "kvmbuild.";
/// The `PATH` the command gets when no setting gives one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the init finds its config file.
pub const CONFIG_PATH: &str = "etc/kvmbuild/config";

/// A virtio-fs share to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The tag the VMM gave the device.
    pub tag: OsString,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// `mount(8)`-style options, comma-separated; empty for none.
    pub options: OsString,
}

/// A block device to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The device node, such as `/dev/vda`.
    pub device: PathBuf,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// The filesystem type, or `None` to try each one the kernel knows.
    pub fstype: Option<OsString>,
    /// `mount(8)`-style options, comma-separated; empty for none.
    pub options: OsString,
}

/// Everything the init is told to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// The command's environment, in the order first given.
    pub env: Vec<(OsString, OsString)>,
    /// The command's working directory.
    pub cwd: Option<PathBuf>,
    /// virtio-fs shares, mounted in order.
    pub shares: Vec<Share>,
    /// Block devices, mounted after the shares, in order.
    pub disks: Vec<Disk>,
    /// The terminal for the command's standard streams.
    pub tty: Option<PathBuf>,
    /// Print each step.
    pub verbose: bool,
    /// The virtio-fs tag of the command's root file system.
    pub root: Option<OsString>,
    /// Connect the command to the `kvmbuild.std*` virtio-console ports.
    pub stdio_ports: bool,
    /// Warm start: stop at the snapshot point once the console is set up and before this
    /// run's disks are probed and its shares mounted, then read this run's settings from the
    /// [`SETTINGS_PORT_NAME`] port (see `guest::warm`).
    pub warm: bool,
    /// The host's wall clock when the run started, in nanoseconds since the Unix epoch; the
    /// init sets the guest's clock to it (a restored guest's clock is the snapshot's).
    pub clock_ns: Option<u64>,
    /// Fresh randomness from the host, mixed into the guest's pool and credited, after which
    /// the kernel's generator is reseeded: no two restored runs share random numbers.
    pub seed: Vec<u8>,
}

/// The name of the virtio-console port that carries a warm run's settings.
pub const SETTINGS_PORT_NAME: &str = "kvmbuild.settings";

/// The names of the virtio-console ports that carry the command's stdin, stdout and stderr.
pub const STDIO_PORT_NAMES: [&str; 3] = ["kvmbuild.stdin", "kvmbuild.stdout", "kvmbuild.stderr"];

impl Config {
    /// Applies the lines of a config file.
    pub fn apply_file(&mut self, text: &str) -> Result<(), Error> {
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                self.apply_word(line)?;
            }
        }
        Ok(())
    }

    /// Applies the `kvmbuild.*` words of a kernel command line.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Result<(), Error> {
        for word in split_cmdline(cmdline) {
            if word == "--" {
                break;
            }
            if word.starts_with(PREFIX) {
                self.apply_word(&word)?;
            }
        }
        Ok(())
    }

    /// Applies one `kvmbuild.key=value` setting.
    fn apply_word(&mut self, word: &str) -> Result<(), Error> {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let bad = |expected| Error::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            expected,
        };
        match key.strip_prefix(PREFIX).unwrap_or("") {
            "cmd" => self.command = value.split(',').map(decode).collect::<Result<_, _>>()?,
            "env" => {
                let decoded = decode(value)?;
                let bytes = decoded.as_bytes();
                let eq = bytes
                    .iter()
                    .position(|&b| b == b'=')
                    .filter(|&i| i > 0)
                    .ok_or_else(|| bad("NAME=VALUE"))?;
                self.set_env(
                    OsString::from_vec(bytes[..eq].to_vec()),
                    OsString::from_vec(bytes[eq + 1..].to_vec()),
                );
            }
            "cwd" => self.cwd = Some(decode(value)?.into()),
            "tty" => self.tty = Some(decode(value)?.into()),
            "verbose" => self.verbose = matches!(value, "1" | "yes" | "true" | ""),
            "stdio" => match value {
                "ports" => self.stdio_ports = true,
                "" | "console" => self.stdio_ports = false,
                _ => return Err(bad("ports or console")),
            },
            "warm" => self.warm = matches!(value, "1" | "yes" | "true" | ""),
            "clock" => {
                self.clock_ns = Some(
                    value
                        .parse()
                        .map_err(|_| bad("nanoseconds since the epoch"))?,
                )
            }
            "seed" => self.seed = decode(value)?.into_vec(),
            "root" => {
                let tag = decode(value)?;
                if tag.is_empty() {
                    return Err(bad("a virtio-fs tag"));
                }
                self.root = Some(tag);
            }
            "fs" => {
                let f = fields(value, 3).ok_or_else(|| bad("TAG:MOUNTPOINT[:OPTIONS]"))?;
                self.shares.push(Share {
                    tag: decode(f[0])?,
                    mountpoint: decode(f[1])?.into(),
                    options: decode(f[2])?,
                });
            }
            "disk" => {
                let f =
                    fields(value, 4).ok_or_else(|| bad("DEVICE:MOUNTPOINT[:FSTYPE[:OPTIONS]]"))?;
                let fstype = decode(f[2])?;
                self.disks.push(Disk {
                    device: decode(f[0])?.into(),
                    mountpoint: decode(f[1])?.into(),
                    fstype: (!fstype.is_empty()).then_some(fstype),
                    options: decode(f[3])?,
                });
            }
            _ => return Err(Error::UnknownKey(key.to_owned())),
        }
        Ok(())
    }

    /// Sets one variable, replacing an earlier value of the same name in place.
    pub fn set_env(&mut self, name: OsString, value: OsString) {
        match self.env.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.env.push((name, value)),
        }
    }

    /// The command's environment: the settings plus a default `PATH`.
    pub fn command_env(&self) -> Vec<(OsString, OsString)> {
        let mut env = self.env.clone();
        if !env.iter().any(|(n, _)| n == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }

    /// The settings as config-file lines, which [`Config::apply_file`] reads back unchanged.
    pub fn render(&self) -> String {
        self.words().into_iter().map(|w| w + "\n").collect()
    }

    /// The settings as kernel command-line words, space-separated.
    pub fn to_cmdline(&self) -> String {
        self.words().join(" ")
    }

    /// An uncompressed cpio archive holding only the config file, to put **in front of** a base
    /// initrd: `settings ++ base`. The kernel accepts an uncompressed archive before a
    /// compressed one, but not after one (it then expects another compressed stream).
    pub fn archive(&self) -> Vec<u8> {
        let mut archive = crate::cpio::Archive::new();
        archive
            .add_file(CONFIG_PATH, self.render().into_bytes(), 0o644)
            .expect("a fixed, valid path in an empty archive");
        archive.to_bytes()
    }

    fn words(&self) -> Vec<String> {
        let mut words = Vec::new();
        if !self.command.is_empty() {
            let args: Vec<String> = self.command.iter().map(|a| encode(a.as_bytes())).collect();
            words.push(format!("{PREFIX}cmd={}", args.join(",")));
        }
        for (name, value) in &self.env {
            words.push(format!(
                "{PREFIX}env={}={}",
                encode(name.as_bytes()),
                encode(value.as_bytes())
            ));
        }
        if let Some(cwd) = &self.cwd {
            words.push(format!(
                "{PREFIX}cwd={}",
                encode(cwd.as_os_str().as_bytes())
            ));
        }
        for s in &self.shares {
            let mut w = format!(
                "{PREFIX}fs={}:{}",
                encode(s.tag.as_bytes()),
                encode(s.mountpoint.as_os_str().as_bytes())
            );
            push_options(&mut w, &s.options);
            words.push(w);
        }
        for d in &self.disks {
            let mut w = format!(
                "{PREFIX}disk={}:{}",
                encode(d.device.as_os_str().as_bytes()),
                encode(d.mountpoint.as_os_str().as_bytes())
            );
            if d.fstype.is_some() || !d.options.is_empty() {
                w.push(':');
                w.push_str(&encode(d.fstype.as_deref().unwrap_or_default().as_bytes()));
            }
            push_options(&mut w, &d.options);
            words.push(w);
        }
        if let Some(tty) = &self.tty {
            words.push(format!(
                "{PREFIX}tty={}",
                encode(tty.as_os_str().as_bytes())
            ));
        }
        if self.verbose {
            words.push(format!("{PREFIX}verbose=1"));
        }
        if self.stdio_ports {
            words.push(format!("{PREFIX}stdio=ports"));
        }
        if let Some(root) = &self.root {
            words.push(format!("{PREFIX}root={}", encode(root.as_bytes())));
        }
        if self.warm {
            words.push(format!("{PREFIX}warm=1"));
        }
        if let Some(ns) = self.clock_ns {
            words.push(format!("{PREFIX}clock={ns}"));
        }
        if !self.seed.is_empty() {
            words.push(format!("{PREFIX}seed={}", encode(&self.seed)));
        }
        words
    }
}

/// Appends `:OPTIONS`, keeping the commas between options literal.
fn push_options(word: &mut String, options: &OsString) {
    if !options.is_empty() {
        let parts: Vec<String> = options
            .as_bytes()
            .split(|&b| b == b',')
            .map(encode)
            .collect();
        word.push(':');
        word.push_str(&parts.join(","));
    }
}

/// Splits `A:B[:C...]` into exactly `max` fields, the missing optional ones empty; `None` when
/// there are fewer than two, more than `max`, or the first two are empty.
fn fields(value: &str, max: usize) -> Option<Vec<&str>> {
    let mut parts: Vec<&str> = value.split(':').collect();
    if parts.len() < 2 || parts.len() > max || parts[0].is_empty() || parts[1].is_empty() {
        return None;
    }
    parts.resize(max, "");
    Some(parts)
}

/// Splits a kernel command line into words as the kernel does: at whitespace outside double
/// quotes, with the quotes themselves dropped.
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Decodes `%XX` escapes.
pub fn decode(value: &str) -> Result<OsString, Error> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits exactly: `u8::from_str_radix` alone would also take a sign
            // (`%+5`).
            let byte = match bytes.get(i + 1..i + 3) {
                Some(&[hi, lo]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                    (hex_value(hi) << 4) | hex_value(lo)
                }
                _ => return Err(Error::BadEncoding(value.to_owned())),
            };
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(OsString::from_vec(out))
}

/// The value of one ASCII hex digit.
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// Encodes every byte outside a small safe set as `%XX`, so the result survives the kernel
/// command line and the list separators.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_./+=@~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
