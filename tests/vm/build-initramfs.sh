#!/usr/bin/env bash
# build-initramfs.sh - fetch a stock Debian kernel and build a small initramfs
# that boots it under QEMU with every module kr-tunneld's kernel tests need
# (ipip, ip6_tunnel, fou/fou6, IPVS, veth, dummy, bridge, nf_tables, 9p).
#
# Why: development and CI machines may run a kernel without those modules and
# without module loading, so tests/run-kernel-tests.sh boots Debian's kernel
# under qemu-system-x86_64 instead (see tests/vm/README.md).
#
# Outputs, in ${KRT_VM_CACHE:-/var/tmp/kr-tunneld-vm}:
#   vmlinuz            the Debian kernel (bzImage)
#   vmlinux            the same kernel uncompressed (ELF; QEMU boots it through
#                      its PVH entry, skipping ~10 s of decompression under TCG)
#   initramfs.cpio.gz  busybox + bash + iproute2 + ipvsadm + nft + ping +
#                      tcpdump + gobgpd/gobgp + bird/birdc + jq + shared
#                      libraries + modules + /init
#   kernel-version     e.g. 6.1.0-56-amd64
#   kernel/<version>/  the unpacked kernel package (kept for rebuilds)
#
# Usage: build-initramfs.sh [--force] [--refresh]
#   --force    rebuild the initramfs even if it looks up to date
#   --refresh  resolve linux-image-amd64 again (take a newer kernel) and rebuild
# Env:   KRT_VM_CACHE          cache directory
#        KRT_VM_KERNEL_PKG     kernel package to use instead of the one
#                              linux-image-amd64 depends on, e.g.
#                              linux-image-6.12.57+deb12-amd64 (use a separate
#                              KRT_VM_CACHE per kernel to keep both cached)
#        KRT_VM_EXTRA_MODULES  more modules to ship and load at boot
#        KRT_VM_EXTRA_BINS     more host programs to ship (with their libraries)
#
# Installs its host packages with apt-get when run as root.  Idempotent: when
# the outputs exist and neither this script, common.sh, the environment above
# nor the host programs it copies changed, it only prints "up to date".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KRT_LOG_TAG=build-initramfs
# shellcheck source=tests/vm/common.sh
. "$HERE/common.sh"

CACHE=${KRT_VM_CACHE:-/var/tmp/kr-tunneld-vm}
FORCE=0 REFRESH=0
for a in "$@"; do
  case $a in
    --force)   FORCE=1 ;;
    --refresh) REFRESH=1 FORCE=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) krt_log "unknown argument $a"; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- packages --
# The guest's tools are copied from the host, so they are installed here.
# busybox-static: a static busybox provides the guest's shell utilities.
# gobgpd (GoBGP 3.10: gobgpd + the gobgp CLI), bird2 and jq: the kube-router
# stand-in nodes of the BGP tests (tests/kube-router-standin.sh, tests/bgp_vm.rs).
krt_ensure_pkgs qemu-system-x86 busybox-static kmod cpio xz-utils \
  iproute2 ipvsadm nftables iputils-ping tcpdump util-linux coreutils \
  gobgpd bird2 jq

mkdir -p "$CACHE"
# One builder at a time per cache directory.
exec 9>"$CACHE/.lock"
flock 9

# --------------------------------------------------------- up-to-date check --
# Host programs copied into the guest, by absolute path.
BINS=()
for b in ip ipvsadm nft bash ping tcpdump timeout env xargs nohup setsid nsenter unshare \
         chroot gobgpd gobgp bird birdc jq ${KRT_VM_EXTRA_BINS:-}; do
  p=$(command -v "$b") || { krt_log "host program $b not found"; exit 1; }
  BINS+=("$(readlink -f "$p")")
