//! All integration tests compile into this one binary (ripgrep's layout).
//! Privileged kernel tests are `#[ignore]`d and run by tests/run-kernel-tests.sh (VM or netns).

// Netlink layer against a real kernel in throwaway network namespaces (root; #[ignore]d).
mod netns;
