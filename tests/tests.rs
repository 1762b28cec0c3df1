//! All integration tests compile into this one binary (ripgrep's layout).
//! Privileged kernel tests are `#[ignore]`d and run by tests/run-kernel-tests.sh (VM or netns).

// Scriptable kube-apiserver stand-in (HTTP/1.1, chunked watches, faults), log capture, mirror.
mod apiserver;
// List+watch against the stand-in: recorded payloads and every fault case of the kube client.
mod kube_watch;
// TLS of the kube client against `openssl s_server`: CA, client certificate, fail closed.
mod kube_tls;
