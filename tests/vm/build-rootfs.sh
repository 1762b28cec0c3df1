#!/usr/bin/env bash
# build-rootfs.sh - a minimal Debian 12 root filesystem with systemd as PID 1,
# for the tests that need real unit semantics (Type=notify start timeouts,
# RuntimeDirectory, restarts, journald priorities, dpkg maintainer scripts).
#
# Booted by `run-in-vm.sh --systemd` with the kernel of build-initramfs.sh:
# a tiny busybox initramfs loads virtio_blk + ext4 + 9p, mounts the image
# (QEMU snapshot=on: every run starts from the same image, nothing is written
# back), mounts the --share folders, copies the per-run /krt (command, nonce)
# and switch_roots to /lib/systemd/systemd. krt-run.service runs /krt/cmd on
# the serial console once basic.target is reached, then powers off.
#
# Outputs, in ${KRT_VM_CACHE:-/var/tmp/kr-tunneld-vm}/systemd:
#   rootfs.img        ext4 image (mke2fs -d) of `mmdebstrap --variant=minbase`
#                     + systemd, systemd-sysv, iproute2, ipvsadm, kmod, the
#                     kernel's network/fs modules, krt-run.service
#   initrd.cpio.gz    busybox + the modules that mount the image and shares
#   stamp             inputs of the last build (kernel, hash of this script)
#
# Usage: build-rootfs.sh [--force]
# Installs mmdebstrap, e2fsprogs and busybox-static with apt-get when run as
# root; mmdebstrap fetches from deb.debian.org (KRT_VM_MIRROR to change).
# Idempotent: prints "up to date" when the outputs match this script and the
# kernel of build-initramfs.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KRT_LOG_TAG=build-rootfs
# shellcheck source=tests/vm/common.sh
. "$HERE/common.sh"

CACHE=${KRT_VM_CACHE:-/var/tmp/kr-tunneld-vm}
OUT=$CACHE/systemd
MIRROR=${KRT_VM_MIRROR:-http://deb.debian.org/debian}
FORCE=0
for a in "$@"; do
  case $a in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) krt_log "unknown argument $a"; exit 2 ;;
  esac
done

# The kernel (and its unpacked modules) come from build-initramfs.sh's cache.
"$HERE/build-initramfs.sh"
KVER=$(cat "$CACHE/kernel-version")
KROOT=$CACHE/kernel/$KVER
MODS=$KROOT/lib/modules/$KVER

krt_ensure_pkgs mmdebstrap e2fsprogs busybox-static cpio
mkdir -p "$OUT"
exec 8>"$OUT/.lock"
flock 8

HASH=$( { cat "$0" "$HERE/common.sh"; echo "$KVER $MIRROR"; } | md5sum | cut -c1-16)
if ((FORCE == 0)) && [[ -f $OUT/rootfs.img && -f $OUT/initrd.cpio.gz &&
      $(cat "$OUT/stamp" 2>/dev/null) == "$HASH" ]]; then
  krt_log "up to date ($KVER)"
  exit 0
