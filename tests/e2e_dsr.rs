//! DSR end to end through the real daemon (issue 5): the fake API serves an annotated Service and
//! its EndpointSlice; kr-tunneld on the director (node a) programs IPVS and the policy routing,
//! kr-tunneld on node b prepares the pod behind it; a client talks TCP to the VIP.
//!
//! ```text
//!   client 192.168.1.50 ── br0 ── a 192.168.1.10 (director: IPVS 203.0.113.10:80, rules, table 78)
//!                           └──── b 192.168.1.11 ── vpod ── pod 10.244.1.10 (kt-dsr holds the VIP)
//! ```
//!
//! Replies go pod → b → client and never cross the director (counted with nft on a).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::e2e::Cluster;
use crate::fakeapi::{SERVICES, SLICES};
use crate::rig::{self, run};

const VIP: &str = "203.0.113.10";
const POD: &str = "10.244.1.10";

fn service(annotations: Value, affinity: bool) -> Value {
    let mut ann = json!({"kube-router.io/service.dsr": "tunnel"});
    for (k, v) in annotations.as_object().into_iter().flatten() {
        ann[k] = v.clone();
    }
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "web", "namespace": "default", "annotations": ann},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20", "externalIPs": [VIP],
                 "sessionAffinity": if affinity { "ClientIP" } else { "None" },
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]}
    })
}

fn slice(endpoints: &[(&str, &str)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "web-x1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": 80}]
    })
}

/// Client and pod namespaces around the cluster; returns (client ns, pod ns). Node b forwards
/// the pod's replies, whose source is the VIP: like any DSR node it needs rp_filter off or loose
/// (2, what kube-router sets; 0 is the kernel's default) on its pod-facing device, not strict.
/// b is a director too (every node is), so its reverse-path check sees the VIP as a local
/// address; kr-tunneld sets `accept_local=1` on the pod-facing device for that (README, DSR).
fn attach(c: &Cluster, tag: &str) -> (String, String) {
    let (cl, pod, b) = (
        format!("krt{tag}cl"),
        format!("krt{tag}pod"),
        c.node("b").ns.clone(),
    );
    for ns in [&cl, &pod] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let script = format!(
        "ip netns add {cl}; ip link add v{tag}cl type veth peer name eth0 netns {cl}
         ip link set v{tag}cl master br0 up; ip -n {cl} link set lo up; ip -n {cl} link set eth0 up
         ip -n {cl} addr add 192.168.1.50/24 dev eth0; ip -n {cl} route add {VIP}/32 via 192.168.1.10
"
    );
    run("sh", &["-c", &script]);
    add_pod(&b, &pod, POD, "10.244.1.253");
    (cl, pod)
}

/// A pod namespace `pod` with address `ip`, behind node namespace `node` (gateway `gw` on the
/// node's side of the veth).
fn add_pod(node: &str, pod: &str, ip: &str, gw: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", pod])
        .stderr(std::process::Stdio::null())
        .status();
    let script = format!(
        "ip netns add {pod}; ip -n {node} link add vpod type veth peer name eth0 netns {pod}
         ip -n {node} link set vpod up; ip -n {pod} link set lo up; ip -n {pod} link set eth0 up
         ip -n {node} addr add {gw}/32 dev vpod; ip -n {node} route add {ip}/32 dev vpod
         ip -n {pod} addr add {ip}/32 dev eth0; ip -n {pod} route add {gw}/32 dev eth0
         ip -n {pod} route add default via {gw} dev eth0
         ip netns exec {node} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward; \
             for f in all default vpod eth0; do echo 0 > /proc/sys/net/ipv4/conf/$f/rp_filter; done'"
    );
    run("sh", &["-c", &script]);
}

