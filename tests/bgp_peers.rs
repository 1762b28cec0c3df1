//! The BGP speaker against real peers that no one here wrote, on the host, without root-only
//! kernel features: Debian's `gobgpd` 3.10 (the library kube-router embeds, configured as
//! kube-router configures its node peers) and `bird2`. The real binary runs with `--dry-run`
//! against the fake API server; its Node has this host's first global IPv4 address (peers
//! refuse a loopback next hop), the peers live on 127.0.0.x, each test on its own port.
//! Proves (SPEC B-3, B-4, B-5, B-6, B-8): sessions establish; the peer learns exactly our pod
//! CIDR with our next hop and LOCAL_PREF 100, and End-of-RIB; with graceful restart a stop
//! (SIGTERM, kill -9) leaves our route stale on the peer and a restart refreshes it; without it
//! a stop sends Cease and the route goes; hold-timer expiry and a peer's NOTIFICATION are
//! handled and the session comes back; a peer announcement that disagrees with its Node is
//! logged; `status` shows the peers.
//!
//! `tests/run-all.sh` installs gobgpd and bird2 (as root, with apt-get); without them these
//! tests print a note and pass, like the TLS tests without openssl.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fakeapi::{node_json, FakeApi};
use crate::rig::kr_tunneld_bin;

