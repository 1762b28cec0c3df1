//! BGP: a minimal iBGP speaker so that a kr-tunneld node can join a kube-router cluster
//! (SPEC section 9, B-1…B-8; `reference/kube-router-bgp.md`).
//!
//! * [`codec`] (core): the messages, golden-tested against GoBGP's bytes and fuzzed;
//! * [`session`] (core): one peer's RFC 4271 state machine, events in, actions out, time passed
//!   in as `now`; peer selection from Nodes as kube-router does it;
//! * [`speaker`] (shell): blocking TCP sockets, one reader thread per connection, one thread
//!   that owns every session and the timers, fed through a channel.
//!
//! The speaker announces this node's pod CIDRs and nothing else. What peers announce is kept
//! for `kr-tunneld status` and metrics only: tunnels and routes still come from Node objects.

pub mod codec;
pub mod session;
pub mod speaker;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use crate::cli::Args;
use crate::config::{parse_bool, parse_duration, ConfigError};
use crate::kube::types::Node;
use crate::model::Family;
use crate::nodes::{self, NodeInfo};
use session::{NodeBgp, Peer, Routes, State, STATES};

/// `kube-router.io/node.asn`.
pub const ANN_ASN: &str = "kube-router.io/node.asn";
/// `kube-router.io/rr.server`.
pub const ANN_RR_SERVER: &str = "kube-router.io/rr.server";
/// `kube-router.io/rr.client`.
pub const ANN_RR_CLIENT: &str = "kube-router.io/rr.client";

/// The BGP flags (SPEC B-1), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `--enable-ibgp`.
    pub enabled: bool,
    /// `--cluster-asn` (0 means 64512, as in kube-router).
    pub asn: u32,
    /// `--bgp-port`.
    pub port: u16,
    /// `--bgp-holdtime` in seconds.
    pub hold: u16,
    /// `--bgp-graceful-restart-time` in seconds when `--bgp-graceful-restart` is on.
    pub gr_time: Option<u16>,
    /// `--router-id` ("" = the node's IPv4 address).
    pub router_id: String,
    /// `--nodes-full-mesh`.
    pub full_mesh: bool,
    /// `--advertise-pod-cidr` (kube-router gates only external peers with it; kept for the
    /// flag's sake: iBGP peers always get the pod CIDRs).
    pub advertise_pod_cidr: bool,
}

impl Settings {
    /// Validate the BGP flags.
    pub fn from_args(args: &Args) -> Result<Settings, ConfigError> {
        let bad = |name: &str, why: &str| {
            let (value, source) = args.get(name);
            ConfigError {
                source: source.to_string(),
                value: value.to_string(),
                why: why.to_string(),
            }
        };
        let bool = |name: &str| {
            parse_bool(args.get(name).0).ok_or_else(|| bad(name, "expected true or false"))
        };
        let asn = match args.get("cluster-asn").0.parse::<u32>() {
            Ok(0) => 64512,
            Ok(a)
                if (64512..=65535).contains(&a) || (4_200_000_000..=4_294_967_294).contains(&a) =>
            {
                a
            }
            _ => {
                return Err(bad(
                    "cluster-asn",
                    "expected a private AS: 64512-65535 or 4200000000-4294967294",
                ))
            }
        };
        let port = match args.get("bgp-port").0.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("bgp-port", "expected a port from 1 to 65535")),
        };
        let hold = parse_duration(args.get("bgp-holdtime").0)
            .filter(|d| (3..=65535).contains(&d.as_secs()) && d.subsec_nanos() == 0)
            .ok_or_else(|| {
                bad(
                    "bgp-holdtime",
                    "expected whole seconds from 3s to 18h12m15s",
                )
            })?;
        let gr = parse_duration(args.get("bgp-graceful-restart-time").0)
            .filter(|d| (1..=4095).contains(&d.as_secs()) && d.subsec_nanos() == 0)
            .ok_or_else(|| {
                bad(
                    "bgp-graceful-restart-time",
                    "expected whole seconds from 1s to 4095s",
                )
            })?;
        let router_id = args.get("router-id").0.trim().to_string();
        if !router_id.is_empty()
            && router_id != "generate"
            && session::router_id(&router_id, &NodeBgp::default()).is_err()
        {
            return Err(bad("router-id", "expected an IPv4 address or 'generate'"));
        }
        Ok(Settings {
            enabled: bool("enable-ibgp")?,
            asn,
            port,
            hold: hold.as_secs() as u16,
            gr_time: bool("bgp-graceful-restart")?.then_some(gr.as_secs() as u16),
            router_id,
            full_mesh: bool("nodes-full-mesh")?,
            advertise_pod_cidr: bool("advertise-pod-cidr")?,
        })
    }

    /// The hold time offered.
    pub fn hold_time(&self) -> Duration {
        Duration::from_secs(u64::from(self.hold))
    }
}

