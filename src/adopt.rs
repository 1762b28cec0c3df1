//! Adoption of what kube-router leaves on a node (SPEC B-7): its `tun-*` tunnels, the protocol-17
//! routes, the table-77 routes, the `from <pod CIDR> lookup 77` rule and its FOU port become
//! kr-tunneld's own objects, without a gap in forwarding, on an explicit takeover
//! (`kr-tunneld adopt --from kube-router`, or `--adopt-kube-router` on the first start).
//!
//! Core module: pure planning. Input: the kernel state, including the foreign routes and rules
//! the shell read for this ([`Leftovers`]); output: the tunnels to bind ([`binds`]) and the ordered
//! ops ([`plan`]). The shell in `main.rs` reads, binds, applies and records the FOU port.
//!
//! How a tunnel moves without a gap: the kernel allows one tunnel per (local, remote, bound
//! device). So kube-router's tunnel is first bound to the underlay device that holds its local
//! address (`IFLA_IPTUN_LINK`, a change in place: it keeps sending and receiving), ours is created
//! unbound next to it, each route through theirs is replaced by ours with the same key
//! (`NLM_F_REPLACE` swaps the route in one step; allowed here because the operator asked for the
//! takeover), and theirs is deleted last. A tunnel that could not be bound (no device holds its
//! local address, or the bind failed) is deleted first and ours created right after, in one batch:
//! a gap of one netlink round trip.
//!
//! Only kube-router's objects are touched: links named `tun-` of kind ipip/ip6tnl; routes of
//! protocol 17 in the main table and routes in table 77, through those links or (main table,
//! protocol 17) via a gateway; rules `from <prefix> lookup 77` with no other selector; the GUE port
//! equal to ours. Anything else of theirs that does not fit is listed in [`Adoption::notes`] and
//! left alone. kube-router's DSR leftovers (fwmark rules, tables 78/79, iptables mangle rules,
//! IPVS services) are not adopted: see the README.

use crate::config::{EncapMode, Overlay};
use crate::model::{Actual, Encap, FouPort, Link, LinkKind, NextHop, Op, Route, Rule, Tunnel};
use crate::nodes::{overhead, rx_tunnel_name, tunnel_name};

/// kube-router's policy-routing table (`routes/pbr.go`).
pub const KUBE_ROUTER_TABLE: u32 = 77;
/// kube-router's route protocol (`ZebraOriginator = 0x11`).
pub const KUBE_ROUTER_PROTOCOL: u8 = 17;
/// The main routing table.
const MAIN: u32 = 254;

/// Foreign routes and rules the shell read for adoption: routes of protocol 17 (every table) and
/// the routes of table 77 (kube-router writes them with the netlink default, protocol boot), and
/// the rules of the protocols kube-router's rules carry (unspec).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Candidate routes.
    pub routes: Vec<Route>,
    /// Candidate rules.
    pub rules: Vec<Rule>,
}

/// A kube-router tunnel to bind to its underlay device before ours is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// ifindex of kube-router's tunnel.
    pub index: u32,
    /// Its attributes as read (a change in place must carry them all).
    pub have: Tunnel,
    /// ifindex of the device holding its local address.
    pub oif: u32,
}

/// What adoption does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Ops in order: per tunnel, create ours, move the routes, delete theirs; then the
    /// unbound tunnels; then the rules.
    pub ops: Vec<Op>,
    /// FOU ports that become ours (to record as owned).
    pub fou: Vec<FouPort>,
    /// kube-router objects left alone, and why.
    pub notes: Vec<String>,
}

/// Whether `l` is a kube-router tunnel: a `tun-…` link of kind ipip or ip6tnl that is not ours.
pub fn is_kube_router_tunnel(l: &Link, cfg: &Overlay) -> bool {
    l.name.starts_with("tun-")
        && matches!(l.kind, LinkKind::Ipip | LinkKind::Ip6Tnl)
        && l.tunnel.is_some()
        && !cfg.own.owns_link(l)
}

fn theirs<'a>(actual: &'a Actual, cfg: &'a Overlay) -> impl Iterator<Item = &'a Link> + 'a {
    actual
        .links
        .iter()
        .filter(move |l| is_kube_router_tunnel(l, cfg))
}

/// The device that holds `t`'s local address.
fn underlay(actual: &Actual, t: &Tunnel) -> Option<u32> {
    actual
        .addrs
        .iter()
        .find(|a| a.addr.addr() == t.local)
        .map(|a| a.index)
}

