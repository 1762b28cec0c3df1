//! Prometheus text-format metrics (SPEC O-6): counters kept by the main loop, rendered as text,
//! served on `--metrics-addr` and/or written to `--metrics-file`.
//!
//! [`Metrics`] and [`Metrics::render`] are pure; [`serve`] is the shell (one tiny HTTP/1.0
//! responder thread over std::net; no HTTP library needed for one fixed page and two probes).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::health::Health;
use crate::model::{Encap, Family};
use crate::nodes::Census;

/// Counters and gauges of the overlay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: u64,
    /// Of those, incremental ones (only changed peers planned, SPEC P-3).
    pub incremental: u64,
    /// Reconciles that failed to read the kernel, plus failed ops.
    pub failures: u64,
    /// Ops applied, total.
    pub ops: u64,
    /// Duration of the last reconcile.
    pub last_duration: Duration,
    /// Peers in the last desired state.
    pub peers: usize,
    /// Tunnels by (family, encap) in the last desired state.
    pub tunnels: BTreeMap<(String, String), usize>,
    /// Direct routes' peers.
    pub direct: usize,
    /// Watch restarts (from the watch threads).
    pub watch_restarts: u64,
    /// Relists (from the watch threads).
    pub relists: u64,
    /// IPVS virtual services kr-tunneld owns (DSR).
    pub dsr_services: usize,
}

impl Metrics {
    /// Record one reconcile.
    pub fn record(&mut self, c: &Census, ops: usize, failed: usize, took: Duration) {
        self.reconciles += 1;
        self.failures += failed as u64;
        self.ops += ops as u64;
        self.last_duration = took;
        self.peers = c.nodes;
        self.direct = c.direct;
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for ((family, encap), n) in &c.tunnels {
            let e = match encap {
                Encap::None => "ipip",
                Encap::Gue { .. } => "gue",
                Encap::Other { .. } => "other",
            };
            *counts
                .entry((family.to_string(), e.to_string()))
                .or_default() += n;
        }
        self.tunnels = counts;
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
            s.push_str(&format!(
                "# HELP kr_tunneld_{name} {help}\n# TYPE kr_tunneld_{name} {kind}\n"
            ));
            for l in lines {
                s.push_str(&format!("kr_tunneld_{name}{l}\n"));
            }
        };
        metric(
            "peers",
            "gauge",
            "Peer nodes in the desired state.",
            vec![format!(" {}", self.peers)],
        );
        let mut t = Vec::new();
        for fam in [Family::V4, Family::V6] {
            for enc in ["ipip", "gue"] {
                let n = self
                    .tunnels
                    .get(&(fam.to_string(), enc.to_string()))
                    .copied()
                    .unwrap_or(0);
                t.push(format!("{{family=\"{fam}\",encap=\"{enc}\"}} {n}"));
            }
        }
        metric(
            "tunnels",
            "gauge",
            "Tunnels in the desired state by family and encapsulation.",
            t,
        );
        metric(
            "direct_routes",
            "gauge",
            "Peers reached by direct routes.",
            vec![format!(" {}", self.direct)],
        );
        metric(
            "reconciles_total",
            "counter",
            "Reconciles run.",
            vec![format!(" {}", self.reconciles)],
        );
        metric(
            "incremental_reconciles_total",
            "counter",
            "Reconciles that planned only the peers that changed (the rest read the whole kernel).",
            vec![format!(" {}", self.incremental)],
        );
        metric(
            "reconcile_failures_total",
            "counter",
            "Failed kernel reads and failed operations.",
            vec![format!(" {}", self.failures)],
        );
        metric(
            "operations_total",
            "counter",
            "Kernel operations planned and applied.",
            vec![format!(" {}", self.ops)],
        );
        metric(
            "reconcile_duration_seconds",
            "gauge",
            "Duration of the last reconcile.",
            vec![format!(" {:.6}", self.last_duration.as_secs_f64())],
        );
        metric(
            "dsr_services",
            "gauge",
            "IPVS virtual services owned for DSR.",
            vec![format!(" {}", self.dsr_services)],
        );
        metric(
            "watch_restarts_total",
            "counter",
            "Watch reconnects.",
            vec![format!(" {}", self.watch_restarts)],
        );
        metric(
            "relists_total",
            "counter",
            "Full relists (start, 410 Gone).",
            vec![format!(" {}", self.relists)],
        );
        s
    }
}

/// Serve from a background thread on `addr`: `/healthz` and `/readyz` from `health` (SPEC S-8),
/// and `page` (the latest rendering of the metrics) at any other path; without a page (the
/// `--health-addr` listener) other paths are 404. Reads and writes are bounded by short timeouts.
pub fn serve(
    addr: SocketAddr,
    page: Option<Arc<Mutex<String>>>,
    health: Option<Arc<Health>>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                // The request line, which may come in pieces.
                let mut buf = [0u8; 1024];
                let mut n = 0;
                while n < buf.len() && !buf[..n].contains(&b'\n') {
                    match c.read(&mut buf[n..]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                // "GET /readyz HTTP/1.1": the second word of the request line.
                let path = std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .unwrap_or("/");
                let probe = match (path.split('?').next(), &health) {
                    (Some("/healthz"), Some(h)) => Some(h.live(Instant::now())),
                    (Some("/readyz"), Some(h)) => Some(h.ready(Instant::now())),
                    _ => None,
                };
                let (status, kind, body) = match (probe, &page) {
                    (Some(Ok(())), _) => ("200 OK", "text/plain", "ok\n".to_string()),
                    (Some(Err(why)), _) => ("503 Service Unavailable", "text/plain", why + "\n"),
                    (None, Some(p)) => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        match p.lock() {
                            Ok(p) => p.clone(),
                            Err(p) => p.into_inner().clone(),
                        },
                    ),
                    (None, None) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let _ = write!(
                    c,
                    "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_and_encap() {
        let mut m = Metrics::default();
        m.tunnels.insert(("ipv4".into(), "gue".into()), 3);
        m.reconciles = 2;
        let t = m.render();
        assert!(
            t.contains("kr_tunneld_tunnels{family=\"ipv4\",encap=\"gue\"} 3\n"),
            "{t}"
        );
        assert!(t.contains("kr_tunneld_tunnels{family=\"ipv6\",encap=\"ipip\"} 0\n"));
        assert!(t.contains(
            "# TYPE kr_tunneld_reconciles_total counter\nkr_tunneld_reconciles_total 2\n"
        ));
    }

    #[test]
    fn serves_the_page_over_http() {
        let page = Arc::new(Mutex::new("kr_tunneld_peers 7\n".to_string()));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        serve(addr, Some(page), None).unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(
            s.starts_with("HTTP/1.0 200 OK") && s.ends_with("kr_tunneld_peers 7\n"),
            "{s}"
        );
    }
}
