//! Desired overlay state from Node objects (SPEC N-1…N-5, T-1…T-3, T-6, T-7).
//!
//! Core module: pure. It takes the watch cache's nodes (as [`NodeInfo`], only the fields used),
//! the local interface addresses and MTUs (read from the kernel by the shell) and the overlay
//! settings, and returns the tunnels, routes, rules and FOU ports that should exist, the peer table
//! for operators, and diagnostics (bad node data) for the shell to log once per change.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{EncapMode, Overlay, OverlayType};
use crate::model::{Actual, Encap, Family, FouPort, NextHop, Route, RouteKind, Rule, Tunnel};

/// Annotation with the node's pod CIDRs, comma separated (kube-router).
pub const ANN_POD_CIDRS: &str = "kube-router.io/pod-cidrs";
/// Deprecated single-CIDR annotation (kube-router), honoured with a warning.
pub const ANN_POD_CIDR: &str = "kube-router.io/pod-cidr";
/// Longest annotation value we parse; anything longer is rejected as a whole.
const MAX_ANNOTATION: usize = 4096;
/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// The fields of a Node that the overlay uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// metadata.name.
    pub name: String,
    /// status.addresses as (type, address) in API order.
    pub addresses: Vec<(String, String)>,
    /// metadata.annotations.
    pub annotations: BTreeMap<String, String>,
    /// spec.podCIDR.
    pub pod_cidr: Option<String>,
    /// spec.podCIDRs.
    pub pod_cidrs: Vec<String>,
}

/// A problem with the input, for the shell to log (once per change).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diag {
    /// Node the problem is about.
    pub node: String,
    /// What is wrong and what was done about it.
    pub msg: String,
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.msg)
    }
}

/// How a peer is reached in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Through a tunnel.
    Tunnel {
        /// Tunnel name.
        name: String,
        /// Transmit encapsulation.
        encap: Encap,
    },
    /// Routed directly via the peer's IP (same subnet).
    Direct,
    /// Not reached by us (overlay off and not in a local subnet).
    None,
}

/// One row of the peer table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Node name.
    pub node: String,
    /// Family.
    pub family: Family,
    /// Peer's best IP of the family.
    pub ip: IpAddr,
    /// Pod CIDRs of the family.
    pub cidrs: Vec<IpNet>,
    /// Decision.
    pub mode: Mode,
}

/// What should exist in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Tunnels, sorted by name.
    pub tunnels: Vec<Tunnel>,
    /// Routes (main table and the overlay table).
    pub routes: Vec<Route>,
    /// Policy rules.
    pub rules: Vec<Rule>,
    /// FOU receive ports.
    pub fou: Vec<FouPort>,
    /// Peer table (for status and the summary line).
    pub peers: Vec<Peer>,
}

/// Primary IP (SPEC N-2): first InternalIP of any family, else first ExternalIP.
fn primary_ip(addrs: &[(String, IpAddr)]) -> Option<IpAddr> {
    addrs
        .iter()
        .find(|(t, _)| t == "InternalIP")
        .or_else(|| addrs.iter().find(|(t, _)| t == "ExternalIP"))
        .map(|(_, ip)| *ip)
}

/// Best IP of a family (SPEC N-2): the primary IP if it is of that family, else the first
/// InternalIP of the family, else the first ExternalIP of the family.
pub fn best_ip(addrs: &[(String, IpAddr)], family: Family) -> Option<IpAddr> {
    if let Some(p) = primary_ip(addrs).filter(|p| Family::of(p) == family) {
        return Some(p);
    }
    let of = |ty: &str| {
        addrs
            .iter()
            .find(|(t, ip)| t == ty && Family::of(ip) == family)
            .map(|(_, ip)| *ip)
    };
    of("InternalIP").or_else(|| of("ExternalIP"))
}

/// A node's parsed addresses and pod CIDRs, with diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Node name.
    pub name: String,
    /// InternalIP/ExternalIP addresses that parsed, in order.
    pub addrs: Vec<(String, IpAddr)>,
    /// Pod CIDRs, normalised, de-duplicated, in order.
    pub cidrs: Vec<IpNet>,
    /// Some pod CIDR (or the whole annotation) was refused with a diagnostic already: "no pod
    /// CIDR" would only repeat it (issue 12).
    pub refused: bool,
}

