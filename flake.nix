{
  description = "kvmbuild: boot Linux straight into KVM; a fast engine for nixpkgs' vmTools";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = import nixpkgs {
        inherit system;
        overlays = [ self.overlays.default ];
      };
    in
    {
      packages.${system} = {
        default = pkgs.kvmbuild;
        kvmbuild = pkgs.kvmbuild;
      };

      overlays.default = import ./nix/overlay.nix;

      lib = {
        # The native runInLinuxVM with every input explicit (kvmbuild, kernel, modules,
        # virtiofsd, shell, coreutils): see nix/lib/run-in-linux-vm.nix.
        mkRunInLinuxVM = import ./nix/lib/run-in-linux-vm.nix;
        # makeDiskImage with every input explicit: see nix/lib/make-disk-image.nix.
        mkMakeDiskImage = import ./nix/lib/make-disk-image.nix;
        # The same with nixpkgs' kernel, bash, coreutils and virtiofsd:
        # `(kvmbuild.lib.forPkgs pkgs).runInLinuxVM drv`, `.makeDiskImage { contents = [ … ]; }`.
        forPkgs =
          pkgs':
          import ./nix/lib {
            pkgs = pkgs';
            kvmbuild = pkgs'.kvmbuild or (pkgs'.callPackage ./nix/package.nix { });
          };
        # For x86_64-linux with this flake's nixpkgs.
        inherit (pkgs.kvmbuildTools) runInLinuxVM makeDiskImage;
      };
    };
}
