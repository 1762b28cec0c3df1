//! krt-bench: the performance benchmarks of SPEC §7 (P-1…P-4) and the watch decoder's throughput.
//!
//! Built as a Cargo example (`cargo build --release --example krt-bench`) and run by
//! `tests/bench/run.sh`, which boots the kernel-test VM and runs the kernel parts there as root.
//! Every kernel measurement runs in a fresh network namespace of its own (a thread that called
//! `unshare(CLONE_NEWNET)`; child processes such as `ip` inherit it).
//!
//! ```text
//! krt-bench scale  [--sizes 2,100,1000,5000] [--runs N]   P-1, P-2, P-3 (root, ipip/fou modules)
//! krt-bench daemon --bin PATH [--peers 5000] [--idle 60]   P-4: the real binary vs the fake API
//! krt-bench decode [--secs 2]                               watch/list decode throughput (no root)
//! krt-bench planner [--sizes 1000,5000,10000]               desired + plan alone, in memory (no root)
//! krt-bench memory [--peers 5000]                          heap by stage, in process (root)
//! krt-bench table FILE...                                   the Markdown table of RESULT lines
//! ```
//!
//! Every figure is printed as a line `RESULT <key> <value>`; `table` turns the collected lines
//! into the README's table.
//!
//! * P-1: converge N peers from nothing with the library (`NetlinkKernel::read` →
//!   `nodes::desired` → `reconcile::plan` → `NetlinkKernel::apply`), then `ip -batch` with the
//!   *same operations* (the plan rendered as iproute2 commands) in another fresh namespace. Our
//!   state is then re-read and re-planned in iproute2's namespace: an empty plan proves both
//!   sides built the same objects. The ratio divides our full converge (read + plan + apply)
//!   by `ip -batch`'s wall time less its start-up (an empty batch, measured the same way).
//!   Best of `--runs` alternating runs.
//! * P-2: in the converged namespace, a resync (read + desired + plan; apply only if ops): time
//!   (best of 3), and on one more pass the netlink messages actually sent, decoded from the
//!   socket's trace log: dumps (`NLM_F_DUMP`), other reads, and writes.
//! * P-3: then one peer more, five times, through the daemon's own event path (`Daemon::on_nodes`,
//!   `Daemon::reconcile`, the status file): median time, and that it took 3 writes and no dump.
//! * P-4: the release binary against the fake API server (tests/fakeapi.rs) with N + 1 nodes:
//!   time to converge, VmHWM/VmRSS from /proc/PID/status, utime+stime over `--idle` seconds
//!   from /proc/PID/stat, and the number of log lines per created tunnel.
//! * decode: `kube::types::decode_event::<Node>` over the recorded watch lines, the whole
//!   `WatchMachine` (decode + cache) over the same lines, and `decode_list` of N synthetic Nodes.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "../fakeapi.rs"]
#[allow(dead_code)]
mod fakeapi;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kr_tunneld::apply::Kernel;
use kr_tunneld::config::{Config, Overlay};
use kr_tunneld::daemon::Daemon;
use kr_tunneld::kube::types::{decode_event, decode_list, WatchEvent};
use kr_tunneld::kube::watch::{Next, WatchMachine};
use kr_tunneld::kube::Update;
use kr_tunneld::kube::{Node, WatchConfig};
use kr_tunneld::model::{Encap, Family, FouPort, NextHop, Op, Ownership, RouteKind};
use kr_tunneld::netlink::NetlinkKernel;
use kr_tunneld::nodes::{self, NodeInfo};
use kr_tunneld::reconcile;

/// Our node: its name, address (on a dummy `eth0`, /24) and pod CIDR.
const LOCAL: &str = "local";
const LOCAL_IP: &str = "10.0.0.1";
const LOCAL_CIDR: &str = "10.244.0.0/24";

// ------------------------------------------------------------------------------------ output --