/// Parse a node's addresses and pod CIDRs (SPEC N-2, N-3). Bad entries are skipped with a
/// diagnostic; they never affect other nodes.
pub fn parse_node(n: &NodeInfo, diags: &mut Vec<Diag>) -> Parsed {
    let mut refused = false;
    let mut warn = |msg: String| {
        diags.push(Diag {
            node: n.name.clone(),
            msg,
        })
    };
    let mut addrs = Vec::new();
    for (ty, a) in &n.addresses {
        if ty != "InternalIP" && ty != "ExternalIP" {
            continue;
        }
        match a.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => addrs.push((ty.clone(), ip)),
            _ => warn(format!(
                "ignoring {ty} '{}': not a usable IP address",
                short(a)
            )),
        }
    }
    let (source, raw): (&str, Vec<String>) = if let Some(v) = n.annotations.get(ANN_POD_CIDRS) {
        (ANN_POD_CIDRS, split_annotation(v, &mut warn, &mut refused))
    } else if let Some(v) = n.annotations.get(ANN_POD_CIDR) {
        warn(format!(
            "annotation {ANN_POD_CIDR} is deprecated, use {ANN_POD_CIDRS}"
        ));
        (ANN_POD_CIDR, split_annotation(v, &mut warn, &mut refused))
    } else if !n.pod_cidrs.is_empty() {
        ("spec.podCIDRs", n.pod_cidrs.clone())
    } else {
        ("spec.podCIDR", n.pod_cidr.iter().cloned().collect())
    };
    let mut cidrs: Vec<IpNet> = Vec::new();
    for s in raw {
        match s.trim().parse::<IpNet>() {
            Ok(net) if net.trunc() != net => {
                warn(format!(
                    "pod CIDR '{s}' from {source} has host bits set, using {}",
                    net.trunc()
                ));
                if !cidrs.contains(&net.trunc()) {
                    cidrs.push(net.trunc());
                }
            }
            Ok(net) if net.prefix_len() == 0 => {
                refused = true;
                warn(format!(
                    "ignoring pod CIDR '{s}' from {source}: a default route is not a pod CIDR"
                ))
            }
            Ok(net) => {
                if cidrs.contains(&net) {
                    warn(format!("ignoring duplicate pod CIDR '{s}' from {source}"));
                } else {
                    cidrs.push(net);
                }
            }
            Err(_) => {
                refused = true;
                warn(format!(
                    "ignoring pod CIDR '{}' from {source}: not a CIDR",
                    short(&s)
                ))
            }
        }
    }
    Parsed {
        name: n.name.clone(),
        addrs,
        cidrs,
        refused,
    }
}

fn split_annotation(v: &str, warn: &mut impl FnMut(String), refused: &mut bool) -> Vec<String> {
    if v.len() > MAX_ANNOTATION {
        *refused = true;
        warn(format!(
            "ignoring pod CIDR annotation of {} bytes (limit {MAX_ANNOTATION})",
            v.len()
        ));
        return Vec::new();
    }
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// At most 64 characters of untrusted text, for log lines.
fn short(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(64).collect::<String>())
    }
}

/// FNV-1a, 64 bit: a stable, dependency-free hash for IPv6 tunnel names. Collisions are detected
/// by the caller, so cryptographic strength is not needed.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Tunnel name for a peer address (SPEC T-3). IPv4: prefix + the 8 hex digits of the address
/// (lossless, so no collisions). IPv6: prefix + `v` + as many hex digits of a hash of the 16 bytes
/// as fit in 15 bytes (at least 10 with a 4-character prefix); clashes are detected by
/// [`desired`]. The prefix is validated to 1–4 characters by the configuration.
pub fn tunnel_name(prefix: &str, remote: IpAddr) -> String {
    match remote {
        IpAddr::V4(a) => format!("{prefix}{:08x}", u32::from(a)),
        IpAddr::V6(a) => {
            let digits = 15usize.saturating_sub(prefix.len() + 1).min(16);
            let hex = format!("{:016x}", fnv1a(&a.octets()));
            format!("{prefix}v{}", &hex[..digits])
        }
    }
}

/// Name of the receive-only (remote any) tunnel of a family: prefix + `rx4` / `rx6`. Peer tunnel
/// names are prefix + 8 hex digits or prefix + `v` + hex, so they cannot clash with it.
pub fn rx_tunnel_name(prefix: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("{prefix}rx4"),
        Family::V6 => format!("{prefix}rx6"),
    }
}

/// Encapsulation overhead in bytes of a tunnel (outer header, plus UDP and GUE headers for GUE).
/// ip6tnl adds the 8-byte tunnel encapsulation limit option by default (RFC 2473).
pub fn overhead(family: Family, encap: &Encap) -> u32 {
    let base = match family {
        Family::V4 => 20,
        Family::V6 => 48,
    };
    match encap {
        Encap::None => base,
        _ => base + 8 + 4,
    }
}

