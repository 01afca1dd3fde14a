//! A VM derivation built on a remote builder: a second Nix store reached over `ssh://` on
//! localhost, the way a workstation without KVM hands its VM builds to a machine that has it.
//!
//! The remote side is an SSH server (dropbear: a server with no system service to start or
//! stop) in a mount namespace of its own, with its own tmpfs on `/nix` (the second store), its
//! own `/etc/nix` (this package set's configuration, which offers the `kvm` feature) and its
//! own `/root` (holding only the client's key). The client is Nix itself, in the usual
//! namespace with a fresh store, configured with `max-jobs = 0` and no system features, so the
//! only place the build can run is the builder line given to it.

use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{check_written_in_the_guest, nix_build_with_guard, setup, GUARD};

const REMOTE_USER_HOST: &str = "root@127.0.0.1";

/// A derivation that requires `kvm` is refused by a builder that does not declare the feature,
/// and is built by one that does: the guest's `uname -r` and RAM reach the client's store and
/// are in the remote store too, and Nix's log says where it was built.
pub fn nix_builds_on_a_remote_builder_over_ssh() {
    let dir = setup("nix-remote");
    bring_up_loopback();
    let keys = Keys::generate(&dir.join("ssh"));
    let server = RemoteBuilder::start(&dir, &keys);

    let without_kvm = remote_build(&dir, &server, &keys, "-");
    without_kvm.check(
        without_kvm.status.is_some_and(|s| s != 0)
            && without_kvm
                .stderr
                .contains("required (system, features): (x86_64-linux, kvm)"),
        "a builder line without the kvm feature must not get the VM derivation",
    );

    let with_kvm = remote_build(&dir, &server, &keys, "kvm");
    with_kvm.check(
        with_kvm.status == Some(0),
        &format!(
            "the remote build should succeed\n--- the SSH server's log ---\n{}",
            server.log()
        ),
    );
    with_kvm.check(
        with_kvm
            .stderr
            .contains(&format!("on 'ssh://{REMOTE_USER_HOST}'")),
        "Nix's log should say that the derivation was built on the remote builder",
    );
    let local = std::fs::read_to_string(dir.join("result-local")).unwrap_or_default();
    let remote = std::fs::read_to_string(dir.join("result-remote")).unwrap_or_default();
    check_written_in_the_guest(&with_kvm, &local);
    with_kvm.check(
        remote == local,
        &format!("the remote store should hold the same $out; it holds {remote:?}"),
    );
    println!(
        "    built remotely in {:.1} s",
        with_kvm.elapsed.as_secs_f64()
    );
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Instantiates `uname` in a fresh client store and realises it with one builder line, the
/// remote builder declaring `features`. On success `result-local` holds `$out` from the client's
/// store and `result-remote` the same path read back from the remote store over SSH.
fn remote_build(dir: &Path, server: &RemoteBuilder, keys: &Keys, features: &str) -> super::Run {
    let client_etc = dir.join("client-etc");
    std::fs::create_dir_all(&client_etc).unwrap();
    std::fs::write(
        client_etc.join("nix.conf"),
        "build-users-group =\nsandbox = false\nsystem-features =\nsubstituters =\nmax-jobs = 0\n",
    )
    .unwrap();
    let ssh_opts = format!(
        "-p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        server.port
    );
    let builder = format!(
        "ssh://{REMOTE_USER_HOST} x86_64-linux {} 1 1 {features} - -",
        keys.client.display()
    );
    let script = format!(
        "set -u\n\
         export NIX_CONF_DIR={client_etc}\n\
         export NIX_SSHOPTS='{ssh_opts}'\n\
         drv=$(nix-instantiate {expr} -A uname) || exit 91\n\
         out=$(nix-store --realise --builders '{builder}' $drv); status=$?\n\
         [ $status = 0 ] || exit $status\n\
         cat \"$out\" > {dir}/result-local\n\
         ssh $NIX_SSHOPTS -i {key} {REMOTE_USER_HOST} cat \"$out\" > {dir}/result-remote\n",
        client_etc = client_etc.display(),
        expr = dir.join("test.nix").display(),
        dir = dir.display(),
        key = keys.client.display(),
    );
    nix_build_with_guard(&script, dir, GUARD)
}

/// The test host brings up no network; the SSH connection needs `lo`.
fn bring_up_loopback() {
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip runs (iproute2)");
    assert!(status.success(), "cannot bring up the loopback interface");
}

/// The client's key pair and the server's host key, under `dir`.
struct Keys {
    client: PathBuf,
    host: PathBuf,
    /// The remote `/root`: `.ssh/authorized_keys` with the client's public key.
    home: PathBuf,
}

impl Keys {
    fn generate(dir: &Path) -> Keys {
        let home = dir.join("home");
        let dot_ssh = home.join(".ssh");
        std::fs::create_dir_all(&dot_ssh).unwrap();
        for d in [&home, &dot_ssh] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let client = dir.join("client_key");
        let host = dir.join("host_key");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&client),
        );
        run_ok(
            Command::new("dropbearkey")
                .args(["-t", "ed25519", "-f"])
                .arg(&host),
        );
        let public = std::fs::read(client.with_extension("pub")).unwrap();
        let authorized = dot_ssh.join("authorized_keys");
        std::fs::write(&authorized, public).unwrap();
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600)).unwrap();
        Keys { client, host, home }
    }
}

/// dropbear serving the remote store, killed when dropped.
struct RemoteBuilder {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl RemoteBuilder {
    /// Starts the server in its own mount namespace (the second store, this package set's Nix
    /// configuration, the key-only home) and waits until it accepts connections.
    fn start(dir: &Path, keys: &Keys) -> RemoteBuilder {
        let port = free_port();
        let log = dir.join("dropbear.log");
        let script = format!(
            "set -e\n\
             mount -t tmpfs nix-remote-store /nix\n\
             mount --bind {etc} /etc/nix\n\
             mount --bind {home} /root\n\
             exec dropbear -F -E -s -p 127.0.0.1:{port} -r {host_key} -P {dir}/dropbear.pid\n",
            etc = dir.join("etc").display(),
            home = keys.home.display(),
            host_key = keys.host.display(),
            dir = dir.display(),
        );
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("unshare runs (util-linux)");
        let mut server = RemoteBuilder { child, port, log };
        server.wait_until_listening(Instant::now() + Duration::from_secs(30));
        server
    }

    fn wait_until_listening(&mut self, deadline: Instant) {
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the SSH server ended ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the SSH server did not listen within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RemoteBuilder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        let _ = std::io::stderr().write_all(&out.stderr);
        panic!("{cmd:?} failed: {}", out.status);
    }
}