fn result(key: &str, value: impl std::fmt::Display) {
    println!("RESULT {key} {value}");
    let _ = std::io::stdout().flush();
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

// ----------------------------------------------------------------- netlink message counting --

/// Counts the netlink messages the socket layer sends, from its trace records
/// (`netlink send N bytes: <hex>`). Enabled only around the counted pass: at any other time the
/// max level is Off and logging costs nothing.
struct Counter;

static COUNTING: AtomicBool = AtomicBool::new(false);
static DUMPS: AtomicU64 = AtomicU64::new(0);
static READS: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static SENDS: AtomicU64 = AtomicU64::new(0);

impl log::Log for Counter {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        COUNTING.load(Ordering::Relaxed) && m.target().starts_with("kr_tunneld::netlink::socket")
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let text = r.args().to_string();
        let Some(hex) = text
            .strip_prefix("netlink send ")
            .and_then(|s| s.split_once(": "))
            .map(|(_, h)| h)
        else {
            return;
        };
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect();
        SENDS.fetch_add(1, Ordering::Relaxed);
        let mut rest = &bytes[..];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            const NLM_F_DUMP: u16 = 0x300;
            const GENL_ID_CTRL: u16 = 0x10;
            const CTRL_CMD_GETFAMILY: u8 = 3;
            // rtnetlink RTM_GET* types are 2 mod 4 (RTM_GETLINK 18, …). The genl controller's
            // type is 16 like RTM_NEWLINK (another socket); its payload starts with the genl
            // command, RTM_NEWLINK's with ifi_family (AF_UNSPEC, AF_INET, AF_INET6).
            let genl_lookup = ty == GENL_ID_CTRL && rest.get(16) == Some(&CTRL_CMD_GETFAMILY);
            let read = (16..100).contains(&ty) && ty % 4 == 2 || genl_lookup;
            if std::env::var_os("KRT_BENCH_DEBUG").is_some() {
                eprintln!("netlink message type {ty} flags {flags:#x} len {len}");
            }
            if flags & NLM_F_DUMP == NLM_F_DUMP {
                DUMPS.fetch_add(1, Ordering::Relaxed);
            } else if read {
                READS.fetch_add(1, Ordering::Relaxed);
            } else {
                WRITES.fetch_add(1, Ordering::Relaxed);
            }
            if len < 16 {
                break;
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }

    fn flush(&self) {}
}

static COUNTER: Counter = Counter;

/// Runs `f` with the counter on; returns (dumps, other reads, writes, send calls).
fn counted<R>(f: impl FnOnce() -> R) -> (R, [u64; 4]) {
    for c in [&DUMPS, &READS, &WRITES, &SENDS] {
        c.store(0, Ordering::Relaxed);
    }
    COUNTING.store(true, Ordering::Relaxed);
    log::set_max_level(log::LevelFilter::Trace);
    let r = f();
    log::set_max_level(log::LevelFilter::Off);
    COUNTING.store(false, Ordering::Relaxed);
    let n = [&DUMPS, &READS, &WRITES, &SENDS].map(|c| c.load(Ordering::Relaxed));
    (r, n)
}

// ------------------------------------------------------------------------------- namespaces --

/// Runs `f` on a new thread in a fresh network namespace (see tests/rig.rs).
fn in_netns<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            // SAFETY: unshare(2) takes a flag word and touches no memory of ours; CLONE_NEWNET
            // moves only this (scoped, short-lived) thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {} (run as root)",
                std::io::Error::last_os_error()
            );
            f()
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// `ip -batch -` with `script` on stdin; panics unless it succeeds.
fn ip_batch_stdin(script: &str) {
    let mut c = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run ip");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write to ip");
    let st = c.wait().expect("wait for ip");
    assert!(st.success(), "ip -batch failed: {script}");
}

/// The host side of a node: `lo` up, `eth0` (dummy, MTU 1500) with our address.
fn setup_host() {
    ip_batch_stdin(&format!(
        "link set lo up\nlink add eth0 type dummy\nlink set eth0 up mtu 1500\n\
         addr add {LOCAL_IP}/24 dev eth0\n"
    ));
}

// ---------------------------------------------------------------------------------- cluster --

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000 + i + 1) // 172.16.0.1 …: outside eth0's subnet → tunnels
}

fn peer_cidr(i: u32) -> String {
    format!("10.{}.{}.0/24", 128 + i / 256, i % 256)
}

fn local_node() -> NodeInfo {
    NodeInfo {
        name: LOCAL.into(),
        addresses: vec![("InternalIP".into(), LOCAL_IP.into())],
        pod_cidrs: vec![LOCAL_CIDR.into()],
        ..NodeInfo::default()
    }
}

fn peer_node(i: u32) -> NodeInfo {
    NodeInfo {
        name: format!("p{i:05}"),
        addresses: vec![("InternalIP".into(), peer_ip(i).to_string())],
        pod_cidrs: vec![peer_cidr(i)],
        ..NodeInfo::default()
    }
}

fn cluster(peers: u32) -> Vec<NodeInfo> {
    std::iter::once(local_node())
        .chain((0..peers).map(peer_node))
        .collect()
}

/// The daemon's settings with every flag at its default but the state directory.
fn config(state_dir: &Path) -> Config {
    let dir = state_dir.display().to_string();
    let kr_tunneld::cli::Parsed::Args(a) =
        kr_tunneld::cli::parse(["--state-dir", dir.as_str()], &|_| None).expect("flags")
    else {
        panic!("flags do not parse to arguments")
    };
    Config::from_args(&a).expect("config")
}

/// A Node object's JSON as the API serves it (tests/fakeapi.rs), from the bench's node data.
fn node_value(n: &NodeInfo) -> serde_json::Value {
    let ips: Vec<&str> = n.addresses.iter().map(|(_, a)| a.as_str()).collect();
    let cidrs: Vec<&str> = n.pod_cidrs.iter().map(String::as_str).collect();
    fakeapi::node_json(&n.name, &ips, &cidrs)
}

/// A Node object as the API serves it.
fn api_node(n: &NodeInfo) -> Node {
    serde_json::from_value(node_value(n)).expect("node json")
}

/// The daemon's overlay settings with every flag at its default (IPv4, ipip, subnet, table 77).
fn overlay() -> Overlay {
    let kr_tunneld::cli::Parsed::Args(a) =
        kr_tunneld::cli::parse(std::iter::empty::<&str>(), &|_| None).expect("default flags")
    else {
        panic!("default flags do not parse to arguments")
    };
    Config::from_args(&a).expect("default config").overlay
}

// ------------------------------------------------------------------------------ one pass --

/// One reconcile pass as `Daemon::reconcile` does it, timed by phase.
#[derive(Debug, Clone, Default)]
struct Pass {
    read: Duration,
    plan: Duration,
    apply: Duration,
    ops: usize,
    failed: usize,
    plan_ops: Vec<Op>,
}