/// What peer choice needs from a Node: addresses (SPEC N-2), pod CIDRs (SPEC N-3; problems are
/// logged by the overlay, not again here) and the BGP annotations.
pub fn node_bgp(n: &Node) -> NodeBgp {
    let ann = &n.metadata.annotations;
    let info = NodeInfo {
        name: n.metadata.name.clone(),
        addresses: n
            .status
            .addresses
            .iter()
            .map(|a| (a.type_.clone(), a.address.clone()))
            .collect(),
        annotations: ann
            .iter()
            .filter(|(k, _)| *k == nodes::ANN_POD_CIDRS || *k == nodes::ANN_POD_CIDR)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        pod_cidr: (!n.spec.pod_cidr.is_empty()).then(|| n.spec.pod_cidr.clone()),
        pod_cidrs: n.spec.pod_cidrs.clone(),
    };
    let p = nodes::parse_node(&info, &mut Vec::new());
    let best = |f| nodes::best_ip(&p.addrs, f);
    NodeBgp {
        name: p.name,
        primary: p
            .addrs
            .iter()
            .find(|(t, _)| t == "InternalIP")
            .or_else(|| p.addrs.first())
            .map(|(_, ip)| *ip),
        best: (
            match best(Family::V4) {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            },
            match best(Family::V6) {
                Some(IpAddr::V6(a)) => Some(a),
                _ => None,
            },
        ),
        cidrs: p.cidrs,
        asn: ann.get(ANN_ASN).cloned(),
        rr_server: ann.get(ANN_RR_SERVER).cloned(),
        rr_client: ann.get(ANN_RR_CLIENT).cloned(),
    }
}

/// The `kr-tunneld status` section (written by the speaker to the state directory): what we
/// announce, then one line per peer with its state and what it announced (SPEC B-8).
pub fn status_text(
    head: &str,
    routes: &Routes,
    peers: &[&Peer],
    age: &dyn Fn(&Peer) -> u64,
) -> String {
    let mut s = format!("BGP: {head}\nannounced:");
    for n in &routes.nets {
        let nh = match n {
            ipnet::IpNet::V4(_) => routes.nh4.map(IpAddr::V4),
            ipnet::IpNet::V6(_) => routes.nh6.map(IpAddr::V6),
        };
        match nh {
            Some(nh) => {
                let _ = write!(s, " {n} via {nh}");
            }
            None => {
                let _ = write!(s, " ({n}: no next hop of its family)");
            }
        }
    }
    if routes.nets.is_empty() {
        s.push_str(" nothing");
    }
    let _ = writeln!(
        s,
        "\n{:<40} {:<24} {:<12} {:>8}  RECEIVED",
        "PEER", "NODE", "STATE", "FOR"
    );
    for p in peers {
        let recv: Vec<String> = p
            .received
            .iter()
            .map(|(n, nh)| format!("{n} via {nh}"))
            .collect();
        let eor: Vec<String> = p.eor.iter().map(|f| format!("eor-{f}")).collect();
        let _ = writeln!(
            s,
            "{:<40} {:<24} {:<12} {:>7}s  {}{}{}",
            p.addr,
            p.node,
            p.state,
            age(p),
            if recv.is_empty() {
                "-".to_string()
            } else {
                recv.join(", ")
            },
            if eor.is_empty() { "" } else { " " },
            eor.join(" ")
        );
    }
    s
}

