# The overlay: `kvmbuild`, stock `vmTools` running on kvmbuild's QEMU-compatible entry point
# (vmTools' `customQemu` argument: the QEMU binary it calls), and `kvmbuildTools`, the native
# functions with nixpkgs' kernel, shell and virtiofsd.
final: prev: {
  kvmbuild = final.callPackage ./package.nix { };

  vmTools = prev.vmTools.override { customQemu = "${final.kvmbuild}/bin/qemu-kvm"; };

  kvmbuildTools = import ./lib {
    pkgs = final;
    inherit (final) kvmbuild;
  };
}