/// The local interface subnets of a family: every address prefix except loopback, link-local,
/// host routes (/32, /128) and addresses on our own tunnels.
fn local_subnets(actual: &Actual, family: Family, own_links: &BTreeSet<u32>) -> Vec<IpNet> {
    actual
        .addrs
        .iter()
        .filter(|a| Family::of_net(&a.addr) == family && !own_links.contains(&a.index))
        .filter(|a| a.addr.prefix_len() < family.host_len())
        .filter(|a| match a.addr.addr() {
            IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
            IpAddr::V6(v) => !v.is_loopback() && (v.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|a| a.addr.trunc())
        .collect()
}

/// MTU of the device holding `ip`, if any.
fn underlay_mtu(actual: &Actual, ip: IpAddr) -> Option<u32> {
    let a = actual.addrs.iter().find(|a| a.addr.addr() == ip)?;
    actual
        .links
        .iter()
        .find(|l| l.index == a.index)
        .map(|l| l.mtu)
}

/// The per-family facts every peer's decision needs: computed once per full pass.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FamilyCtx {
    family: Family,
    /// This node's best IP of the family.
    my_ip: IpAddr,
    /// Local interface subnets (SPEC N-1: a peer in one of them is "same subnet").
    subnets: Vec<IpNet>,
    /// Transmit encapsulation of peer tunnels.
    encap: Encap,
    /// MTU of the device holding `my_ip` (`None` with `--tunnel-mtu`).
    underlay: Option<u32>,
    /// MTU of peer tunnels.
    mtu: u32,
}

/// What a full computation learnt about this node, its interfaces and the settings: enough to
/// work out any one peer's objects again without looking at the others (SPEC P-3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    local: String,
    me: Parsed,
    families: Vec<FamilyCtx>,
}

/// The pod CIDRs and tunnel names in use. A CIDR or a name wanted by two nodes goes to the one
/// whose name sorts first (SPEC N-5); such a contest makes every node's outcome depend on the
/// others', so while one exists only a full computation is exact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// Pod CIDRs claimed (this node's own included).
    cidrs: HashSet<IpNet>,
    /// Tunnel names in use.
    names: HashSet<String>,
    /// Whether some CIDR or name was wanted by two nodes.
    pub contested: bool,
}

/// What an incremental update touched: the objects to plan, and the names and route keys whose
/// kernel state the planner must see (old and new).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// The changed nodes' objects as they should be now.
    pub want: Desired,
    /// Tunnel names before and after (a few: plain lists, compared without hashing).
    pub names: Vec<String>,
    /// Route (table, destination) pairs before and after.
    pub routes: Vec<(u32, IpNet)>,
}

impl Context {
    /// This node's parsed data, the local subnets and the tunnel MTU, from the local node and the
    /// kernel's interfaces. `None` (with a diagnostic) when the local node is not in the cache:
    /// then nothing can be planned and the kernel is left alone (SPEC K-4).
    pub fn new(
        local: &str,
        me: Option<&NodeInfo>,
        actual: &Actual,
        cfg: &Overlay,
        diags: &mut Vec<Diag>,
    ) -> Option<Context> {
        let Some(me) = me else {
            diags.push(Diag {
                node: local.to_string(),
                msg: "local node not found in the API; keeping the kernel state as it is".into(),
            });
            return None;
        };
        let me = parse_node(me, diags);
        // SPEC S-4: a local Node without a usable address of an enabled family (a cloud
        // controller re-initialising it) says nothing about what should exist: like a missing one.
        let usable = |f: Family| match f {
            Family::V4 => cfg.ipv4,
            Family::V6 => cfg.ipv6,
        };
        if !me.addrs.iter().any(|(_, ip)| usable(Family::of(ip))) {
            diags.push(Diag {
                node: local.to_string(),
                msg: "local node has no usable InternalIP/ExternalIP address; keeping the kernel \
                      state as it is"
                    .into(),
            });
            return None;
        }
        let own_links: BTreeSet<u32> = actual
            .links
            .iter()
            .filter(|l| cfg.own.owns_link(l))
            .map(|l| l.index)
            .collect();
        let mut families = Vec::new();
        for (family, enabled) in [(Family::V4, cfg.ipv4), (Family::V6, cfg.ipv6)] {
            if !enabled {
                continue;
            }
            let Some(my_ip) = best_ip(&me.addrs, family) else {
                diags.push(Diag {
                    node: me.name.clone(),
                    msg: format!("no {family} address: no {family} tunnels or routes"),
                });
                continue;
            };
            let encap = match cfg.encap {
                EncapMode::Ipip => Encap::None,
                EncapMode::Fou => Encap::Gue {
                    sport: 0,
                    dport: cfg.port,
                },
            };
            let underlay = if cfg.mtu != 0 {
                None
            } else {
                Some(underlay_mtu(actual, my_ip).unwrap_or_else(|| {
                    diags.push(Diag {
                        node: me.name.clone(),
                        msg: format!(
                            "{my_ip} is on no local interface; assuming an underlay MTU of 1500"
                        ),
                    });
                    1500
                }))
            };
            families.push(FamilyCtx {
                family,
                my_ip,
                subnets: local_subnets(actual, family, &own_links),
                mtu: tunnel_mtu(cfg, family, underlay, &encap),
                underlay,
                encap,
            });
        }
        Some(Context {
            local: local.to_string(),
            me,
            families,
        })
    }

