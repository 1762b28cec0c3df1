//! kube-router nodes next to kr-tunneld (issue 14): stand-in kube-router nodes built from Debian's
//! gobgpd (GoBGP 3.10) configured as kube-router configures its internal peers, plus
//! tests/kube-router-standin.sh installing what kube-router installs for learned paths
//! (`../shared/reference/kube-router-bgp.md` §2-§7). The three-node topology of [`crate::e2e`]:
//! a and b share 192.168.1.0/24 (direct routes), c is behind the router (tunnels).
//!
//! Every test is `#[ignore]`: it needs root, ipip/ip6_tunnel/fou and gobgpd (the VM of tests/vm/
//! ships it; tests/run-kernel-tests.sh runs them).

use std::time::Duration;

use serde_json::Value;

use crate::e2e::{Cluster, Pinger};

/// The stand-in script.
fn script() -> String {
    format!(
        "{}/tests/kube-router-standin.sh",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// (IPv4, IPv6, pod CIDRs) of each node of the e2e topology.
fn spec(name: &str) -> (&'static str, &'static str, &'static str) {
    match name {
        "a" => ("192.168.1.10", "fd00:1::10", "10.244.0.0/24 fd10::/64"),
        "b" => (
            "192.168.1.11",
            "fd00:1::11",
            "10.244.1.0/24 fd10:0:0:1::/64",
        ),
        _ => (
            "192.168.2.12",
            "fd00:2::12",
            "10.244.2.0/24 fd10:0:0:2::/64",
        ),
    }
}

fn sh(c: &Cluster, node: &str, cmd: &str) -> String {
    let out = c.exec(node, cmd);
    assert!(
        out.status.success(),
        "on {node}: `{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Start a kube-router stand-in on `node`, peering with the other two nodes. `env` adds KRS_*
/// settings (graceful restart time, encapsulation).
fn start_standin(c: &Cluster, node: &str, env: &str) {
    let (ip4, ip6, pods) = spec(node);
    let peers: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != node)
        .map(|n| spec(n).0)
        .collect();
    let dir = c.dir.join(format!("kube-router-{node}"));
    sh(
        c,
        node,
        &format!(
            "env KRS_IP4={ip4} KRS_IP6={ip6} KRS_PODS='{pods}' KRS_PEERS='{}' {env} \
             bash {} start {}",
            peers.join(" "),
            script(),
            dir.display()
        ),
    );
}

/// Stop the stand-in on `node`: `stop` = like kube-router with graceful restart (no
/// NOTIFICATION), `cease` = without (a Cease to every peer). Its kernel state stays.
fn stop_standin(c: &Cluster, node: &str, how: &str) {
    let dir = c.dir.join(format!("kube-router-{node}"));
    sh(
        c,
        node,
        &format!("bash {} {how} {}", script(), dir.display()),
    );
}

/// The stand-in's logs, for failure messages.
fn standin_logs(c: &Cluster) -> String {
    let mut s = String::new();
    for n in ["a", "b", "c"] {
        for f in ["gobgpd.log", "injector.log"] {
            let p = c.dir.join(format!("kube-router-{n}")).join(f);
            if let Ok(t) = std::fs::read_to_string(&p) {
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                s.push_str(&format!("--- {n} {f}\n"));
                for l in tail.iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
    }
    s
}

/// kube-router's tunnel name for a next hop: `tun-` + 11 hex digits of sha256 of the address
/// without separators.
fn tun_name(c: &Cluster, node: &str, nh: &str) -> String {
    let plain: String = nh.chars().filter(|ch| *ch != '.' && *ch != ':').collect();
    let out = sh(c, node, &format!("printf %s {plain} | sha256sum"));
    format!("tun-{}", &out[..11])
}

/// Routes of protocol 17 on `node` (both families), as `ip -o route` lines.
fn kube_routes(c: &Cluster, node: &str) -> Vec<String> {
    sh(
        c,
        node,
        "ip -o -4 route show table all proto 17; ip -o -6 route show table all proto 17",
    )
    .lines()
    .map(String::from)
    .collect()
}

/// Everything of kube-router's kinds on `node`: tun-* links, proto-17 routes, table-77 routes
/// and lookup-77 rules that are not kr-tunneld's (protocol 157).
fn kube_router_objects(c: &Cluster, node: &str) -> Vec<String> {
    let mut v: Vec<String> = sh(
        c,
        node,
        "ip -o link show | grep -o ' tun-[0-9a-f]*' || true; \
         ip -o -4 route show table all proto 17; ip -o -6 route show table all proto 17; \
         ip -o -4 route show table 77 | grep -v 'proto 157' || true; \
         ip -o -6 route show table 77 | grep -v 'proto 157' || true; \
         ip rule show | grep 'lookup 77' | grep -v 'proto 157' || true; \
         ip -6 rule show | grep 'lookup 77' | grep -v 'proto 157' || true",
    )
    .lines()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty())
    .collect();
    v.sort();
    v
}

fn established_peers(c: &Cluster, node: &str) -> usize {
    let out = c.exec(node, "gobgp neighbor -j");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["state"]["session_state"].as_u64() == Some(6))
                .count()
        })
        .unwrap_or(0)
}

/// (prefix, next hop) of every path `node`'s gobgpd holds from `peer`, both families, and whether
/// any of them is stale.
fn learned_from(c: &Cluster, node: &str, peer: &str) -> (Vec<(String, String)>, bool) {
    let mut out = Vec::new();
    let mut stale = false;
    for fam in ["ipv4", "ipv6"] {
        let o = c.exec(node, &format!("gobgp global rib -j -a {fam}"));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        for paths in v.as_object().into_iter().flat_map(|m| m.values()) {
            for p in paths.as_array().into_iter().flatten() {
                if p["neighbor-ip"] != peer {
                    continue;
                }
                stale |= p["stale"] == true;
                let nh = p["attrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["type"] == 3 || a["type"] == 14)
                    .and_then(|a| a["nexthop"].as_str())
                    .unwrap_or("")
                    .to_string();
                out.push((p["nlri"]["prefix"].as_str().unwrap_or("").to_string(), nh));
            }
        }
    }
    out.sort();
    (out, stale)
}

/// Something listens on TCP port 179 in `node`'s namespace.
fn listens_on_179(c: &Cluster, node: &str) -> bool {
    // /proc/net/tcp{,6}: local address "IP:PORT" in hex, state 0A = LISTEN.
    let out = sh(c, node, "cat /proc/net/tcp /proc/net/tcp6");
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(1)?.to_string(), f.get(3)?.to_string()))
        })
        .any(|(local, st)| st == "0A" && local.ends_with(":00B3"))
}

