# A native `runInLinuxVM`: builds a derivation inside a microVM started by `kvmbuild exec`,
# with kvmbuild's own initrd and init instead of nixpkgs' stage 1 and QEMU.
#
# It keeps vmTools' contract where it makes sense (pkgs/build-support/vm/default.nix in
# nixpkgs): the builder's environment is written to `xchg/saved-env` before the VM starts and
# sourced inside it; the builder's status comes back in `xchg/in-vm-exit`; `preVM` runs on the
# build host before the VM and `postVM` after a successful build; `memSize` is the guest's RAM
# in MiB; `enableParallelBuilding` gives the guest NIX_BUILD_CORES vCPUs; `diskImage` (set by
# preVM) is attached as /dev/vda. Inside, the Nix store is mounted at its own path and the
# exchange directory at /tmp/xchg; the builder runs in /tmp.
#
# Differences from vmTools, each refused with a message rather than ignored:
#   * QEMU_OPTS is read word by word: `-m N[M|G]` and `-smp [cpus=]N` are mapped, `-cpu max`,
#     `-cpu host`, `-nographic`, `-no-reboot` and `-enable-kvm` describe what kvmbuild does
#     anyway; anything else fails the build naming the option.
#   * `diskImage` must be a raw image (no qcow2, so no backing files); `mountDisk` (a disk as
#     the guest's root) is not supported.
#   * structured attributes (`__structuredAttrs`) are not supported.
#
# `kvmbuildVerbose = true` adds `kvmbuild exec -v`'s account (kernel, initrd, virtiofsd, boot
# and command timings) to the build log.
#
# Warm start: a build with the default memory size, one vCPU and no disk starts from a
# snapshot of the builder VM (`kvmbuild exec --warm`) instead of booting the kernel. The
# snapshot, with the initrd, is a derivation of its own (`kvmbuild-warm-image`), built once per
# kernel, kvmbuild and machine: it boots the VM to kvmbuild's snapshot point and saves it, then
# runs once from it to record the pages a run touches. It is only good for the host it was
# made on (kvmbuild refuses a snapshot made where KVM offered another CPU, and boots cold), so
# it is never substituted. `warm = false` here, or `kvmbuildWarm = false` on a derivation,
# boots cold.
#
# The store is shared writable, as vmTools shares it: the builder writes its outputs at their
# own store paths. Inside Nix's sandbox that store holds only the build's inputs and outputs.
#
# This file uses only builtins, so it works with any nixpkgs or with none (the repository's
# tests build with a package set made of host binaries). Arguments:
{
  # A directory with bin/kvmbuild.
  kvmbuild,
  # The kernel: a bzImage or an ELF vmlinux (with PVH, as Linux's is).
  kernel,
  # The kernel's module directory, lib/modules/RELEASE, with modules.dep (depmod's output).
  modules,
  # The virtiofsd executable.
  virtiofsd,
  # A POSIX shell (bash or busybox sh): it runs both the host side and the guest's stage 2.
  # `export` output of this shell must be readable by the same shell.
  shell,
  # A directory whose bin/ has mkdir, ln, cat, head and nproc (coreutils, or busybox's
  # applets).
  coreutils,
  # Where the store is, on the host and in the guest.
  storeDir ? builtins.storeDir,
  # Start builds that fit the warm image from it (see above).
  warm ? true,
}:

drv:

let
  attrs = if drv ? drvAttrs then drv.drvAttrs else drv;
  memSize = attrs.memSize or 512;

  # The warm image's machine: vmTools' default memory size and one vCPU. A build that asks
  # for more cannot use it, and does not depend on it.
  warmMemSize = 512;
  useWarm =
    (attrs.kvmbuildWarm or warm)
    && memSize == warmMemSize
    && !(attrs.enableParallelBuilding or false)
    && (attrs.QEMU_OPTS or "") == "";
  # `kvmbuild exec` with the devices every build has: the store and the exchange directory.
  execArgs = ''
    --no-root --kernel ${kernel} --modules ${modules} --virtiofsd ${virtiofsd} \
      --share ${storeDir}:${storeDir} --share "$NIX_BUILD_TOP/xchg:/tmp/xchg" --cwd /tmp'';
  warmImage = derivation {
    name = "kvmbuild-warm-image";
    inherit (attrs) system;
    builder = shell;
    args = [
      "-e"
      "-c"
      ''
        ${bin "mkdir"} -p "$NIX_BUILD_TOP/xchg" "$out"
        export XDG_CACHE_HOME="$out"
        # The first run saves the snapshot; the second, restored from it, records its hot list.
        for run in save hot-list; do
          ${kvmbuild}/bin/kvmbuild exec --warm ${execArgs} \
            --mem ${toString warmMemSize} --cpus 1 -- ${shell} -c true
        done
      ''
    ];
    requiredSystemFeatures = [ "kvm" ];
    # Made for this host's CPU and KVM: never fetched from elsewhere.
    preferLocalBuild = true;
    allowSubstitutes = false;
  };
  bin = name: "${coreutils}/bin/${name}";
  # The builder's arguments as one shell-quoted string, so that they reach it unchanged
  # (`origArgs`, kept for vmTools' users, is only their space-joined text).
  quote = arg: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg) + "'";
  quotedArgs = builtins.concatStringsSep " " (map quote (attrs.args or [ ]));

  # Runs in the guest as kvmbuild's command: restore the environment Nix gave the builder, point
  # its scratch variables at the guest's /tmp, run the builder, report its status.
  stage2 = ''
    . /tmp/xchg/saved-env
    export NIX_STORE=${storeDir}
    export NIX_BUILD_TOP=/tmp TMPDIR=/tmp TEMPDIR=/tmp TMP=/tmp TEMP=/tmp
    cd /tmp
    if [ ! -e /bin/sh ]; then
      ${bin "mkdir"} -p /bin && ${bin "ln"} -s ${shell} /bin/sh
    fi
    if [ ! -e /etc/passwd ]; then
      ${bin "mkdir"} -p /etc
      echo "root:x:0:0:System administrator:/root:/bin/sh" > /etc/passwd
    fi
    exec < /dev/null
    status=0
    eval "set -- $kvmbuildArgs"
    "$origBuilder" "$@" || status=$?
    echo "$status" > /tmp/xchg/in-vm-exit
    exit "$status"
  '';

  # Runs on the build host as the derivation's builder.
  host = ''
    fail() { echo "runInLinuxVM (kvmbuild): $*" >&2; exit 1; }
    ${bin "mkdir"} xchg
    export > xchg/saved-env
    printf '%s\n' "$kvmbuildStage2" > xchg/stage2

    eval "$preVM"

    [ -z "''${mountDisk-}" ] || fail "mountDisk (a disk as the guest's root) is not supported; use vmTools with kvmbuild's qemu-kvm"

    mem=$memSize
    cpus=1
    if [ "$enableParallelBuilding" = 1 ]; then
      cpus=''${NIX_BUILD_CORES:-0}
      [ "$cpus" != 0 ] || cpus=$(${bin "nproc"})
      [ "$cpus" -le 254 ] || cpus=254
    fi

    # QEMU_OPTS, mapped by name; whatever has no equivalent fails the build.
    set -f
    set -- $QEMU_OPTS
    set +f
    while [ $# -gt 0 ]; do
      opt=$1
      shift
      case $opt in
        -m|-smp|-cpu)
          [ $# -gt 0 ] || fail "QEMU_OPTS: $opt needs a value"
          value=$1
          shift ;;
      esac
      case $opt in
        -m)
          value=''${value#size=}
          value=''${value%%,*}
          case $value in
            *[Gg]) mem=$(( ''${value%?} * 1024 )) ;;
            *[Mm]) mem=''${value%?} ;;
            *) mem=$value ;;
          esac ;;
        -smp)
          value=''${value#cpus=}
          cpus=''${value%%,*} ;;
        -cpu)
          case $value in
            max|host) ;;
            *) fail "QEMU_OPTS: -cpu $value: kvmbuild offers the host's CPU (max/host) only" ;;
          esac ;;
        -nographic|-no-reboot|-enable-kvm) ;;
        *) fail "QEMU_OPTS: $opt has no kvmbuild equivalent (mapped: -m, -smp, -cpu max|host, -nographic, -no-reboot, -enable-kvm)" ;;
      esac
    done
    case $mem in ""|*[!0-9]*) fail "memory size '$mem' is not a number of MiB" ;; esac
    case $cpus in ""|*[!0-9]*) fail "vCPU count '$cpus' is not a number" ;; esac

    disk=
    if [ -n "''${diskImage-}" ]; then
      [ -f "$diskImage" ] || [ -b "$diskImage" ] || fail "diskImage $diskImage is not a file or block device"
      # The first bytes only: `read` would scan a whole image that has no newline (a fresh,
      # sparse one is all zeros), byte by byte under busybox, for minutes on a large disk.
      magic=$(${bin "head"} -c 4 "$diskImage" 2>/dev/null) || true
      case $magic in
        QFI*) fail "diskImage $diskImage is qcow2; kvmbuild attaches raw images only" ;;
      esac
      disk="--disk=$diskImage"
    fi

    # kvmbuild caches its initrd per kernel and init: in the warm image, whose snapshot this
    # build starts from when it has the image's machine and no disk, or else with the build.
    warm=
    if [ -n "$kvmbuildWarmImage" ] && [ "$mem" = ${toString warmMemSize} ] && [ "$cpus" = 1 ] && [ -z "$disk" ]; then
      export XDG_CACHE_HOME="$kvmbuildWarmImage"
      warm=--warm
    else
      export XDG_CACHE_HOME="$NIX_BUILD_TOP/.kvmbuild-cache"
    fi
    vmStatus=0
    verbose=
    [ -z "$kvmbuildVerbose" ] || verbose=-v
    ${kvmbuild}/bin/kvmbuild exec $verbose $warm ${execArgs} \
      --mem "$mem" --cpus "$cpus" $disk \
      -- ${shell} /tmp/xchg/stage2 || vmStatus=$?

    if [ ! -e xchg/in-vm-exit ]; then
      echo "runInLinuxVM (kvmbuild): the virtual machine produced no exit code (kvmbuild exec exited $vmStatus)" >&2
      [ "$vmStatus" = 0 ] && exit 1
      exit "$vmStatus"
    fi
    read -r exitCode < xchg/in-vm-exit
    [ "$exitCode" = 0 ] || exit "$exitCode"

    eval "$postVM"
  '';
