//! All integration tests compile into this one binary (ripgrep's layout).
//! Privileged kernel tests are `#[ignore]`d and run by tests/run-kernel-tests.sh (VM or netns).

// Kernel-test rig: netns/`ip` helpers for kernel tests, and environment self-checks.
mod rig;
// Journal and plain log formats, and init() choosing between them.
#[cfg(test)]
mod logging;
// .deb/.rpm from packaging/build.sh, the unit, the environment file and the man page.
#[cfg(test)]
mod packaging;
// sd_notify messages received on a stand-in NOTIFY_SOCKET (path and abstract).
#[cfg(test)]
mod systemd_notify;
// Scriptable kube-apiserver stand-in (HTTP/1.1, chunked watches, faults), log capture, mirror.
mod apiserver;
// List+watch against the stand-in: recorded payloads and every fault case of the kube client.
mod kube_watch;
// TLS of the kube client against `openssl s_server`: CA, client certificate, fail closed.
mod kube_tls;
// Netlink layer against a real kernel in throwaway network namespaces (root; #[ignore]d).
mod netns;
// Stateful fake API server (nodes, list + watch, outages) for end-to-end tests and the demo.
mod fakeapi;
// End to end: three netns nodes running the real binary against the fake API server (root; #[ignore]d).
mod e2e;
// The binary without root: flags, exit codes, dry run with sd_notify, token never logged.
mod daemon_cli;
// The BGP speaker against Debian's gobgpd and bird2 on loopback (installed by run-all.sh).
mod bgp_peers;
// DSR end to end through the real daemon: director, pod receiver, client (root; #[ignore]d).
mod e2e_dsr;
// DSR against a real kernel: IPVS via our netlink vs ipvsadm, pod receivers, end to end (root; #[ignore]d).
mod dsr_kernel;
// The fuzz targets' bodies (tests/fuzz/targets.rs, shared with cargo-fuzz) and their stable-Rust
// replay: seeds, past crashes and deterministic mutations, no panic allowed.
#[path = "fuzz/replay.rs"]
mod fuzz_replay;
#[path = "fuzz/targets.rs"]
mod fuzz_targets;
// Through real systemd in a Debian 12 VM: the .deb, the unit, journald (root; #[ignore]d,
// run by tests/run-kernel-tests.sh --systemd).
#[cfg(test)]
mod sysvm;
// Fault soak: kill -9 mid-converge and API faults against the real binary (root; #[ignore]d).
mod soak;
// Liveness against a real kernel: SIGTERM mid-pass, drift repaired from rtnetlink notifications (root; #[ignore]d).
mod live;
// kube-router stand-ins (gobgpd + tests/kube-router-standin.sh) and migration to kr-tunneld (root; #[ignore]d).
mod kube_router;