impl Pass {
    fn total(&self) -> Duration {
        self.read + self.plan + self.apply
    }
}

fn pass(k: &mut NetlinkKernel, nodes: &[NodeInfo], cfg: &Overlay) -> Pass {
    let own = &cfg.own;
    let t0 = Instant::now();
    let actual = k.read(own).expect("read the kernel");
    let t1 = Instant::now();
    let mut diags = Vec::new();
    let d = nodes::desired(LOCAL, nodes, &actual, cfg, &mut diags).expect("local node");
    let owned: BTreeSet<FouPort> = d.fou.iter().copied().collect();
    let p = reconcile::plan(&d, &actual, own, &owned);
    let t2 = Instant::now();
    let failed = if p.ops.is_empty() {
        Vec::new()
    } else {
        k.apply(own, &p.ops)
    };
    let t3 = Instant::now();
    for (i, e) in failed.iter().take(5) {
        eprintln!("op {i} ({}) failed: {e}", p.ops[*i]);
    }
    Pass {
        read: t1 - t0,
        plan: t2 - t1,
        apply: t3 - t2,
        ops: p.ops.len(),
        failed: failed.len(),
        plan_ops: p.ops,
    }
}

/// The plan's ops as iproute2 batch commands (the same kernel operations, one request each).
fn ip_script(ops: &[Op], own: &Ownership) -> String {
    let mut s = String::new();
    for op in ops {
        match op {
            Op::AddFouPort(p) => {
                let _ = writeln!(
                    s,
                    "fou add port {} gue{}",
                    p.port,
                    if p.family == Family::V6 { " -6" } else { "" }
                );
            }
            Op::CreateTunnel(t) => {
                assert_eq!(t.family, Family::V4, "the bench is IPv4 only");
                let remote = if t.remote.is_unspecified() {
                    "any".to_string()
                } else {
                    t.remote.to_string()
                };
                let encap = match t.encap {
                    Encap::None => String::new(),
                    Encap::Gue { dport, .. } => {
                        format!(" encap gue encap-sport auto encap-dport {dport}")
                    }
                    Encap::Other { .. } => panic!("unexpected encap"),
                };
                let _ = writeln!(
                    s,
                    "link add {} mtu {} group {} up type ipip local {} remote {remote} ttl {} \
                     pmtudisc{encap} mode ipip",
                    t.name, t.mtu, own.link_group, t.local, t.ttl
                );
            }
            Op::ReplaceRoute(r) => {
                assert_eq!(r.kind, RouteKind::Unicast);
                let nh = match &r.nexthop {
                    NextHop::Dev(d) => format!("dev {d}"),
                    NextHop::Via(g) => format!("via {g}"),
                };
                let src = r.src.map(|a| format!(" src {a}")).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "route replace {} {nh}{src} proto {} table {}",
                    r.dst, r.protocol, r.table
                );
            }
            Op::AddRule(r) => {
                let from = r.src.map(|n| format!(" from {n}")).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "rule add{from} lookup {} priority {} protocol {}",
                    r.table, r.priority, r.protocol
                );
            }
            other => panic!("a converge from nothing should not need {other}"),
        }
    }
    s
}

