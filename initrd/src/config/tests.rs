//! Settings: parsing, encoding and the round trip through files and command lines.

use super::*;

fn os(s: &str) -> OsString {
    s.into()
}

fn parse(cmdline: &str) -> Result<Config, Error> {
    let mut config = Config::default();
    config.apply_cmdline(cmdline)?;
    Ok(config)
}

#[test]
fn full_command_line() {
    let c = parse(
        "console=ttyS0 quiet kvmbuild.cmd=/bin/sh,-c,echo%20a%2Cb \
         kvmbuild.env=HOME=/tmp kvmbuild.env=X=a=b kvmbuild.cwd=/tmp/xchg \
         kvmbuild.fs=store:/nix/store kvmbuild.fs=xchg:/tmp/xchg:ro,noatime \
         kvmbuild.disk=/dev/vda:/mnt:ext4:discard kvmbuild.disk=/dev/vdb:/data \
         kvmbuild.verbose=1 -- init-arg kvmbuild.cmd=ignored",
    )
    .unwrap();
    assert_eq!(c.command, [os("/bin/sh"), os("-c"), os("echo a,b")]);
    assert_eq!(c.env, [(os("HOME"), os("/tmp")), (os("X"), os("a=b"))]);
    assert_eq!(c.cwd, Some("/tmp/xchg".into()));
    assert_eq!(
        c.shares[1],
        Share {
            tag: os("xchg"),
            mountpoint: "/tmp/xchg".into(),
            options: os("ro,noatime")
        }
    );
    assert_eq!(
        c.disks[0],
        Disk {
            device: "/dev/vda".into(),
            mountpoint: "/mnt".into(),
            fstype: Some(os("ext4")),
            options: os("discard")
        }
    );
    assert_eq!(c.disks[1].fstype, None);
    assert!(c.verbose);
}

#[test]
fn command_line_overrides_file() {
    let mut c = Config::default();
    c.apply_file("# comment\n\nkvmbuild.cmd=/bin/false\nkvmbuild.env=A=1\nkvmbuild.env=B=2\n")
        .unwrap();
    c.apply_cmdline("kvmbuild.cmd=/bin/true kvmbuild.env=A=3")
        .unwrap();
    assert_eq!(c.command, [os("/bin/true")]);
    assert_eq!(c.env, [(os("A"), os("3")), (os("B"), os("2"))]);
}

#[test]
fn quotes_group_words() {
    assert_eq!(
        split_cmdline(r#"a "b c"  d="e f" g"#),
        ["a", "b c", "d=e f", "g"]
    );
    let c = parse(r#"kvmbuild.cmd="/bin/echo,a b""#).unwrap();
    assert_eq!(c.command, [os("/bin/echo"), os("a b")]);
}

#[test]
fn render_round_trips_awkward_values() {
    let config = Config {
        command: vec![os("/bin/sh"), os("-c"), os("echo \"%, :\"\n"), os("")],
        env: vec![(os("A B"), os("x=y z")), (os("PATH"), os("/bin"))],
        cwd: Some("/tmp/a b".into()),
        shares: vec![Share {
            tag: os("t:1"),
            mountpoint: "/m".into(),
            options: os("ro,a=b%2Cc"),
        }],
        disks: vec![Disk {
            device: "/dev/vda".into(),
            mountpoint: "/d".into(),
            fstype: None,
            options: os("ro"),
        }],
        tty: Some("/dev/hvc0".into()),
        verbose: true,
        root: Some(os("root fs")),
        stdio_ports: true,
        warm: true,
        clock_ns: Some(1_764_500_000_123_456_789),
        seed: vec![0, b'%', b',', 0xff, b' '],
    };
    let mut from_file = Config::default();
    from_file.apply_file(&config.render()).unwrap();
    assert_eq!(from_file, config);
    assert_eq!(parse(&config.to_cmdline()).unwrap(), config);
    assert!(!config.to_cmdline().contains('\n'));
}

#[test]
fn root_and_stdio_settings() {
    let c = parse("kvmbuild.root=hostroot kvmbuild.stdio=ports").unwrap();
    assert_eq!(c.root, Some(os("hostroot")));
    assert!(c.stdio_ports);
    assert!(!parse("kvmbuild.stdio=console").unwrap().stdio_ports);
    assert!(matches!(
        parse("kvmbuild.stdio=vsock"),
        Err(Error::BadValue { .. })
    ));
    assert!(matches!(
        parse("kvmbuild.root="),
        Err(Error::BadValue { .. })
    ));
}

#[test]
fn non_utf8_bytes_survive() {
    let arg = OsString::from_vec(vec![0xff, b'a']);
    let config = Config {
        command: vec![arg.clone()],
        ..Config::default()
    };
    assert_eq!(parse(&config.to_cmdline()).unwrap().command, [arg]);
}

#[test]
fn default_path_is_added_only_when_missing() {
    let mut c = Config::default();
    assert_eq!(c.command_env(), [(os("PATH"), os(DEFAULT_PATH))]);
    c.set_env(os("PATH"), os("/x"));
    assert_eq!(c.command_env(), [(os("PATH"), os("/x"))]);
}

#[test]
fn errors_are_specific() {
    assert!(matches!(
        parse("kvmbuild.cmd=%zz"),
        Err(Error::BadEncoding(_))
    ));
    assert!(matches!(
        parse("kvmbuild.cmd=%4"),
        Err(Error::BadEncoding(_))
    ));
    // Found by the config_parse fuzz target: a sign is not a hex digit.
    for signed in ["~%+5", "%-5", "%+F"] {
        assert!(
            matches!(decode(signed), Err(Error::BadEncoding(_))),
            "{signed}"
        );
    }
    assert_eq!(decode("%4a%4F").unwrap(), os("JO"));
    assert!(matches!(
        parse("kvmbuild.comand=/bin/true"),
        Err(Error::UnknownKey(_))
    ));
    assert!(matches!(
        parse("kvmbuild.env=NOEQUALS"),
        Err(Error::BadValue { .. })
    ));
    assert!(matches!(
        parse("kvmbuild.env==x"),
        Err(Error::BadValue { .. })
    ));
    assert!(matches!(
        parse("kvmbuild.fs=onlytag"),
        Err(Error::BadValue { .. })
    ));
    assert!(matches!(
        parse("kvmbuild.disk=/dev/vda:/m:ext4:ro:extra"),
        Err(Error::BadValue { .. })
    ));
    let msg = parse("kvmbuild.fs=x").unwrap_err().to_string();
    assert_eq!(
        msg,
        "bad value for kvmbuild.fs: \"x\" (expected TAG:MOUNTPOINT[:OPTIONS])"
    );
}

#[test]
fn other_words_are_ignored() {
    assert_eq!(
        parse("root=/dev/vda console=ttyS0,115200 kvmbuild").unwrap(),
        Config::default()
    );
}

#[test]
fn config_archive_holds_the_file() {
    let config = Config {
        command: vec![os("/bin/true")],
        ..Config::default()
    };
    let bytes = config.archive();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("etc/kvmbuild/config\0"));
    assert!(text.contains("kvmbuild.cmd=/bin/true\n"));
}
