# Without flakes: `nix-build nix` builds kvmbuild with the nixpkgs on NIX_PATH;
# `import ./nix { }` gives the package, the overlay and the native functions.
{
  pkgs ? import <nixpkgs> { overlays = [ (import ./overlay.nix) ]; },
}:

let
  kvmbuild = pkgs.kvmbuild or (pkgs.callPackage ./package.nix { });
in
kvmbuild
// {
  overlay = import ./overlay.nix;
  lib = import ./lib { inherit pkgs kvmbuild; };
}
