#!/usr/bin/env bash
# run.sh - the performance benchmarks (SPEC §7, P-1…P-4, watch decode): `bash tests/bench/run.sh`
#
# 1. Builds kr-tunneld and the bench harness (tests/bench/krt_bench.rs, the Cargo example
#    `krt-bench`) with `cargo build --release`.
# 2. On the host: the stripped binary's size and the watch decoder's throughput (pure code).
# 3. In the kernel-test VM (tests/vm/run-in-vm.sh: Debian's kernel under QEMU, booted once), as
#    root, each measurement in a fresh network namespace:
#      krt-bench scale   P-1 (vs `ip -batch`), P-2 and P-3 at the sizes below
#      krt-bench daemon  P-4: the release binary against the fake API server with 5,000 nodes
# 4. Prints the Markdown table that README.md's "Performance" section keeps (krt-bench table).
#
# Env: KRT_BENCH_SIZES (default 2,100,1000,5000), KRT_BENCH_RUNS (best of, default 2),
#      KRT_BENCH_PEERS (P-4, default 5000), KRT_BENCH_IDLE (P-4 idle window, default 60 s),
#      KRT_KERNEL_TESTS=host runs the kernel parts on this host instead (root, with the ipip,
#      fou and ip_vs modules); the VM knobs of tests/vm/run-in-vm.sh (KRT_VM_*) apply.
# Output: the RESULT lines and the table in <target dir>/bench/results.txt and table.md.
# Takes about 4 minutes (under TCG emulation, about 1 minute of it the idle window).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd -P)
KRT_LOG_TAG=bench
# shellcheck source=tests/vm/common.sh
. "$ROOT/tests/vm/common.sh"
cd "$ROOT"

SIZES=${KRT_BENCH_SIZES:-2,100,1000,5000}
RUNS=${KRT_BENCH_RUNS:-2}
PEERS=${KRT_BENCH_PEERS:-5000}
IDLE=${KRT_BENCH_IDLE:-60}

T0=$(date +%s.%N)
cargo build --release --bin kr-tunneld --example krt-bench
TARGET=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=$TARGET/release/kr-tunneld
BENCH=$TARGET/release/examples/krt-bench
OUT=$TARGET/bench
mkdir -p "$OUT"
RES=$OUT/results.txt
: >"$RES"

{
  echo "RESULT meta.commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +dirty)"
  echo "RESULT meta.rustc $(rustc --version | awk '{print $2}')"
  echo "RESULT meta.host_cpu $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1 | tr ' ' '_')"
} >>"$RES"

# The release profile strips already (strip = true); strip a copy again to prove it.
cp "$BIN" "$OUT/kr-tunneld.stripped"
strip "$OUT/kr-tunneld.stripped"
echo "RESULT p4.binary_bytes $(stat -c %s "$OUT/kr-tunneld.stripped")" | tee -a "$RES"
echo "RESULT p4.binary_bytes_as_built $(stat -c %s "$BIN")" | tee -a "$RES"

krt_log "watch decode throughput and the pure planner (host)"
"$BENCH" decode | tee -a "$RES"
"$BENCH" planner | tee -a "$RES"

CMD="echo RESULT meta.kernel \$(uname -r) >>'$RES'; echo RESULT meta.vcpus \$(nproc) >>'$RES';
  '$BENCH' scale --sizes '$SIZES' --runs '$RUNS' | tee -a '$RES' &&
  '$BENCH' daemon --bin '$BIN' --peers '$PEERS' --idle '$IDLE' | tee -a '$RES'"
if [[ ${KRT_KERNEL_TESTS:-vm} == host ]]; then
  krt_log "kernel parts on the host kernel $(uname -r)"
  bash -c "$CMD"
else
  SHARE=(--share "$ROOT")
  case $TARGET/ in "$ROOT"/*) ;; *) SHARE+=(--share "$TARGET") ;; esac
  bash "$ROOT/tests/vm/run-in-vm.sh" "${SHARE[@]}" --cwd "$ROOT" --timeout 3600 -- "$CMD"
  echo "RESULT meta.vm qemu-tcg-1vcpu-${KRT_VM_MEM:-1024}MiB" >>"$RES"
fi

"$BENCH" table "$RES" | tee "$OUT/table.md"
grep '^RESULT meta' "$RES" | sed 's/^RESULT //'
krt_log "done in $(krt_since "$T0")s; results in $RES, table in $OUT/table.md"
