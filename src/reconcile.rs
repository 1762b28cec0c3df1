//! The planner: desired state vs actual (owned) kernel state → an ordered list of [`Op`]s.
//!
//! Core module: pure, no I/O, no logging. Level-triggered (SPEC T-9): it does not care what
//! changed, only what is and what should be, so the same function serves events, resyncs, restarts
//! and `cleanup` (an empty desired state).
//!
//! Ordering: FOU ports first (receive before anyone sends), then deletions of what nothing wants
//! (routes, then tunnels: a route through a tunnel that is deleted goes with it and is not deleted
//! separately), then tunnels (create / change in place / up), routes, rules, and last the
//! deletion of unwanted rules and FOU ports. A tunnel is matched by its attributes (kind, local,
//! remote), never by name alone (SPEC T-3); foreign objects are never touched (SPEC T-4): a clash
//! is reported and the wanted object skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use crate::model::{
    Actual, Family, FouPort, Link, LinkKind, NextHop, Op, Ownership, Route, Rule, Tunnel,
};
use crate::nodes::Desired;

/// A plan: ops to apply, and clashes with foreign objects to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Ops in the order they must be applied.
    pub ops: Vec<Op>,
    /// Wanted objects that foreign state blocks, one message each.
    pub clashes: Vec<String>,
}

/// Whether an existing tunnel (with device MTU `mtu`) must be changed to become `want` (SPEC T-5).
fn tunnel_differs(have: &Tunnel, want: &Tunnel, mtu: u32) -> bool {
    have.local != want.local
        || have.remote != want.remote
        || have.encap != want.encap
        || have.ttl != want.ttl
        // ip6tnl has no PMTUDISC attribute; it always discovers.
        || (want.family == Family::V4 && have.pmtudisc != want.pmtudisc)
        || mtu != want.mtu
}

