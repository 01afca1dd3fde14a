//! The `kvmbuild.*` settings: the command-line and config-file parsers, the percent-encoding,
//! and the round trip `parse(render(c)) == c` for every configuration that parses (and for
//! configurations built directly, within the invariants parsing guarantees).

#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use arbitrary::{Arbitrary, Unstructured};
use initrd::config::{decode, encode, split_cmdline, Config, Disk, Share};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        text(rest);
    } else if let Ok(config) = built(&mut Unstructured::new(rest)) {
        round_trip(&config);
    }
});

/// Arbitrary text through both parsers and the codec.
fn text(data: &[u8]) {
    // Any bytes survive encode/decode.
    let encoded = encode(data);
    assert!(encoded.bytes().all(|b| b.is_ascii_graphic()), "{encoded:?}");
    assert_eq!(decode(&encoded).unwrap().as_bytes(), data);

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(decoded) = decode(text) {
        assert_well_encoded(text);
        assert_eq!(decode(&encode(decoded.as_bytes())).unwrap(), decoded);
    }
    for word in split_cmdline(text) {
        assert!(!word.contains('"'));
    }
    let mut from_cmdline = Config::default();
    if from_cmdline.apply_cmdline(text).is_ok() {
        round_trip(&from_cmdline);
    }
    let mut from_file = Config::default();
    if from_file.apply_file(text).is_ok() {
        round_trip(&from_file);
    }
}

/// Every `%` in text that decodes starts an escape of exactly two hex digits.
fn assert_well_encoded(text: &str) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = &bytes[i + 1..i + 3];
            assert!(
                hex.iter().all(u8::is_ascii_hexdigit),
                "decode accepted {text:?}"
            );
            i += 3;
        } else {
            i += 1;
        }
    }
}

/// Both renderings read back as the same configuration.
fn round_trip(config: &Config) {
    let rendered = config.render();
    let mut from_file = Config::default();
    from_file
        .apply_file(&rendered)
        .unwrap_or_else(|e| panic!("{config:?} rendered as {rendered:?}: {e}"));
    assert_eq!(&from_file, config, "via the file {rendered:?}");

    let cmdline = config.to_cmdline();
    assert!(!cmdline.contains('\n'));
    let mut from_cmdline = Config::default();
    from_cmdline
        .apply_cmdline(&cmdline)
        .unwrap_or_else(|e| panic!("{config:?} rendered as {cmdline:?}: {e}"));
    assert_eq!(&from_cmdline, config, "via the command line {cmdline:?}");

    let _ = config.command_env();
    let _ = config.archive();
}

fn os(u: &mut Unstructured) -> arbitrary::Result<OsString> {
    Ok(OsString::from_vec(Vec::<u8>::arbitrary(u)?))
}

fn non_empty(u: &mut Unstructured) -> arbitrary::Result<OsString> {
    let mut v = Vec::<u8>::arbitrary(u)?;
    if v.is_empty() {
        v.push(b'x');
    }
    Ok(OsString::from_vec(v))
}

/// A configuration as parsing can produce one: environment names non-empty, without `=` and
/// unique; share tags, devices and mount points non-empty; a root tag non-empty.
fn built(u: &mut Unstructured) -> arbitrary::Result<Config> {
    let mut config = Config {
        command: (0..u.int_in_range(0..=4)?)
            .map(|_| os(u))
            .collect::<Result<_, _>>()?,
        cwd: u
            .arbitrary::<bool>()?
            .then(|| os(u))
            .transpose()?
            .map(Into::into),
        tty: u
            .arbitrary::<bool>()?
            .then(|| os(u))
            .transpose()?
            .map(Into::into),
        verbose: u.arbitrary()?,
        stdio_ports: u.arbitrary()?,
        root: u.arbitrary::<bool>()?.then(|| non_empty(u)).transpose()?,
        ..Config::default()
    };
    for _ in 0..u.int_in_range(0..=3)? {
        let mut name = non_empty(u)?.into_vec();
        name.retain(|&b| b != b'=');
        if name.is_empty() {
            continue;
        }
        config.set_env(OsString::from_vec(name), os(u)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        config.shares.push(Share {
            tag: non_empty(u)?,
            mountpoint: non_empty(u)?.into(),
            options: os(u)?,
        });
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let fstype = os(u)?;
        config.disks.push(Disk {
            device: non_empty(u)?.into(),
            mountpoint: non_empty(u)?.into(),
            fstype: (!fstype.is_empty()).then_some(fstype),
            options: os(u)?,
        });
    }
    Ok(config)
}
