//! The fuzz targets' bodies: every parser kr-tunneld runs on input from the API server, the
//! kubeconfig, or the kernel (SPEC R-1: no panic on any input). Each function takes arbitrary
//! bytes and must return without panicking whatever they are; results are formatted so that
//! their `Debug`/`Display` code runs too.
//!
//! Shared by the cargo-fuzz targets in `fuzz_targets/` (this file is the fuzz package's library,
//! `cargo fuzz --fuzz-dir tests/fuzz run <target>`) and by the stable-Rust replay test
//! (`tests/fuzz/replay.rs`, part of `cargo test`), which feeds the committed seeds, every crash
//! found so far and a bounded number of deterministic mutations through the same functions.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use kr_tunneld::kube::types::{decode_event, decode_list, WatchEvent};
use kr_tunneld::kube::watch::{Flow, Next, WatchMachine};
use kr_tunneld::kube::{EndpointSlice, KubeError, Node, Service, WatchConfig};
use kr_tunneld::model::Family;
use kr_tunneld::netlink::{fou, genl, ipvs, rtnl};
use kr_tunneld::nodes::{self, NodeInfo};

/// Every target by name, for the replay test (`nl_socket` is cargo-fuzz only: the socket's
/// framing code is crate-private and is compiled into that target by path).
/// A target's body.
pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("watch_event", watch_event),
    ("watch_stream", watch_stream),
    ("kube_list", kube_list),
    ("kubeconfig", kubeconfig),
    ("rtnl_link", rtnl_link),
    ("rtnl_addr", rtnl_addr),
    ("rtnl_route", rtnl_route),
    ("rtnl_rule", rtnl_rule),
    ("fou", fou_port),
    ("ipvs", ipvs_msgs),
    ("genl_ctrl", genl_ctrl),
    ("podns", podns),
    ("bgp", bgp),
];

fn sink<T: std::fmt::Debug>(v: &T) {
    black_box(format!("{v:?}"));
}

/// A node decoded from the API goes through the overlay's node parser and the desired-state
/// computation as a peer of a fixed local node.
fn through_desired(n: &Node) {
    let info = kr_tunneld::daemon::node_info(n);
    let mut diags = Vec::new();
    sink(&nodes::parse_node(&info, &mut diags));
    let local = NodeInfo {
        name: "fuzz-local".into(),
        addresses: vec![("InternalIP".into(), "10.0.0.1".into())],
        pod_cidrs: vec!["10.244.0.0/24".into()],
        ..NodeInfo::default()
    };
    let cfg = overlay();
    let d = nodes::desired(
        "fuzz-local",
        &[local, info],
        &Default::default(),
        &cfg,
        &mut diags,
    );
    sink(&d);
    for d in &diags {
        black_box(d.to_string());
    }
}

fn overlay() -> kr_tunneld::config::Overlay {
    use std::sync::OnceLock;
    static CFG: OnceLock<kr_tunneld::config::Overlay> = OnceLock::new();
    CFG.get_or_init(|| {
        let args = ["--enable-ipv6=true", "--overlay-type=full"];
        match kr_tunneld::cli::parse(args.iter().copied(), &|_| None) {
            Ok(kr_tunneld::cli::Parsed::Args(a)) => {
                kr_tunneld::config::Config::from_args(&a)
                    .expect("config")
                    .overlay
            }
            _ => panic!("flags"),
        }
    })
    .clone()
}

/// One watch line, decoded as each resource the daemon watches.
pub fn watch_event(data: &[u8]) {
    match decode_event::<Node>(data) {
        Ok(WatchEvent::Added(n) | WatchEvent::Modified(n) | WatchEvent::Deleted(n)) => {
            through_desired(&n)
        }
        other => sink(&other),
    }
    sink(&decode_event::<Service>(data));
    sink(&decode_event::<EndpointSlice>(data));
}

/// A list body for each resource.
pub fn kube_list(data: &[u8]) {
    if let Ok(page) = decode_list::<Node>(data) {
        for n in page.items.iter().take(8) {
            through_desired(n);
        }
        sink(&page.skipped);
    }
    sink(&decode_list::<Service>(data));
    sink(&decode_list::<EndpointSlice>(data));
}

/// The watch state machine: the first byte splits the input into a list body and a watch body,
/// the second chooses the chunk size the body arrives in, the third how the stream ends.
pub fn watch_stream(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (head, rest) = data.split_at(3);
    let split = (head[0] as usize * rest.len()) / 256;
    let chunk = (head[1] as usize % 64) + 1;
    let (list, body) = rest.split_at(split);
    let cfg = WatchConfig {
        max_line: 4096,
        ..WatchConfig::default()
    };
    let mut m = WatchMachine::<Node>::new(cfg, 7);
    let t0 = Instant::now();
    let mut now = t0;
    for step in 0..4 {
        now += Duration::from_secs(1);
        match m.next(now) {
            Next::List { .. } => {
                if step == 0 {
                    m.list_page(list, now);
                } else {
                    m.list_page(
                        br#"{"kind":"NodeList","metadata":{"resourceVersion":"5"},"items":[]}"#,
                        now,
                    );
                }
            }
            Next::Watch { .. } => {
                m.watch_opened(now);
                for c in body.chunks(chunk) {
                    if m.watch_data(c, now) == Flow::Stop {
                        break;
                    }
                }
                let err = KubeError::Decode {
                    what: "fuzz".into(),
                    reason: "cut".into(),
                };
                m.watch_ended((head[2] & 1 == 1).then_some(&err), now);
            }
            Next::Wait { until } => now = until,
        }
        sink(&m.take_output());
    }
    black_box(m.cache().len());
    black_box(m.resource_version());
}