done
# Everything the image depends on besides the kernel package itself.
inputs_hash() {
  {
    cat "$0" "$HERE/common.sh"
    echo "${KRT_VM_EXTRA_MODULES:-}|${KRT_VM_EXTRA_BINS:-}"
    stat -L -c '%n %s %Y' /bin/busybox "${BINS[@]}"
  } | md5sum | cut -c1-16
}
HASH=$(inputs_hash)
old_stamp=$(cat "$CACHE/stamp" 2>/dev/null || true)      # "<kernel-pkg> <hash>"
old_pkg=${old_stamp%% *}
if ((FORCE == 0)) && [[ -f $CACHE/initramfs.cpio.gz && -f $CACHE/vmlinuz &&
      ${old_stamp#* } == "$HASH" ]] &&
   [[ ${KRT_VM_KERNEL_PKG:-$old_pkg} == "$old_pkg" ]]; then
  krt_log "up to date ($(cat "$CACHE/kernel-version"))"
  exit 0
fi
T0=$(date +%s.%N)

# ------------------------------------------------------------------ kernel --
# Which package: KRT_VM_KERNEL_PKG, else the one built before (stable across
# runs until --refresh), else what linux-image-amd64 currently depends on.
resolve_kpkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
KPKG=${KRT_VM_KERNEL_PKG:-}
if [[ -z $KPKG ]] && ((REFRESH == 0)); then KPKG=$old_pkg; fi
if [[ -z $KPKG ]]; then
  ((REFRESH)) && [[ $EUID == 0 ]] && apt-get update -qq
  KPKG=$(resolve_kpkg)
  if [[ -z $KPKG && $EUID == 0 ]]; then apt-get update -qq; KPKG=$(resolve_kpkg); fi
  [[ -n $KPKG ]] || { krt_log "cannot resolve the package linux-image-amd64 depends on"; exit 1; }
fi
KVER=${KPKG#linux-image-}
KROOT=$CACHE/kernel/$KVER

# The .deb is downloaded and unpacked, never installed (that would run the
# initramfs/bootloader hooks of this machine).
download_kernel() {
  local dl=$CACHE/dl deb
  rm -rf "$dl"; mkdir -p "$dl"
  # As root, apt-get download warns that it cannot drop privileges to _apt
  # for this directory; harmless.
  (cd "$dl" && apt-get download -q "$KPKG" 2>&1 | grep -v 'performed unsandboxed' >&2) || true
  deb=$(find "$dl" -name "${KPKG}_*.deb" | head -1)
  [[ -n $deb ]] || return 1
  rm -rf "$KROOT.tmp"; mkdir -p "$KROOT.tmp"
  dpkg-deb -x "$deb" "$KROOT.tmp"
  rm -rf "$dl" "$KROOT"
  mv "$KROOT.tmp" "$KROOT"
}
if [[ ! -f $KROOT/boot/vmlinuz-$KVER ]]; then
  krt_log "downloading $KPKG"
  t=$(date +%s.%N)
  if ! download_kernel; then
    # Stale package lists (Debian drops superseded kernel ABIs): update, and
    # re-resolve unless a package was asked for by name.
    [[ $EUID == 0 ]] || { krt_log "apt-get download $KPKG failed"; exit 1; }
    krt_log "download failed; apt-get update and retry"
    apt-get update -qq
    if [[ -z ${KRT_VM_KERNEL_PKG:-} ]]; then
      KPKG=$(resolve_kpkg); KVER=${KPKG#linux-image-}; KROOT=$CACHE/kernel/$KVER
    fi
    download_kernel || { krt_log "apt-get download $KPKG failed"; exit 1; }
  fi
  # The package has no modules.dep (its postinst runs depmod): make one.
  depmod -b "$KROOT" "$KVER"
  krt_log "kernel $KVER downloaded and unpacked in $(krt_since "$t")s"
  # Other kernels cached earlier are not needed any more (~450 MB each).
  for d in "$CACHE"/kernel/*; do [[ $d == "$KROOT" ]] || rm -rf "$d"; done
fi

cp "$KROOT/boot/vmlinuz-$KVER" "$CACHE/vmlinuz.tmp"
mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
# Uncompressed ELF vmlinux for PVH boot.  Debian 6.1 compresses with xz
# (trailing data makes xz exit 1: ignored); 6.12's bzImage is not compressed
# with xz, so there is no vmlinux and the bzImage boots as it is.
rm -f "$CACHE/vmlinux"
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$CACHE/vmlinuz" | head -1 | cut -d: -f1 || true)
if [[ -n $off ]] && grep -q '^CONFIG_PVH=y' "$KROOT/boot/config-$KVER"; then
  tail -c +$((off + 1)) "$CACHE/vmlinuz" | xz -dc > "$CACHE/vmlinux.tmp" 2>/dev/null || true
  if [[ $(head -c4 "$CACHE/vmlinux.tmp" | od -An -c | tr -d ' ') == 177ELF ]]; then
    mv "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
  fi
  rm -f "$CACHE/vmlinux.tmp"
fi

# ----------------------------------------------------------------- modules --
# Top-level names; dependencies (tunnel4, tunnel6, udp_tunnel, nf_conntrack,
# ...) come from modprobe --show-depends against the unpacked tree.
# BOOT_MODULES are insmod'ed by /init in dependency order (each one costs a
# little boot time under TCG).  AVAIL_MODULES are only shipped: the kernel
# autoloads them through /sbin/modprobe, or run `modprobe NAME` in the guest.
BOOT_MODULES=(
  virtio_pci 9pnet_virtio 9p                       # host folder sharing
  veth dummy bridge                                # links
  ipip ip6_tunnel tunnel4 tunnel6 fou fou6         # tunnels, FOU/GUE (no autoload)
  ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_mh       # IPVS + schedulers
  nf_tables nft_objref nft_ct                      # nft, named counters, ct
)
read -r -a extra <<<"${KRT_VM_EXTRA_MODULES:-}"
BOOT_MODULES+=("${extra[@]}")
AVAIL_MODULES=(
  vxlan sit ip_gre ip6_gre vrf macvlan ifb
  ip_vs_lc ip_vs_wlc ip_vs_lblc ip_vs_lblcr ip_vs_dh ip_vs_sed ip_vs_nq ip_vs_fo ip_vs_ovf
  nft_compat nft_chain_nat nft_nat nft_masq nft_redir nft_reject_inet nft_fib_inet
  nft_numgen nft_hash nft_limit nft_log nft_quota nf_conntrack_netlink
  xt_mark xt_conntrack iptable_mangle ip6table_mangle iptable_nat iptable_filter
  sch_netem sch_ingress cls_bpf act_bpf
)

STAGE=$(mktemp -d "$CACHE/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# merged-/usr layout like Debian 12 (ldd reports /lib/x86_64-linux-gnu/...)
mkdir -p "$STAGE"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,proc,sys,dev,tmp,run,mnt,root,etc/krt,var,krt}
ln -s usr/bin "$STAGE/bin"; ln -s usr/sbin "$STAGE/sbin"
ln -s usr/lib "$STAGE/lib"; ln -s usr/lib64 "$STAGE/lib64"
ln -s ../run "$STAGE/var/run"
: > "$STAGE/etc/krt/modules"

declare -A seen=()
# stage_modules BOOT|AVAIL NAME...: copy NAME.ko and its dependencies.
stage_modules() {
  local list=$1 m kind path rel out; shift
  for m in "$@"; do
    if ! out=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>&1); then
      # e.g. nft_objref is part of nf_tables in 6.12
      krt_log "module $m not in $KVER (built in or merged), skipped"; continue
    fi
    while read -r kind path _; do
      [[ $kind == insmod ]] || continue                 # "builtin NAME"
      rel=${path#"$KROOT"/}
      # CPU-specific crypto (crc32c-intel, ...) pulled in as soft dependencies
      # fails on TCG's CPU model; the generic versions are used instead.
      [[ $rel == */arch/x86/crypto/* ]] && continue
      [[ -n ${seen[$rel]:-} ]] && continue
      seen[$rel]=1
      mkdir -p "$STAGE/$(dirname "$rel")"
      cp "$path" "$STAGE/$rel"
      if [[ $list == BOOT ]]; then echo "$rel" >> "$STAGE/etc/krt/modules"; fi
    done <<<"$out"
  done
}
stage_modules BOOT "${BOOT_MODULES[@]}"
stage_modules AVAIL "${AVAIL_MODULES[@]}"
cp "$KROOT/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$STAGE/lib/modules/$KVER/"
depmod -b "$STAGE" "$KVER"
krt_log "${#seen[@]} modules shipped, $(wc -l < "$STAGE/etc/krt/modules") loaded at boot"

# ---------------------------------------------------------------- programs --
# copy_elf SRC DEST: copy a program and every shared library ldd reports.
copy_elf() {
  local src=$1 dst=$2 lib
  install -D -m 0755 "$src" "$STAGE/$dst"
  { ldd "$src" 2>/dev/null || true; } |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
    while read -r lib; do
      [[ -e $STAGE/$lib ]] && continue
      mkdir -p "$STAGE/$(dirname "$lib")"
      cp -L "$lib" "$STAGE/$lib"
    done
}
cp /bin/busybox "$STAGE/usr/bin/busybox"
# Real tools where busybox's applets would not do; same directory as on the host.
for p in "${BINS[@]}"; do
  case $p in */sbin/*) d=usr/sbin ;; *) d=usr/bin ;; esac
  copy_elf "$p" "$d/$(basename "$p")"
done
# /bin/sh is bash: inside busybox sh, Debian's busybox runs its own applets
# (ip, ...) in preference to PATH, which would shadow the real iproute2.
ln -s bash "$STAGE/usr/bin/sh"
# Rust binaries built on the host need libgcc_s (unwinding) and friends.
for l in libgcc_s.so.1 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1; do
  p=/lib/x86_64-linux-gnu/$l
  if [[ -e $p && ! -e $STAGE$p ]]; then cp -L "$p" "$STAGE$p"; fi
done
# busybox applets for everything else (mount, insmod, cat, ...)
for a in $(/bin/busybox --list); do
  [[ -e $STAGE/usr/bin/$a || -e $STAGE/usr/sbin/$a ]] && continue
  ln -s busybox "$STAGE/usr/bin/$a"
done
ln -sf ../bin/busybox "$STAGE/usr/sbin/modprobe"   # the kernel's modprobe path

cp -r /etc/iproute2 "$STAGE/etc/" 2>/dev/null || true
cp /etc/protocols /etc/services "$STAGE/etc/" 2>/dev/null || true
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$STAGE/etc/passwd"
printf 'root:x:0:\n' > "$STAGE/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$STAGE/etc/hosts"

# -------------------------------------------------------------------- init --
# run-in-vm.sh appends a second cpio per run with /krt/cmd (the command),
# /krt/shares ("<9p tag> <path>" lines), /krt/nonce and /krt/dmesg.
cat > "$STAGE/init" <<'EOF'
#!/bin/sh
# kr-tunneld test VM /init: mount, load modules, mount the host folders,
# run /krt/cmd, report its exit status, power off.
export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /run/netns
mount -t debugfs none /sys/kernel/debug 2>/dev/null
# .ko paths in dependency order
while read -r m; do
  case $m in
    */dummy.ko) insmod "/$m" numdummies=0 ;;   # no stray dummy0
    *)          insmod "/$m" ;;
  esac || echo "krt-vm: failed to load $m"
done < /etc/krt/modules
ip link set lo up
hostname krt-vm
if [ -f /krt/shares ]; then
  while read -r tag dir; do
    mkdir -p "$dir"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose "$tag" "$dir" \
      || echo "krt-vm: 9p mount of $dir failed"
  done < /krt/shares
fi
cd /root
NONCE=$(cat /krt/nonce 2>/dev/null)
echo "krt-vm: ready after $(cut -d' ' -f1 /proc/uptime)s (guest uptime)"
if [ -x /krt/cmd ]; then
  /krt/cmd </dev/null; rc=$?
else
  echo "krt-vm: no command; interactive shell (poweroff -f to quit)"
  setsid cttyhack /bin/bash -l; rc=$?
fi
if [ -s /krt/dmesg ]; then dmesg > "$(cat /krt/dmesg)" 2>/dev/null; fi
sync
# On a line of its own; run-in-vm.sh reads it from the console log.
echo
echo "KRT-VM-EXIT $NONCE $rc $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
EOF
chmod 0755 "$STAGE/init"

( cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 ) |
  gzip -1 > "$CACHE/initramfs.cpio.gz.tmp"
mv "$CACHE/initramfs.cpio.gz.tmp" "$CACHE/initramfs.cpio.gz"
echo "$KVER" > "$CACHE/kernel-version"
echo "$KPKG $HASH" > "$CACHE/stamp"
krt_log "kernel $KVER; initramfs $(du -h "$CACHE/initramfs.cpio.gz" | cut -f1); built in $(krt_since "$T0")s"
