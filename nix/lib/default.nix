# The native functions with nixpkgs' defaults: `runInLinuxVM drv`, booting `kernel` (nixpkgs'
# default Linux unless given) with kvmbuild's own initrd and init.
{
  pkgs,
  kvmbuild ? pkgs.callPackage ../package.nix { },
  kernel ? pkgs.linux,
}:

let
  modulesOutput = pkgs.lib.getOutput "modules" kernel;
in
rec {
  runInLinuxVM = import ./run-in-linux-vm.nix {
    inherit kvmbuild;
    kernel = "${kernel}/${pkgs.stdenv.hostPlatform.linux-kernel.target}";
    modules = "${modulesOutput}/lib/modules/${kernel.modDirVersion}";
    virtiofsd = "${pkgs.virtiofsd}/bin/virtiofsd";
    shell = "${pkgs.bash}/bin/bash";
    inherit (pkgs) coreutils;
    storeDir = builtins.storeDir;
  };

  makeDiskImage = import ./make-disk-image.nix {
    inherit runInLinuxVM;
    shell = "${pkgs.bash}/bin/bash";
    inherit (pkgs) coreutils;
    utilLinux = pkgs.util-linux;
    sfdisk = "${pkgs.util-linux}/bin/sfdisk";
    mke2fs = "${pkgs.e2fsprogs}/bin/mke2fs";
    jq = "${pkgs.jq}/bin/jq";
    qemuImg = "${pkgs.qemu-utils}/bin/qemu-img";
  };
}