fn time_ip_batch(path: &Path) -> Duration {
    let t = Instant::now();
    let st = Command::new("ip")
        .arg("-batch")
        .arg(path)
        .status()
        .expect("run ip");
    let took = t.elapsed();
    assert!(st.success(), "ip -batch {} failed", path.display());
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Frees the namespace's links now (synchronously) so that tearing it down does not overlap the
/// next measurement.
fn teardown(k: &mut NetlinkKernel, own: &Ownership) {
    let _ = k.delete_link_group(own.link_group);
}

// ------------------------------------------------------------------------------ P-1 … P-3 --

/// What one size measured on our side (first run only for P-2/P-3).
struct Ours {
    pass: Pass,
    objects: (usize, usize, usize),
}

/// Counts owned links, routes and rules.
fn objects(k: &mut NetlinkKernel, own: &Ownership) -> (usize, usize, usize) {
    let a = k.read(own).expect("read");
    (
        a.links.iter().filter(|l| own.owns_link(l)).count(),
        a.routes.len(),
        a.rules.len(),
    )
}

fn ours_run(n: u32, cfg: &Overlay, extras: bool) -> Ours {
    let nodes_n = cluster(n);
    in_netns(|| {
        setup_host();
        let mut k = NetlinkKernel::open().expect("open netlink");
        let p = pass(&mut k, &nodes_n, cfg);
        assert_eq!(p.failed, 0, "{n} peers: {} ops failed", p.failed);
        let objects = objects(&mut k, &cfg.own);
        if extras {
            // P-2: resync with nothing to change.
            let mut times = Vec::new();
            for _ in 0..3 {
                let r = pass(&mut k, &nodes_n, cfg);
                assert_eq!(r.ops, 0, "resync planned {} ops: {:?}", r.ops, r.plan_ops);
                times.push(r);
            }
            let best = times
                .iter()
                .min_by_key(|r| r.total())
                .cloned()
                .unwrap_or_default();
            result(&format!("p2.{n}.resync_ms"), ms(best.total()));
            result(&format!("p2.{n}.read_ms"), ms(best.read));
            result(&format!("p2.{n}.plan_ms"), ms(best.plan));
            let (r, [dumps, reads, writes, sends]) = counted(|| pass(&mut k, &nodes_n, cfg));
            assert_eq!(r.ops, 0);
            result(&format!("p2.{n}.dumps"), dumps);
            result(&format!("p2.{n}.other_reads"), reads);
            result(&format!("p2.{n}.writes"), writes);
            result(&format!("p2.{n}.sends"), sends);
            // P-3: one more peer, five times, the way the daemon takes a Node event: the cache
            // update and `Daemon::reconcile` (after one full pass to start from, as at start-up),
            // then the status file it writes after every pass.
            let state =
                std::env::temp_dir().join(format!("krt-bench-p3-{}-{n}", std::process::id()));
            let mut d = Daemon::new(
                config(&state),
                LOCAL.into(),
                NetlinkKernel::open().expect("open netlink"),
                Box::new(std::io::sink()),
            );
            d.on_nodes(Update::Replace(nodes_n.iter().map(api_node).collect()));
            let o = d.reconcile(Instant::now()).expect("first pass");
            assert_eq!(o.planned, 0, "{}", o.summary);
            let mut totals = Vec::new();
            let mut parts = Vec::new();
            for j in 0..5 {
                let before = d.metrics.incremental;
                assert!(d.on_nodes(Update::Upsert(api_node(&peer_node(n + j)))));
                let (o, [dumps, _, writes, _]) =
                    counted(|| d.reconcile(Instant::now()).expect("pass"));
                assert_eq!((o.planned, o.failed), (3, 0), "{}", o.summary); // tunnel, 2 routes
                assert_eq!((writes, dumps), (3, 0));
                assert_eq!(d.metrics.incremental, before + 1, "not incremental");
                // Timed without the counter (hex-formatting every message costs).
                let t0 = Instant::now();
                d.on_nodes(Update::Upsert(api_node(&peer_node(n + 100 + j))));
                let o = d.reconcile(Instant::now()).expect("pass");
                let t1 = Instant::now();
                d.write_status();
                let t2 = Instant::now();
                assert_eq!((o.planned, o.failed), (3, 0), "{}", o.summary);
                totals.push(t2 - t0);
                parts.push((t2 - t0, t1 - t0, t2 - t1));
            }
            let med = median(totals);
            let (_, pass, status) = parts
                .iter()
                .find(|p| p.0 == med)
                .copied()
                .unwrap_or_default();
            result(&format!("p3.{n}.add_one_ms"), ms(med));
            result(&format!("p3.{n}.pass_ms"), ms(pass));
            result(&format!("p3.{n}.status_ms"), ms(status));
            result(&format!("p3.{n}.ops"), 3);
            drop(d);
            let _ = std::fs::remove_dir_all(&state);
        }
        teardown(&mut k, &cfg.own);
        Ours { pass: p, objects }
    })
}

fn theirs_run(script: &Path, cfg: &Overlay, want: (usize, usize, usize)) -> Duration {
    in_netns(|| {
        setup_host();
        let took = time_ip_batch(script);
        let mut k = NetlinkKernel::open().expect("open netlink");
        let got = objects(&mut k, &cfg.own);
        assert_eq!(got, want, "ip -batch built other objects than we did");
        took
    })
}

/// iproute2's side, checked: after `ip -batch`, our planner has nothing to do there.
fn theirs_equivalent(script: &Path, n: u32, cfg: &Overlay) {
    let nodes_n = cluster(n);
    in_netns(|| {
        setup_host();
        time_ip_batch(script);
        let mut k = NetlinkKernel::open().expect("open netlink");
        let actual = k.read(&cfg.own).expect("read");
        let d = nodes::desired(LOCAL, &nodes_n, &actual, cfg, &mut Vec::new()).expect("local");
        let owned: BTreeSet<FouPort> = d.fou.iter().copied().collect();
        let p = reconcile::plan(&d, &actual, &cfg.own, &owned);
        assert!(
            p.ops.is_empty(),
            "after ip -batch our plan is not empty ({} ops), first: {:?}",
            p.ops.len(),
            p.ops.first()
        );
        teardown(&mut k, &cfg.own);
    });
}

fn scale(sizes: &[u32], runs: usize) {
    let cfg = overlay();
    let dir = std::env::temp_dir().join(format!("krt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let empty = dir.join("empty.batch");
    std::fs::write(&empty, "").expect("write");
    let startup = (0..3)
        .map(|_| in_netns(|| time_ip_batch(&empty)))
        .min()
        .unwrap_or_default();
    result("p1.ip_startup_ms", ms(startup));
    for &n in sizes {
        let t = Instant::now();
        let first = ours_run(n, &cfg, true);
        let script = dir.join(format!("converge-{n}.batch"));
        std::fs::write(&script, ip_script(&first.pass.plan_ops, &cfg.own)).expect("write");
        if n < 10 {
            // P-3's baseline only.
            eprintln!("size {n}: {:?}", t.elapsed());
            continue;
        }
        theirs_equivalent(&script, n, &cfg);
        let mut ours = vec![first.pass.clone()];
        let mut theirs = vec![theirs_run(&script, &cfg, first.objects)];
        for _ in 1..runs {
            ours.push(ours_run(n, &cfg, false).pass);
            theirs.push(theirs_run(&script, &cfg, first.objects));
        }
        let best = ours
            .iter()
            .min_by_key(|p| p.total())
            .cloned()
            .unwrap_or_default();
        let ip = theirs.iter().min().copied().unwrap_or_default();
        let ip_net = ip.saturating_sub(startup);
        let (links, routes, rules) = first.objects;
        result(&format!("p1.{n}.ops"), best.ops);
        result(
            &format!("p1.{n}.objects"),
            format!("{links}/{routes}/{rules}"),
        );
        result(&format!("p1.{n}.ours_ms"), ms(best.total()));
        result(&format!("p1.{n}.ours_read_ms"), ms(best.read));
        result(&format!("p1.{n}.ours_plan_ms"), ms(best.plan));
        result(&format!("p1.{n}.ours_apply_ms"), ms(best.apply));
        result(&format!("p1.{n}.ip_ms"), ms(ip));
        result(&format!("p1.{n}.ip_net_ms"), ms(ip_net));
        result(
            &format!("p1.{n}.ratio"),
            format!("{:.2}", best.total().as_secs_f64() / ip_net.as_secs_f64()),
        );
        result(
            &format!("p1.{n}.ratio_apply_vs_ip"),
            format!("{:.2}", best.apply.as_secs_f64() / ip.as_secs_f64()),
        );
        eprintln!("size {n}: {:?}", t.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------------------------- P-4 --

fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name in parentheses: state is field 3; utime 14, stime 15.
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

fn daemon(bin: &Path, peers: u32, idle: u64, wrap: &str) {
    let cfg = overlay();
    let want_links = peers as usize + 1; // + the receive-only tunnel
    let dir = std::env::temp_dir().join(format!("krt-bench-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let log_path = dir.join("daemon.log");
    in_netns(|| {
        setup_host();
        let api = fakeapi::FakeApi::start("127.0.0.1:0");
        api.put_node(fakeapi::node_json(LOCAL, &[LOCAL_IP], &[LOCAL_CIDR]));
        for i in 0..peers {
            let ip = peer_ip(i).to_string();
            let cidr = peer_cidr(i);
            api.put_node(fakeapi::node_json(&format!("p{i:05}"), &[&ip], &[&cidr]));
        }
        let log = std::fs::File::create(&log_path).expect("log file");
        let t = Instant::now();
        // `--wrap "valgrind --tool=massif ..."` runs the daemon under a profiler (the /proc
        // figures are then the wrapper's).
        let mut cmd = match wrap.split_whitespace().collect::<Vec<_>>().split_first() {
            Some((w, wargs)) => {
                let mut c = Command::new(w);
                c.args(wargs).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args([
                "--master",
                &format!("http://{}", api.addr),
                "--hostname-override",
                LOCAL,
                "--log-level",
                "info",
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kr-tunneld");
        let pid = child.id();
        // Converged when the daemon logs its first summary with every peer and no failure
        // (polling the kernel instead would compete with it for the one vCPU, and its dumps
        // get interrupted while links are being created).
        let done = format!("reconciled: peers={peers} ");
        let mut converged = None;
        let mut took_ms = String::new();
        while t.elapsed() < Duration::from_secs(900) {
            std::thread::sleep(Duration::from_millis(250));
            if let Ok(Some(st)) = child.try_wait() {
                panic!("kr-tunneld exited: {st}");
            }
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(&done)) {
                assert!(line.contains(" failed=0 "), "first pass failed: {line}");
                took_ms = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("took="))
                    .unwrap_or("")
                    .to_string();
                converged = Some(t.elapsed());
                break;
            }
        }
        let converged = converged.expect("kr-tunneld did not converge in 900 s");
        let mut k = NetlinkKernel::open().expect("open netlink");
        let got = objects(&mut k, &cfg.own);
        assert_eq!(
            got,
            (want_links, 2 * peers as usize, 1),
            "kernel state after convergence"
        );
        // Let the first pass finish its logging before measuring the idle time.
        std::thread::sleep(Duration::from_secs(2));
        let hwm_converged = proc_status(pid, "VmHWM:");
        // SAFETY: sysconf(3) reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = cpu_ticks(pid) as f64 / hz;
        let c0 = cpu_ticks(pid);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(idle));
        let c1 = cpu_ticks(pid);
        let idle_s = t0.elapsed().as_secs_f64();
        let hwm = proc_status(pid, "VmHWM:");
        let rss = proc_status(pid, "VmRSS:");
        let threads = proc_status(pid, "Threads:");
        // SAFETY: kill(2) with our own child's pid and SIGTERM.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let st = child.wait().expect("wait");
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let creates = text.matches("create tunnel kt").count();
        result("p4.peers", peers);
        result("p4.converge_s", format!("{:.1}", converged.as_secs_f64()));
        result("p4.converge_cpu_s", format!("{busy:.2}"));
        result("p4.first_pass", took_ms);
        result("p4.vmhwm_kib", hwm);
        result("p4.vmhwm_at_converge_kib", hwm_converged);
        result("p4.vmrss_kib", rss);
        result("p4.threads", threads);
        result("p4.idle_window_s", format!("{idle_s:.0}"));
        result(
            "p4.idle_cpu_s",
            format!("{:.2}", (c1.saturating_sub(c0)) as f64 / hz),
        );
        result(
            "p4.log_lines_per_created_tunnel",
            format!("{:.1}", creates as f64 / want_links as f64),
        );
        result("p4.exit", st.code().unwrap_or(-1));
        teardown(&mut k, &cfg.own);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------- memory --

/// The system allocator, counting live and peak bytes (for `krt-bench memory`: where the
/// daemon's peak RSS goes, stage by stage).
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { std::alloc::System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size() as u64, Ordering::Relaxed) + l.size() as u64;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let q = unsafe { std::alloc::System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
            let now = LIVE.fetch_add(new as u64, Ordering::Relaxed) + new as u64;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap now and the peak since the last call, in KiB; resets the peak to now.
fn heap_mark() -> (u64, u64) {
    let live = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.swap(live, Ordering::Relaxed);
    (live / 1024, peak / 1024)
}

/// Heap use of the daemon's stages at `peers` peers, in process: the Node list as the API sends
/// it (pages of 500) decoded, the cache, the first (converging) pass, a pass with nothing to
/// do, and one Node event.
fn memory(peers: u32) {
    in_netns(|| {
        setup_host();
        let state = std::env::temp_dir().join(format!("krt-bench-mem-{}", std::process::id()));
        let mark = |stage: &str| {
            let (live, peak) = heap_mark();
            result(&format!("mem.{peers}.{stage}.live_kib"), live);
            result(&format!("mem.{peers}.{stage}.peak_kib"), peak);
        };
        mark("start");
        let all = cluster(peers);
        let mut objects: Vec<Node> = Vec::new();
        for page in all.chunks(500) {
            let items: Vec<serde_json::Value> = page.iter().map(node_value).collect();
            let body = serde_json::to_vec(&serde_json::json!({
                "kind": "NodeList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"}, "items": items}))
            .expect("json");
            drop(items);
            let page = decode_list::<Node>(&body).expect("decode");
            objects.extend(page.items);
        }
        drop(all);
        mark("list_decoded");
        let mut d = Daemon::new(
            config(&state),
            LOCAL.into(),
            NetlinkKernel::open().expect("open netlink"),
            Box::new(std::io::sink()),
        );
        d.on_nodes(Update::Replace(objects));
        mark("cache");
        let o = d.reconcile(Instant::now()).expect("first pass");
        assert_eq!(o.failed, 0, "{}", o.summary);
        mark("converge");
        let o = d.reconcile(Instant::now()).expect("resync");
        assert_eq!(o.planned, 0, "{}", o.summary);
        d.request_full();
        let o = d.reconcile(Instant::now()).expect("resync");
        assert_eq!(o.planned, 0, "{}", o.summary);
        mark("resync");
        d.on_nodes(Update::Upsert(api_node(&peer_node(peers))));
        let o = d.reconcile(Instant::now()).expect("event");
        assert_eq!(o.planned, 3, "{}", o.summary);
        mark("event");
        let mut k = NetlinkKernel::open().expect("open netlink");
        teardown(&mut k, &overlay().own);
        drop(d);
        mark("end");
        let _ = std::fs::remove_dir_all(&state);
    });
}

// ---------------------------------------------------------------------------------- decode --

const RECORDED: &str = include_str!("../data/watch-nodes-http11.raw");

fn decode(secs: f64, list_nodes: u32) {
    let lines: Vec<&str> = RECORDED.lines().filter(|l| l.starts_with('{')).collect();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    // decode_event alone.
    let mut n = 0u64;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        for l in &lines {
            match decode_event::<Node>(l.as_bytes()) {
                Ok(WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_)) => {}
                Ok(WatchEvent::Bookmark(_)) => {}
                other => panic!("recorded line did not decode: {other:?}"),
            }
            n += 1;
        }
    }
    let el = t.elapsed().as_secs_f64();
    result("decode.recorded_lines", lines.len());
    result("decode.avg_event_bytes", bytes / lines.len().max(1));
    result("decode.events_per_s", format!("{:.0}", n as f64 / el));
    result(
        "decode.mb_per_s",
        format!(
            "{:.1}",
            n as f64 * (bytes as f64 / lines.len() as f64) / el / 1e6
        ),
    );
    // The whole watch machine: line splitting, decoding, cache, updates.
    let mut m = WatchMachine::<Node>::new(WatchConfig::default(), 1);
    let now = Instant::now();
    assert!(matches!(m.next(now), Next::List { .. }));
    m.list_page(
        br#"{"kind":"NodeList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}"#,
        now,
    );
    assert!(matches!(m.next(now), Next::Watch { .. }));
    m.watch_opened(now);
    let mut chunk = Vec::new();
    for l in &lines {
        chunk.extend_from_slice(l.as_bytes());
        chunk.push(b'\n');
    }
    let mut n = 0u64;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        let flow = m.watch_data(&chunk, now);
        assert_eq!(flow, kr_tunneld::kube::watch::Flow::Continue);
        n += m.take_output().len() as u64;
    }
    result(
        "decode.machine_updates_per_s",
        format!("{:.0}", n as f64 / t.elapsed().as_secs_f64()),
    );
    // A list of synthetic Nodes (what the first list costs).
    let items: Vec<serde_json::Value> = (0..list_nodes)
        .map(|i| {
            fakeapi::node_json(
                &format!("p{i:05}"),
                &[&peer_ip(i).to_string()],
                &[&peer_cidr(i)],
            )
        })
        .collect();
    let body = serde_json::json!({"kind": "NodeList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "7"}, "items": items})
    .to_string();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let page = decode_list::<Node>(body.as_bytes()).expect("list");
        best = best.min(t.elapsed());
        assert_eq!(page.items.len(), list_nodes as usize);
    }
    result(&format!("decode.list_{list_nodes}_ms"), ms(best));
    result(
        &format!("decode.list_{list_nodes}_body_kib"),
        body.len() / 1024,
    );
}

// --------------------------------------------------------------------------------- planner --

/// The pure core alone, on an in-memory kernel (`apply::FakeKernel`) already converged to N
/// peers: `nodes::desired` and `reconcile::plan` for a resync with nothing to change. Shows how
/// the planner scales without the kernel's dumps (host, no root).
fn planner(sizes: &[u32]) {
    use kr_tunneld::apply::FakeKernel;
    use kr_tunneld::model::{Actual, Addr, Link, LinkKind};
    let cfg = overlay();
    for &n in sizes {
        let host = Actual {
            links: vec![Link {
                index: 2,
                name: "eth0".into(),
                kind: LinkKind::Other("dummy".into()),
                group: 0,
                mtu: 1500,
                up: true,
                tunnel: None,
            }],
            addrs: vec![Addr {
                index: 2,
                addr: format!("{LOCAL_IP}/24").parse().expect("addr"),
            }],
            ..Actual::default()
        };
        let mut k = FakeKernel::with(host);
        let ns = cluster(n);
        let actual = k.read(&cfg.own).expect("read");
        let d = nodes::desired(LOCAL, &ns, &actual, &cfg, &mut Vec::new()).expect("local");
        let p = reconcile::plan(&d, &actual, &cfg.own, &BTreeSet::new());
        assert!(k.apply(&cfg.own, &p.ops).is_empty());
        let actual = k.read(&cfg.own).expect("read");
        let mut best_d = Duration::MAX;
        let mut best_p = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let d = nodes::desired(LOCAL, &ns, &actual, &cfg, &mut Vec::new()).expect("local");
            best_d = best_d.min(t.elapsed());
            let owned: BTreeSet<FouPort> = d.fou.iter().copied().collect();
            let t = Instant::now();
            let p = reconcile::plan(&d, &actual, &cfg.own, &owned);
            best_p = best_p.min(t.elapsed());
            assert!(p.ops.is_empty(), "{:?}", p.ops.first());
        }
        result(&format!("planner.{n}.desired_ms"), ms(best_d));
        result(&format!("planner.{n}.plan_ms"), ms(best_p));
        // The daemon's incremental path alone (in-memory kernel): one Node event, median of 51.
        let state = std::env::temp_dir().join(format!("krt-bench-pl-{}-{n}", std::process::id()));
        let mut d = Daemon::new(config(&state), LOCAL.into(), k, Box::new(std::io::sink()));
        d.on_nodes(Update::Replace(ns.iter().map(api_node).collect()));
        d.reconcile(Instant::now()).expect("first pass");
        let mut times = Vec::new();
        for j in 0..51 {
            let node = api_node(&peer_node(n + j));
            let t = Instant::now();
            d.on_nodes(Update::Upsert(node));
            let o = d.reconcile(Instant::now()).expect("pass");
            times.push(t.elapsed());
            assert_eq!((o.planned, o.failed), (3, 0), "{}", o.summary);
        }
        assert_eq!(d.metrics.incremental, 51);
        result(
            &format!("planner.{n}.event_us"),
            format!("{:.0}", median(times).as_secs_f64() * 1e6),
        );
        drop(d);
        let _ = std::fs::remove_dir_all(&state);
    }
}

// ----------------------------------------------------------------------------------- table --

/// Prints the README table from RESULT lines (later lines win).
fn table(files: &[PathBuf]) {
    let mut r: BTreeMap<String, String> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for l in text.lines() {
            if let Some(rest) = l.trim().strip_prefix("RESULT ") {
                if let Some((k, v)) = rest.split_once(' ') {
                    r.insert(k.to_string(), v.trim().to_string());
                }
            }
        }
    }
    let g = |k: &str| r.get(k).cloned().unwrap_or_else(|| "–".into());
    println!("| target | measure | result |");
    println!("|---|---|---|");
    let sizes: BTreeSet<u32> = r
        .keys()
        .filter_map(|k| k.strip_prefix("p1.")?.split('.').next()?.parse().ok())
        .collect();
    for n in &sizes {
        println!(
            "| P-1 | converge {n} peers from nothing ({} ops; links/routes/rules {}): ours (read+plan+apply) vs `ip -batch` less its {} ms start-up | {} ms vs {} ms: **ratio {}** (apply {} ms; apply vs whole `ip -batch` {}) |",
            g(&format!("p1.{n}.ops")),
            g(&format!("p1.{n}.objects")),
            g("p1.ip_startup_ms"),
            g(&format!("p1.{n}.ours_ms")),
            g(&format!("p1.{n}.ip_net_ms")),
            g(&format!("p1.{n}.ratio")),
            g(&format!("p1.{n}.ours_apply_ms")),
            g(&format!("p1.{n}.ratio_apply_vs_ip")),
        );
    }
    for n in &sizes {
        println!(
            "| P-2 | resync, nothing to change, {n} peers | **{} writes**, {} dumps, {} other reads, {} sends; {} ms (read {} ms, desired+plan {} ms) |",
            g(&format!("p2.{n}.writes")),
            g(&format!("p2.{n}.dumps")),
            g(&format!("p2.{n}.other_reads")),
            g(&format!("p2.{n}.sends")),
            g(&format!("p2.{n}.resync_ms")),
            g(&format!("p2.{n}.read_ms")),
            g(&format!("p2.{n}.plan_ms")),
        );
    }
    let p3: BTreeSet<u32> = r
        .keys()
        .filter_map(|k| k.strip_prefix("p3.")?.split('.').next()?.parse().ok())
        .collect();
    for n in &p3 {
        println!(
            "| P-3 | one peer added to {n} (3 ops): Node event → `Daemon::reconcile` → status file, median of 5 | {} ms (pass {} ms, status file {} ms) |",
            g(&format!("p3.{n}.add_one_ms")),
            g(&format!("p3.{n}.pass_ms")),
            g(&format!("p3.{n}.status_ms")),
        );
    }
    let ratio_of = |key: &str, a: u32, b: u32| -> String {
        let x: Option<f64> = r.get(&format!("p3.{a}.{key}")).and_then(|v| v.parse().ok());
        let y: Option<f64> = r.get(&format!("p3.{b}.{key}")).and_then(|v| v.parse().ok());
        match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "–".into(),
        }
    };
    println!(
        "| P-3 | ratio 1,000 / 2 (5,000 / 2): event to kernel updated; with the status file | **{}** ({}); {} ({}) |",
        ratio_of("pass_ms", 1000, 2),
        ratio_of("pass_ms", 5000, 2),
        ratio_of("add_one_ms", 1000, 2),
        ratio_of("add_one_ms", 5000, 2)
    );
    println!(
        "| P-4 | peak RSS (VmHWM), real binary, {} peers via the fake API | **{} KiB** (at convergence {} KiB; VmRSS after idle {} KiB; {} threads) |",
        g("p4.peers"),
        g("p4.vmhwm_kib"),
        g("p4.vmhwm_at_converge_kib"),
        g("p4.vmrss_kib"),
        g("p4.threads"),
    );
    println!(
        "| P-4 | stripped release binary | **{} bytes** |",
        g("p4.binary_bytes")
    );
    println!(
        "| P-4 | CPU while idle (utime+stime) | **{} s over {} s** (converging took {} s wall from start, {} s CPU; first pass {} by its own log) |",
        g("p4.idle_cpu_s"),
        g("p4.idle_window_s"),
        g("p4.converge_s"),
        g("p4.converge_cpu_s"),
        g("p4.first_pass"),
    );
    println!(
        "| (O-6) | daemon log lines per created tunnel at info level | {} |",
        g("p4.log_lines_per_created_tunnel"),
    );
    let pl: BTreeSet<u32> = r
        .keys()
        .filter_map(|k| k.strip_prefix("planner.")?.split('.').next()?.parse().ok())
        .collect();
    if !pl.is_empty() {
        let cells: Vec<String> = pl
            .iter()
            .map(|n| {
                format!(
                    "{n}: {} + {} ms (one event {} µs)",
                    g(&format!("planner.{n}.desired_ms")),
                    g(&format!("planner.{n}.plan_ms")),
                    g(&format!("planner.{n}.event_us"))
                )
            })
            .collect();
        println!(
            "| (P-2/P-3) | pure core on the host, in-memory kernel: resync with nothing to change (`nodes::desired` + `reconcile::plan`); one Node event through `Daemon::reconcile` (median of 51) | {} |",
            cells.join("; ")
        );
    }
    println!(
        "| watch | decode recorded Node events ({} lines, ~{} B each) | **{} events/s** ({} MB/s); whole watch machine {} updates/s; list of 5,000 Nodes ({} KiB) {} ms |",
        g("decode.recorded_lines"),
        g("decode.avg_event_bytes"),
        g("decode.events_per_s"),
        g("decode.mb_per_s"),
        g("decode.machine_updates_per_s"),
        g("decode.list_5000_body_kib"),
        g("decode.list_5000_ms"),
    );
}

// ------------------------------------------------------------------------------------ main --

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let _ = log::set_logger(&COUNTER);
    log::set_max_level(log::LevelFilter::Off);
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("scale") => {
            let sizes: String = arg(&args, "--sizes", "2,100,1000,5000".to_string());
            let sizes: Vec<u32> = sizes.split(',').filter_map(|s| s.parse().ok()).collect();
            scale(&sizes, arg(&args, "--runs", 2usize));
        }
        Some("daemon") => {
            let bin: PathBuf = arg(&args, "--bin", PathBuf::from("target/release/kr-tunneld"));
            daemon(
                &bin,
                arg(&args, "--peers", 5000u32),
                arg(&args, "--idle", 60u64),
                &arg(&args, "--wrap", String::new()),
            );
        }
        Some("decode") => decode(arg(&args, "--secs", 2.0f64), arg(&args, "--list", 5000u32)),
        Some("planner") => {
            let sizes: String = arg(&args, "--sizes", "2,1000,5000,10000".to_string());
            planner(
                &sizes
                    .split(',')
                    .filter_map(|s| s.parse().ok())
                    .collect::<Vec<_>>(),
            );
        }
        Some("memory") => memory(arg(&args, "--peers", 5000u32)),
        Some("table") => table(&args[1..].iter().map(PathBuf::from).collect::<Vec<_>>()),
        _ => {
            eprintln!("usage: krt-bench scale [--sizes 2,100,1000,5000] [--runs 2] | daemon --bin PATH [--peers 5000] [--idle 60] | decode [--secs 2] [--list 5000] | planner [--sizes 1000,5000,10000] | table FILE...");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
