# A bootable disk image holding a store closure, in the spirit of nixpkgs'
# nixos/lib/make-disk-image.nix, built on the native runInLinuxVM:
#
#   * preVM (build host): a sparse raw image of `size` MiB, or with size = "auto" the
#     closure's NAR size plus a fifth, `additionalSpace` MiB and room for ext4's metadata;
#   * in the VM: a partition table (`partitionTableType`: "gpt" or "mbr", one Linux partition
#     from 1 MiB to the end, /dev/vda1; or "none", the file system on the whole disk,
#     /dev/vda), ext4 labelled `label`, the closure copied to /nix/store and its registration
#     at /nix-path-registration (what `nix-store --load-db < /nix-path-registration` reads in
#     the booted system, as NixOS's first boot does);
#   * postVM (build host): the image moved to $out/nixos.img, or with format = "qcow2"
#     converted by qemu-img to $out/nixos.qcow2.
#
# The derivation requires the `kvm` system feature (through runInLinuxVM). Boot it with the
# closure's kernel and `root=/dev/vda1` (or /dev/vda), and an initrd that can reach the disk.
#
# Builtins only. Arguments:
{
  # The native runInLinuxVM (./run-in-linux-vm.nix applied to its arguments).
  runInLinuxVM,
  # A POSIX shell, the builder on the host and in the guest.
  shell,
  # A directory whose bin/ has mkdir, cat, cp, mv, rm, truncate, sync, sleep (coreutils, or
  # busybox's applets), and one whose bin/ has mount and umount (util-linux, or busybox).
  coreutils,
  utilLinux ? coreutils,
  # sfdisk (util-linux), mke2fs (e2fsprogs), jq, qemu-img: executables (paths).
  sfdisk,
  mke2fs,
  jq,
  qemuImg ? null,
}:

{
  name ? "disk-image",
  # Store paths whose closure goes into the image.
  contents,
  # MiB, or "auto".
  size ? "auto",
  # MiB of free space on top of the closure when size = "auto".
  additionalSpace ? 64,
  # "gpt", "mbr" or "none".
  partitionTableType ? "gpt",
  label ? "nixos",
  # "raw" or "qcow2".
  format ? "raw",
  memSize ? 512,
  # More attributes for the VM derivation (QEMU_OPTS, kvmbuildVerbose, ...).
  vmAttrs ? { },
}:

let
  bin = name: "${coreutils}/bin/${name}";
  check =
    what: ok: value:
    if builtins.elem value ok then
      value
    else
      throw "makeDiskImage: ${what} must be one of ${builtins.concatStringsSep ", " ok}, not ${toString value}";
  partitions = check "partitionTableType" [ "gpt" "mbr" "none" ] partitionTableType;
  imageFormat = check "format" [ "raw" "qcow2" ] format;
  sizeArg =
    if size == "auto" || builtins.isInt size then
      toString size
    else
      throw "makeDiskImage: size must be a number of MiB or \"auto\"";

  # The closure and what `nix-store --load-db` needs for it, as nixpkgs' closureInfo makes
  # them: store-paths, registration (path, NAR hash, NAR size, deriver, references), and
  # total-nar-size. Structured attributes give the NAR hashes and sizes.
  closureInfo = derivation {
    name = "${name}-closure-info";
    system = builtins.currentSystem;
    builder = shell;
    __structuredAttrs = true;
    exportReferencesGraph.closure = contents;
    args = [
      "-c"
      ''
        set -e
        attrs=''${NIX_ATTRS_JSON_FILE:-$NIX_BUILD_TOP/.attrs.json}
        jq=${jq}
        out=$($jq -r .outputs.out "$attrs")
        ${bin "mkdir"} "$out"
        $jq -r '.closure | map(.narSize) | add' "$attrs" > "$out/total-nar-size"
        $jq -r '.closure[].path' "$attrs" > "$out/store-paths"
        $jq -r '.closure[] | .path, .narHash, (.narSize | tostring), "", (.references | length | tostring), .references[]' "$attrs" > "$out/registration"
      ''
    ];
  };

  # In the guest: partition, make the file system, fill it.
  fillImage = ''
    set -e
    PATH=${coreutils}/bin:${utilLinux}/bin
    echo "makeDiskImage: partitioning ($partitionTableType)"
    case $partitionTableType in
      gpt) printf 'label: gpt\nstart=2048, type=L\n' | ${sfdisk} --quiet /dev/vda; root=/dev/vda1 ;;
      mbr) printf 'label: dos\nstart=2048, type=83, bootable\n' | ${sfdisk} --quiet /dev/vda; root=/dev/vda1 ;;
      none) root=/dev/vda ;;
    esac
    # devtmpfs makes the partition's node once the kernel has re-read the table; bounded wait.
    tries=0
    while [ ! -b "$root" ]; do
      tries=$((tries + 1))
      if [ "$tries" -gt 100 ]; then echo "makeDiskImage: $root did not appear" >&2; exit 1; fi
      sleep 0.1
    done
    echo "makeDiskImage: ext4 labelled $label on $root"
    ${mke2fs} -q -F -t ext4 -L "$label" "$root"
    mkdir -p /mnt
    mount -t ext4 "$root" /mnt
    mkdir -p /mnt/nix/store
    echo "makeDiskImage: copying the closure"
    for path in $(cat ${closureInfo}/store-paths); do
      cp -a "$path" /mnt/nix/store/
    done
    cp ${closureInfo}/registration /mnt/nix-path-registration
    umount /mnt
    sync
  '';
in
runInLinuxVM (derivation (vmAttrs // {
  inherit name memSize;
  # Always with a disk, which the warm image does not have.
  kvmbuildWarm = false;
  system = builtins.currentSystem;
  builder = shell;
  args = [
    "-c"
    fillImage
  ];
  inherit label;
  partitionTableType = partitions;
  diskSize = sizeArg;
  inherit additionalSpace;
  preVM = ''
    if [ "$diskSize" = auto ]; then
      read -r narSize < ${closureInfo}/total-nar-size
      # A fifth more than the NAR size for ext4's block rounding and inodes, 16 MiB for its
      # journal and tables (and the partition table), and the headroom asked for.
      diskSize=$(( (narSize * 6 / 5 + 1048575) / 1048576 + 16 + additionalSpace ))
    fi
    diskImage=$NIX_BUILD_TOP/disk.raw
    ${bin "truncate"} -s "''${diskSize}M" "$diskImage"
  '';
  postVM =
    if imageFormat == "qcow2" then
      (
        if qemuImg == null then
          throw "makeDiskImage: format = \"qcow2\" needs qemuImg"
        else
          ''
            ${bin "mkdir"} -p "$out"
            ${qemuImg} convert -f raw -O qcow2 "$diskImage" "$out/nixos.qcow2"
            ${bin "rm"} "$diskImage"
          ''
      )
    else
      ''
        ${bin "mkdir"} -p "$out"
        ${bin "mv"} "$diskImage" "$out/nixos.img"
      '';
}))