    /// The objects that do not depend on peers: the receive-only tunnels, FOU ports and the
    /// rules for our pod CIDRs; and this node's CIDRs in `claims`.
    fn base(&self, cfg: &Overlay, claims: &mut Claims, d: &mut Desired) {
        for c in &self.me.cidrs {
            claims.cidrs.insert(*c);
        }
        if !cfg.enabled {
            return;
        }
        for f in &self.families {
            let family = f.family;
            // A receive-only tunnel with remote "any": the kernel hands it every IPIP/GUE packet
            // for our address that no per-peer tunnel takes. An in-place change of a peer tunnel
            // (encap switch, T-5) unhashes it for an RCU grace period; without this device the
            // packets arriving in that window are dropped (seen in the live-switch test, IPv6).
            d.tunnels.push(Tunnel {
                name: rx_tunnel_name(&cfg.own.name_prefix, family),
                family,
                local: f.my_ip,
                remote: match family {
                    Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                },
                encap: Encap::None,
                ttl: cfg.ttl,
                pmtudisc: true,
                // It never transmits; its MTU must not follow the encap, or an encap switch
                // would change (and so briefly unhash) it too.
                mtu: tunnel_mtu(cfg, family, f.underlay, &Encap::None),
            });
            for port in std::iter::once(cfg.port).chain(cfg.extra_rx_ports.iter().copied()) {
                let p = FouPort {
                    family,
                    port,
                    gue: true,
                };
                if !d.fou.contains(&p) {
                    d.fou.push(p);
                }
            }
            for cidr in self.me.cidrs.iter().filter(|c| Family::of_net(c) == family) {
                d.rules.push(Rule {
                    family,
                    priority: cfg.rule_priority,
                    src: Some(*cidr),
                    dst: None,
                    ipproto: None,
                    dport: None,
                    table: cfg.table,
                    protocol: cfg.own.protocol,
                });
            }
        }
    }

    /// One peer's objects in one family, added to `d`; its CIDRs and tunnel name claimed.
    fn peer(
        &self,
        f: &FamilyCtx,
        cfg: &Overlay,
        p: &Parsed,
        claims: &mut Claims,
        d: &mut Desired,
        diags: &mut Vec<Diag>,
    ) {
        let family = f.family;
        let cidrs: Vec<IpNet> = p
            .cidrs
            .iter()
            .filter(|c| Family::of_net(c) == family)
            .filter(|c| {
                // A peer claiming one of our own pod CIDRs (or one already taken by a peer
                // sorted before it) must not steal its route (SPEC N-5).
                if claims.cidrs.contains(*c) {
                    claims.contested = true;
                    diags.push(Diag {
                        node: p.name.clone(),
                        msg: format!(
                            "pod CIDR {c} is already used by another node; ignoring it here"
                        ),
                    });
                    return false;
                }
                claims.cidrs.insert(**c);
                true
            })
            .copied()
            .collect();
        if cidrs.is_empty() {
            if !p.refused && !p.cidrs.iter().any(|c| Family::of_net(c) == family) {
                diags.push(Diag {
                    node: p.name.clone(),
                    msg: format!("no {family} pod CIDR: nothing to route"),
                });
            }
            return;
        }
        let Some(ip) = best_ip(&p.addrs, family) else {
            diags.push(Diag {
                node: p.name.clone(),
                msg: format!("no {family} address: no {family} route to its pod CIDRs"),
            });
            return;
        };
        if self.me.addrs.iter().any(|(_, a)| *a == ip) {
            diags.push(Diag {
                node: p.name.clone(),
                msg: format!("has this node's address {ip}; skipped"),
            });
            return;
        }
        let same_subnet = f.subnets.iter().any(|s| s.contains(&ip));
        let tunnel = cfg.enabled && (cfg.kind == OverlayType::Full || !same_subnet);
        let mode = if tunnel {
            let name = tunnel_name(&cfg.own.name_prefix, ip);
            if claims.names.contains(&name) {
                claims.contested = true;
                let holder = d
                    .peers
                    .iter()
                    .find(|q| matches!(&q.mode, Mode::Tunnel { name: n, .. } if *n == name))
                    .map_or("another node", |q| q.node.as_str());
                diags.push(Diag {
                    node: p.name.clone(),
                    msg: format!("tunnel name {name} clashes with node {holder}'s; skipped"),
                });
                return;
            }
            claims.names.insert(name.clone());
            d.tunnels.push(Tunnel {
                name: name.clone(),
                family,
                local: f.my_ip,
                remote: ip,
                encap: f.encap,
                ttl: cfg.ttl,
                pmtudisc: true,
                mtu: f.mtu,
            });
            d.routes.push(Route {
                table: cfg.table,
                dst: host_net(ip),
                nexthop: NextHop::Dev(name.clone()),
                src: None,
                protocol: cfg.own.protocol,
                kind: RouteKind::Unicast,
                advmss: None,
            });
            for c in &cidrs {
                d.routes.push(Route {
                    table: MAIN_TABLE,
                    dst: *c,
                    nexthop: NextHop::Dev(name.clone()),
                    src: Some(f.my_ip),
                    protocol: cfg.own.protocol,
                    kind: RouteKind::Unicast,
                    advmss: None,
                });
            }
            Mode::Tunnel {
                name,
                encap: f.encap,
            }
        } else if same_subnet {
            for c in &cidrs {
                d.routes.push(Route {
                    table: MAIN_TABLE,
                    dst: *c,
                    nexthop: NextHop::Via(ip),
                    src: None,
                    protocol: cfg.own.protocol,
                    kind: RouteKind::Unicast,
                    advmss: None,
                });
            }
            Mode::Direct
        } else {
            Mode::None
        };
        d.peers.push(Peer {
            node: p.name.clone(),
            family,
            ip,
            cidrs,
            mode,
        });
    }
}

