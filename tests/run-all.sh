#!/usr/bin/env bash
# run-all.sh - the project's test command: `bash tests/run-all.sh`.
#
#   1. cargo test                   unit tests, doc tests and the non-ignored
#                                   integration tests (no root needed)
#   2. tests/run-kernel-tests.sh    the #[ignore]d kernel tests, as root, on the
#                                   host kernel or in a QEMU guest (see there)
#   3. tests/run-kernel-tests.sh --systemd
#                                   the sysvm:: tests: the .deb in a Debian 12 VM
#                                   with systemd as PID 1 (tests/vm/README.md)
#
# Every phase always runs.  Exit status: 0 only if all pass.  The last line is
# "N passed, N failed", summed over the phases from cargo's "test result:"
# lines; a phase that fails without reporting a failed test (build error, VM
# crash) counts as one failure.
# Env: KRT_SKIP_KERNEL_TESTS=1 skips phases 2 and 3 (says so; for quick local runs).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 125
T0=$(date +%s)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/krt-run-all.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT

PASSED=0 FAILED=0 RC=0
SUMMARY=()
# phase NAME COMMAND...: run COMMAND with its output shown and logged, then add
# up its "test result:" lines.
phase() {
  local name=$1 t rc p f log
  shift
  log=$LOGS/$name.log
  echo "=== $name: $*"
  t=$(date +%s)
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  read -r p f < <(sed 's/\x1b\[[0-9;]*m//g' "$log" |
    awk '/^test result: / { for (i = 1; i < NF; i++) {
                              if ($(i+1) ~ /^passed/) p += $i
                              if ($(i+1) ~ /^failed/) f += $i } }
         END { print p + 0, f + 0 }')
  if ((rc != 0 && f == 0)); then
    f=1
    SUMMARY+=("$name: exit $rc without a failed test: counted as 1 failure")
  fi
  SUMMARY+=("$name: $p passed, $f failed, exit $rc, $(($(date +%s) - t))s")
  PASSED=$((PASSED + p)) FAILED=$((FAILED + f))
  ((rc == 0)) || RC=1
}

# Host tools the cargo-test phase uses: openssl makes the test CA and serves TLS for the kube
# client's TLS tests (they would otherwise print a note and pass without testing anything).
if ! command -v openssl >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "=== installing openssl for the TLS tests"
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends openssl >/dev/null
fi
# gobgpd and bird2 are the real BGP peers of tests/bgp_peers.rs (kube-router embeds GoBGP).
if ! { command -v gobgpd && command -v bird; } >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "=== installing gobgpd and bird2 for the BGP peer tests"
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends gobgpd bird2 >/dev/null
fi

phase cargo-test cargo test
if [[ ${KRT_SKIP_KERNEL_TESTS:-0} == 1 ]]; then
  SUMMARY+=("kernel-tests, systemd-tests: SKIPPED (KRT_SKIP_KERNEL_TESTS=1)")
else
  phase kernel-tests bash tests/run-kernel-tests.sh
  phase systemd-tests bash tests/run-kernel-tests.sh --systemd
fi

echo "=== summary ($(($(date +%s) - T0))s)"
printf '%s\n' "${SUMMARY[@]}"
echo "$PASSED passed, $FAILED failed"
exit "$RC"