in
if attrs.__structuredAttrs or false then
  throw "runInLinuxVM (kvmbuild): ${attrs.name or "this derivation"} uses __structuredAttrs, which is not supported"
else
  derivation (
    removeAttrs attrs [
      "builder"
      "args"
      "memSize"
      "kvmbuildWarm"
    ]
    // {
      builder = shell;
      args = [
        "-e"
        "-c"
        host
      ];
      origBuilder = attrs.builder;
      origArgs = attrs.args or [ ];
      memSize = toString memSize;
      preVM = attrs.preVM or "";
      postVM = attrs.postVM or "";
      QEMU_OPTS = attrs.QEMU_OPTS or "";
      enableParallelBuilding = attrs.enableParallelBuilding or false;
      requiredSystemFeatures = (attrs.requiredSystemFeatures or [ ]) ++ [ "kvm" ];
      # true: kvmbuild exec -v (its kernel, initrd, virtiofsd and timings) in the build log.
      kvmbuildVerbose = attrs.kvmbuildVerbose or false;
      kvmbuildStage2 = stage2;
      kvmbuildWarmImage = if useWarm then warmImage else "";
      kvmbuildArgs = quotedArgs;
      # Attributes passed as files would be paths on the build host, not in the guest.
      passAsFile = [ ];
    }
  )
