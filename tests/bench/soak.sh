#!/usr/bin/env bash
# soak.sh - the long fault soak (SPEC R-3, K-4): `bash tests/bench/soak.sh`
#
# Runs the soak tests of tests/soak.rs with long settings through tests/run-kernel-tests.sh (in
# the kernel-test VM unless the host kernel can run them), against the release binary:
#   - 20 rounds of kill -9 at random moments while converging 1,000 peers, then a restart: the
#     kernel must equal a clean run's (no duplicates, no orphans);
#   - 5 minutes of API faults (resets, 5xx, 429, 410, garbage, stalls, an 8 s blackout) while
#     nodes are added and removed: no tunnel of a live node is ever removed, nothing changes in
#     the blackout, and the kernel matches the API after the faults stop.
# CI runs the same tests short (300 peers, 4 rounds; 40 s of faults).
# Env: KR_SOAK_ROUNDS (20), KR_SOAK_PEERS (1000), KR_SOAK_SECS (300), KR_SOAK_SEED (random; the
# tests print the one they used), KRT_BIN_PROFILE (release). Takes about 12 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export KR_SOAK_ROUNDS=${KR_SOAK_ROUNDS:-20}
export KR_SOAK_PEERS=${KR_SOAK_PEERS:-1000}
export KR_SOAK_SECS=${KR_SOAK_SECS:-300}
export KRT_BIN_PROFILE=${KRT_BIN_PROFILE:-release}
exec bash tests/run-kernel-tests.sh soak:: --nocapture