fi
T0=$(date +%s.%N)
STAGE=$(mktemp -d "$OUT/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# ------------------------------------------------------------------ rootfs --
ROOT=$STAGE/root
krt_log "mmdebstrap bookworm (minbase + systemd) from $MIRROR"
mmdebstrap --quiet --variant=minbase --mode=root \
  --aptopt='APT::Install-Recommends "false"' \
  --include=systemd,systemd-sysv,iproute2,ipvsadm,kmod,procps \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  bookworm "$ROOT" "deb $MIRROR bookworm main"
# apt lists and caches are not needed (no network in the guest: dpkg -i only).
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*

# Modules: networking, filesystems, virtio and the small net drivers (veth,
# dummy, ...); modprobe/systemd-modules-load find them through depmod.
MD=$ROOT/usr/lib/modules/$KVER
mkdir -p "$MD/kernel/drivers/net" "$MD/kernel/drivers/block"
cp -a "$MODS"/kernel/{net,lib,crypto,fs} "$MD/kernel/"
cp -a "$MODS/kernel/drivers/virtio" "$MD/kernel/drivers/"
cp -a "$MODS/kernel/drivers/block/virtio_blk.ko" "$MD/kernel/drivers/block/"
find "$MODS/kernel/drivers/net" -maxdepth 1 -name '*.ko' -exec cp -a {} "$MD/kernel/drivers/net/" \;
cp -a "$MODS"/modules.{order,builtin,builtin.modinfo} "$MD/"
depmod -b "$ROOT" "$KVER"

echo krt-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost krt-vm\n::1 localhost\n' > "$ROOT/etc/hosts"
# A fixed machine id: no first-boot logic.
echo 4b5254564d0000000000000000000001 > "$ROOT/etc/machine-id"
: > "$ROOT/etc/fstab"
# Nothing that waits for devices or the network on a test VM.
for u in systemd-networkd-wait-online.service getty@tty1.service serial-getty@ttyS0.service \
         systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer fstrim.timer systemd-journald-audit.socket; do
  ln -sf /dev/null "$ROOT/etc/systemd/system/$u"
done
rm -f "$ROOT"/etc/systemd/system/getty.target.wants/*
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nForwardToConsole=no\n' \
  > "$ROOT/etc/systemd/journald.conf.d/krt.conf"

# krt-run.service: the test command, on the serial console, then power off.
cat > "$ROOT/usr/local/sbin/krt-run" <<'EOF'
#!/bin/bash
# Runs /krt/cmd (written by run-in-vm.sh), reports its exit status on the
# console in run-in-vm.sh's format and powers the VM off.
export PATH=/krt/bin:/usr/sbin:/usr/bin HOME=/root TERM=dumb
NONCE=$(cat /krt/nonce 2>/dev/null)
echo "krt-vm: ready after $(cut -d' ' -f1 /proc/uptime)s (guest uptime, systemd)"
cd /root
if [ -x /krt/cmd ]; then
  /krt/cmd </dev/null; rc=$?
else
  echo "krt-vm: no command"; rc=125
fi
if [ -s /krt/dmesg ]; then dmesg > "$(cat /krt/dmesg)" 2>/dev/null; fi
if [ -s /krt/journal ]; then journalctl -b --no-pager -o short-monotonic > "$(cat /krt/journal)" 2>/dev/null; fi
sync
echo
echo "KRT-VM-EXIT $NONCE $rc $(cut -d' ' -f1 /proc/uptime)"
systemctl poweroff -ff
EOF
chmod 0755 "$ROOT/usr/local/sbin/krt-run"
cat > "$ROOT/etc/systemd/system/krt-run.service" <<'EOF'
[Unit]
Description=kr-tunneld test command (/krt/cmd)
# After basic.target only: the command runs while multi-user.target may still
# be starting (a test can watch the boot itself).
After=basic.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/krt-run
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/krt-run.service "$ROOT/etc/systemd/system/multi-user.target.wants/krt-run.service"

SIZE_MB=$(( $(du -sm "$ROOT" | cut -f1) + 400 ))
rm -f "$OUT/rootfs.img.tmp"
mke2fs -q -t ext4 -L krt-root -E root_owner=0:0 -d "$ROOT" "$OUT/rootfs.img.tmp" "${SIZE_MB}M"
mv "$OUT/rootfs.img.tmp" "$OUT/rootfs.img"

# ------------------------------------------------------------------ initrd --
I=$STAGE/initrd
mkdir -p "$I"/{bin,dev,proc,sys,newroot,mods}
cp /bin/busybox "$I/bin/busybox"
for a in sh mount umount insmod mkdir cat cp switch_root sleep echo cut; do ln -s busybox "$I/bin/$a"; done
: > "$I/mods/list"
declare -A seen=()
for m in virtio_pci virtio_blk ext4 9pnet_virtio 9p; do
  while read -r kind path _; do
    [[ $kind == insmod ]] || continue
    [[ $path == */arch/x86/crypto/* ]] && continue
    b=$(basename "$path")
    [[ -n ${seen[$b]:-} ]] && continue
    seen[$b]=1
    cp "$path" "$I/mods/$b"
    echo "$b" >> "$I/mods/list"
  done < <(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m")
done
cat > "$I/init" <<'EOF'
#!/bin/sh
# Mount the root image and the host shares, hand over to systemd.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/mods/$m" || echo "krt-initrd: failed to load $m"; done < /mods/list
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o rw /dev/vda /newroot || { echo "krt-initrd: cannot mount /dev/vda"; sleep 1; echo o > /proc/sysrq-trigger; }
mkdir -p /newroot/krt
cp -a /krt/. /newroot/krt/ 2>/dev/null
if [ -f /krt/shares ]; then
  while read -r tag dir; do
    mkdir -p "/newroot$dir"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose "$tag" "/newroot$dir" \
      || echo "krt-initrd: 9p mount of $dir failed"
  done < /krt/shares
fi
umount /proc /sys
mount -o move /dev /newroot/dev
exec switch_root /newroot /lib/systemd/systemd
EOF
chmod 0755 "$I/init"
( cd "$I" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 ) |
  gzip -1 > "$OUT/initrd.cpio.gz.tmp"
mv "$OUT/initrd.cpio.gz.tmp" "$OUT/initrd.cpio.gz"
echo "$HASH" > "$OUT/stamp"
krt_log "rootfs $(du -h --apparent-size "$OUT/rootfs.img" | cut -f1) (used $(du -h "$OUT/rootfs.img" | cut -f1))," \
  "initrd $(du -h "$OUT/initrd.cpio.gz" | cut -f1), built in $(krt_since "$T0")s"
