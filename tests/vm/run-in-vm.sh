#!/usr/bin/env bash
# run-in-vm.sh - boot the Debian kernel + initramfs of build-initramfs.sh under
# QEMU, run ONE command in it as root with all test modules loaded, stream the
# guest's console to stdout, and exit with the command's exit status.
#
# Usage:
#   run-in-vm.sh [options] [--] command [args...]
#   run-in-vm.sh [options] --shell        interactive bash on the console
# Options:
#   --share DIR        mount host DIR read-write over 9p at the SAME path in the
#                      guest (repeatable), so host-built binaries run there
#   --cwd DIR          directory the command starts in (default: $PWD if it is
#                      inside a shared DIR, else /root)
#   --env NAME=VALUE   export a variable to the command (repeatable)
#   --copy SRC[:DEST]  put host file SRC into the guest at DEST (default
#                      /krt/bin/NAME, on PATH), with its shared libraries
#   --console-log FILE also write the raw console output to FILE
#   --dmesg FILE       after the command, save the guest's dmesg to FILE, which
#                      must be inside a shared DIR
#   --stats FILE       write boot=, command=, wall=, rc= lines (seconds) to FILE
#   --timeout SECS     kill the VM after SECS (default 1800, env KRT_VM_TIMEOUT)
#   --systemd          boot build-rootfs.sh's Debian 12 image with systemd as
#                      PID 1 instead of the busybox initramfs; the command runs
#                      from krt-run.service after basic.target (see README.md)
#   --journal FILE     (--systemd) after the command, save `journalctl -b` to
#                      FILE, which must be inside a shared DIR
#   --shell            no command: an interactive shell (Ctrl-A X quits QEMU)
# Env: KRT_VM_CACHE      cache dir of build-initramfs.sh (default /var/tmp/kr-tunneld-vm)
#      KRT_VM_MEM        guest RAM in MiB (default 1024)
#      KRT_VM_SMP        vCPUs (default 1 on hosts with <= 2 cores, else 2)
#      KRT_VM_ACCEL      auto|kvm|tcg (auto: kvm only if /dev/kvm is usable and
#                        the CPU shows vmx/svm; else tcg)
#      KRT_VM_APPEND     extra kernel command line
#      KRT_VM_QEMU_ARGS  extra QEMU arguments (word-split)
# Exit status: the command's; 125 if the VM died or timed out before the
# command reported one (or the runner itself failed).
#
# A single command argument is run by bash -c (pipes etc. work); several are
# run as an argv.  The command's stdout and stderr both arrive on the serial
# console (merged; ~120 KB/s under TCG, so write big logs to a shared DIR).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KRT_LOG_TAG=run-in-vm
# shellcheck source=tests/vm/common.sh
. "$HERE/common.sh"

CACHE=${KRT_VM_CACHE:-/var/tmp/kr-tunneld-vm}
export KRT_VM_CACHE=$CACHE
MEM=${KRT_VM_MEM:-1024}
# Under TCG one vCPU boots and runs faster than two on a 2-core host (measured).
SMP=${KRT_VM_SMP:-$(( $(nproc) > 2 ? 2 : 1 ))}
TIMEOUT=${KRT_VM_TIMEOUT:-1800}
SHARES=() COPIES=() ENVS=()
CWD='' CONSOLE_LOG='' DMESG='' JOURNAL='' STATS='' SHELL_MODE=0 SYSTEMD=0

die() { krt_log "$*"; exit 125; }
while (($#)); do
  case $1 in
    --share)       [[ -d ${2:-} ]] || die "--share: no directory ${2:-}"
                   SHARES+=("$(cd "$2" && pwd -P)"); shift 2 ;;
    --cwd)         CWD=$2; shift 2 ;;
    --env)         [[ $2 == [A-Za-z_]*=* ]] || die "--env wants NAME=VALUE, got $2"
                   ENVS+=("$2"); shift 2 ;;
    --copy)        COPIES+=("$2"); shift 2 ;;
    --console-log) CONSOLE_LOG=$2; shift 2 ;;
    --dmesg)       DMESG=$2; shift 2 ;;
    --stats)       STATS=$2; shift 2 ;;
    --timeout)     TIMEOUT=$2; shift 2 ;;
    --shell)       SHELL_MODE=1; shift ;;
    --systemd)     SYSTEMD=1; shift ;;
    --journal)     JOURNAL=$2; shift 2 ;;
    --)            shift; break ;;
    -h|--help)     sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    -*)            die "unknown option $1" ;;
    *)             break ;;
  esac