/// Our pod CIDR and the stand-in peer's.
const OURS: &str = "10.244.7.0/24";
const THEIRS: &str = "10.244.3.0/24";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// This host's first global IPv6 address.
fn host_ipv6() -> Option<std::net::Ipv6Addr> {
    let out = Command::new("ip")
        .args(["-6", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// This host's first global IPv4 address (not loopback: GoBGP treats a loopback next hop as
/// invalid and withdraws the path).
fn host_ipv4() -> Option<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

fn ready(tools: &[&str]) -> Option<Ipv4Addr> {
    for t in tools {
        if !have(t) {
            eprintln!(
                "note: {t} not installed (tests/run-all.sh installs it): BGP peer test skipped"
            );
            return None;
        }
    }
    let ip = host_ipv4();
    if ip.is_none() {
        eprintln!("note: no global IPv4 address on this host: BGP peer test skipped");
    }
    ip
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("krt-bgp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// Wait up to `secs` for `f`; a bound for a condition, not a timing assert.
fn wait(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Kills its process on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gobgpd configuration kube-router gives a node peer (reference §4-§5): AS 64512, the
/// peer's primary IP, remote port = the cluster's BGP port, graceful restart with MP-GR for
/// ipv4-unicast. Debian's 3.10 wants the peer AS in its file (kube-router leaves it 0).
pub fn gobgp_config(me: &str, peer: Ipv4Addr, port: u16, hold: u16) -> String {
    gobgp_config_full(me, peer, port, port, hold, false)
}

/// [`gobgp_config`] with gobgpd listening on `listen` and, with `v6`, ipv6-unicast too.
pub fn gobgp_config_full(
    me: &str,
    peer: Ipv4Addr,
    listen: u16,
    port: u16,
    hold: u16,
    v6: bool,
) -> String {
    let mut c = format!(
        r#"[global.config]
  as = 64512
  router-id = "{me}"
  port = {listen}
  local-address-list = ["{me}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{peer}"
    peer-as = 64512
  [neighbors.timers.config]
    hold-time = {hold}
    keepalive-interval = {ka}
    connect-retry = 120
  [neighbors.transport.config]
    local-address = "{me}"
    remote-port = {port}
  [neighbors.graceful-restart.config]
    enabled = true
    restart-time = 90
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
"#,
        ka = (hold / 3).max(1)
    );
    if v6 {
        c.push_str(
            r#"  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
"#,
        );
    }
    c
}

struct Gobgp {
    _p: Proc,
    api: u16,
}

impl Gobgp {
    fn start(dir: &Path, me: &str, peer: Ipv4Addr, port: u16, hold: u16) -> Gobgp {
        Gobgp::start_with(dir, port, &gobgp_config(me, peer, port, hold))
    }

    fn start_with(dir: &Path, port: u16, config: &str) -> Gobgp {
        let api = port + 20000;
        let conf = dir.join("gobgpd.toml");
        std::fs::write(&conf, config).expect("write config");
        let log = std::fs::File::create(dir.join("gobgpd.log")).expect("log");
        let p = Command::new("gobgpd")
            .arg("-f")
            .arg(&conf)
            .args([
                "--api-hosts",
                &format!("127.0.0.1:{api}"),
                "-p",
                "--pprof-disable",
                "-l",
                "debug",
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start gobgpd");
        let g = Gobgp { _p: Proc(p), api };
        assert!(
            wait(10, || g.cli(&["global"]).is_some()),
            "gobgpd did not start"
        );
        g
    }

    fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("gobgp")
            .args(["-p", &self.api.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The RIB as JSON: prefix -> paths.
    fn rib(&self) -> serde_json::Value {
        self.rib_of("ipv4")
    }

    fn rib_of(&self, family: &str) -> serde_json::Value {
        self.cli(&["global", "rib", "-a", family, "-j"])
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Our path as gobgpd holds it: (next hop, stale, attributes).
    fn learned(&self, prefix: &str) -> Option<(String, bool, String)> {
        let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
        let rib = self.rib_of(family);
        let paths = rib.get(prefix)?.as_array()?;
        let p = paths
            .iter()
            .find(|p| p.get("source-id").is_some() || p.get("neighbor-ip").is_some())?;
        let attrs = p.get("attrs")?.to_string();
        let nh = p
            .get("attrs")?
            .as_array()?
            .iter()
            .find_map(|a| a.get("nexthop").and_then(|n| n.as_str()))?
            .to_string();
        Some((
            nh,
            p.get("stale").and_then(|s| s.as_bool()).unwrap_or(false),
            attrs,
        ))
    }

    fn state(&self, peer: Ipv4Addr) -> String {
        self.cli(&["neighbor", &peer.to_string()])
            .and_then(|s| {
                s.lines()
                    .find(|l| l.trim_start().starts_with("BGP state"))
                    .map(|l| l.to_string())
            })
            .unwrap_or_default()
    }
}

/// The daemon with captured stderr.
struct Kr {
    p: Proc,
    log: Arc<Mutex<String>>,
}

impl Kr {
    fn start(api: &FakeApi, dir: &Path, port: u16, extra: &[&str]) -> Kr {
        let mut p = Command::new(kr_tunneld_bin())
            .args(["--dry-run", "--hostname-override", "a", "--enable-ibgp"])
            .args(["--bgp-port", &port.to_string()])
            .arg("--master")
            .arg(format!("http://{}", api.addr))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kr-tunneld");
        let mut err = p.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                l2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Kr { p: Proc(p), log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn has(&self, s: &str) -> bool {
        self.log().contains(s)
    }

    fn signal(&self, sig: &str) {
        let pid = self.p.0.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success());
    }
}

fn cluster(ip: Ipv4Addr, peer: &str) -> FakeApi {
    let api = FakeApi::start("127.0.0.1:0");
    api.put_node(node_json("a", &[&ip.to_string()], &[OURS]));
    api.put_node(node_json("b", &[peer], &[THEIRS]));
    api
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Session with gobgpd, exactly our pod CIDR with our next hop, EOR; the peer's route kept;
    /// its disagreeing next hop logged (B-5); status shows it; Cease on a stop without GR.
    #[test]
    fn gobgpd_learns_exactly_our_pod_cidr_and_drops_it_on_cease() {
        let Some(ip) = ready(&["gobgpd", "gobgp"]) else {
            return;
        };
        let dir = scratch("gobgp");
        let port = 17901;
        let api = cluster(ip, "127.0.0.3");
        let g = Gobgp::start(&dir, "127.0.0.3", ip, port, 90);
        // gobgpd's own pod CIDR, with a next hop that is not node b's IP (B-5).
        g.cli(&[
            "global",
            "rib",
            "add",
            THEIRS,
            "origin",
            "igp",
            "nexthop",
            "192.0.2.99",
        ])
        .expect("add route");
        let t = Instant::now();
        let kr = Kr::start(&api, &dir, port, &[]);
        assert!(
            wait(30, || g.learned(OURS).is_some()),
            "gobgpd did not learn {OURS}: {}\n{}",
            g.state(ip),
            kr.log()
        );
        let took = t.elapsed();
        eprintln!("established and learned in {took:?} from process start");
        let (nh, stale, attrs) = g.learned(OURS).unwrap();
        assert_eq!(nh, ip.to_string());
        assert!(!stale);
        assert!(
            attrs.contains(r#""type":5,"value":100"#) && attrs.contains(r#""type":1,"value":0"#),
            "{attrs}"
        );
        // Nothing else was announced.
        let rib = g.rib();
        let mut keys: Vec<&str> = rib
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, [THEIRS, OURS]);
        assert!(kr.has("established"), "{}", kr.log());
        let glog = || std::fs::read_to_string(dir.join("gobgpd.log")).unwrap_or_default();
        assert!(
            wait(10, || glog().contains("EOR received")),
            "no End-of-RIB"
        );
        assert!(
            wait(10, || kr.has("announces 10.244.3.0/24 via 192.0.2.99")),
            "{}",
            kr.log()
        );
        // status shows the peer, its state and what it announced.
        assert!(wait(10, || {
            std::fs::read_to_string(dir.join("state/bgp")).is_ok_and(|s| {
                s.contains("established") && s.contains("10.244.3.0/24 via 192.0.2.99")
            })
        }));
        let status = Command::new(kr_tunneld_bin())
            .args(["status", "--state-dir"])
            .arg(dir.join("state"))
            .output()
            .expect("status");
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("127.0.0.3") && text.contains("established"),
            "{text}"
        );
        // Without graceful restart, SIGTERM sends Cease and gobgpd drops the route at once.
        kr.signal("-TERM");
        assert!(
            wait(10, || g.learned(OURS).is_none()),
            "route still there after Cease"
        );
        let glog = std::fs::read_to_string(dir.join("gobgpd.log")).unwrap_or_default();
        assert!(
            glog.contains("Cease") || glog.contains("notification"),
            "{glog}"
        );
    }

    /// Graceful restart: kill -9 and SIGTERM close TCP without NOTIFICATION; gobgpd keeps the
    /// route, stale; a new kr-tunneld (R bit) re-announces it and sends EOR: fresh again.
    #[test]
    fn graceful_restart_keeps_the_route_stale_until_we_are_back() {
        let Some(ip) = ready(&["gobgpd", "gobgp"]) else {
            return;
        };
        let dir = scratch("gr");
        let port = 17902;
        let api = cluster(ip, "127.0.0.4");
        let g = Gobgp::start(&dir, "127.0.0.4", ip, port, 90);
        let gr = [
            "--bgp-graceful-restart",
            "--bgp-graceful-restart-time",
            "60s",
        ];
        for sig in ["-KILL", "-TERM"] {
            let kr = Kr::start(&api, &dir, port, &gr);
            assert!(
                wait(30, || g.learned(OURS).is_some_and(|l| !l.1)),
                "{sig}: not learned fresh: {}",
                kr.log()
            );
            kr.signal(sig);
            assert!(
                wait(10, || g.learned(OURS).is_some_and(|l| l.1)),
                "{sig}: route not stale: {:?}",
                g.learned(OURS)
            );
            let glog = std::fs::read_to_string(dir.join("gobgpd.log")).unwrap_or_default();
            assert!(!glog.contains("Cease"), "{glog}");
            drop(kr);
        }
        let kr = Kr::start(&api, &dir, port, &gr);
        assert!(
            wait(30, || g.learned(OURS).is_some_and(|l| !l.1)),
            "not fresh after restart: {}",
            kr.log()
        );
        // Each session ended the initial table with End-of-RIB, which ends the peer's stale phase.
        let glog = std::fs::read_to_string(dir.join("gobgpd.log")).unwrap_or_default();
        assert_eq!(glog.matches("EOR received").count(), 3, "{glog}");
        assert!(glog.contains("withdraw stale routes"), "{glog}");
        // gobgpd sends End-of-RIB where GR is negotiated: status shows it.
        assert!(wait(10, || {
            std::fs::read_to_string(dir.join("state/bgp")).is_ok_and(|s| s.contains("eor-ipv4"))
        }));
    }

    /// Hold timer: gobgpd frozen (SIGSTOP) → our hold timer (3 s) expires, NOTIFICATION 4/0,
    /// reconnect once it runs again. A NOTIFICATION from the peer (`neighbor disable`) closes the
    /// session; `enable` brings it back.
    #[test]
    fn hold_timer_expiry_and_peer_notification_are_handled() {
        let Some(ip) = ready(&["gobgpd", "gobgp"]) else {
            return;
        };
        let dir = scratch("hold");
        let port = 17903;
        let api = cluster(ip, "127.0.0.5");
        let g = Gobgp::start(&dir, "127.0.0.5", ip, port, 3);
        let kr = Kr::start(&api, &dir, port, &["--bgp-holdtime", "3s"]);
        assert!(wait(30, || g.learned(OURS).is_some()), "{}", kr.log());
        let gpid = g._p.0.id().to_string();
        Command::new("kill")
            .args(["-STOP", &gpid])
            .status()
            .expect("stop");
        let expired = wait(15, || kr.has("hold timer expired"));
        Command::new("kill")
            .args(["-CONT", &gpid])
            .status()
            .expect("cont");
        assert!(expired, "{}", kr.log());
        assert!(
            wait(30, || kr.log().matches(" established").count() >= 2),
            "not back: {}",
            kr.log()
        );
        g.cli(&["neighbor", &ip.to_string(), "disable"])
            .expect("disable");
        assert!(
            wait(10, || kr.has("notification 6/2 from peer")),
            "{}",
            kr.log()
        );
        g.cli(&["neighbor", &ip.to_string(), "enable"])
            .expect("enable");
        assert!(
            wait(30, || kr.log().matches(" established").count() >= 3),
            "not back: {}",
            kr.log()
        );
        assert!(wait(10, || g.learned(OURS).is_some()));
        // Peers follow Nodes (B-2): node b deleted → Cease 6/3, our route gone from it; back →
        // a new session.
        api.delete_node("b");
        assert!(
            wait(10, || kr.has("cease: peer de-configured")),
            "{}",
            kr.log()
        );
        assert!(wait(10, || g.learned(OURS).is_none()));
        api.put_node(node_json("b", &["127.0.0.5"], &[THEIRS]));
        assert!(wait(30, || g.learned(OURS).is_some()), "{}", kr.log());
    }

    /// bird2 as a second implementation, passive (so the session is our active one).
    /// `strict bind`: without it bird listens on 0.0.0.0:port, which fails with EADDRINUSE
    /// whenever our listener on the host address and port came up first (a start-order race
    /// that failed CI), and a passive bird without a listener never gets the session.
    #[test]
    fn bird2_learns_our_pod_cidr() {
        let Some(ip) = ready(&["bird", "birdc"]) else {
            return;
        };
        let dir = scratch("bird");
        let port = 17904;
        let api = cluster(ip, "127.0.0.6");
        let sock = dir.join("bird.ctl");
        let conf = dir.join("bird.conf");
        std::fs::write(
            &conf,
            format!(
                "router id 127.0.0.6;\nprotocol device {{}}\nprotocol bgp kr {{\n  local 127.0.0.6 port {port} as 64512;\n  strict bind on;\n  neighbor {ip} port {port} as 64512;\n  passive on;\n  hold time 90;\n  graceful restart on;\n  ipv4 {{ import all; export none; }};\n}}\n"
            ),
        )
        .expect("bird.conf");
        let b = Command::new("bird")
            .args(["-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird");
        let _b = Proc(b);
        let show = || {
            Command::new("birdc")
                .arg("-s")
                .arg(&sock)
                .args(["show", "route", "protocol", "kr", "all"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let kr = Kr::start(&api, &dir, port, &[]);
        assert!(
            wait(30, || show().contains(OURS)),
            "{}\n{}",
            show(),
            kr.log()
        );
        let routes = show();
        assert!(routes.contains(&format!("BGP.next_hop: {ip}")), "{routes}");
        assert!(
            routes.contains("BGP.local_pref: 100") && routes.contains("BGP.origin: IGP"),
            "{routes}"
        );
        assert_eq!(routes.matches("/24").count(), 1, "{routes}");
    }

    /// Dual stack: the IPv6 pod CIDR goes in MP_REACH_NLRI with our IPv6 next hop, both
    /// families on the one session over IPv4 (as kube-router), each with End-of-RIB.
    #[test]
    fn gobgpd_learns_the_ipv6_pod_cidr_with_our_ipv6_next_hop() {
        let Some(ip) = ready(&["gobgpd", "gobgp"]) else {
            return;
        };
        let Some(ip6) = host_ipv6() else {
            eprintln!("note: no global IPv6 address on this host: test skipped");
            return;
        };
        let dir = scratch("v6");
        let port = 17905;
        let api = FakeApi::start("127.0.0.1:0");
        api.put_node(node_json(
            "a",
            &[&ip.to_string(), &ip6.to_string()],
            &[OURS, "fd00:244:7::/64"],
        ));
        api.put_node(node_json("b", &["127.0.0.7"], &[THEIRS]));
        let g = Gobgp::start_with(
            &dir,
            port,
            &gobgp_config_full("127.0.0.7", ip, port, port, 90, true),
        );
        let kr = Kr::start(
            &api,
            &dir,
            port,
            &["--enable-ipv6", "--bgp-graceful-restart"],
        );
        assert!(
            wait(30, || g.learned("fd00:244:7::/64").is_some()),
            "{}",
            kr.log()
        );
        assert_eq!(g.learned("fd00:244:7::/64").unwrap().0, ip6.to_string());
        assert_eq!(g.learned(OURS).unwrap().0, ip.to_string());
        let glog = || std::fs::read_to_string(dir.join("gobgpd.log")).unwrap_or_default();
        assert!(
            wait(10, || glog().contains("AddressFamily=ipv6-unicast")
                && glog().matches("EOR received").count() == 2),
            "{}",
            glog()
        );
    }

    /// Nothing listens on the BGP port with BGP off; with it on, a peer that cannot be reached
    /// on its port (our active connections fail) still gets a session by connecting to us
    /// (passive side), on our primary IP only.
    #[test]
    fn passive_session_and_nothing_listens_when_off() {
        let Some(ip) = ready(&["gobgpd", "gobgp"]) else {
            return;
        };
        let dir = scratch("passive");
        let port = 17906;
        let api = cluster(ip, "127.0.0.8");
        // BGP off: the daemon runs, nothing listens on the port.
        let off = Command::new(kr_tunneld_bin())
            .args([
                "--dry-run",
                "--hostname-override",
                "a",
                "--bgp-port",
                &port.to_string(),
            ])
            .arg("--master")
            .arg(format!("http://{}", api.addr))
            .arg("--state-dir")
            .arg(dir.join("state-off"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let off = Proc(off);
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            std::net::TcpStream::connect((ip, port)).is_err(),
            "something listens with BGP off"
        );
        assert!(!dir.join("state-off/bgp").exists());
        drop(off);
        // gobgpd listens on another port than the one it dials: our connections are refused.
        let g = Gobgp::start_with(
            &dir,
            port,
            &gobgp_config_full("127.0.0.8", ip, port + 100, port, 90, false),
        );
        let kr = Kr::start(&api, &dir, port, &[]);
        assert!(
            wait(30, || kr.has("established: peer connected")),
            "{}",
            kr.log()
        );
        assert!(kr.has("connect failed"), "{}", kr.log());
        assert!(wait(10, || g.learned(OURS).is_some()));
        // Only the primary IP: not the wildcard, not loopback.
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        // Only configured peers: a connection from this host's address (no peer's) is closed
        // without an OPEN.
        let mut c = std::net::TcpStream::connect((ip, port)).expect("connect to our listener");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(c.read(&mut buf).expect("read"), 0, "not closed: {buf:?}");
    }
}
