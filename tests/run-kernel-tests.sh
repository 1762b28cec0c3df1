#!/usr/bin/env bash
# run-kernel-tests.sh - run the privileged (#[ignore]d) integration tests
# against a real kernel, as root, one test at a time.
#
# Usage: tests/run-kernel-tests.sh [--systemd] [extra test-binary args, e.g. a name filter]
#
# --systemd: run the sysvm:: tests instead (tests/sysvm.rs), always in a VM
#    booted from build-rootfs.sh's Debian 12 image with systemd as PID 1, with
#    the .deb of packaging/build.sh (built from the same binary) in
#    KRT_DEB; the guest's journal is saved to <target dir>/systemd-tests/
#    journal.log. Without it, the sysvm:: tests are skipped.
#
# 1. Builds the integration test binary (cargo test --no-run --test tests) and
#    kr-tunneld (debug; KRT_BIN_PROFILE=release for the release build).
# 2. Runs `<test binary> --ignored --test-threads=1 ARGS...` with
#    KR_TUNNELD_BIN=<kr-tunneld> and the repository as working directory:
#    - directly, if we are root and this kernel can make ipip links, FOU ports
#      and IPVS in a throwaway network namespace (tests make their own netns);
#    - otherwise inside a QEMU guest booted once with Debian's kernel
#      (tests/vm/run-in-vm.sh), the repository and target directory shared at
#      the same paths.
#    KRT_KERNEL_TESTS=auto (default) | host | vm forces the choice.
# Exit status: the test binary's; 125 if the VM died or timed out.
# Logs (VM): <target dir>/kernel-tests/console.log (whole console) and
# dmesg.log (guest kernel log after the tests).
# Forwarded to the tests: RUST_BACKTRACE (default 1), RUST_LOG, and every KR_*
# variable.  VM knobs: see tests/vm/run-in-vm.sh --help (KRT_VM_*).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd -P)
KRT_LOG_TAG=kernel-tests
# shellcheck source=tests/vm/common.sh
. "$HERE/vm/common.sh"
cd "$ROOT"

T0=$(date +%s.%N)
MODE=${KRT_KERNEL_TESTS:-auto}
SYSTEMD=0
if [[ ${1:-} == --systemd ]]; then SYSTEMD=1 MODE=vm KRT_LOG_TAG=systemd-tests; shift; fi
case $MODE in auto|host|vm) ;; *) krt_log "KRT_KERNEL_TESTS must be auto, host or vm"; exit 2 ;; esac

# ------------------------------------------------------------------- build --
# artifact_exe KIND NAME: the "executable" of the compiler-artifact message
# for target NAME of kind KIND in cargo's JSON output (stdin).
artifact_exe() {
  grep '"reason":"compiler-artifact"' | grep -F "\"kind\":[\"$1\"]" | grep -F "\"name\":\"$2\"" |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
PROFILE_ARGS=()
[[ ${KRT_BIN_PROFILE:-debug} == release ]] && PROFILE_ARGS=(--release)
TESTBIN=$(cargo test --no-run --test tests --message-format=json | artifact_exe test tests)
BIN=$(cargo build "${PROFILE_ARGS[@]}" --bin kr-tunneld --message-format=json | artifact_exe bin kr-tunneld)
[[ -x $TESTBIN ]] || { krt_log "could not find the test binary in cargo's output"; exit 1; }
[[ -x $BIN ]] || { krt_log "could not find the kr-tunneld binary in cargo's output"; exit 1; }
TARGET=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -d $TARGET ]] || { krt_log "could not find the target directory"; exit 1; }
T_BUILD=$(krt_since "$T0")
krt_log "test binary $TESTBIN"
krt_log "KR_TUNNELD_BIN=$BIN (built in ${T_BUILD}s)"