/// A kubeconfig file (UTF-8 only: the daemon reads it with `read_to_string`).
pub fn kubeconfig(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        sink(&kr_tunneld::kube::kubeconfig::parse(
            s,
            Path::new("/nonexistent/fuzz"),
        ));
    }
}

pub fn rtnl_link(data: &[u8]) {
    sink(&rtnl::parse_link(data));
}

pub fn rtnl_addr(data: &[u8]) {
    sink(&rtnl::parse_addr(data));
}

pub fn rtnl_route(data: &[u8]) {
    let names: HashMap<u32, String> = [(1, "lo".to_string()), (2, "eth0".to_string())]
        .into_iter()
        .collect();
    if let Ok(Some(r)) = rtnl::parse_route(data, &names) {
        black_box(kr_tunneld::model::RouteDisplay(&r).to_string());
    }
}

pub fn rtnl_rule(data: &[u8]) {
    if let Ok(Some(r)) = rtnl::parse_rule(data) {
        black_box(kr_tunneld::model::RuleDisplay(&r).to_string());
    }
}

pub fn fou_port(data: &[u8]) {
    sink(&fou::parse_fou_port(data));
}

/// IPVS service and real-server replies (the first byte picks the destination's family).
pub fn ipvs_msgs(data: &[u8]) {
    sink(&ipvs::parse_service(data));
    let fam = if data.first().is_some_and(|b| b & 1 == 1) {
        Family::V6
    } else {
        Family::V4
    };
    sink(&ipvs::parse_dest(data, fam));
    sink(&ipvs::IpvsMessage::parse(data));
}

/// nlctrl answers (family ID lookup) and generic netlink attributes in general.
pub fn genl_ctrl(data: &[u8]) {
    sink(&genl::parse_family_id(data));
    if let Ok(attrs) = genl::parse_attrs(data) {
        for a in attrs.iter().take(32) {
            sink(&a.as_nested());
            black_box((a.as_u8(), a.as_u16(), a.as_be16(), a.as_u32()));
        }
    }
}

/// The pod-namespace parsers (links with devconf, routes, netconf).
pub fn podns(data: &[u8]) {
    sink(&kr_tunneld::podns::parse_link(data));
    let names: HashMap<u32, String> = [(2, "eth0".to_string())].into_iter().collect();
    sink(&kr_tunneld::podns::parse_route(data, 157, &names));
    sink(&kr_tunneld::podns::parse_netconf_all_rp_filter(data));
}

/// A BGP byte stream as a peer sends it: framed and decoded as the speaker's reader does
/// (AS_PATH width from the OPEN), every message fed to a session machine that is past
/// OpenSent, decoded UPDATEs re-encoded and decoded again.
pub fn bgp(data: &[u8]) {
    use kr_tunneld::bgp::codec;
    use kr_tunneld::bgp::session::{Event, Local, Peer, Routes};
    let now = Instant::now();
    let local = Local {
        asn: 64512,
        id: std::net::Ipv4Addr::new(10, 0, 0, 1),
        hold: 90,
        gr_time: Some(90),
        families: vec![Family::V4, Family::V6],
    };
    let routes = Routes {
        nets: vec!["10.244.0.0/24".parse().unwrap()],
        nh4: Some(std::net::Ipv4Addr::new(10, 0, 0, 1)),
        nh6: None,
    };
    let mut peer = Peer::new("10.0.0.2".parse().unwrap(), "fuzz", 64512, now);
    sink(&peer.handle(Event::Tick, &local, &routes, now));
    sink(&peer.handle(
        Event::Connected {
            conn: 1,
            outgoing: true,
        },
        &local,
        &routes,
        now,
    ));
    let mut rest = data;
    let mut as4 = true;
    while let Ok(Some(n)) = codec::frame_len(rest) {
        if rest.len() < n {
            break;
        }
        let m = codec::decode(&rest[..n], as4);
        rest = &rest[n..];
        let ev = match m {
            Ok(m) => {
                if let codec::Msg::Open(o) = &m {
                    as4 = o.as4;
                    sink(&codec::encode_open(o));
                }
                if let codec::Msg::Update(u) = &m {
                    let b = codec::encode_update(u, as4);
                    if b.len() <= codec::MAX {
                        sink(&codec::decode(&b, as4));
                    }
                }
                Event::Received(1, m)
            }
            Err(e) => {
                black_box(e.to_string());
                Event::Malformed(1, e)
            }
        };
        sink(&peer.handle(ev, &local, &routes, now));
    }
    sink(&peer.set_routes(&routes));
    sink(&peer.stop(None, now));
}