/// kr-tunneld's receive-only tunnels (remote any, see [`crate::nodes`]) for the families kube-router
/// tunnels, if missing: created before anything is bound. Binding changes a tunnel in place, and
/// the kernel unhashes it meanwhile (an RCU grace period for ip6tnl); packets from that peer
/// arriving then are caught by this device instead of being dropped (seen in the VM: 1 of ~1,040
/// IPv6 pings lost without it).
pub fn receivers(actual: &Actual, cfg: &Overlay) -> Vec<Op> {
    let mut ops = Vec::new();
    for l in theirs(actual, cfg) {
        let Some(t) = &l.tunnel else { continue };
        let name = rx_tunnel_name(&cfg.own.name_prefix, t.family);
        let exists = |n: &str| actual.links.iter().any(|x| x.name == n);
        if exists(&name)
            || ops
                .iter()
                .any(|o| matches!(o, Op::CreateTunnel(x) if x.name == name))
        {
            continue;
        }
        let underlay = underlay(actual, t)
            .and_then(|i| actual.links.iter().find(|x| x.index == i))
            .map_or(1500, |x| x.mtu);
        let mtu = if cfg.mtu != 0 {
            cfg.mtu
        } else {
            underlay.saturating_sub(overhead(t.family, &Encap::None))
        };
        ops.push(Op::CreateTunnel(Tunnel {
            name,
            family: t.family,
            local: t.local,
            remote: match t.family {
                crate::model::Family::V4 => std::net::Ipv4Addr::UNSPECIFIED.into(),
                crate::model::Family::V6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            encap: Encap::None,
            ttl: cfg.ttl,
            pmtudisc: true,
            mtu,
        }));
    }
    ops
}

/// The kube-router tunnels to bind before [`plan`] runs: every one whose local address is on a
/// device and whose replacement name is free.
pub fn binds(actual: &Actual, cfg: &Overlay) -> Vec<Bind> {
    theirs(actual, cfg)
        .filter_map(|l| {
            let have = l.tunnel.clone()?;
            let name = tunnel_name(&cfg.own.name_prefix, have.remote);
            if actual.links.iter().any(|x| x.name == name) {
                return None;
            }
            let oif = underlay(actual, &have)?;
            Some(Bind {
                index: l.index,
                have: Tunnel {
                    name: l.name.clone(),
                    mtu: l.mtu,
                    ..have
                },
                oif,
            })
        })
        .collect()
}

/// Plan the takeover. `bound` holds the ifindexes of kube-router tunnels that are now bound to
/// their underlay device (the [`binds`] that succeeded): ours is created before theirs is
/// deleted. The others are deleted first.
pub fn plan(actual: &Actual, left: &Leftovers, cfg: &Overlay, bound: &[u32]) -> Adoption {
    let own = &cfg.own;
    let mut a = Adoption::default();
    let encap = match cfg.encap {
        EncapMode::Ipip => Encap::None,
        EncapMode::Fou => Encap::Gue {
            sport: 0,
            dport: cfg.port,
        },
    };
    // kube-router tunnel name → ours.
    let mut names: Vec<&str> = Vec::new();
    let mut unbound = Vec::new();
    let mut moved = vec![false; left.routes.len()];
    for l in theirs(actual, cfg) {
        let Some(t) = &l.tunnel else { continue };
        let name = tunnel_name(&own.name_prefix, t.remote);
        if let Some(x) = actual.links.iter().find(|x| x.name == name) {
            a.notes.push(format!(
                "{}: the name {name} is held by ifindex {}; left alone",
                l.name, x.index
            ));
            continue;
        }
        names.push(l.name.as_str());
        let ours = Tunnel {
            name: name.clone(),
            family: t.family,
            local: t.local,
            remote: t.remote,
            encap,
            ttl: cfg.ttl,
            pmtudisc: true,
            mtu: l.mtu,
        };
        let mut ops = vec![Op::CreateTunnel(ours)];
        for (i, r) in left.routes.iter().enumerate() {
            if let Some(new) = translate(r, &l.name, &name, cfg) {
                moved[i] = true;
                ops.push(Op::ReplaceRoute(new));
            }
        }
        let del = Op::DeleteTunnel {
            index: l.index,
            name: l.name.clone(),
        };
        if bound.contains(&l.index) {
            a.ops.extend(ops);
            a.ops.push(del);
        } else {
            unbound.push(del);
            unbound.extend(ops);
        }
    }
    a.ops.extend(unbound);
    // Direct routes (same subnet): `<cidr> via <node> proto 17` → ours, same key.
    for (i, r) in left.routes.iter().enumerate() {
        if moved[i] {
            continue;
        }
        match &r.nexthop {
            NextHop::Via(_) if r.table == MAIN && r.protocol == KUBE_ROUTER_PROTOCOL => {
                a.ops.push(Op::ReplaceRoute(Route {
                    protocol: own.protocol,
                    ..r.clone()
                }));
            }
            NextHop::Dev(d) if d.starts_with("tun-") && !names.contains(&d.as_str()) => {}
            _ if r.table == MAIN && r.protocol != KUBE_ROUTER_PROTOCOL => {}
            _ => a.notes.push(format!(
                "route {}: not a kube-router pod route; left alone",
                crate::model::RouteDisplay(r)
            )),
        }
    }
    // The rule: ours (explicit priority, our table) first, then theirs goes.
    for r in &left.rules {
        let kube = r.table == KUBE_ROUTER_TABLE
            && r.src.is_some()
            && r.dst.is_none()
            && r.ipproto.is_none()
            && r.dport.is_none()
            && r.protocol != own.protocol;
        if !kube {
            continue;
        }
        let ours = Rule {
            priority: cfg.rule_priority,
            table: cfg.table,
            protocol: own.protocol,
            ..r.clone()
        };
        if !actual.rules.contains(&ours) && !a.ops.contains(&Op::AddRule(ours.clone())) {
            a.ops.push(Op::AddRule(ours));
        }
        a.ops.push(Op::DeleteRule(r.clone()));
    }
    // FOU: our port, if kube-router opened it, is ours from now on; another port of theirs stays
    // open (peers that still run kube-router send to it) and is reported.
    let their_ports: Vec<u16> = theirs(actual, cfg)
        .filter_map(|l| match l.tunnel.as_ref()?.encap {
            Encap::Gue { dport, .. } => Some(dport),
            _ => None,
        })
        .collect();
    for f in &actual.fou {
        if !f.gue {
            continue;
        }
        if cfg.enabled && f.port == cfg.port {
            a.fou.push(*f);
        } else if their_ports.contains(&f.port) {
            a.notes.push(format!(
                "fou port {} {}: kube-router's, not --overlay-encap-port; left open for peers that still send to it",
                f.family, f.port
            ));
        }
    }
    a
}

/// Our version of kube-router route `r` through their tunnel `from`, now through ours `to`.
fn translate(r: &Route, from: &str, to: &str, cfg: &Overlay) -> Option<Route> {
    if !matches!(&r.nexthop, NextHop::Dev(d) if d == from) {
        return None;
    }
    let table = match (r.table, r.protocol) {
        (MAIN, KUBE_ROUTER_PROTOCOL) => MAIN,
        (KUBE_ROUTER_TABLE, _) => cfg.table,
        _ => return None,
    };
    Some(Route {
        table,
        nexthop: NextHop::Dev(to.to_string()),
        protocol: cfg.own.protocol,
        src: if table == MAIN { r.src } else { None },
        ..r.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{FakeKernel, Kernel};
    use crate::model::{Addr, Family, RouteKind};
    use std::net::IpAddr;

    fn cfg(args: &[&str]) -> Overlay {
        crate::testutil::config(args).overlay
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tun(index: u32, name: &str, local: &str, remote: &str, encap: Encap) -> Link {
        let family = Family::of(&ip(local));
        Link {
            index,
            name: name.into(),
            kind: LinkKind::for_family(family),
            group: 0,
            mtu: 1480,
            up: true,
            tunnel: Some(Tunnel {
                name: name.into(),
                family,
                local: ip(local),
                remote: ip(remote),
                encap,
                ttl: 0,
                pmtudisc: false,
                mtu: 1480,
            }),
        }
    }

    fn route(table: u32, dst: &str, nh: NextHop, src: Option<&str>, protocol: u8) -> Route {
        Route {
            table,
            dst: dst.parse().unwrap(),
            nexthop: nh,
            src: src.map(ip),
            protocol,
            kind: RouteKind::Unicast,
            advmss: None,
        }
    }

    fn dev(d: &str) -> NextHop {
        NextHop::Dev(d.into())
    }

    /// A kube-router node 192.168.2.12 (pods 10.244.2.0/24) with a tunnel to 192.168.1.10, a
    /// direct route to 192.168.2.13, its rule, its GUE port, plus foreign state that is not
    /// kube-router's.
    fn kube_router_node() -> (Actual, Leftovers) {
        let eth0 = Link {
            index: 2,
            name: "eth0".into(),
            kind: LinkKind::Other("veth".into()),
            group: 0,
            mtu: 1500,
            up: true,
            tunnel: None,
        };
        let gue = Encap::Gue {
            sport: 0,
            dport: 5555,
        };
        let actual = Actual {
            links: vec![
                eth0,
                tun(7, "tun-e443169117a", "192.168.2.12", "192.168.1.10", gue),
                // A foreign tunnel that is not kube-router's.
                tun(8, "vpn0", "192.168.2.12", "198.51.100.1", Encap::None),
            ],
            addrs: vec![Addr {
                index: 2,
                addr: "192.168.2.12/24".parse().unwrap(),
            }],
            routes: vec![],
            rules: vec![],
            fou: vec![FouPort {
                family: Family::V4,
                port: 5555,
                gue: true,
            }],
        };
        let left = Leftovers {
            routes: vec![
                route(
                    MAIN,
                    "10.244.0.0/24",
                    dev("tun-e443169117a"),
                    Some("192.168.2.12"),
                    17,
                ),
                route(77, "192.168.1.10/32", dev("tun-e443169117a"), None, 3),
                route(
                    MAIN,
                    "10.244.3.0/24",
                    NextHop::Via(ip("192.168.2.13")),
                    None,
                    17,
                ),
                // Someone else's route in table 77 and a proto-17 route on another device.
                route(77, "10.9.0.0/16", dev("vpn0"), None, 3),
            ],
            rules: vec![
                Rule {
                    family: Family::V4,
                    priority: 32765,
                    src: Some("10.244.2.0/24".parse().unwrap()),
                    dst: None,
                    ipproto: None,
                    dport: None,
                    table: 77,
                    protocol: 0,
                },
                // Not kube-router's: another table.
                Rule {
                    family: Family::V4,
                    priority: 100,
                    src: Some("10.1.0.0/16".parse().unwrap()),
                    dst: None,
                    ipproto: None,
                    dport: None,
                    table: 100,
                    protocol: 0,
                },
            ],
        };
        (actual, left)
    }

    #[test]
    fn a_bound_tunnel_is_replaced_create_first_and_routes_move_by_replace() {
        let c = cfg(&["--overlay-encap=fou"]);
        let (actual, left) = kube_router_node();
        let b = binds(&actual, &c);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!((b[0].index, b[0].oif), (7, 2));
        assert_eq!(b[0].have.name, "tun-e443169117a");
        let bound: Vec<u32> = b.iter().map(|b| b.index).collect();
        let a = plan(&actual, &left, &c, &bound);
        let text: Vec<String> = a.ops.iter().map(|o| o.to_string()).collect();
        let p = c.own.protocol;
        assert_eq!(
            text,
            vec![
                "create tunnel ktc0a8010a local 192.168.2.12 remote 192.168.1.10 encap gue:5555 ttl 64 mtu 1480".to_string(),
                format!("replace route 10.244.0.0/24 dev ktc0a8010a src 192.168.2.12 table 254 proto {p}"),
                format!("replace route 192.168.1.10/32 dev ktc0a8010a table 77 proto {p}"),
                "delete tunnel tun-e443169117a".to_string(),
                format!("replace route 10.244.3.0/24 via 192.168.2.13 table 254 proto {p}"),
                format!("add rule ipv4 pref {} from 10.244.2.0/24 lookup 77 proto {p}", c.rule_priority),
                "delete rule ipv4 pref 32765 from 10.244.2.0/24 lookup 77 proto 0".to_string(),
            ],
            "{text:#?}"
        );
        assert_eq!(a.fou, actual.fou);
        assert_eq!(a.notes.len(), 1, "{:?}", a.notes);
        assert!(a.notes[0].contains("10.9.0.0/16"), "{:?}", a.notes);
    }

    #[test]
    fn receive_only_tunnels_come_first_and_once() {
        let c = cfg(&[]);
        let (mut actual, _) = kube_router_node();
        let ops: Vec<String> = receivers(&actual, &c)
            .iter()
            .map(|o| o.to_string())
            .collect();
        assert_eq!(
            ops,
            vec![
                "create tunnel ktrx4 local 192.168.2.12 remote 0.0.0.0 encap ipip ttl 64 mtu 1480"
            ]
        );
        actual.links.push(Link {
            name: "ktrx4".into(),
            ..actual.links[1].clone()
        });
        assert!(receivers(&actual, &c).is_empty());
    }

    #[test]
    fn an_unbound_tunnel_is_deleted_first_then_replaced_in_the_same_batch() {
        let c = cfg(&[]);
        let (actual, left) = kube_router_node();
        let a = plan(&actual, &left, &c, &[]);
        let text: Vec<String> = a.ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(text[0], "delete tunnel tun-e443169117a");
        assert!(text[1].starts_with("create tunnel ktc0a8010a "), "{text:?}");
        assert!(text[1].contains("encap ipip"), "{text:?}");
    }

    /// What adoption leaves is kr-tunneld's own state: after it, nothing of kube-router's
    /// remains and the normal planner wants no change to the moved objects beyond attributes.
    #[test]
    fn after_adoption_nothing_of_kube_router_is_left_and_everything_is_owned() {
        let c = cfg(&["--overlay-encap=fou"]);
        let (mut actual, left) = kube_router_node();
        actual.routes = left.routes.clone();
        actual.rules = left.rules.clone();
        let mut k = FakeKernel::with(actual.clone());
        let bound: Vec<u32> = binds(&actual, &c).iter().map(|b| b.index).collect();
        let a = plan(&actual, &left, &c, &bound);
        let failed = k.apply(&c.own, &a.ops);
        assert!(failed.is_empty(), "{failed:?}");
        let s = &k.state;
        assert!(!s.links.iter().any(|l| l.name.starts_with("tun-")));
        assert!(s.links.iter().any(|l| l.name == "vpn0"));
        let kube_routes: Vec<&Route> = s
            .routes
            .iter()
            .filter(|r| {
                r.protocol == 17 || matches!(&r.nexthop, NextHop::Dev(d) if d.starts_with("tun-"))
            })
            .collect();
        assert!(kube_routes.is_empty(), "{kube_routes:?}");
        assert!(s.routes.iter().any(|r| r.dst.to_string() == "10.9.0.0/16"));
        assert!(s
            .rules
            .iter()
            .all(|r| r.table != 77 || r.protocol == c.own.protocol));
        assert!(s.rules.iter().any(|r| r.table == 100));
        // Adopting again finds nothing to do.
        let left2 = Leftovers {
            routes: s
                .routes
                .iter()
                .filter(|r| r.protocol != c.own.protocol)
                .cloned()
                .collect(),
            rules: s
                .rules
                .iter()
                .filter(|r| r.protocol != c.own.protocol)
                .cloned()
                .collect(),
        };
        let again = plan(s, &left2, &c, &[]);
        assert!(again.ops.is_empty(), "{:?}", again.ops);
    }

    #[test]
    fn a_taken_name_or_an_unknown_local_address_is_handled() {
        let c = cfg(&[]);
        let (mut actual, left) = kube_router_node();
        // No device holds the local address (NATed node IP): no bind.
        actual.addrs.clear();
        assert!(binds(&actual, &c).is_empty());
        // Our name is held by another link: that tunnel and its routes are left alone.
        actual.links.push(Link {
            index: 9,
            name: "ktc0a8010a".into(),
            kind: LinkKind::Other("dummy".into()),
            group: 0,
            mtu: 1500,
            up: true,
            tunnel: None,
        });
        let a = plan(&actual, &left, &c, &[]);
        assert!(!a
            .ops
            .iter()
            .any(|o| matches!(o, Op::DeleteTunnel { .. } | Op::CreateTunnel(_))));
        assert!(
            a.notes.iter().any(|n| n.contains("held by ifindex 9")),
            "{:?}",
            a.notes
        );
        assert!(!a
            .ops
            .iter()
            .any(|o| matches!(o, Op::ReplaceRoute(r) if r.dst.to_string() == "10.244.0.0/24")));
    }

    #[test]
    fn only_our_port_is_adopted() {
        let c = cfg(&["--overlay-encap=fou", "--overlay-encap-port=6000"]);
        let (actual, left) = kube_router_node();
        let a = plan(&actual, &left, &c, &[]);
        assert!(a.fou.is_empty());
        assert!(
            a.notes.iter().any(|n| n.contains("fou port ipv4 5555")),
            "{:?}",
            a.notes
        );
    }
}
