# kvmbuild for nixpkgs: `pkgs.callPackage ./package.nix { }`.
#
# kvmbuild carries its guest init (kvmbuild-init, PID 1 of every `kvmbuild exec` guest) inside
# its binary. cli/build.rs builds that init with a nested `cargo build` linked statically
# (`-C target-feature=+crt-static`). We keep that route here rather than building the init in
# a derivation of its own and passing KVMBUILD_PREBUILT_INIT: the nested cargo sees the same
# vendored crates (cargoSetupHook's configuration) and Cargo.lock as the outer build, so one
# derivation builds both, and the only extra input a static glibc link needs is glibc's static
# archives, `glibc.static`.
{
  lib,
  rustPlatform,
  glibc,
}:

let
  # The repository without build products, VCS data or the Nix files themselves (editing a
  # .nix file should not rebuild kvmbuild).
  src = lib.cleanSourceWith {
    src = ../.;
    filter =
      path: type:
      let
        base = baseNameOf path;
      in
      !(
        (type == "directory" && (base == "target" || base == ".git" || base == "nix"))
        || lib.hasSuffix ".nix" base
        || base == "flake.lock"
        || base == "result"
      );
  };
in
rustPlatform.buildRustPackage {
  pname = "kvmbuild";
  version = "0.1.0";
  inherit src;

  cargoLock.lockFile = ../Cargo.lock;

  # Only the kvmbuild binary (the workspace's default member); its build script builds the
  # static init, which needs libc.a.
  cargoBuildFlags = [
    "-p"
    "kvmbuild"
  ];
  buildInputs = [ glibc.static ];

  # The tests boot real kernels under KVM (or cross into a nested test host); not in a build.
  doCheck = false;

  # Under these names kvmbuild accepts the QEMU command line vmTools uses (customQemu).
  postInstall = ''
    ln -s kvmbuild $out/bin/qemu-kvm
    ln -s kvmbuild $out/bin/qemu-system-x86_64
  '';

  meta = {
    description = "Boot a Linux kernel and initrd straight into KVM, in milliseconds";
    license = lib.licenses.asl20;
    platforms = [ "x86_64-linux" ];
    mainProgram = "kvmbuild";
  };
}