/// A pod behind a bridge-style CNI: `cni0` on node `node` holds the gateway, the pod's veth is
/// a port of it. Default sysctls except `ip_forward`.
fn add_bridge_pod(node: &str, pod: &str, ip: &str, gw: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", pod])
        .stderr(std::process::Stdio::null())
        .status();
    let script = format!(
        "ip netns add {pod}; ip -n {node} link add cni0 type bridge; ip -n {node} link set cni0 up
         ip -n {node} link add vethp0 type veth peer name eth0 netns {pod}
         ip -n {node} link set vethp0 master cni0 up; ip -n {pod} link set lo up; ip -n {pod} link set eth0 up
         ip -n {node} addr add {gw}/32 dev cni0; ip -n {node} route add {ip}/32 dev cni0
         ip -n {pod} addr add {ip}/32 dev eth0; ip -n {pod} route add {gw}/32 dev eth0
         ip -n {pod} route add default via {gw} dev eth0
         ip netns exec {node} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"
    );
    run("sh", &["-c", &script]);
}

/// nft counters: on the director, anything from the VIP (replies must not pass there); on b,
/// forwarded SYN-ACKs from the VIP and those with MSS `mss`, and GUE to 5555.
fn counters(c: &Cluster, mss: u32) {
    for (node, rules) in [
        ("a", format!("chain p {{ type filter hook prerouting priority 0; ip saddr {VIP} counter name vip; }}\n  chain o {{ type filter hook output priority 0; ip saddr {VIP} counter name vip; }}")),
        ("b", format!("chain f {{ type filter hook forward priority 0;\n    ip saddr {VIP} tcp flags syn,ack / syn,ack tcp option maxseg size {mss} counter name mss_ok\n    ip saddr {VIP} tcp flags syn,ack / syn,ack counter name synack\n    udp dport 5555 counter name gue\n  }}")),
    ] {
        let script = format!(
            "table inet d {{\n  counter vip {{ }}\n  counter mss_ok {{ }}\n  counter synack {{ }}\n  counter gue {{ }}\n  {rules}\n}}\n"
        );
        let out = c.exec(node, &format!("nft delete table inet d 2>/dev/null; nft -f - <<'EOF'\n{script}EOF"));
        assert!(out.status.success(), "nft on {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn count(c: &Cluster, node: &str, name: &str) -> u64 {
    let out = c.exec(node, &format!("nft -j list counter inet d {name}"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("no counter {name} on {node}: {v}"))
}

/// TCP echo on [::]:80 inside the pod namespace, on a detached thread.
fn echo_server(pod: &str) {
    let path = PathBuf::from(format!("/run/netns/{pod}"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = kr_tunneld::podns::in_netns(&path, || {
            let l = TcpListener::bind("[::]:80").expect("bind :80 in the pod");
            let _ = tx.send(());
            for conn in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("echo server listening");
}

/// From the client namespace: connect to the VIP, send 20 kB, read the echo. Err on failure.
fn talk(client: &str) -> Result<(), String> {
    talk_to(client, VIP)
}

/// [`talk`] to any VIP.
fn talk_to(client: &str, vip: &str) -> Result<(), String> {
    let path = PathBuf::from(format!("/run/netns/{client}"));
    kr_tunneld::podns::in_netns(&path, || {
        let addr = SocketAddr::new(vip.parse::<IpAddr>().map_err(|e| e.to_string())?, 80);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let msg: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
        if back == msg {
            Ok(())
        } else {
            Err("echo differs".into())
        }
    })
    .map_err(|e| e.to_string())?
}

/// What the data path looks like, for failure messages.
fn diagnose(c: &Cluster, pod: &str) -> String {
    let a = c.exec("a", "ipvsadm -Lnc; ipvsadm -Ln --stats; ip rule; ip route show table 78; ip route; nft list ruleset");
    let b = c.exec("b", "ip -s link show vpod; ip -s link show eth0; ip route; cat /proc/sys/net/ipv4/ip_forward; grep . /proc/sys/net/ipv4/conf/*/rp_filter; nft list ruleset; grep -E '^Ip:' /proc/net/snmp; echo 1 > /proc/sys/net/ipv4/conf/all/log_martians; ip neigh");
    let p = Command::new("ip")
        .args(["netns", "exec", pod, "sh", "-c", "ip -d -s link show kt-dsr; ip addr; ip rule; ip route show table all; cat /proc/sys/net/ipv4/conf/*/rp_filter | tr '\\n' ' '; echo; cat /proc/net/tcp /proc/net/tcp6; grep -E '^(Ip|Tcp):' /proc/net/snmp; grep -E '^TcpExt:' /proc/net/netstat"])
        .output()
        .expect("ip netns exec");
    format!(
        "--- director a\n{}\n--- node b\n{}\n--- pod\n{}{}\n{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout),
        String::from_utf8_lossy(&p.stdout),
        String::from_utf8_lossy(&p.stderr),
        c.logs()
    )
}

fn ipvsadm(c: &Cluster) -> String {
    String::from_utf8_lossy(&c.exec("a", "ipvsadm -Ln --tun-info").stdout).into_owned()
}

fn pod_has_vip(pod: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", pod, "-j", "addr", "show", "dev", "kt-dsr"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).contains(VIP))
        .unwrap_or(false)
}

fn dsr_rules(c: &Cluster) -> usize {
    let rules = c.ipj("a", &["rule", "show"]);
    rules
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["table"] == "78" && r["dst"] == VIP)
                .count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC D-1…D-5 through the daemon: traffic, reply bypass, MSS, scheduler and affinity, GUE,
    /// annotation removed and restored, endpoints to zero and back, restart, foreign state.
    #[test]
    #[ignore = "needs root, ip_vs, ipip and fou: run by tests/run-kernel-tests.sh"]
    fn dsr_service_through_the_daemon() {
        rig::in_new_netns(|| {
            let mut c = Cluster::new("r");
            let (client, pod) = attach(&c, "r");
            // Foreign state on the director: an IPVS service and a rule into table 78.
            let foreign = c.exec(
                "a",
                "ipvsadm -A -t 198.51.100.1:80 -s rr && ip rule add to 203.0.113.99 lookup 78 pref 500",
            );
            assert!(foreign.status.success(), "{foreign:?}");
            c.api.put(
                SERVICES,
                service(json!({"kube-router.io/service.scheduler": "sh"}), true),
            );
            c.api.put(SLICES, slice(&[(POD, "b")]));
            // All "nodes" share one kernel here, so each sees the others' pod namespaces under
            // /run/netns; on a real node it sees only its own. Distinct link groups keep each
            // daemon's pod-side ownership to its own node, as separate kernels would.
            let dsr = ["--enable-dsr", "--service-external-ip-range=203.0.113.0/24"];
            let (ga, gb) = ("--link-group=19284", "--link-group=19285");
            c.start("a", &[dsr[0], dsr[1], ga]);
            c.start("b", &[dsr[0], dsr[1], gb]);
            c.wait_for("IPVS service with the pod as tunnel real server", 60, |c| {
                let l = ipvsadm(c);
                l.contains(&format!("TCP  {VIP}:80 sh persistent 10800"))
                    && l.contains(&format!("{POD}:80"))
            });
            c.wait_for("the pod's receive link holds the VIP", 60, |_| {
                pod_has_vip(&pod)
            });
            assert_eq!(dsr_rules(&c), 1, "{}", c.logs());
            let route = c.ipj("a", &["route", "show", "table", "78"]);
            assert!(route.to_string().contains("\"type\":\"local\""), "{route}");

            echo_server(&pod);
            counters(&c, 1440);
            talk(&client).unwrap_or_else(|e| panic!("DSR over IPIP: {e}\n{}", diagnose(&c, &pod)));
            let (vip_at_director, synack, mss_ok) = (
                count(&c, "a", "vip"),
                count(&c, "b", "synack"),
                count(&c, "b", "mss_ok"),
            );
            println!("ipip: director saw {vip_at_director} reply packets; SYN-ACKs {synack}, with MSS 1440: {mss_ok}");
            assert_eq!(vip_at_director, 0, "replies crossed the director");
            assert!(synack > 0 && mss_ok == synack, "SYN-ACK MSS is not 1440");

            // GUE: restart both with fou; the real server's tunnel type follows; UDP on the wire.
            let fou = [
                "--enable-dsr",
                "--service-external-ip-range=203.0.113.0/24",
                "--overlay-encap=fou",
            ];
            for (n, g) in [("a", ga), ("b", gb)] {
                c.stop(n);
                c.start(n, &[fou[0], fou[1], fou[2], g]);
            }
            c.wait_for("real server with GUE tunnel type", 60, |c| {
                ipvsadm(c).to_lowercase().contains("gue")
            });
            counters(&c, 1428);
            c.wait_for("GUE DSR traffic", 30, |_| talk(&client).is_ok());
            let (gue, synack, mss_ok) = (
                count(&c, "b", "gue"),
                count(&c, "b", "synack"),
                count(&c, "b", "mss_ok"),
            );
            println!("gue: UDP/5555 packets to the pod {gue}; SYN-ACKs {synack}, with MSS 1428: {mss_ok}");
            assert!(
                gue >= 5 && mss_ok == synack && synack > 0,
                "gue {gue} synack {synack} mss_ok {mss_ok}"
            );
            assert_eq!(count(&c, "a", "vip"), 0);

            // Annotation removed: IPVS service, rule, table-78 route and the pod side go.
            c.api.put(SERVICES, json!({
                "kind": "Service", "apiVersion": "v1",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"type": "ClusterIP", "externalIPs": [VIP], "ports": [{"protocol": "TCP", "port": 80}]}
            }));
            c.wait_for("DSR removed", 60, |c| {
                !ipvsadm(c).contains(VIP) && dsr_rules(c) == 0 && !pod_has_vip(&pod)
            });
            // Restored, then endpoints to zero and back.
            c.api.put(SERVICES, service(json!({}), false));
            c.wait_for("DSR back", 60, |c| {
                ipvsadm(c).contains(&format!("{POD}:80")) && pod_has_vip(&pod)
            });
            c.api.put(SLICES, slice(&[]));
            c.wait_for("no real servers", 60, |c| {
                ipvsadm(c).contains(VIP)
                    && !ipvsadm(c).contains(&format!("{POD}:80"))
                    && !pod_has_vip(&pod)
            });
            c.api.put(SLICES, slice(&[(POD, "b")]));
            c.wait_for("real server back", 60, |c| {
                ipvsadm(c).contains(&format!("{POD}:80")) && pod_has_vip(&pod)
            });
            c.wait_for("traffic again", 30, |_| talk(&client).is_ok());

            // A pod on the director node itself behind a bridge (cni0), then session affinity
            // across two pods: every connection of the client lands on the same one.
            let pod_a = "krtrpoda".to_string();
            add_bridge_pod(&c.node("a").ns, &pod_a, "10.244.0.10", "10.244.0.253");
            echo_server(&pod_a);
            c.api.put(SLICES, slice(&[("10.244.0.10", "a")]));
            c.wait_for("the director's own pod as the only real server", 60, |c| {
                let l = ipvsadm(c);
                l.contains("10.244.0.10:80")
                    && !l.contains(&format!("{POD}:80"))
                    && pod_has_vip(&pod_a)
                    && !pod_has_vip(&pod)
            });
            c.wait_for("traffic to the pod on the director node", 30, |_| {
                talk(&client).is_ok()
            });
            let cni0 = |c: &Cluster| {
                String::from_utf8_lossy(
                    &c.exec("a", "cat /proc/sys/net/ipv4/conf/cni0/accept_local")
                        .stdout,
                )
                .trim()
                .to_string()
            };
            assert_eq!(
                cni0(&c),
                "1",
                "accept_local on the bridge of the director's pod"
            );
            c.api.put(SERVICES, service(json!({}), true));
            c.api
                .put(SLICES, slice(&[("10.244.0.10", "a"), (POD, "b")]));
            c.wait_for("two real servers, persistent", 60, |c| {
                let l = ipvsadm(c);
                l.contains("persistent 10800")
                    && l.contains("10.244.0.10:80")
                    && l.contains(&format!("{POD}:80"))
            });
            let seen_before =
                String::from_utf8_lossy(&c.exec("a", "ipvsadm -Lnc").stdout).into_owned();
            let old_sources: std::collections::BTreeSet<String> = seen_before
                .lines()
                .filter_map(|l| l.split_whitespace().nth(3))
                .filter(|s| !s.ends_with(":0"))
                .map(str::to_string)
                .collect();
            for _ in 0..6 {
                talk(&client)
                    .unwrap_or_else(|e| panic!("affinity round: {e}\n{}", diagnose(&c, &pod)));
            }
            let conns = String::from_utf8_lossy(&c.exec("a", "ipvsadm -Lnc").stdout).into_owned();
            let dests: std::collections::BTreeSet<&str> = conns
                .lines()
                .filter(|l| l.contains("192.168.1.50:"))
                .filter(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .is_some_and(|src| !old_sources.contains(src))
                })
                .filter_map(|l| l.split_whitespace().nth(5))
                .collect();
            println!("affinity: client connections went to {dests:?}");
            assert_eq!(dests.len(), 1, "ClientIP affinity broken: {conns}");
            let _ = Command::new("ip").args(["netns", "del", &pod_a]).status();
            c.api.put(SLICES, slice(&[(POD, "b")]));
            c.api.put(SERVICES, service(json!({}), false));
            c.wait_for("back to the pod on b", 60, |c| {
                let l = ipvsadm(c);
                !l.contains("10.244.0.10:80")
                    && l.contains(&format!("{POD}:80"))
                    && !l.contains("persistent")
            });
            c.wait_for("accept_local on cni0 set back to 0", 30, |c| cni0(c) == "0");

            // Restart: nothing duplicated, nothing changed.
            let before = ipvsadm(&c);
            c.stop("a");
            c.start("a", &[fou[0], fou[1], fou[2], ga]);
            std::thread::sleep(Duration::from_secs(4)); // two resyncs
            assert_eq!(ipvsadm(&c), before);
            assert_eq!(dsr_rules(&c), 1);

            // Service deleted: everything goes; foreign state stays.
            c.api.delete(SERVICES, "default/web");
            c.wait_for("DSR removed after delete", 60, |c| {
                !ipvsadm(c).contains(VIP) && dsr_rules(c) == 0 && !pod_has_vip(&pod)
            });
            let l = ipvsadm(&c);
            assert!(
                l.contains("198.51.100.1:80"),
                "foreign IPVS service removed: {l}"
            );
            let rules = c.ipj("a", &["rule", "show"]);
            assert!(
                rules
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["priority"] == 500),
                "foreign rule removed"
            );
            let link = Command::new("ip")
                .args(["-n", &pod, "link", "show", "kt-dsr"])
                .output()
                .expect("ip");
            assert!(!link.status.success(), "pod receive link left behind");
            for ns in [&client, &pod] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        });
    }
}

#[cfg(test)]
mod ipv6 {
    use super::*;

    const VIP6: &str = "2001:db8:100::10";
    const POD6: &str = "fd10:0:0:1::10";

    /// An IPv6 VIP through the daemon: ip6tnl (ip6ip6) to the pod, `kt-dsr6` in the pod, replies
    /// bypass the director, SYN-ACK MSS 1500 - 100 = 1400.
    #[test]
    #[ignore = "needs root, ip_vs, ip6_tunnel: run by tests/run-kernel-tests.sh"]
    fn ipv6_vip_through_the_daemon() {
        rig::in_new_netns(|| {
            let mut c = Cluster::new("6");
            let (client, pod) = attach(&c, "6");
            let b = c.node("b").ns.clone();
            run(
                "sh",
                &[
                    "-c",
                    &format!(
                        "ip -n {pod} -6 addr add {POD6}/128 dev eth0 nodad
                     ip -n {b} -6 addr add fd10:0:0:1::253/128 dev vpod nodad
                     ip -n {b} -6 route add {POD6}/128 dev vpod
                     ip -n {pod} -6 route add fd10:0:0:1::253/128 dev eth0
                     ip -n {pod} -6 route add default via fd10:0:0:1::253 dev eth0
                     ip netns exec {b} sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/forwarding'
                     ip -n {client} -6 addr add fd00:1::50/64 dev eth0 nodad
                     ip -n {client} -6 route add {VIP6}/128 via fd00:1::10"
                    ),
                ],
            );
            let mut svc = service(json!({}), false);
            svc["spec"]["externalIPs"] = json!([VIP6]);
            c.api.put(SERVICES, svc);
            let mut sl = slice(&[(POD6, "b")]);
            sl["addressType"] = json!("IPv6");
            c.api.put(SLICES, sl);
            let flags = [
                "--enable-dsr",
                "--service-external-ip-range=2001:db8:100::/64",
            ];
            c.start("a", &[flags[0], flags[1], "--link-group=19284"]);
            c.start("b", &[flags[0], flags[1], "--link-group=19285"]);
            c.wait_for("IPv6 IPVS service with the pod", 60, |c| {
                let l = ipvsadm(c);
                l.contains(&format!("[{VIP6}]:80")) && l.contains(&format!("[{POD6}]:80"))
            });
            c.wait_for("kt-dsr6 holds the VIP", 60, |_| {
                let out = Command::new("ip")
                    .args(["-n", &pod, "-j", "addr", "show", "dev", "kt-dsr6"])
                    .output();
                out.map(|o| String::from_utf8_lossy(&o.stdout).contains(VIP6))
                    .unwrap_or(false)
            });
            echo_server(&pod);
            for (node, rules) in [
                ("a", format!("chain p {{ type filter hook prerouting priority 0; ip6 saddr {VIP6} counter name vip; }}\n  chain o {{ type filter hook output priority 0; ip6 saddr {VIP6} counter name vip; }}")),
                ("b", format!("chain f {{ type filter hook forward priority 0;\n    ip6 saddr {VIP6} tcp flags syn,ack / syn,ack tcp option maxseg size 1400 counter name mss_ok\n    ip6 saddr {VIP6} tcp flags syn,ack / syn,ack counter name synack\n  }}")),
            ] {
                let script = format!("table inet d {{\n  counter vip {{ }}\n  counter mss_ok {{ }}\n  counter synack {{ }}\n  counter gue {{ }}\n  {rules}\n}}\n");
                let out = c.exec(node, &format!("nft -f - <<'EOF'\n{script}EOF"));
                assert!(out.status.success(), "nft on {node}: {}", String::from_utf8_lossy(&out.stderr));
            }
            c.wait_for("IPv6 DSR traffic", 30, |_| talk_to(&client, VIP6).is_ok());
            let (vip, synack, mss_ok) = (
                count(&c, "a", "vip"),
                count(&c, "b", "synack"),
                count(&c, "b", "mss_ok"),
            );
            println!("ipv6: director saw {vip} reply packets; SYN-ACKs {synack}, with MSS 1400: {mss_ok}");
            assert_eq!(vip, 0, "replies crossed the director");
            assert!(synack > 0 && mss_ok == synack, "SYN-ACK MSS is not 1400");
            for ns in [&client, &pod] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        });
    }
}

/// Issue 13: a new user's first try, on nodes with default sysctls (only `ip_forward`, which
/// every Kubernetes node has): a director a, a pod on b wired by a plain veth, a client on the
/// LAN, a fake API serving static lists, and `kr-tunneld --once --enable-dsr` run once on each
/// node. IPv4 and IPv6 VIPs of one Service, IPIP then GUE.
#[cfg(test)]
mod first_try {
    use super::*;

    const VIP6: &str = "2001:db8:100::10";
    const POD6: &str = "fd10:0:0:1::10";

    /// `kr-tunneld --once` on `node`; its exit status must be 0.
    fn once(c: &mut Cluster, node: &str, flags: &[&str]) {
        c.start(node, flags);
        let i = c.nodes.iter().position(|n| n.name == node).unwrap();
        let st = c.nodes[i].child.take().unwrap().wait().expect("wait");
        assert!(st.success(), "--once on {node}: {st}\n{}", c.logs());
    }

    /// A pod behind `node` with nothing but addresses and routes: no sysctl is touched.
    fn plain_pod(node: &str, pod: &str) {
        let _ = Command::new("ip")
            .args(["netns", "del", pod])
            .stderr(std::process::Stdio::null())
            .status();
        let script = format!(
            "ip netns add {pod}; ip -n {node} link add vpod type veth peer name eth0 netns {pod}
             ip -n {node} link set vpod up; ip -n {pod} link set lo up; ip -n {pod} link set eth0 up
             ip -n {node} addr add 10.244.1.253/32 dev vpod; ip -n {node} route add {POD}/32 dev vpod
             ip -n {pod} addr add {POD}/32 dev eth0; ip -n {pod} route add 10.244.1.253/32 dev eth0
             ip -n {pod} route add default via 10.244.1.253 dev eth0
             ip -n {pod} -6 addr add {POD6}/128 dev eth0 nodad
             ip -n {node} -6 addr add fd10:0:0:1::253/128 dev vpod nodad
             ip -n {node} -6 route add {POD6}/128 dev vpod
             ip -n {pod} -6 route add fd10:0:0:1::253/128 dev eth0
             ip -n {pod} -6 route add default via fd10:0:0:1::253 dev eth0
             ip netns exec {node} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward; \
                 echo 1 > /proc/sys/net/ipv6/conf/all/forwarding'"
        );
        run("sh", &["-c", &script]);
    }

    fn sysctl(c: &Cluster, node: &str, key: &str) -> String {
        let out = c.exec(node, &format!("cat /proc/sys/net/ipv4/conf/{key}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Everything kr-tunneld made on both nodes and in the pod, for the idempotence check.
    fn snapshot(c: &Cluster, pod: &str) -> String {
        let p = Command::new("ip")
            .args([
                "netns",
                "exec",
                pod,
                "sh",
                "-c",
                "ip -d link; ip addr; ip rule; ip -6 rule; ip route show table all",
            ])
            .output()
            .expect("ip");
        let mut s = String::new();
        for n in ["a", "b"] {
            let o = c.exec(n, "ipvsadm -Ln --tun-info; ip rule; ip -6 rule; ip route show table 78; ip -6 route show table 78; grep . /proc/sys/net/ipv4/conf/*/accept_local");
            s.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        s + &String::from_utf8_lossy(&p.stdout)
    }

    #[test]
    #[ignore = "needs root, ip_vs, ipip, ip6_tunnel and fou: run by tests/run-kernel-tests.sh"]
    fn dsr_works_on_the_first_once_run_on_default_nodes() {
        rig::in_new_netns(|| {
            let mut c = Cluster::new("o");
            let (client, pod) = (String::from("krtocl"), String::from("krtopod"));
            let _ = Command::new("ip")
                .args(["netns", "del", &client])
                .stderr(std::process::Stdio::null())
                .status();
            run("sh", &["-c", &format!(
                "ip netns add {client}; ip link add vocl type veth peer name eth0 netns {client}
                 ip link set vocl master br0 up; ip -n {client} link set lo up; ip -n {client} link set eth0 up
                 ip -n {client} addr add 192.168.1.50/24 dev eth0; ip -n {client} route add {VIP}/32 via 192.168.1.10
                 ip -n {client} -6 addr add fd00:1::50/64 dev eth0 nodad
                 ip -n {client} -6 route add {VIP6}/128 via fd00:1::10")]);
            plain_pod(&c.node("b").ns.clone(), &pod);
            let defaults = (
                sysctl(&c, "b", "vpod/accept_local"),
                sysctl(&c, "b", "vpod/rp_filter"),
            );
            println!(
                "node b, vpod before: accept_local={} rp_filter={}",
                defaults.0, defaults.1
            );
            let foreign = c.exec("a", "ipvsadm -A -t 198.51.100.1:80 -s rr");
            assert!(foreign.status.success(), "{foreign:?}");
            let mut svc = service(json!({}), false);
            svc["spec"]["externalIPs"] = json!([VIP, VIP6]);
            c.api.put(SERVICES, svc);
            c.api.put(SLICES, slice(&[(POD, "b")]));
            let mut sl6 = slice(&[(POD6, "b")]);
            sl6["metadata"]["name"] = json!("web-x6");
            sl6["addressType"] = json!("IPv6");
            c.api.put(SLICES, sl6);
            echo_server(&pod);
            for (encap, mss4) in [("ipip", 1440u32), ("fou", 1428)] {
                let enc = format!("--overlay-encap={encap}");
                let flags = |g: &'static str| -> Vec<String> {
                    vec![
                        "--once".into(),
                        "--enable-dsr".into(),
                        "--service-external-ip-range=203.0.113.0/24,2001:db8:100::/64".into(),
                        enc.clone(),
                        g.into(),
                    ]
                };
                let (fa, fb) = (flags("--link-group=19284"), flags("--link-group=19285"));
                let fa: Vec<&str> = fa.iter().map(String::as_str).collect();
                let fb: Vec<&str> = fb.iter().map(String::as_str).collect();
                once(&mut c, "a", &fa);
                once(&mut c, "b", &fb);
                counters(&c, mss4);
                // The first run converged: no waiting, no retry.
                talk(&client).unwrap_or_else(|e| {
                    panic!(
                        "{encap} IPv4 after the first --once: {e}\n{}",
                        diagnose(&c, &pod)
                    )
                });
                talk_to(&client, VIP6).unwrap_or_else(|e| {
                    panic!(
                        "{encap} IPv6 after the first --once: {e}\n{}",
                        diagnose(&c, &pod)
                    )
                });
                let (vip_at_director, synack, mss_ok) = (
                    count(&c, "a", "vip"),
                    count(&c, "b", "synack"),
                    count(&c, "b", "mss_ok"),
                );
                println!("{encap}: director saw {vip_at_director} IPv4 reply packets; SYN-ACKs {synack}, with MSS {mss4}: {mss_ok}; vpod accept_local={}", sysctl(&c, "b", "vpod/accept_local"));
                assert_eq!(vip_at_director, 0, "replies crossed the director");
                assert!(synack > 0 && mss_ok == synack, "SYN-ACK MSS is not {mss4}");
                // Idempotent: a second run on each node changes nothing.
                let before = snapshot(&c, &pod);
                once(&mut c, "a", &fa);
                once(&mut c, "b", &fb);
                assert_eq!(
                    snapshot(&c, &pod),
                    before,
                    "second --once changed something"
                );
            }
            // Annotation removed: everything goes, the device's sysctl is back to its default,
            // the foreign IPVS service stays.
            c.api.put(SERVICES, json!({
                "kind": "Service", "apiVersion": "v1",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"type": "ClusterIP", "externalIPs": [VIP], "ports": [{"protocol": "TCP", "port": 80}]}
            }));
            let f = [
                "--once",
                "--enable-dsr",
                "--service-external-ip-range=203.0.113.0/24,2001:db8:100::/64",
            ];
            once(&mut c, "a", &[f[0], f[1], f[2], "--link-group=19284"]);
            once(&mut c, "b", &[f[0], f[1], f[2], "--link-group=19285"]);
            for n in ["a", "b"] {
                let l = String::from_utf8_lossy(&c.exec(n, "ipvsadm -Ln").stdout).into_owned();
                assert!(
                    !l.contains(VIP) && !l.contains("2001:db8:100::10"),
                    "{n}: {l}"
                );
                let rules = c.ipj(n, &["rule", "show"]).to_string()
                    + &c.ipj(n, &["-6", "rule", "show"]).to_string();
                assert!(!rules.contains("\"table\":\"78\""), "{n}: {rules}");
            }
            assert!(
                String::from_utf8_lossy(&c.exec("a", "ipvsadm -Ln").stdout)
                    .contains("198.51.100.1:80"),
                "foreign IPVS service removed"
            );
            assert!(!pod_has_vip(&pod));
            let link = Command::new("ip")
                .args(["-n", &pod, "link", "show", "kt-dsr"])
                .output()
                .expect("ip");
            assert!(!link.status.success(), "pod receive link left behind");
            assert_eq!(
                (
                    sysctl(&c, "b", "vpod/accept_local"),
                    sysctl(&c, "b", "vpod/rp_filter")
                ),
                defaults
            );
            for ns in [&client, &pod] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        });
    }
}