/// How many nodes the peer table names (a dual-stack peer has a row per family). The rows are
/// sorted by (family, node) as [`full`] and [`update`] keep them, so this is a merge of the two
/// families' rows, without hashing or allocating.
pub fn distinct_nodes(peers: &[Peer]) -> usize {
    let sorted = peers
        .windows(2)
        .all(|w| (w[0].family, &w[0].node) < (w[1].family, &w[1].node));
    if !sorted {
        return peers
            .iter()
            .map(|p| p.node.as_str())
            .collect::<BTreeSet<_>>()
            .len();
    }
    let split = peers.partition_point(|p| p.family == Family::V4);
    let (v4, v6) = peers.split_at(split);
    let (mut i, mut j, mut both) = (0, 0, 0);
    while i < v4.len() && j < v6.len() {
        match v4[i].node.cmp(&v6[j].node) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    peers.len() - both
}

/// Counts over the peer table, for the summary line and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Nodes the peer table names.
    pub nodes: usize,
    /// Tunnel rows by (family, transmit encapsulation).
    pub tunnels: Vec<((Family, Encap), usize)>,
    /// Rows reached by a direct route.
    pub direct: usize,
}

/// Count the peer table (after every pass, so without allocating per peer: SPEC P-3).
pub fn census(peers: &[Peer]) -> Census {
    let mut c = Census {
        nodes: distinct_nodes(peers),
        ..Census::default()
    };
    for p in peers {
        match &p.mode {
            Mode::Tunnel { encap, .. } => {
                let key = (p.family, *encap);
                match c.tunnels.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, n)) => *n += 1,
                    None => c.tunnels.push((key, 1)),
                }
            }
            Mode::Direct => c.direct += 1,
            Mode::None => {}
        }
    }
    c
}

/// The host route (/32, /128) of an address.
fn host_net(ip: IpAddr) -> IpNet {
    IpNet::new(ip, Family::of(&ip).host_len()).unwrap_or_else(|_| IpNet::from(ip))
}

/// MTU of a peer tunnel: `--tunnel-mtu`, or the underlay's less the encapsulation overhead, never
/// below the family's minimum.
fn tunnel_mtu(cfg: &Overlay, family: Family, underlay: Option<u32>, encap: &Encap) -> u32 {
    let min = match family {
        Family::V4 => 576,
        Family::V6 => 1280,
    };
    match underlay {
        None => cfg.mtu,
        Some(u) => u.saturating_sub(overhead(family, encap)).max(min),
    }
}

/// Compute the desired state. `local` is this node's name. Returns `None` (with a diagnostic)
/// when the local node is not in the cache: then nothing can be planned and the kernel is left
/// alone (SPEC K-4).
pub fn desired(
    local: &str,
    nodes: &[NodeInfo],
    actual: &Actual,
    cfg: &Overlay,
    diags: &mut Vec<Diag>,
) -> Option<Desired> {
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    full(local, &sorted, actual, cfg, diags).map(|(d, _, _)| d)
}

/// [`desired`] over nodes already sorted by name, with the context and claims that
/// [`update`] needs to change it later one node at a time.
pub fn full(
    local: &str,
    sorted: &[&NodeInfo],
    actual: &Actual,
    cfg: &Overlay,
    diags: &mut Vec<Diag>,
) -> Option<(Desired, Context, Claims)> {
    let me = sorted.iter().find(|n| n.name == local).copied();
    let ctx = Context::new(local, me, actual, cfg, diags)?;
    let mut d = Desired::default();
    let mut claims = Claims::default();
    ctx.base(cfg, &mut claims, &mut d);
    for f in &ctx.families {
        for n in sorted.iter().filter(|n| n.name != local) {
            let p = parse_node(n, diags);
            ctx.peer(f, cfg, &p, &mut claims, &mut d, diags);
        }
    }
    d.tunnels.sort_by(|a, b| a.name.cmp(&b.name));
    Some((d, ctx, claims))
}