/// Compute the plan. `owned_fou` lists the FOU ports kr-tunneld opened earlier (FOU ports carry no
/// owner mark, so only those are ever closed).
pub fn plan(
    desired: &Desired,
    actual: &Actual,
    own: &Ownership,
    owned_fou: &BTreeSet<FouPort>,
) -> Plan {
    let mut p = Plan::default();
    let mut tunnel_ops = Vec::new();
    let mut blocked: BTreeSet<String> = BTreeSet::new();
    // Owned links not yet matched to a desired tunnel, by ifindex.
    let mut unmatched: BTreeMap<u32, &Link> = actual
        .links
        .iter()
        .filter(|l| own.owns_link(l))
        .map(|l| (l.index, l))
        .collect();
    // Indexes, so planning stays O(n log n) in the number of peers (SPEC P-3): tunnels by
    // (kind, local, remote), owned and foreign, and links by name.
    let mut owned_by_ends: HashMap<(&LinkKind, IpAddr, IpAddr), u32> = HashMap::new();
    let mut foreign_by_ends: HashMap<(&LinkKind, IpAddr, IpAddr), &Link> = HashMap::new();
    for l in &actual.links {
        if let Some(t) = &l.tunnel {
            if own.owns_link(l) {
                owned_by_ends
                    .entry((&l.kind, t.local, t.remote))
                    .or_insert(l.index);
            } else {
                foreign_by_ends
                    .entry((&l.kind, t.local, t.remote))
                    .or_insert(l);
            }
        }
    }
    let by_name: HashMap<&str, &Link> = actual.links.iter().map(|l| (l.name.as_str(), l)).collect();

    // FOU ports: open the missing ones first.
    for f in &desired.fou {
        match actual
            .fou
            .iter()
            .find(|a| a.family == f.family && a.port == f.port)
        {
            Some(a) if a.gue == f.gue => {}
            Some(_) => p.clashes.push(format!(
                "fou port {} {} exists with another encapsulation type; not changing it",
                f.family, f.port
            )),
            None => p.ops.push(Op::AddFouPort(*f)),
        }
    }

    for want in &desired.tunnels {
        let kind = LinkKind::for_family(want.family);
        let ends = (&kind, want.local, want.remote);
        // 1. An owned link of this kind with the same endpoints: keep it, repair attributes.
        let by_attrs = owned_by_ends
            .get(&ends)
            .copied()
            .filter(|i| unmatched.contains_key(i));
        if let Some(index) = by_attrs {
            let Some(l) = unmatched.remove(&index) else {
                continue;
            };
            if l.name != want.name {
                // Same endpoints under another name (e.g. another naming scheme): replace. The
                // old one must go first, the kernel allows one tunnel per endpoint pair.
                tunnel_ops.push(Op::DeleteTunnel {
                    index,
                    name: l.name.clone(),
                });
                tunnel_ops.push(Op::CreateTunnel(want.clone()));
                continue;
            }
            if let Some(have) = &l.tunnel {
                if tunnel_differs(have, want, l.mtu) {
                    tunnel_ops.push(Op::ChangeTunnel {
                        index,
                        want: want.clone(),
                    });
                }
            }
            if !l.up {
                tunnel_ops.push(Op::SetUp {
                    index,
                    name: l.name.clone(),
                });
            }
            continue;
        }
        // 2. A link holding the wanted name.
        if let Some(l) = by_name.get(want.name.as_str()).copied() {
            if unmatched.remove(&l.index).is_some() && l.kind == kind {
                // Ours, other endpoints (the peer's or our IP changed): change in place.
                tunnel_ops.push(Op::ChangeTunnel {
                    index: l.index,
                    want: want.clone(),
                });
                if !l.up {
                    tunnel_ops.push(Op::SetUp {
                        index: l.index,
                        name: l.name.clone(),
                    });
                }
            } else if own.owns_link(l) {
                // Ours but of the other kind (cannot happen with our naming): replace.
                tunnel_ops.push(Op::DeleteTunnel {
                    index: l.index,
                    name: l.name.clone(),
                });
                tunnel_ops.push(Op::CreateTunnel(want.clone()));
            } else {
                p.clashes.push(format!(
                    "tunnel {} to {}: a link of that name exists and is not ours (ifindex {}); leaving it alone",
                    want.name, want.remote, l.index
                ));
                blocked.insert(want.name.clone());
            }
            continue;
        }
        // 3. A foreign tunnel with our endpoint pair: the kernel would refuse a second one.
        if let Some(l) = foreign_by_ends.get(&ends).copied() {
            p.clashes.push(format!(
                "tunnel {} to {}: foreign link {} already tunnels {} -> {}; leaving it alone",
                want.name, want.remote, l.name, want.local, want.remote
            ));
            blocked.insert(want.name.clone());
            continue;
        }
        tunnel_ops.push(Op::CreateTunnel(want.clone()));
    }

    // Deletions of unwanted routes first (routes through tunnels that are deleted go with them).
    let dying: BTreeSet<&str> = unmatched.values().map(|l| l.name.as_str()).collect();
    let wanted_routes: BTreeMap<(u32, ipnet::IpNet), &Route> = desired
        .routes
        .iter()
        .filter(|r| !matches!(&r.nexthop, NextHop::Dev(d) if blocked.contains(d)))
        .map(|r| ((r.table, r.dst), r))
        .collect();
    for r in &actual.routes {
        if r.protocol != own.protocol || wanted_routes.contains_key(&(r.table, r.dst)) {
            continue;
        }
        if matches!(&r.nexthop, NextHop::Dev(d) if dying.contains(d.as_str())) {
            continue;
        }
        p.ops.push(Op::DeleteRoute(r.clone()));
    }
    for l in unmatched.values() {
        p.ops.push(Op::DeleteTunnel {
            index: l.index,
            name: l.name.clone(),
        });
    }
    // Replacements' deletions go first among tunnel ops so the endpoint pair is free.
    tunnel_ops.sort_by_key(|op| !matches!(op, Op::DeleteTunnel { .. }));
    p.ops.extend(tunnel_ops);

    // Routes through a newly created tunnel are written even if an equal-looking one exists
    // (a replaced link has a new ifindex).
    let created: BTreeSet<String> = p
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::CreateTunnel(t) => Some(t.name.clone()),
            _ => None,
        })
        .collect();
    let have_routes: HashSet<&Route> = actual.routes.iter().collect();
    for r in wanted_routes.values() {
        let fresh_dev = matches!(&r.nexthop, NextHop::Dev(d) if created.contains(d));
        if fresh_dev || !have_routes.contains(*r) {
            p.ops.push(Op::ReplaceRoute((*r).clone()));
        }
    }

    // Rules: add what is missing, then delete what nothing wants.
    let wanted_rules: BTreeSet<&Rule> = desired.rules.iter().collect();
    let have_rules: BTreeSet<&Rule> = actual.rules.iter().collect();
    for r in &wanted_rules {
        if !have_rules.contains(*r) {
            p.ops.push(Op::AddRule((*r).clone()));
        }
    }
    let mut seen: BTreeSet<&Rule> = BTreeSet::new();
    for r in &actual.rules {
        if r.protocol != own.protocol {
            continue;
        }
        // A duplicate of a wanted rule (left by a crash between two adds) goes too (SPEC R-3).
        if !wanted_rules.contains(r) || !seen.insert(r) {
            p.ops.push(Op::DeleteRule(r.clone()));
        }
    }

    // FOU ports we opened and nothing wants any more.
    for f in owned_fou {
        let wanted = desired
            .fou
            .iter()
            .any(|d| d.family == f.family && d.port == f.port);
        let present = actual
            .fou
            .iter()
            .any(|a| a.family == f.family && a.port == f.port);
        if !wanted && present {
            p.ops.push(Op::DelFouPort(*f));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay_of(args: &[&str]) -> crate::config::Overlay {
        crate::testutil::config(args).overlay
    }
    use crate::apply::{FakeKernel, Kernel};
    use crate::model::{Encap, RouteKind};
    use crate::nodes::{desired, NodeInfo};

    fn own() -> Ownership {
        Ownership {
            name_prefix: "kt".into(),
            link_group: 19284,
            protocol: 157,
        }
    }

    /// `n` peers in other subnets plus the local node "a".
    fn nodes(n: u32) -> Vec<NodeInfo> {
        let mut v = vec![NodeInfo {
            name: "a".into(),
            addresses: vec![("InternalIP".into(), "192.168.1.10".into())],
            pod_cidrs: vec!["10.244.0.0/24".into()],
            ..NodeInfo::default()
        }];
        for i in 1..=n {
            v.push(NodeInfo {
                name: format!("n{i}"),
                addresses: vec![(
                    "InternalIP".into(),
                    format!("172.16.{}.{}", i / 250, i % 250 + 1),
                )],
                pod_cidrs: vec![format!("10.{}.{}.0/24", 100 + i / 256, i % 256)],
                ..NodeInfo::default()
            });
        }
        v
    }

    fn want(k: &mut FakeKernel, ns: &[NodeInfo], args: &[&str]) -> (Desired, Actual) {
        let cfg = overlay_of(args);
        let actual = k.read(&own()).unwrap();
        let d = desired("a", ns, &actual, &cfg, &mut vec![]).unwrap();
        (d, actual)
    }

    fn replan(k: &mut FakeKernel, ns: &[NodeInfo], args: &[&str]) -> Plan {
        let (d, actual) = want(k, ns, args);
        let owned: BTreeSet<FouPort> = k.state.fou.iter().copied().collect();
        plan(&d, &actual, &own(), &owned)
    }

    fn converge(k: &mut FakeKernel, ns: &[NodeInfo], args: &[&str]) -> Plan {
        let p = replan(k, ns, args);
        let failed = k.apply(&own(), &p.ops);
        assert!(failed.is_empty(), "{failed:?}");
        p
    }

    /// The kernel holds exactly the desired tunnels, routes, rules and FOU ports.
    fn assert_matches_desired(k: &mut FakeKernel, ns: &[NodeInfo], args: &[&str]) {
        let (d, actual) = want(k, ns, args);
        let mut have: Vec<Tunnel> = actual
            .links
            .iter()
            .filter(|l| own().owns_link(l))
            .filter_map(|l| l.tunnel.clone().map(|t| Tunnel { mtu: l.mtu, ..t }))
            .collect();
        have.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(have, d.tunnels, "{args:?}");
        let set = |v: &[Route]| v.iter().cloned().collect::<std::collections::HashSet<_>>();
        assert_eq!(set(&actual.routes), set(&d.routes), "{args:?}");
        let mut rules = actual.rules.clone();
        rules.sort();
        let mut want_rules = d.rules.clone();
        want_rules.sort();
        assert_eq!(rules, want_rules, "{args:?}");
        let mut fou = actual.fou.clone();
        fou.sort();
        let mut want_fou = d.fou.clone();
        want_fou.sort();
        assert_eq!(fou, want_fou, "{args:?}");
    }

    #[test]
    fn from_nothing_in_dependency_order_then_converged() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        let p = converge(&mut k, &nodes(2), &[]);
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|o| match o {
                Op::AddFouPort(_) => "fou",
                Op::CreateTunnel(_) => "link",
                Op::ReplaceRoute(_) => "route",
                Op::AddRule(_) => "rule",
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["fou", "link", "link", "link", "route", "route", "route", "route", "rule"]
        );
        assert_matches_desired(&mut k, &nodes(2), &[]);
        // Apply, plan again: nothing (the key convergence property).
        assert_eq!(replan(&mut k, &nodes(2), &[]).ops, vec![]);
    }

    #[test]
    fn every_flag_combination_converges() {
        let combos: &[&[&str]] = &[
            &[],
            &["--overlay-type=full"],
            &["--overlay-encap=fou"],
            &["--enable-overlay=false"],
            &[
                "--overlay-encap=fou",
                "--overlay-encap-port=6000",
                "--tunnel-ttl=10",
            ],
            &["--tunnel-mtu=1400", "--overlay-type=full"],
            &["--tunnel-ttl=10"],
            &["--enable-ipv6=true", "--overlay-type=full"],
        ];
        for a in combos {
            for b in combos {
                let mut k = FakeKernel::with(crate::testutil::host(false));
                converge(&mut k, &nodes(5), a);
                converge(&mut k, &nodes(5), b);
                assert_matches_desired(&mut k, &nodes(5), b);
                assert_eq!(replan(&mut k, &nodes(5), b).ops, vec![], "{a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn encap_switch_changes_in_place_and_keeps_routes() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        converge(&mut k, &nodes(3), &[]);
        let before: Vec<u32> = k.state.links.iter().map(|l| l.index).collect();
        let p = converge(&mut k, &nodes(3), &["--overlay-encap=fou"]);
        assert_eq!(p.ops.len(), 3, "{:?}", p.ops);
        for op in &p.ops {
            let Op::ChangeTunnel { want, .. } = op else {
                panic!("{op}")
            };
            assert_eq!(
                want.encap,
                Encap::Gue {
                    sport: 0,
                    dport: 5555
                }
            );
        }
        // The FOU port was already open (T-7); no route rewritten; same ifindexes.
        assert_eq!(
            k.state.links.iter().map(|l| l.index).collect::<Vec<_>>(),
            before
        );
        assert_eq!(
            replan(&mut k, &nodes(3), &["--overlay-encap=fou"]).ops,
            vec![]
        );
    }

    #[test]
    fn deleted_node_removes_tunnel_without_separate_route_deletes() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        converge(&mut k, &nodes(3), &[]);
        let p = converge(&mut k, &nodes(2), &[]);
        assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
        assert!(matches!(&p.ops[0], Op::DeleteTunnel { name, .. } if name == "ktac100004"));
        assert!(k
            .state
            .routes
            .iter()
            .all(|r| r.dst != "10.100.3.0/24".parse().unwrap()));
        assert_matches_desired(&mut k, &nodes(2), &[]);
    }

    #[test]
    fn adding_one_peer_costs_the_same_at_any_size() {
        for n in [1, 1000] {
            let mut k = FakeKernel::with(crate::testutil::host(false));
            converge(&mut k, &nodes(n), &[]);
            let p = converge(&mut k, &nodes(n + 1), &[]);
            assert_eq!(p.ops.len(), 3, "n={n}: {:?}", p.ops); // link, table-77 route, pod route
        }
    }

    #[test]
    fn peer_ip_change_is_repaired() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        let mut ns = nodes(2);
        converge(&mut k, &ns, &[]);
        ns[1].addresses[0].1 = "172.16.9.9".into();
        converge(&mut k, &ns, &[]);
        assert_matches_desired(&mut k, &ns, &[]);
        assert_eq!(replan(&mut k, &ns, &[]).ops, vec![]);
    }

    #[test]
    fn foreign_state_is_never_touched() {
        let mut st = crate::testutil::host(false);
        // A foreign link named like ours, a foreign ipip link with one of our endpoint pairs,
        // a foreign route and a foreign rule.
        let foreign_tun = |index: u32, name: &str, remote: &str| Link {
            index,
            name: name.into(),
            kind: LinkKind::Ipip,
            group: 0,
            mtu: 1480,
            up: true,
            tunnel: Some(Tunnel {
                name: name.into(),
                family: Family::V4,
                local: "192.168.1.10".parse().unwrap(),
                remote: remote.parse().unwrap(),
                encap: Encap::None,
                ttl: 0,
                pmtudisc: true,
                mtu: 1480,
            }),
        };
        st.links.push(foreign_tun(10, "ktac100002", "172.16.0.99"));
        st.links.push(foreign_tun(11, "tun-foreign", "172.16.0.3"));
        st.routes.push(Route {
            table: 254,
            dst: "10.99.0.0/16".parse().unwrap(),
            nexthop: NextHop::Via("192.168.1.1".parse().unwrap()),
            src: None,
            protocol: 17,
            kind: RouteKind::Unicast,
            advmss: None,
        });
        st.rules.push(Rule {
            family: Family::V4,
            priority: 100,
            src: Some("10.244.0.0/24".parse().unwrap()),
            dst: None,
            ipproto: None,
            dport: None,
            table: 77,
            protocol: 0,
        });
        let mut k = FakeKernel::with(st.clone());
        let p = replan(&mut k, &nodes(3), &[]);
        assert_eq!(p.clashes.len(), 2, "{:?}", p.clashes);
        for op in &p.ops {
            match op {
                Op::DeleteTunnel { .. } | Op::ChangeTunnel { .. } | Op::SetUp { .. } => {
                    panic!("{op}")
                }
                Op::DeleteRoute(_) | Op::DeleteRule(_) => panic!("{op}"),
                Op::ReplaceRoute(r) => assert!(
                    !matches!(&r.nexthop, NextHop::Dev(d) if d == "ktac100002" || d == "ktac100003"),
                    "{op}"
                ),
                _ => {}
            }
        }
        assert!(k.apply(&own(), &p.ops).is_empty());
        for l in &st.links {
            assert!(k.state.links.contains(l), "{l:?} changed");
        }
        assert!(k.state.routes.contains(&st.routes[0]) && k.state.rules.contains(&st.rules[0]));
    }

    #[test]
    fn drift_is_repaired() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        converge(&mut k, &nodes(3), &["--overlay-encap=fou"]);
        // Someone deletes a tunnel, changes a route and an encap port behind our back.
        let victim = k
            .state
            .links
            .iter()
            .position(|l| l.name == "ktac100002")
            .unwrap();
        k.state.links.remove(victim);
        k.state
            .routes
            .retain(|r| !matches!(&r.nexthop, NextHop::Dev(d) if d == "ktac100002"));
        let r = k.state.routes.iter_mut().find(|r| r.table == 254).unwrap();
        r.src = None;
        let t = k
            .state
            .links
            .iter_mut()
            .find(|l| l.name == "ktac100003")
            .unwrap();
        t.tunnel.as_mut().unwrap().encap = Encap::Gue {
            sport: 0,
            dport: 7777,
        };
        let p = converge(&mut k, &nodes(3), &["--overlay-encap=fou"]);
        assert!(p
            .ops
            .iter()
            .any(|o| matches!(o, Op::CreateTunnel(t) if t.name == "ktac100002")));
        assert!(p
            .ops
            .iter()
            .any(|o| matches!(o, Op::ChangeTunnel { want, .. } if want.name == "ktac100003")));
        assert_matches_desired(&mut k, &nodes(3), &["--overlay-encap=fou"]);
    }

    #[test]
    fn cleanup_removes_everything_owned_and_only_that() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        converge(&mut k, &nodes(4), &["--overlay-encap=fou"]);
        let owned: BTreeSet<FouPort> = k.state.fou.iter().copied().collect();
        let actual = k.read(&own()).unwrap();
        let p = plan(&Desired::default(), &actual, &own(), &owned);
        assert!(k.apply(&own(), &p.ops).is_empty());
        assert_eq!(k.state.links, crate::testutil::host(false).links);
        assert!(k.state.routes.is_empty() && k.state.rules.is_empty() && k.state.fou.is_empty());
    }

    #[test]
    fn port_change_keeps_old_port_only_while_listed() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        converge(&mut k, &nodes(1), &["--overlay-encap=fou"]);
        converge(
            &mut k,
            &nodes(1),
            &[
                "--overlay-encap=fou",
                "--overlay-encap-port=6000",
                "--overlay-encap-rx-ports=5555",
            ],
        );
        let mut ports: Vec<u16> = k.state.fou.iter().map(|f| f.port).collect();
        ports.sort();
        assert_eq!(ports, [5555, 6000]);
        converge(
            &mut k,
            &nodes(1),
            &["--overlay-encap=fou", "--overlay-encap-port=6000"],
        );
        assert_eq!(
            k.state.fou.iter().map(|f| f.port).collect::<Vec<_>>(),
            [6000]
        );
    }

    #[test]
    fn duplicate_rules_from_a_crash_are_removed() {
        let mut k = FakeKernel::with(crate::testutil::host(false));
        converge(&mut k, &nodes(1), &[]);
        let dup = k.state.rules[0].clone();
        k.state.rules.push(dup);
        let p = converge(&mut k, &nodes(1), &[]);
        assert_eq!(p.ops.len(), 1);
        assert!(matches!(p.ops[0], Op::DeleteRule(_)));
        assert_matches_desired(&mut k, &nodes(1), &[]);
    }
}