/// Metrics (Prometheus text): peers per state, per-peer state and received prefixes, and the
/// number of prefixes announced (SPEC B-8).
pub fn metrics_text(routes: &Routes, peers: &[&Peer]) -> String {
    let mut s = String::from(
        "# HELP kr_tunneld_bgp_peers BGP peers by session state.\n# TYPE kr_tunneld_bgp_peers gauge\n",
    );
    for st in STATES {
        let n = peers.iter().filter(|p| p.state == st).count();
        let _ = writeln!(s, "kr_tunneld_bgp_peers{{state=\"{st}\"}} {n}");
    }
    s.push_str("# HELP kr_tunneld_bgp_peer_established 1 if the session with this peer is established.\n# TYPE kr_tunneld_bgp_peer_established gauge\n");
    for p in peers {
        let up = u8::from(p.state == State::Established);
        let _ = writeln!(
            s,
            "kr_tunneld_bgp_peer_established{{peer=\"{}\",node=\"{}\",state=\"{}\"}} {up}",
            p.addr, p.node, p.state
        );
    }
    s.push_str("# HELP kr_tunneld_bgp_received_prefixes Prefixes a peer announces.\n# TYPE kr_tunneld_bgp_received_prefixes gauge\n");
    for p in peers {
        let _ = writeln!(
            s,
            "kr_tunneld_bgp_received_prefixes{{peer=\"{}\"}} {}",
            p.addr,
            p.received.len()
        );
    }
    let _ = writeln!(
        s,
        "# HELP kr_tunneld_bgp_announced_prefixes Prefixes this node announces.\n# TYPE kr_tunneld_bgp_announced_prefixes gauge\nkr_tunneld_bgp_announced_prefixes {}",
        routes.nets.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::config;

    #[test]
    fn flags_have_kube_routers_defaults_and_bgp_is_off() {
        let b = config(&[]).bgp;
        assert_eq!(
            b,
            Settings {
                enabled: false,
                asn: 64512,
                port: 179,
                hold: 90,
                gr_time: None,
                router_id: String::new(),
                full_mesh: true,
                advertise_pod_cidr: true,
            }
        );
        let b = config(&[
            "--enable-ibgp",
            "--cluster-asn=0",
            "--bgp-graceful-restart",
            "--bgp-graceful-restart-time=2m",
            "--bgp-holdtime=3s",
            "--router-id=generate",
        ])
        .bgp;
        assert_eq!(
            (b.enabled, b.asn, b.gr_time, b.hold),
            (true, 64512, Some(120), 3)
        );
    }

    #[test]
    fn bad_bgp_values_name_the_flag() {
        let parse = |a: &[&str]| {
            let crate::cli::Parsed::Args(args) =
                crate::cli::parse(a.iter().copied(), &|_| None).unwrap()
            else {
                panic!()
            };
            crate::config::Config::from_args(&args)
                .unwrap_err()
                .to_string()
        };
        for (args, flag) in [
            (&["--cluster-asn=65000000"][..], "--cluster-asn"),
            (&["--cluster-asn=100"][..], "--cluster-asn"),
            (&["--bgp-port=0"][..], "--bgp-port"),
            (&["--bgp-holdtime=2s"][..], "--bgp-holdtime"),
            (
                &["--bgp-graceful-restart-time=4096s"][..],
                "--bgp-graceful-restart-time",
            ),
            (&["--router-id=fd00::1"][..], "--router-id"),
            (&["--nodes-full-mesh=maybe"][..], "--nodes-full-mesh"),
        ] {
            let e = parse(args);
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn metrics_count_peers_per_state() {
        let now = std::time::Instant::now();
        let mut p = Peer::new("10.0.0.2".parse().unwrap(), "b", 64512, now);
        p.received.push((
            "10.244.2.0/24".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ));
        let r = Routes {
            nets: vec!["10.244.1.0/24".parse().unwrap()],
            nh4: Some("10.0.0.1".parse().unwrap()),
            nh6: None,
        };
        let m = metrics_text(&r, &[&p]);
        assert!(
            m.contains("kr_tunneld_bgp_peers{state=\"active\"} 1\n"),
            "{m}"
        );
        assert!(m.contains("kr_tunneld_bgp_peers{state=\"established\"} 0\n"));
        assert!(m.contains(
            "kr_tunneld_bgp_peer_established{peer=\"10.0.0.2\",node=\"b\",state=\"active\"} 0\n"
        ));
        assert!(m.contains("kr_tunneld_bgp_received_prefixes{peer=\"10.0.0.2\"} 1\n"));
        assert!(m.contains("kr_tunneld_bgp_announced_prefixes 1\n"));
        let s = status_text("AS 64512", &r, &[&p], &|_| 5);
        assert!(s.contains("announced: 10.244.1.0/24 via 10.0.0.1"), "{s}");
        assert!(
            s.contains("10.0.0.2")
                && s.contains("active")
                && s.contains("10.244.2.0/24 via 10.0.0.2"),
            "{s}"
        );
    }
}
