#!/usr/bin/env bash
# run.sh - run every cargo-fuzz target for a bounded time: `bash tests/fuzz/run.sh [SECONDS] [TARGET...]`
#
# Installs cargo-fuzz from crates.io when missing. cargo-fuzz needs nightly-only compiler flags
# (-Zsanitizer=address, -Cpasses=sancov-module); this machine has only a stable toolchain, so the
# build runs with RUSTC_BOOTSTRAP=1, which lets stable rustc accept them.
# Each target starts from tests/fuzz/seeds/<target> (see seeds.py) plus its working corpus in
# <target dir>/fuzz/corpus/<target>; crashes land in tests/fuzz/artifacts/<target>/ (copy them to
# tests/fuzz/regressions/<target>/ with the fix, where the replay test in `cargo test` runs them).
# Prints one line per target: execs, exec/s, coverage (libFuzzer's cov = edges), corpus, crashes.
# Default: 60 s per target (14 targets, about 15 minutes); -jobs is 1 (the machine has 2 cores).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd -P)
cd "$ROOT"
SECS=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/fuzz
export CARGO_TARGET_DIR=$TARGET_DIR
ALL=$(cargo fuzz list --fuzz-dir tests/fuzz)
TARGETS=("$@")
((${#TARGETS[@]})) || mapfile -t TARGETS <<<"$ALL"
cargo fuzz build --fuzz-dir tests/fuzz || exit 1
SUMMARY=()
RC=0
for t in "${TARGETS[@]}"; do
  corpus=$TARGET_DIR/corpus/$t
  art=$HERE/artifacts/$t
  mkdir -p "$corpus" "$art"
  log=$TARGET_DIR/fuzz-$t.log
  echo "=== $t: ${SECS}s"
  cargo fuzz run --fuzz-dir tests/fuzz "$t" "$corpus" "$HERE/seeds/$t" -- \
    -max_total_time="$SECS" -print_final_stats=1 -artifact_prefix="$art/" -timeout=10 \
    -rss_limit_mb=2048 >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  corp=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  crashes=$(find "$art" -type f | wc -l)
  line="$t: execs ${execs:-?} (${speed:-?}/s), cov ${cov:-?} edges, ft ${ft:-?}, corpus ${corp:-?}, crashes $crashes, exit $rc"
  echo "$line"
  SUMMARY+=("$line")
  if ((rc != 0)); then
    RC=1
    grep -m5 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log"
  fi
done
echo "=== summary (${SECS}s per target)"
printf '%s\n' "${SUMMARY[@]}"
exit $RC