done
((SHELL_MODE)) || (($#)) || die "no command given (see --help)"

# Kernel + base initramfs (cached; rebuilt only when missing or outdated).
"$HERE/build-initramfs.sh" || die "build-initramfs.sh failed"
BASE_INITRD=$CACHE/initramfs.cpio.gz ROOTDISK=()
if ((SYSTEMD)); then
  "$HERE/build-rootfs.sh" || die "build-rootfs.sh failed"
  BASE_INITRD=$CACHE/systemd/initrd.cpio.gz
  # snapshot=on: guest writes go to a temporary file, the image stays as built.
  ROOTDISK=(-drive "file=$CACHE/systemd/rootfs.img,if=virtio,format=raw,snapshot=on")
fi

ACCEL=${KRT_VM_ACCEL:-auto}
if [[ $ACCEL == auto ]]; then
  # /dev/kvm alone is not enough: some hosts (Firecracker) expose a KVM that
  # aborts or hangs a stock kernel.  Require hardware virtualization flags.
  if [[ -r /dev/kvm && -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
    ACCEL=kvm
  else
    ACCEL=tcg
  fi
fi
# TCG: a plain CPU model is faster than "max" (glibc would pick AVX2 string
# routines, which TCG emulates slowly).
if [[ $ACCEL == kvm ]]; then CPU=host; else CPU=qemu64; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/krt-vm.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
NONCE=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')

# ------------------------------------------------------- per-run overlay cpio --
# Appended to the base initramfs (the kernel unpacks concatenated archives).
OV=$WORK/ov
mkdir -p "$OV/krt/bin"
echo "$NONCE" > "$OV/krt/nonce"

# Libraries already in the base image (listed once, lazily).
in_base() {
  [[ -f $WORK/base.list ]] ||
    zcat "$CACHE/initramfs.cpio.gz" | cpio -t --quiet 2>/dev/null |
      sed 's|^\.\{0,1\}/\{0,1\}|/|; s|^/lib/|/usr/lib/|; s|^/lib64/|/usr/lib64/|' > "$WORK/base.list"
  local p=$1
  p=${p/#\/lib\//\/usr\/lib\/}; p=${p/#\/lib64\//\/usr\/lib64\/}
  grep -qxF "$p" "$WORK/base.list"
}
for c in "${COPIES[@]}"; do
  src=${c%%:*} dst=${c#*:}
  [[ $c == *:* ]] || dst=/krt/bin/$(basename "$src")
  [[ -f $src ]] || die "--copy: no such file $src"
  install -D -m "$(stat -c %a "$src")" "$src" "$OV$dst"
  [[ $dst == /krt/bin/* ]] && chmod 0755 "$OV$dst"
  if ((!SYSTEMD)) && [[ $(head -c4 "$src") == $'\x7fELF' ]]; then
    { ldd "$src" 2>/dev/null || true; } |
      awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
      while read -r lib; do
        in_base "$lib" || [[ -e $OV$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$OV$lib"
      done
  fi
done

# 9p shares: one virtio-9p device per directory, mounted by /init.
QSHARE=()
: > "$OV/krt/shares"
for i in "${!SHARES[@]}"; do
  d=${SHARES[$i]}
  [[ $d != *[[:space:]]* ]] || die "--share: paths with white space are not supported: $d"
  QSHARE+=(-virtfs "local,path=$d,mount_tag=krt$i,security_model=none,multidevs=remap,id=krt$i")
  echo "krt$i $d" >> "$OV/krt/shares"
done
# Is a host path inside one of the shares?
shared() { local d; for d in "${SHARES[@]}"; do case $1/ in "$d"/*) return 0 ;; esac; done; return 1; }
if [[ -n $DMESG ]]; then
  DMESG=$(realpath -m "$DMESG")
  shared "$DMESG" || die "--dmesg $DMESG is not inside a --share directory"
  mkdir -p "$(dirname "$DMESG")"
  echo "$DMESG" > "$OV/krt/dmesg"
fi
if [[ -n $JOURNAL ]]; then
  JOURNAL=$(realpath -m "$JOURNAL")
  shared "$JOURNAL" || die "--journal $JOURNAL is not inside a --share directory"
  mkdir -p "$(dirname "$JOURNAL")"
  echo "$JOURNAL" > "$OV/krt/journal"
fi
if [[ -z $CWD ]]; then
  CWD=/root
  if shared "$(pwd -P)"; then CWD=$(pwd -P); fi
fi

# bash single-quote quoting
q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
if ((! SHELL_MODE)); then
  {
    echo '#!/bin/bash'
    echo 'export PATH=/krt/bin:/usr/sbin:/usr/bin'
    for e in "${ENVS[@]}"; do echo "export ${e%%=*}=$(q "${e#*=}")"; done
    echo "cd $(q "$CWD") || exit 125"
    if (($# == 1)); then
      echo "exec /bin/bash -c $(q "$1")"
    else
      printf 'exec'; for a in "$@"; do printf ' %s' "$(q "$a")"; done; echo
    fi
  } > "$OV/krt/cmd"
  chmod 0755 "$OV/krt/cmd"
fi
(cd "$OV" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) |
  gzip -1 > "$WORK/overlay.cpio.gz"
cat "$BASE_INITRD" "$WORK/overlay.cpio.gz" > "$WORK/initrd.img"

# ---------------------------------------------------------------------- boot --
# vmlinux (uncompressed ELF) boots through PVH and skips the bzImage's slow
# self-decompression; fall back to vmlinuz.
KERNEL=$CACHE/vmlinux
[[ -f $KERNEL ]] || KERNEL=$CACHE/vmlinuz
# cryptomgr.notests: skip crypto self-tests (seconds under TCG).
# panic=-1 + -no-reboot: a guest panic ends QEMU at once (exit 125 here).
APPEND="console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off cryptomgr.notests"
((SYSTEMD)) && APPEND+=" systemd.show_status=error"
APPEND+=" ${KRT_VM_APPEND:-}"
QARGS=(-accel "$ACCEL" -cpu "$CPU" -M pc -m "$MEM" -smp "$SMP"
       -nodefaults -no-user-config -display none -no-reboot
       -kernel "$KERNEL" -initrd "$WORK/initrd.img" "${QSHARE[@]}" "${ROOTDISK[@]}")
# shellcheck disable=SC2206  # word splitting wanted
QARGS+=(${KRT_VM_QEMU_ARGS:-})

if ((SHELL_MODE)); then
  exec qemu-system-x86_64 "${QARGS[@]}" -serial mon:stdio -append "$APPEND"
fi

RAW=$WORK/console.raw
krt_log "booting $(cat "$CACHE/kernel-version") (accel=$ACCEL, ${MEM} MiB, $SMP vCPU)"
start=$(date +%s.%N)
# QEMU logs the raw console to $RAW itself; the pipe shows it live with CRs
# and the exit marker removed (sed -u: unbuffered, so output streams).
set +e
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 "${QARGS[@]}" \
    -chardev "stdio,id=con0,signal=off,logfile=$RAW" -serial chardev:con0 \
    -append "$APPEND" </dev/null 2>"$WORK/qemu.err" |
  sed -u -e 's/\r$//' -e "/^KRT-VM-EXIT $NONCE /d" -e '/^\[ *[0-9.]*\] reboot: Power down$/d'
qrc=${PIPESTATUS[0]}
set -e
wall=$(krt_since "$start")

tr -d '\r' < "$RAW" > "$WORK/console.log" 2>/dev/null || true
[[ -z $CONSOLE_LOG ]] || cp "$WORK/console.log" "$CONSOLE_LOG"
boot=$(sed -n 's/^krt-vm: ready after \([0-9.]*\)s.*/\1/p' "$WORK/console.log" | head -1)
read -r rc end < <(sed -n "s/^KRT-VM-EXIT $NONCE \([0-9]*\) \([0-9.]*\)$/\1 \2/p" "$WORK/console.log" | tail -1) || true
cmd_time=
[[ -n ${rc:-} && -n $boot ]] && cmd_time=$(awk -v a="$boot" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
krt_log "boot ${boot:-?}s, command ${cmd_time:-?}s, VM wall ${wall}s, qemu rc=$qrc, command rc=${rc:-none}"
if [[ -n $STATS ]]; then
  printf 'boot=%s\ncommand=%s\nwall=%s\nrc=%s\n' "${boot:-}" "${cmd_time:-}" "$wall" "${rc:-125}" > "$STATS"
fi
if [[ -z ${rc:-} ]]; then
  ((qrc == 124 || qrc == 137)) && krt_log "timed out after ${TIMEOUT}s"
  [[ -s $WORK/qemu.err ]] && sed 's/^/qemu: /' "$WORK/qemu.err" >&2
  krt_log "the VM ended without reporting an exit status"
  exit 125
fi
exit "$rc"
