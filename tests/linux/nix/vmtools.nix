# The drop-in path without nixpkgs: a vmTools of our own, shaped as nixpkgs'
# pkgs/build-support/vm/default.nix (its vmRunCommand's host side, a busybox stage 1 that
# insmods modules by path and mounts `store` and `xchg` by tag, stage 2 with in-vm-exit and
# poweroff -f, and its QEMU argument line), with `customQemu` pointing at kvmbuild's qemu-kvm
# name. Next to it, nix/lib's native runInLinuxVM on the same package set, so the same trivial
# derivation can be built both ways (tests/linux/nix/timing.rs).
{
  # The repository's nix/lib.
  lib,
  busybox,
  # bin/kvmbuild and bin/qemu-kvm (a symlink to it).
  kvmbuild,
  kernel,
  # lib/modules/RELEASE of the kernel, and the modules stage 1 loads, in load order, relative
  # to it.
  modules,
  moduleList,
  virtiofsd,
}:

let
  sh = "${busybox}/bin/sh";
  system = builtins.currentSystem;
  # A store file with mode 755 holding `text`.
  script =
    name: text:
    derivation {
      inherit name system;
      builder = sh;
      PATH = "${busybox}/bin";
      inherit text;
      passAsFile = [ "text" ];
      args = [
        "-c"
        "cp $textPath $out && chmod 755 $out"
      ];
    };

  stage1 = script "vm-run-stage1" ''
    #!/bin/sh
    /bin/busybox mkdir -p /proc /sys /dev
    /bin/busybox mount -t proc proc /proc
    /bin/busybox mount -t sysfs sys /sys
    /bin/busybox mount -t devtmpfs dev /dev
    exec > /dev/console 2>&1 < /dev/console
    set -e
    /bin/busybox --install -s /bin
    export PATH=/bin
    for m in ${builtins.concatStringsSep " " moduleList}; do
      insmod /lib/modules/$m || echo "warning: unable to load $m"
    done
    for o in $(cat /proc/cmdline); do
      case $o in
        mountDisk=*) mountDisk=''${o#mountDisk=} ;;
        command=*) command=''${o#command=} ;;
      esac
    done
    mkdir /fs
    if [ -z "$mountDisk" ]; then mount -t tmpfs none /fs; else mount /dev/vda /fs; fi
    mkdir -p /fs/dev /fs/proc /fs/sys /fs/nix/store /fs/tmp
    mount -o bind /dev /fs/dev
    mount -t virtiofs store /fs/nix/store
    mount -t tmpfs -o mode=1777 none /fs/tmp
    mkdir -p /fs/tmp/xchg
    mount -t virtiofs xchg /fs/tmp/xchg
    mount -t proc none /fs/proc
    mount -t sysfs none /fs/sys
    echo "starting stage 2 ($command)"
    exec switch_root /fs $command
  '';

  initrd = derivation {
    name = "initrd";
    inherit system;
    builder = sh;
    PATH = "${busybox}/bin";
    args = [
      "-c"
      ''
        set -e
        mkdir -p root/bin root/proc root/sys root/dev $out
        cp ${busybox}/bin/busybox root/bin/busybox
        ln -s busybox root/bin/sh
        for m in ${builtins.concatStringsSep " " moduleList}; do
          mkdir -p root/lib/modules/''${m%/*}
          cp ${modules}/$m root/lib/modules/$m
        done
        cp ${stage1} root/init
        cd root
        find . | cpio -o -H newc > $out/initrd
      ''
    ];
  };

  stage2 = script "vm-run-stage2" ''
    #!${sh}
    set -eu
    . /tmp/xchg/saved-env
    export NIX_STORE=/nix/store NIX_BUILD_TOP=/tmp TMPDIR=/tmp PATH=/empty
    cd /tmp
    "$origBuilder" $origArgs
    echo $? > /tmp/xchg/in-vm-exit
    ${busybox}/bin/poweroff -f
  '';

  customQemu = "${kvmbuild}/bin/qemu-kvm -cpu max";

  vmRun = ''
    set -e
    export PATH=${busybox}/bin
    mkdir xchg
    export > xchg/saved-env
    eval "$preVM"
    ${virtiofsd} --socket-path virtio-store.sock --sandbox none --seccomp none --shared-dir /nix/store &
    store=$!
    ${virtiofsd} --socket-path virtio-xchg.sock --sandbox none --seccomp none --shared-dir xchg &
    xchg=$!
    tries=0
    until [ -e virtio-store.sock ] && [ -e virtio-xchg.sock ]; do
      tries=$((tries + 1))
      [ "$tries" -lt 300 ] || { echo "virtiofsd made no socket"; exit 1; }
      sleep 0.1
    done
    ${customQemu} \
      -nographic -no-reboot \
      -device virtio-rng-pci \
      -chardev socket,id=store,path=virtio-store.sock \
      -device vhost-user-fs-pci,chardev=store,tag=store \
      -chardev socket,id=xchg,path=virtio-xchg.sock \
      -device vhost-user-fs-pci,chardev=xchg,tag=xchg \
      ''${diskImage:+-drive file=$diskImage,if=virtio,cache=unsafe,werror=report} \
      -kernel ${kernel} \
      -initrd ${initrd}/initrd \
      -append "console=ttyS0 panic=1 command=${stage2} mountDisk=$mountDisk loglevel=4" \
      $QEMU_OPTS
    kill $store $xchg 2>/dev/null || true
    if ! test -e xchg/in-vm-exit; then
      echo "Virtual machine didn't produce an exit code."
      exit 1
    fi
    exitCode=$(cat xchg/in-vm-exit)
    [ "$exitCode" = 0 ] || exit "$exitCode"
    eval "$postVM"
  '';

  dropInRunInLinuxVM =
    attrs:
    derivation (
      removeAttrs attrs [ "memSize" ]
      // {
        builder = sh;
        args = [
          "-c"
          vmRun
        ];
        origBuilder = attrs.builder;
        origArgs = attrs.args;
        preVM = attrs.preVM or "";
        postVM = attrs.postVM or "";
        mountDisk = "";
        requiredSystemFeatures = [ "kvm" ];
        QEMU_OPTS = "-m ${toString (attrs.memSize or 512)} -object memory-backend-memfd,id=mem,size=${toString (attrs.memSize or 512)}M,share=on -machine memory-backend=mem";
      }
    );

  nativeRunInLinuxVM = import (lib + "/run-in-linux-vm.nix") {
    kvmbuild = kvmbuild;
    kernel = kernel;
    modules = modules;
    inherit virtiofsd;
    shell = sh;
    coreutils = busybox;
  };

  # The trivial VM derivation: the guest's kernel release. `seed` makes each build distinct.
  trivial = how: seed: {
    name = "trivial-${how}-${toString seed}";
    inherit system seed;
    builder = sh;
    PATH = "${busybox}/bin";
    args = [
      "-e"
      (builtins.toFile "trivial.sh" "uname -r > $out")
    ];
  };
in
{
  dropIn = seed: dropInRunInLinuxVM (trivial "drop-in" seed);
  # kvmbuild -v in the log shows whether the build started from the warm image.
  native =
    seed: nativeRunInLinuxVM (derivation (trivial "native" seed // { kvmbuildVerbose = true; }));
}