/// Replace the rows of the `changed` peers in `d.peers` with what their current data (the node,
/// or `None` when it was deleted) asks for, and return their objects, without looking at any
/// other node (SPEC P-3). Only the peer table of `d` is used and kept up to date: the tunnels and
/// routes of every peer follow from it, so a long-lived `d` need not hold them.
/// The result equals a full computation over the updated cache as long as no pod CIDR or tunnel
/// name is contested: `None` when one was before or would be now (then `d` and `claims` are
/// half-updated and must be recomputed with [`full`]). The local node must not be among them.
pub fn update<'a>(
    ctx: &Context,
    cfg: &Overlay,
    d: &mut Desired,
    claims: &mut Claims,
    changed: impl IntoIterator<Item = (&'a str, Option<&'a NodeInfo>)>,
    diags: &mut Vec<Diag>,
) -> Option<Scope> {
    if claims.contested {
        return None;
    }
    let mut scope = Scope::default();
    let mut changed: Vec<(&str, Option<&NodeInfo>)> = changed.into_iter().collect();
    changed.sort_by(|a, b| a.0.cmp(b.0));
    for (name, _) in &changed {
        if *name == ctx.local {
            return None;
        }
        // What the node had: its rows of the peer table name its objects.
        // Its rows (one per family) are found by binary search: the rows are sorted.
        for f in &ctx.families {
            let key = (f.family, *name);
            let Ok(at) = d
                .peers
                .binary_search_by(|p| (p.family, p.node.as_str()).cmp(&key))
            else {
                continue;
            };
            let p = d.peers.remove(at);
            if let Mode::Tunnel { name, .. } = p.mode {
                scope.routes.push((cfg.table, host_net(p.ip)));
                claims.names.remove(&name);
                scope.names.push(name);
            }
            for c in &p.cidrs {
                scope.routes.push((MAIN_TABLE, *c));
                claims.cidrs.remove(c);
            }
        }
        // A node without rows in a family (no address, say) may still hold claims there: they
        // stay, and if the node claims them again that looks like a contest, which only costs
        // a full pass (stale claims can make the incremental path give up, never go wrong).
    }
    for f in &ctx.families {
        for (_, node) in &changed {
            if let Some(n) = node {
                let p = parse_node(n, diags);
                ctx.peer(f, cfg, &p, claims, &mut scope.want, diags);
            }
        }
    }
    if claims.contested {
        return None;
    }
    for t in &scope.want.tunnels {
        if !scope.names.contains(&t.name) {
            scope.names.push(t.name.clone());
        }
    }
    for r in &scope.want.routes {
        if !scope.routes.contains(&(r.table, r.dst)) {
            scope.routes.push((r.table, r.dst));
        }
    }
    for p in &scope.want.peers {
        let at = d
            .peers
            .partition_point(|x| (x.family, x.node.as_str()) < (p.family, p.node.as_str()));
        d.peers.insert(at, p.clone());
    }
    Some(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay_of(args: &[&str]) -> Overlay {
        crate::testutil::config(args).overlay
    }

    fn node(name: &str, addrs: &[(&str, &str)], cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            addresses: addrs
                .iter()
                .map(|(t, a)| (t.to_string(), a.to_string()))
                .collect(),
            pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            ..NodeInfo::default()
        }
    }

    fn cluster() -> Vec<NodeInfo> {
        vec![
            node(
                "a",
                &[("InternalIP", "192.168.1.10"), ("InternalIP", "fd00:1::10")],
                &["10.244.0.0/24", "fd10::/64"],
            ),
            node(
                "b",
                &[("InternalIP", "192.168.1.11"), ("InternalIP", "fd00:1::11")],
                &["10.244.1.0/24", "fd10:0:0:1::/64"],
            ),
            node(
                "c",
                &[("InternalIP", "192.168.2.12"), ("InternalIP", "fd00:2::12")],
                &["10.244.2.0/24", "fd10:0:0:2::/64"],
            ),
        ]
    }

    fn modes(d: &Desired) -> Vec<(String, Family, String)> {
        d.peers
            .iter()
            .map(|p| {
                let m = match &p.mode {
                    Mode::Tunnel { .. } => "tunnel",
                    Mode::Direct => "direct",
                    Mode::None => "none",
                };
                (p.node.clone(), p.family, m.to_string())
            })
            .collect()
    }

    #[test]
    fn decision_matrix() {
        // (flags, expected mode of same-subnet peer b, expected mode of other-subnet peer c)
        let cases: &[(&[&str], &str, &str)] = &[
            (&[], "direct", "tunnel"),
            (&["--overlay-type=subnet"], "direct", "tunnel"),
            (&["--overlay-type=full"], "tunnel", "tunnel"),
            (&["--enable-overlay=false"], "direct", "none"),
            (
                &["--enable-overlay=false", "--overlay-type=full"],
                "direct",
                "none",
            ),
            (&["--overlay-encap=fou"], "direct", "tunnel"),
            (
                &["--overlay-encap=fou", "--overlay-type=full"],
                "tunnel",
                "tunnel",
            ),
        ];
        for (flags, b, c) in cases {
            let mut args = flags.to_vec();
            args.push("--enable-ipv6=true");
            let cfg = overlay_of(&args);
            let mut diags = vec![];
            let d = desired(
                "a",
                &cluster(),
                &crate::testutil::host(true),
                &cfg,
                &mut diags,
            )
            .unwrap();
            for fam in [Family::V4, Family::V6] {
                let m = modes(&d);
                assert!(
                    m.contains(&("b".into(), fam, b.to_string())),
                    "{flags:?} {fam}: {m:?}"
                );
                assert!(
                    m.contains(&("c".into(), fam, c.to_string())),
                    "{flags:?} {fam}: {m:?}"
                );
            }
            assert!(diags.is_empty(), "{diags:?}");
            // FOU ports are open whenever the overlay is on, whatever the encap (T-7).
            let want_fou = !flags.contains(&"--enable-overlay=false");
            assert_eq!(d.fou.len(), if want_fou { 2 } else { 0 }, "{flags:?}");
            assert_eq!(d.rules.len(), if want_fou { 2 } else { 0 }, "{flags:?}");
        }
    }

    #[test]
    fn tunnel_and_routes_for_a_remote_peer() {
        let cfg = overlay_of(&["--overlay-encap=fou"]);
        let d = desired(
            "a",
            &cluster(),
            &crate::testutil::host(true),
            &cfg,
            &mut vec![],
        )
        .unwrap();
        assert_eq!(
            d.tunnels,
            vec![
                Tunnel {
                    name: "ktc0a8020c".into(),
                    family: Family::V4,
                    local: "192.168.1.10".parse().unwrap(),
                    remote: "192.168.2.12".parse().unwrap(),
                    encap: Encap::Gue {
                        sport: 0,
                        dport: 5555
                    },
                    ttl: 64,
                    pmtudisc: true,
                    mtu: 1500 - 32,
                },
                Tunnel {
                    name: "ktrx4".into(),
                    family: Family::V4,
                    local: "192.168.1.10".parse().unwrap(),
                    remote: "0.0.0.0".parse().unwrap(),
                    encap: Encap::None,
                    ttl: 64,
                    pmtudisc: true,
                    mtu: 1500 - 20,
                }
            ]
        );
        let shown: Vec<String> = d
            .routes
            .iter()
            .map(|r| crate::model::RouteDisplay(r).to_string())
            .collect();
        assert_eq!(
            shown,
            [
                "10.244.1.0/24 via 192.168.1.11 table 254 proto 157",
                "192.168.2.12/32 dev ktc0a8020c table 77 proto 157",
                "10.244.2.0/24 dev ktc0a8020c src 192.168.1.10 table 254 proto 157",
            ]
        );
        let rule = crate::model::RuleDisplay(&d.rules[0]).to_string();
        assert_eq!(
            rule,
            "ipv4 pref 32001 from 10.244.0.0/24 lookup 77 proto 157"
        );
    }

    #[test]
    fn names_are_lossless_for_ipv4_and_fit_for_ipv6() {
        assert_eq!(tunnel_name("kt", "10.0.0.5".parse().unwrap()), "kt0a000005");
        // kube-router's separator-stripping collisions cannot happen: 21.3.0.4 vs 2.13.0.4.
        assert_ne!(
            tunnel_name("kt", "21.3.0.4".parse().unwrap()),
            tunnel_name("kt", "2.13.0.4".parse().unwrap())
        );
        for prefix in ["k", "kt", "krt", "krtn"] {
            let n = tunnel_name(prefix, "2001:db8::1".parse().unwrap());
            assert_eq!(n.len(), 15, "{n}");
            assert!(n.starts_with(&format!("{prefix}v")));
        }
        let a = tunnel_name("kt", "2001:db8::1".parse().unwrap());
        let b = tunnel_name("kt", "2001:db8::2".parse().unwrap());
        assert_ne!(a, b);
    }

    #[test]
    fn ipv6_name_clash_is_detected_not_ignored() {
        // A real 40+-bit hash clash cannot be found in a unit test, so the mechanism is checked
        // with two nodes that claim the same address (hence the same name): the second is
        // reported and skipped, never given the first one's tunnel.
        let mut nodes = cluster();
        nodes.push(node(
            "d",
            &[("InternalIP", "192.168.2.12")],
            &["10.244.3.0/24"],
        ));
        let cfg = overlay_of(&[]);
        let mut diags = vec![];
        let d = desired("a", &nodes, &crate::testutil::host(true), &cfg, &mut diags).unwrap();
        assert_eq!(d.tunnels.len(), 2); // c's and the receive tunnel
        assert!(
            diags
                .iter()
                .any(|x| x.node == "d" && x.msg.contains("clashes with node c")),
            "{diags:?}"
        );
    }

    #[test]
    fn bad_nodes_are_skipped_with_one_warning_each() {
        let mut nodes = cluster();
        nodes.push(node("noaddr", &[], &["10.244.9.0/24"]));
        nodes.push(node(
            "garbage",
            &[("InternalIP", "not-an-ip")],
            &["banana", "10.244.10.0/24"],
        ));
        nodes.push(node(
            "wrongfam",
            &[("InternalIP", "192.168.2.30")],
            &["fd99::/64"],
        ));
        nodes.push(node(
            "thief",
            &[("InternalIP", "192.168.2.31")],
            &["10.244.0.0/24"],
        ));
        nodes.push(node(
            "me-too",
            &[("InternalIP", "192.168.1.10")],
            &["10.244.11.0/24"],
        ));
        nodes.push(node(
            "dup",
            &[("InternalIP", "192.168.2.32")],
            &["10.244.12.0/24", "10.244.12.0/24"],
        ));
        let mut huge = node("huge", &[("InternalIP", "192.168.2.33")], &[]);
        huge.annotations
            .insert(ANN_POD_CIDRS.into(), "10.1.0.0/24,".repeat(1000));
        nodes.push(huge);
        let mut notcidr = node("notcidr", &[("InternalIP", "192.168.2.34")], &[]);
        notcidr
            .annotations
            .insert(ANN_POD_CIDRS.into(), "not-a-cidr".into());
        nodes.push(notcidr);
        let cfg = overlay_of(&[]);
        let mut diags = vec![];
        let d = desired("a", &nodes, &crate::testutil::host(true), &cfg, &mut diags).unwrap();
        let by = |n: &str| diags.iter().filter(|x| x.node == n).count();
        assert_eq!(by("noaddr"), 1, "{diags:?}");
        assert_eq!(by("garbage"), 3, "{diags:?}"); // bad address, bad CIDR, then no address
        assert_eq!(by("wrongfam"), 1); // only an IPv6 CIDR, IPv6 disabled: "no ipv4 pod CIDR"
        assert_eq!(by("thief"), 1);
        assert_eq!(by("me-too"), 1);
        assert_eq!(by("dup"), 1);
        assert_eq!(by("huge"), 1); // annotation too long (not also "no pod CIDR")
        assert_eq!(by("notcidr"), 1, "{diags:?}"); // issue 12: one warning, not two
                                                   // The good peers are unaffected.
        assert!(modes(&d).contains(&("c".into(), Family::V4, "tunnel".into())));
        assert!(modes(&d).contains(&("dup".into(), Family::V4, "tunnel".into())));
        // No route for our own CIDR, nor for anything from the bad nodes.
        for r in &d.routes {
            assert_ne!(r.dst, "10.244.0.0/24".parse::<IpNet>().unwrap());
            assert_ne!(r.dst, "10.244.11.0/24".parse::<IpNet>().unwrap());
        }
    }

    #[test]
    fn pod_cidr_precedence() {
        let mut n = node("x", &[], &["10.0.1.0/24"]);
        n.pod_cidr = Some("10.0.9.0/24".into());
        let get = |n: &NodeInfo| parse_node(n, &mut vec![]).cidrs;
        assert_eq!(get(&n), vec!["10.0.1.0/24".parse::<IpNet>().unwrap()]);
        n.pod_cidrs.clear();
        assert_eq!(get(&n), vec!["10.0.9.0/24".parse::<IpNet>().unwrap()]);
        n.annotations
            .insert(ANN_POD_CIDR.into(), "10.0.5.0/24".into());
        let mut diags = vec![];
        assert_eq!(
            parse_node(&n, &mut diags).cidrs,
            vec!["10.0.5.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(diags[0].msg.contains("deprecated"));
        n.annotations
            .insert(ANN_POD_CIDRS.into(), "10.0.6.0/24, fd00::/64".into());
        assert_eq!(get(&n).len(), 2);
    }

    #[test]
    fn best_ip_rules() {
        let a = |v: &[(&str, &str)]| -> Vec<(String, IpAddr)> {
            v.iter()
                .map(|(t, ip)| (t.to_string(), ip.parse().unwrap()))
                .collect()
        };
        let dual = a(&[
            ("ExternalIP", "203.0.113.1"),
            ("InternalIP", "fd00::1"),
            ("InternalIP", "10.0.0.1"),
        ]);
        assert_eq!(best_ip(&dual, Family::V6), Some("fd00::1".parse().unwrap())); // primary
        assert_eq!(
            best_ip(&dual, Family::V4),
            Some("10.0.0.1".parse().unwrap())
        ); // first internal v4
        let ext = a(&[("ExternalIP", "203.0.113.1")]);
        assert_eq!(
            best_ip(&ext, Family::V4),
            Some("203.0.113.1".parse().unwrap())
        );
        assert_eq!(best_ip(&ext, Family::V6), None);
    }

    #[test]
    fn missing_local_node_plans_nothing() {
        let mut diags = vec![];
        assert!(desired(
            "zz",
            &cluster(),
            &crate::testutil::host(true),
            &overlay_of(&[]),
            &mut diags
        )
        .is_none());
        assert_eq!(diags.len(), 1);
    }
}