fn all_pairs_ping(c: &Cluster) {
    for (x, y) in [
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
        ("c", "a"),
        ("b", "a"),
        ("c", "b"),
    ] {
        for v6 in [false, true] {
            assert!(
                c.ping(x, y, v6, 2),
                "ping {x} -> {y} (ipv6={v6}) failed\n{}\n{}",
                c.logs(),
                standin_logs(c)
            );
        }
    }
}

/// Wait until `check` holds (polling), or panic with `what`, the daemon and the stand-in logs.
fn wait(c: &Cluster, what: &str, secs: u64, mut check: impl FnMut(&Cluster) -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if check(c) {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!(
        "timed out waiting for {what}\n{}\n{}",
        c.logs(),
        standin_logs(c)
    );
}

/// Wait until each stand-in has its two sessions up and both other nodes' routes (two families).
fn wait_standins(c: &Cluster, nodes: &[&str]) {
    for n in nodes {
        wait(
            c,
            &format!("{n}: 2 sessions and 4 learned routes"),
            90,
            |c| established_peers(c, n) == 2 && kube_routes(c, n).len() == 4,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rig;

    /// The rig itself: three kube-router stand-ins (gobgpd as kube-router configures it, and the
    /// injector) peer with each other and install what kube-router installs: `tun-…` tunnels
    /// with the `src` route, the table-77 host route and the rule for tunnelled peers, `via`
    /// routes in one subnet; all pods ping each other over both families; a Cease from a node
    /// (kube-router without graceful restart) removes its route and tunnel on the others.
    #[test]
    #[ignore = "needs root, ipip/ip6_tunnel and gobgpd: run by tests/run-kernel-tests.sh"]
    fn kube_router_standins_peer_and_route_pods() {
        rig::in_new_netns(|| {
            let c = Cluster::new("k");
            for n in ["a", "b", "c"] {
                start_standin(&c, n, "KRS_GR=90");
            }
            wait_standins(&c, &["a", "b", "c"]);
            all_pairs_ping(&c);

            let tun = tun_name(&c, "a", "192.168.2.12");
            let link = &c.ipj("a", &["-d", "link", "show", "dev", &tun])[0]["linkinfo"];
            assert_eq!(link["info_kind"], "ipip", "{link}");
            assert_eq!(link["info_data"]["remote"], "192.168.2.12", "{link}");
            assert_eq!(link["info_data"]["local"], "192.168.1.10", "{link}");
            let routes = kube_routes(&c, "a").join("\n");
            assert!(
                routes.contains(&format!(
                    "10.244.2.0/24 dev {tun} scope link src 192.168.1.10"
                )),
                "{routes}"
            );
            assert!(
                routes.contains("10.244.1.0/24 via 192.168.1.11"),
                "{routes}"
            );
            let t77 = sh(&c, "a", "ip route show table 77");
            assert!(t77.contains(&format!("192.168.2.12 dev {tun}")), "{t77}");
            let rules = sh(&c, "a", "ip rule show");
            assert!(rules.contains("from 10.244.0.0/24 lookup 77"), "{rules}");

            // Withdrawal after a Cease: route and tunnel go (the session is down).
            stop_standin(&c, "c", "cease");
            wait(&c, "a drops c's route and tunnel", 60, |c| {
                !kube_routes(c, "a")
                    .iter()
                    .any(|r| r.contains("10.244.2.0/24"))
                    && c.exec("a", &format!("ip link show {tun}")).status.code() != Some(0)
            });
            for n in ["a", "b"] {
                stop_standin(&c, n, "cease");
            }
        });
    }

    /// Issue 14, mixed cluster: kube-router stand-ins on a (b's subnet) and c (behind the router),
    /// kr-tunneld with `--enable-ibgp --bgp-graceful-restart` on b. Both stand-ins establish with
    /// b and learn exactly b's pod CIDRs (IPv4, and IPv6 in MP_REACH) with b's addresses as next
    /// hop; all pods ping each other (a-b direct, b-c tunnels, both families). Then kr-tunneld on
    /// b is killed (-9) and started again while pods ping b every 10 ms: the stand-ins keep b's
    /// routes as stale meanwhile, the new process re-announces them, and no reply is missing.
    #[test]
    #[ignore = "needs root, ipip/ip6_tunnel and gobgpd: run by tests/run-kernel-tests.sh"]
    fn mixed_cluster_routes_pods_and_a_graceful_restart_loses_no_ping() {
        const BGP: &[&str] = &["--enable-ibgp", "--bgp-graceful-restart"];
        rig::in_new_netns(|| {
            let mut c = Cluster::new("x");
            for n in ["a", "c"] {
                start_standin(&c, n, "KRS_GR=90");
            }
            let t0 = std::time::Instant::now();
            c.start("b", BGP);
            wait_standins(&c, &["a", "c"]);
            eprintln!(
                "mixed: both stand-ins established with b and routing its pods {:.1} s after start",
                t0.elapsed().as_secs_f64()
            );
            let log = std::fs::read_to_string(c.dir.join("b.log")).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("starting: node") || l.contains("bgp: peer"))
                .collect();
            eprintln!("mixed: b's start and session lines:\n{}", lines.join("\n"));
            let want = vec![
                ("10.244.1.0/24".to_string(), "192.168.1.11".to_string()),
                ("fd10:0:0:1::/64".to_string(), "fd00:1::11".to_string()),
            ];
            for n in ["a", "c"] {
                assert_eq!(learned_from(&c, n, "192.168.1.11").0, want, "{n}");
            }
            all_pairs_ping(&c);

            let pingers = [("a", "b", false), ("c", "b", false), ("c", "b", true)]
                .map(|(x, y, v6)| ((x, y, v6), Pinger::start(&c, x, y, v6)));
            std::thread::sleep(Duration::from_secs(1));
            c.kill9("b");
            let t1 = std::time::Instant::now();
            c.start("b", BGP);
            wait(
                &c,
                "a and c: b re-established, its routes fresh",
                120,
                |c| {
                    ["a", "c"].iter().all(|n| {
                        let (paths, stale) = learned_from(c, n, "192.168.1.11");
                        established_peers(c, n) == 2 && paths == want && !stale
                    })
                },
            );
            eprintln!(
                "mixed: b's routes fresh again {:.1} s after the restart",
                t1.elapsed().as_secs_f64()
            );
            std::thread::sleep(Duration::from_secs(2));
            let mut report = Vec::new();
            for ((x, y, v6), p) in pingers {
                let (max, missing) = p.finish();
                report.push(format!(
                    "{x}->{y} ipv6={v6}: {max} sent, {} lost {missing:?}",
                    missing.len()
                ));
                assert!(max > 100, "{x}->{y} ipv6={v6}: only {max} replies");
            }
            eprintln!("graceful restart losses: {report:#?}");
            assert!(
                report.iter().all(|r| r.contains(", 0 lost")),
                "{report:#?}\n{}\n{}",
                c.logs(),
                standin_logs(&c)
            );
            c.stop("b");
            for n in ["a", "c"] {
                stop_standin(&c, n, "cease");
            }
        });
    }

    /// SPEC B-7: a kube-router node (stand-in, GUE on 5555, graceful restart 90 s) is migrated to
    /// kr-tunneld: its BGP speaker and injector stop like kube-router with graceful restart
    /// (kernel state kept, peers keep its routes as stale), and kr-tunneld starts with
    /// `--adopt-kube-router --enable-ibgp --bgp-graceful-restart`; the other nodes learn its pod
    /// CIDRs from kr-tunneld before their stale timer runs out. Pods ping every 10 ms from the migrated node to a tunnelled peer
    /// (IPv4 and IPv6) and to a peer in its subnet (direct route): no reply is missing. Afterwards
    /// nothing of kube-router's is left on the node (no tun-* link, no proto-17 route, no foreign
    /// table-77 route or lookup-77 rule), its GUE port is recorded as kr-tunneld's; restarted
    /// without `--enable-ibgp`, nothing listens on the BGP port.
    #[test]
    #[ignore = "needs root, ipip/ip6_tunnel/fou and gobgpd: run by tests/run-kernel-tests.sh"]
    fn migrating_a_kube_router_node_loses_no_ping_and_leaves_nothing_of_kube_router() {
        rig::in_new_netns(|| {
            let mut c = Cluster::new("m");
            for n in ["a", "b", "c"] {
                start_standin(&c, n, "KRS_GR=90 KRS_ENCAP=fou");
            }
            wait_standins(&c, &["a", "b", "c"]);
            all_pairs_ping(&c);
            let before = kube_router_objects(&c, "b");
            assert!(before.len() >= 8, "b before migration: {before:#?}");
            assert!(sh(&c, "b", "ip fou show").contains("5555"));

            let pingers = [("b", "c", false), ("b", "c", true), ("b", "a", false)]
                .map(|(x, y, v6)| ((x, y, v6), Pinger::start(&c, x, y, v6)));
            std::thread::sleep(Duration::from_secs(1));
            stop_standin(&c, "b", "stop");
            let flags = [
                "--adopt-kube-router",
                "--overlay-encap=fou",
                "--enable-ibgp",
                "--bgp-graceful-restart",
            ];
            c.start("b", &flags);
            wait(&c, "b: kr-tunneld's two GUE tunnels to c", 60, |c| {
                let t = c.tunnels("b");
                t.len() == 2
                    && t.iter()
                        .all(|t| t.3.starts_with("192.168.2.") || t.3.starts_with("fd00:2:"))
            });
            wait(&c, "b: nothing of kube-router left", 30, |c| {
                kube_router_objects(c, "b").is_empty()
            });
            // The other nodes learn b's pod CIDRs again from kr-tunneld, which ends their stale
            // phase (before the restart time, 90 s, would have withdrawn them).
            let want = vec![
                ("10.244.1.0/24".to_string(), "192.168.1.11".to_string()),
                ("fd10:0:0:1::/64".to_string(), "fd00:1::11".to_string()),
            ];
            wait(&c, "a and c: b's routes fresh from kr-tunneld", 80, |c| {
                ["a", "c"].iter().all(|n| {
                    let (paths, stale) = learned_from(c, n, "192.168.1.11");
                    paths == want && !stale
                })
            });
            // A full resync pass (2 s) after the takeover, still pinging.
            std::thread::sleep(Duration::from_secs(3));
            let mut report = Vec::new();
            for ((x, y, v6), p) in pingers {
                let (max, missing) = p.finish();
                report.push(format!(
                    "{x}->{y} ipv6={v6}: {max} sent, {} lost {missing:?}",
                    missing.len()
                ));
                assert!(max > 100, "{x}->{y} ipv6={v6}: only {max} replies");
            }
            eprintln!("migration losses: {report:#?}");
            assert!(
                report.iter().all(|r| r.contains(", 0 lost")),
                "{report:#?}\n{}\n{}",
                c.logs(),
                standin_logs(&c)
            );
            let log = std::fs::read_to_string(c.dir.join("b.log")).unwrap_or_default();
            let adopt: Vec<&str> = log.lines().filter(|l| l.contains("adopt:")).collect();
            eprintln!("adoption log:\n{}", adopt.join("\n"));
            // Both tunnels (IPv4, IPv6) to c were bound first, so ours was created before theirs
            // went; nothing failed.
            assert!(
                log.contains("kube-router's state taken over")
                    && log.contains("2 tunnels bound first")
                    && log.contains(" 0 failures)"),
                "{log}"
            );
            let fou = std::fs::read_to_string(c.dir.join("state-b").join("fou-ports"))
                .unwrap_or_default();
            assert!(fou.contains("ipv4 5555"), "fou-ports: {fou:?}");
            all_pairs_ping(&c);
            // BGP off (the default): nothing listens on the BGP port; with it on, b does.
            assert!(
                listens_on_179(&c, "b"),
                "kr-tunneld with --enable-ibgp does not listen"
            );
            c.stop("b");
            c.start("b", &["--overlay-encap=fou"]);
            wait(&c, "b: a pass without BGP", 60, |c| {
                let log = std::fs::read_to_string(c.dir.join("b.log")).unwrap_or_default();
                log.matches("kr-tunneld 0.").count() >= 2
                    && log
                        .rsplit("kr-tunneld 0.")
                        .next()
                        .unwrap_or("")
                        .contains("reconciled")
            });
            assert!(
                !listens_on_179(&c, "b"),
                "something listens on 179 on b with BGP off"
            );
            c.stop("b");
            for n in ["a", "c"] {
                stop_standin(&c, n, "cease");
            }
        });
    }
}
