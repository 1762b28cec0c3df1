//! All integration tests compile into this one binary (ripgrep's layout).
//! Privileged kernel tests are `#[ignore]`d and run by tests/run-kernel-tests.sh (VM or netns).

// Kernel-test rig: netns/`ip` helpers for kernel tests, and environment self-checks.
mod rig;