# ------------------------------------------------------------- host or VM? --
# The host will do if we are root and a throwaway netns gets an ipip link, a
# GUE port (fou does not autoload: modprobe first) and IPVS.
host_can_run() {
  ((EUID == 0)) || return 1
  command -v unshare >/dev/null && command -v ip >/dev/null || return 1
  unshare -n ip link add krprobe type ipip remote 192.0.2.1 2>/dev/null || return 1
  modprobe -q -a fou fou6 ip_vs 2>/dev/null || true
  unshare -n ip fou add port 5555 gue 2>/dev/null || return 1
  unshare -n test -e /proc/net/ip_vs || return 1
}
if [[ $MODE == auto ]]; then
  if host_can_run; then MODE=host; else MODE=vm; fi
fi
SYSVM=()
if ((SYSTEMD)); then
  # The package an operator installs, from the binary just built (no lintian here:
  # tests/packaging.rs lints).
  krt_ensure_pkgs dpkg-dev jq
  rm -rf "$TARGET/sysvm-deb"
  bash "$ROOT/packaging/build.sh" --only deb --binary "$BIN" --out "$TARGET/sysvm-deb" >/dev/null
  DEB=$(ls "$TARGET"/sysvm-deb/*.deb)
  krt_log "package $DEB"
  SYSVM=(--systemd --journal "$TARGET/systemd-tests/journal.log")
fi

ENVS=("KR_TUNNELD_BIN=$BIN" "RUST_BACKTRACE=${RUST_BACKTRACE:-1}" "CARGO_MANIFEST_DIR=$ROOT")
((SYSTEMD)) && ENVS+=("KRT_DEB=$DEB")
[[ -n ${RUST_LOG:-} ]] && ENVS+=("RUST_LOG=$RUST_LOG")
while IFS='=' read -r name _; do
  [[ $name == KR_TUNNELD_BIN ]] || ENVS+=("$name=${!name}")
done < <(env | grep -E '^KR_[A-Za-z0-9_]*=' || true)
if ((SYSTEMD)); then
  # A name filter given here replaces sysvm:: (name sysvm tests only).
  (($#)) || set -- sysvm::
  # --show-output: the tests print the figures they measure.
  ARGS=(--ignored --test-threads=1 --show-output "$@")
else
  ARGS=(--ignored --test-threads=1 --skip sysvm:: "$@")
fi

# ------------------------------------------------------------------- run --
LOGDIR=$TARGET/kernel-tests
((SYSTEMD == 0)) || LOGDIR=$TARGET/systemd-tests
mkdir -p "$LOGDIR"
T1=$(date +%s.%N)
set +e
if [[ $MODE == host ]]; then
  krt_log "running on the host kernel $(uname -r)"
  krt_ensure_pkgs iproute2 ipvsadm nftables iputils-ping
  # Modules that do not autoload (fou) or that tests expect up front.
  modprobe -q -a ipip ip6_tunnel fou fou6 ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh veth dummy \
    2>/dev/null || true
  env "${ENVS[@]}" "$TESTBIN" "${ARGS[@]}"
  rc=$?
  BOOT=0
else
  krt_log "this kernel ($(uname -r)) cannot run them (or KRT_KERNEL_TESTS=vm): using a VM"
  SHARE=(--share "$ROOT")
  case $TARGET/ in "$ROOT"/*) ;; *) SHARE+=(--share "$TARGET") ;; esac
  VMENV=()
  for e in "${ENVS[@]}"; do VMENV+=(--env "$e"); done
  STATS=$(mktemp)
  bash "$HERE/vm/run-in-vm.sh" "${SYSVM[@]}" "${SHARE[@]}" --cwd "$ROOT" "${VMENV[@]}" \
    --console-log "$LOGDIR/console.log" --dmesg "$LOGDIR/dmesg.log" --stats "$STATS" \
    -- "$TESTBIN" "${ARGS[@]}"
  rc=$?
  BOOT=$(sed -n 's/^boot=//p' "$STATS"); rm -f "$STATS"
  krt_log "logs: $LOGDIR/console.log, $LOGDIR/dmesg.log"
fi
set -e
krt_log "mode $MODE: build ${T_BUILD}s, boot ${BOOT:-?}s, tests+VM $(krt_since "$T1")s," \
  "total $(krt_since "$T0")s, exit $rc"
exit "$rc"
