# The disk-image test's package set and images (tests/linux/nix/disk_image.rs writes the call):
# nix/lib/make-disk-image.nix on the native runInLinuxVM, with host binaries added to the store.
# sfdisk and mke2fs run in the guest, whose root holds only the store: each comes as a bundle
# (libexec/NAME, lib/ with its shared libraries and the dynamic loader) behind a wrapper that
# runs it through that loader. jq and qemu-img run on the build host, as they are.
{
  # The repository's nix/lib.
  lib,
  busybox,
  kvmbuild,
  kernel,
  modules,
  virtiofsd,
  sfdiskBundle,
  mke2fsBundle,
  jq,
  qemuImg,
}:

let
  sh = "${busybox}/bin/sh";
  runInLinuxVM = import (lib + "/run-in-linux-vm.nix") {
    inherit kvmbuild kernel modules virtiofsd;
    shell = sh;
    coreutils = busybox;
  };
  # bin/NAME: runs bundle/libexec/NAME with the bundle's loader and libraries.
  wrap =
    name: bundle:
    derivation {
      name = "${name}-wrapped";
      system = builtins.currentSystem;
      builder = sh;
      PATH = "${busybox}/bin";
      args = [
        "-c"
        ''
          mkdir -p $out/bin
          {
            echo '#!${sh}'
            echo 'exec ${bundle}/lib/ld-linux-x86-64.so.2 --library-path ${bundle}/lib ${bundle}/libexec/${name} "$@"'
          } > $out/bin/${name}
          chmod 755 $out/bin/${name}
        ''
      ];
    };
  makeDiskImage = import (lib + "/make-disk-image.nix") {
    inherit runInLinuxVM jq qemuImg;
    shell = sh;
    coreutils = busybox;
    sfdisk = "${wrap "sfdisk" sfdiskBundle}/bin/sfdisk";
    mke2fs = "${wrap "mke2fs" mke2fsBundle}/bin/mke2fs";
  };
  # The image's init: says it runs, shows what its root is, powers the VM off.
  init = derivation {
    name = "image-init";
    system = builtins.currentSystem;
    builder = sh;
    PATH = "${busybox}/bin";
    args = [
      "-c"
      ''
        mkdir -p $out/bin
        {
          echo '#!${sh}'
          echo 'export PATH=${busybox}/bin'
          echo 'echo "KVMBUILD-IMAGE-INIT-REACHED as pid $$"'
          echo 'mkdir -p /proc && mount -t proc proc /proc'
          echo 'grep " / " /proc/mounts | sed "s/^/root mount: /"'
          echo 'ls /nix/store | sed "s/^/store entry: /"'
          echo 'poweroff -f'
        } > $out/bin/init
        chmod 755 $out/bin/init
      ''
    ];
  };
  image =
    attrs:
    makeDiskImage (
      {
        contents = [ init ];
        additionalSpace = 16;
        vmAttrs.kvmbuildVerbose = true;
      }
      // attrs
    );
in
rec {
  inherit init;
  gpt = image {
    name = "image-gpt";
    partitionTableType = "gpt";
    label = "kvmbuild-gpt";
  };
  none = image {
    name = "image-none";
    partitionTableType = "none";
    label = "kvmbuild-none";
  };
  # What the test builds, in this order.
  images = [
    gpt
    none
    qcow2
  ];
  qcow2 = image {
    name = "image-qcow2";
    partitionTableType = "mbr";
    format = "qcow2";
  };
}
