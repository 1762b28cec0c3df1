//! The BGP speaker's shell: sockets, threads and the one loop that owns every session.
//!
//! Shell module. One thread ("bgp") owns the [`Peer`] machines and the writing ends of the
//! connections; everything else talks to it through one queue: the Node watch ([`Feed`]),
//! the listener thread (accepted connections), connect threads (one per attempt) and one reader
//! thread per connection (decoded messages). It waits with `recv_timeout` until the next peer
//! deadline, so timers cost nothing when idle. Nothing here decides what to do: [`super::session`]
//! does; this module connects, writes, closes, logs and writes the status file.
//!
//! Connections go from this Node's primary IP to each peer's primary IP at `--bgp-port`; the
//! listener is bound to the primary IP only (never the wildcard) and accepts only configured
//! peers (reference §2, §10.1). Nothing listens while BGP is off: the speaker is not started.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::codec::{self, CodecError, Msg};
use super::session::{self, Action, Event, Local, NodeBgp, Peer, Routes};
use super::Settings;
use crate::config::Config;
use crate::kube::types::Node;
use crate::kube::Update;
use crate::model::Family;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a write to a peer (a full socket buffer means the peer is stuck; the hold
/// timer handles it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the speaker thread is told.
pub enum Cmd {
    /// A Node cache update.
    Nodes(Update<NodeBgp>),
    /// The listener accepted a connection.
    Accepted(TcpStream, SocketAddr),
    /// An outgoing connection `conn` to a peer is up (the write end) or failed.
    Connected(IpAddr, u64, std::io::Result<TcpStream>),
    /// A message (or a decoding error) on a connection.
    Msg(u64, Result<Msg, CodecError>),
    /// A connection closed.
    Closed(u64, String),
    /// Stop.
    Stop,
}

/// The speaker's inbox: a queue and a condition variable (one small instantiation instead of
/// a whole `mpsc` channel per message type; SPEC P-4's binary size).
#[derive(Default)]
pub struct Queue {
    q: Mutex<VecDeque<Cmd>>,
    cv: Condvar,
}

impl Queue {
    fn push(&self, c: Cmd) {
        match self.q.lock() {
            Ok(mut q) => q.push_back(c),
            Err(q) => q.into_inner().push_back(c),
        }
        self.cv.notify_one();
    }

    /// The next command, or `None` after `wait`.
    fn pop(&self, wait: Duration) -> Option<Cmd> {
        let Ok(mut q) = self.q.lock() else {
            return Some(Cmd::Stop);
        };
        let end = Instant::now() + wait;
        loop {
            if let Some(c) = q.pop_front() {
                return Some(c);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            q = match self.cv.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(_) => return Some(Cmd::Stop),
            };
        }
    }
}

/// The sending end for Node updates (the Node watch callback holds one).
#[derive(Clone, Default)]
pub struct Feed(Arc<Queue>);

impl Feed {
    /// Pass a Node cache update to the speaker (converted here, on the watch thread).
    pub fn nodes(&self, u: &Update<Node>) {
        let u = match u {
            Update::Replace(all) => Update::Replace(all.iter().map(super::node_bgp).collect()),
            Update::Upsert(n) => Update::Upsert(super::node_bgp(n)),
            Update::Delete(n) => Update::Delete(super::node_bgp(n)),
        };
        self.0.push(Cmd::Nodes(u));
    }
}

/// A running speaker.
pub struct Speaker {
    q: Arc<Queue>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<Mutex<String>>,
}

impl Speaker {
    /// Start the speaker thread for node `local`, fed by `feed` (create it before the Node
    /// watch starts, so the first list reaches the speaker). Only the families the overlay
    /// manages (`--enable-ipv4`/`--enable-ipv6`) are offered and announced. `page`: the served
    /// metrics page, whose BGP part the speaker keeps current.
    pub fn start(
        cfg: &Config,
        local: String,
        feed: &Feed,
        page: Arc<Mutex<String>>,
    ) -> std::io::Result<Speaker> {
        let metrics = Arc::new(Mutex::new(String::new()));
        let families = [
            (cfg.overlay.ipv4, Family::V4),
            (cfg.overlay.ipv6, Family::V6),
        ];
        let mut core = Core {
            settings: cfg.bgp.clone(),
            families: families.iter().filter(|f| f.0).map(|f| f.1).collect(),
            local_name: local,
            status_path: cfg.state_dir.join("bgp"),
            page,
            q: feed.0.clone(),
            nodes: Vec::new(),
            peers: Vec::new(),
            conns: Vec::new(),
            next_conn: 1,
            local: None,
            routes: Routes::default(),
            listener: None,
            problem: String::new(),
            metrics: metrics.clone(),
            started: Instant::now(),
            publish_at: None,
        };
        let thread = std::thread::Builder::new()
            .name("bgp".into())
            .spawn(move || core.run())?;
        Ok(Speaker {
            q: feed.0.clone(),
            thread: Some(thread),
            metrics,
        })
    }

    /// The BGP metrics as Prometheus text, kept up to date by the speaker.
    pub fn metrics_page(&self) -> Arc<Mutex<String>> {
        self.metrics.clone()
    }

    /// Stop every session (without NOTIFICATION when graceful restart is on, else with Cease)
    /// and wait for the thread.
    pub fn stop(mut self) {
        self.q.push(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct ConnIo {
    id: u64,
    peer: IpAddr,
    /// The write end; `None` while an outgoing connection is being made.
    stream: Option<TcpStream>,
}

struct Core {
    settings: Settings,
    families: Vec<Family>,
    local_name: String,
    status_path: PathBuf,
    page: Arc<Mutex<String>>,
    q: Arc<Queue>,
    nodes: Vec<NodeBgp>,
    peers: Vec<Peer>,
    conns: Vec<ConnIo>,
    next_conn: u64,
    local: Option<(Local, IpAddr)>,
    routes: Routes,
    listener: Option<(SocketAddr, TcpListener)>,
    problem: String,
    metrics: Arc<Mutex<String>>,
    started: Instant,
    publish_at: Option<Instant>,
}

impl Core {
    fn run(&mut self) {
        loop {
            let now = Instant::now();
            let deadline = self
                .peers
                .iter()
                .filter_map(Peer::deadline)
                .chain(self.publish_at)
                .min();
            let wait = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
            let cmd = self.q.pop(wait);
            let now = Instant::now();
            match cmd {
                None => {}
                Some(Cmd::Stop) => {
                    // GR on: close TCP without NOTIFICATION so peers keep our routes (B-6).
                    let cease = if self.settings.gr_time.is_some() {
                        None
                    } else {
                        Some(2)
                    };
                    self.stop_all(cease, now);
                    self.problem = "stopped".into();
                    self.publish();
                    return;
                }
                Some(Cmd::Nodes(u)) => {
                    match u {
                        Update::Replace(all) => self.nodes = all,
                        Update::Upsert(n) => match self.nodes.iter_mut().find(|m| m.name == n.name)
                        {
                            Some(m) if *m == n => continue,
                            Some(m) => *m = n,
                            None => self.nodes.push(n),
                        },
                        Update::Delete(n) => self.nodes.retain(|m| m.name != n.name),
                    }
                    self.sync(now);
                }
                Some(Cmd::Accepted(stream, from)) => {
                    let ip = canonical(from.ip());
                    if self.peer(ip).is_some() {
                        let conn = self.add_conn(ip, Ok(stream));
                        self.event(
                            ip,
                            Event::Connected {
                                conn,
                                outgoing: false,
                            },
                            now,
                        );
                    } else {
                        log::debug!("bgp: refused a connection from {from}: not a peer");
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                Some(Cmd::Connected(ip, conn, res)) => {
                    let ev = match res {
                        Ok(stream) if self.peer(ip).is_none() => {
                            self.conns.retain(|c| c.id != conn);
                            let _ = stream.shutdown(Shutdown::Both);
                            continue;
                        }
                        Ok(stream) => match self.conns.iter_mut().find(|c| c.id == conn) {
                            Some(c) => {
                                c.stream = Some(stream);
                                Event::Connected {
                                    conn,
                                    outgoing: true,
                                }
                            }
                            None => {
                                let _ = stream.shutdown(Shutdown::Both);
                                continue;
                            }
                        },
                        Err(e) => {
                            self.conns.retain(|c| c.id != conn);
                            Event::ConnectFailed(e.to_string())
                        }
                    };
                    self.event(ip, ev, now);
                }
                Some(Cmd::Msg(conn, m)) => {
                    let Some(ip) = self.conn_peer(conn) else {
                        continue;
                    };
                    if matches!(m, Ok(Msg::Update(_))) {
                        // What peers announce shows in status: at most one write a second.
                        self.publish_at.get_or_insert(now + Duration::from_secs(1));
                    }
                    let ev = match m {
                        Ok(m) => Event::Received(conn, m),
                        Err(e) => Event::Malformed(conn, e),
                    };
                    self.event(ip, ev, now);
                }
                Some(Cmd::Closed(conn, why)) => {
                    let Some(ip) = self.conn_peer(conn) else {
                        continue;
                    };
                    self.event(ip, Event::Closed(conn, why), now);
                }
            }
            let due: Vec<IpAddr> = self
                .peers
                .iter()
                .filter(|p| p.deadline().is_some_and(|d| d <= now))
                .map(|p| p.addr)
                .collect();
            for a in due {
                self.event(a, Event::Tick, now);
            }
            if self.publish_at.is_some_and(|t| t <= now) {
                self.publish();
            }
        }
    }

    fn peer(&mut self, ip: IpAddr) -> Option<&mut Peer> {
        self.peers.iter_mut().find(|p| p.addr == ip)
    }

    fn conn_peer(&self, conn: u64) -> Option<IpAddr> {
        self.conns.iter().find(|c| c.id == conn).map(|c| c.peer)
    }

    fn event(&mut self, ip: IpAddr, ev: Event, now: Instant) {
        let Some((local, _)) = &self.local else {
            return;
        };
        let Some(p) = self.peers.iter_mut().find(|p| p.addr == ip) else {
            return;
        };
        let acts = p.handle(ev, local, &self.routes, now);
        self.execute(ip, acts);
    }

    /// A connection and its reader thread: `Ok` an accepted stream, `Err` the addresses to
    /// connect from and to (the thread connects, then reports [`Cmd::Connected`]).
    fn add_conn(&mut self, peer: IpAddr, how: Result<TcpStream, (IpAddr, SocketAddr)>) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        let q = self.q.clone();
        let (mine, theirs) = match how {
            Ok(s) => match s.try_clone() {
                Ok(r) => (Some(s), Ok(r)),
                Err(e) => {
                    log::warn!("bgp: cannot clone a socket: {e}");
                    let _ = s.shutdown(Shutdown::Both);
                    (Some(s), Err(None))
                }
            },
            Err(addrs) => (None, Err(Some(addrs))),
        };
        if let Some(s) = &mine {
            let _ = s.set_nodelay(true);
            let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
        }
        let spawned = std::thread::Builder::new()
            .name("bgp-conn".into())
            .spawn(move || {
                let s = match theirs {
                    Ok(s) => s,
                    Err(None) => return,
                    Err(Some((src, to))) => {
                        let res = connect_from(src, to).and_then(|s| {
                            s.set_nodelay(true)?;
                            s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                            Ok((s.try_clone()?, s))
                        });
                        match res {
                            Ok((w, r)) => {
                                q.push(Cmd::Connected(to.ip(), id, Ok(w)));
                                r
                            }
                            Err(e) => return q.push(Cmd::Connected(to.ip(), id, Err(e))),
                        }
                    }
                };
                read_loop(id, s, &q);
            });
        if let Err(e) = spawned {
            log::warn!("bgp: cannot start a connection thread: {e}");
            if let Some(s) = &mine {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.conns.push(ConnIo {
            id,
            peer,
            stream: mine,
        });
        id
    }

    fn execute(&mut self, ip: IpAddr, acts: Vec<Action>) {
        let mut changed = false;
        for a in acts {
            match a {
                Action::Connect => {
                    if let Some((_, src)) = self.local {
                        let to = SocketAddr::new(ip, self.settings.port);
                        self.add_conn(ip, Err((src, to)));
                    }
                }
                Action::Send(conn, bytes) => {
                    let c = self.conns.iter_mut().find(|c| c.id == conn);
                    if let Some(s) = c.and_then(|c| c.stream.as_mut()) {
                        if let Err(e) = s.write_all(&bytes) {
                            log::debug!("bgp: write to {ip} failed: {e}");
                            // The reader sees the shutdown and reports the close.
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    }
                }
                Action::Close(conn) => {
                    if let Some(i) = self.conns.iter().position(|c| c.id == conn) {
                        if let Some(s) = self.conns.swap_remove(i).stream {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                    }
                }
                Action::State(s, why) => {
                    let node = self
                        .peers
                        .iter()
                        .find(|p| p.addr == ip)
                        .map_or("", |p| p.node.as_str());
                    let sep = if why.is_empty() { "" } else { ": " };
                    log::info!("bgp: peer {ip} (node {node}) {s}{sep}{why}");
                    changed = true;
                }
                Action::Warn(w) => log::warn!("{w}"),
            }
        }
        if changed {
            self.publish();
        }
    }

    /// Recompute our settings, routes and peers from the Node cache (B-2), and act on changes.
    fn sync(&mut self, now: Instant) {
        let Some(me) = self
            .nodes
            .iter()
            .find(|n| n.name == self.local_name)
            .cloned()
        else {
            self.set_problem(format!(
                "this node ({}) is not in the Node list",
                self.local_name
            ));
            return;
        };
        let chosen = session::choose(&me, &self.nodes, self.settings.asn, self.settings.full_mesh)
            .and_then(|(asn, wants)| {
                Ok((
                    asn,
                    session::router_id(&self.settings.router_id, &me)?,
                    wants,
                ))
            });
        let (asn, id, wants) = match chosen {
            Ok(c) => c,
            Err(e) => {
                // Like kube-router, no BGP without a usable identity; retried on every change.
                self.set_problem(format!("BGP not running: {e}"));
                self.stop_all(Some(6), now);
                return;
            }
        };
        self.problem.clear();
        let src = me.primary.unwrap_or(IpAddr::V4(id));
        let fams: Vec<Family> = self
            .families
            .iter()
            .copied()
            .filter(|f| match f {
                Family::V4 => me.best.0.is_some(),
                Family::V6 => me.best.1.is_some(),
            })
            .collect();
        let routes = Routes {
            nets: me
                .cidrs
                .iter()
                .filter(|n| fams.contains(&Family::of_net(n)))
                .copied()
                .collect(),
            nh4: me.best.0.filter(|_| fams.contains(&Family::V4)),
            nh6: me.best.1.filter(|_| fams.contains(&Family::V6)),
        };
        let local = Local {
            asn,
            id,
            hold: self.settings.hold,
            gr_time: self.settings.gr_time,
            families: fams,
        };
        if self.local.as_ref() != Some(&(local.clone(), src)) {
            if self.local.is_some() {
                // Cease, "other configuration change" (RFC 4486).
                self.stop_all(Some(6), now);
            }
            log::info!(
                "bgp: AS {asn}, router id {id}, source {src}, port {}",
                self.settings.port
            );
            self.local = Some((local, src));
            self.listen(src);
        }
        if routes != self.routes {
            self.routes = routes;
            for i in 0..self.peers.len() {
                let acts = self.peers[i].set_routes(&self.routes);
                let a = self.peers[i].addr;
                self.execute(a, acts);
            }
        }
        let mut i = 0;
        while i < self.peers.len() {
            if wants.iter().any(|w| w.addr == self.peers[i].addr) {
                i += 1;
                continue;
            }
            // Node gone: Cease, "peer de-configured".
            let acts = self.peers[i].stop(Some(3), now);
            let a = self.peers[i].addr;
            self.execute(a, acts);
            self.peers.remove(i);
        }
        for w in wants {
            match self.peer(w.addr) {
                Some(p) => {
                    p.node = w.node;
                    p.expect = w.expect;
                }
                None => {
                    log::info!("bgp: new peer {} (node {})", w.addr, w.node);
                    let mut p = Peer::new(w.addr, &w.node, w.asn, now);
                    p.expect = w.expect;
                    self.peers.push(p);
                }
            }
        }
        self.publish();
    }

    fn stop_all(&mut self, cease: Option<u8>, now: Instant) {
        for i in 0..self.peers.len() {
            let acts = self.peers[i].stop(cease, now);
            let a = self.peers[i].addr;
            self.execute(a, acts);
        }
        self.peers.clear();
        self.local = None;
        self.unlisten();
    }

    fn set_problem(&mut self, p: String) {
        if p != self.problem {
            log::error!("bgp: {p}");
            self.problem = p;
            self.publish();
        }
    }

    fn listen(&mut self, src: IpAddr) {
        let addr = SocketAddr::new(src, self.settings.port);
        if self.listener.as_ref().is_some_and(|(a, _)| *a == addr) {
            return;
        }
        self.unlisten();
        let res = TcpListener::bind(addr).and_then(|l| {
            let l2 = l.try_clone()?;
            let q = self.q.clone();
            std::thread::Builder::new()
                .name("bgp-listen".into())
                .spawn(move || {
                    for c in l2.incoming() {
                        let Ok(c) = c else { break };
                        if let Ok(from) = c.peer_addr() {
                            q.push(Cmd::Accepted(c, from));
                        }
                    }
                })?;
            Ok(l)
        });
        match res {
            Ok(l) => {
                log::info!("bgp: listening on {addr}");
                self.listener = Some((addr, l));
            }
            Err(e) => {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    " (ports below 1024 need CAP_NET_BIND_SERVICE; see README)"
                } else {
                    ""
                };
                // Active sessions still work; peers cannot connect to us.
                log::error!("bgp: cannot listen on {addr}: {e}{hint}");
            }
        }
    }

    fn unlisten(&mut self) {
        if let Some((addr, l)) = self.listener.take() {
            // SAFETY: shutdown(2) on a listening socket we own wakes the accept() of the
            // listener thread (Linux returns EINVAL there), which then ends; no memory involved.
            unsafe {
                libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
            }
            log::debug!("bgp: stopped listening on {addr}");
        }
    }

    /// Write the status file and the metrics text.
    fn publish(&mut self) {
        self.publish_at = None;
        let now = Instant::now();
        let peers: Vec<&Peer> = self.peers.iter().collect();
        let head =
            match &self.local {
                Some((l, src)) => {
                    format!(
                "AS {}, router id {}, source {src}, port {}, hold {}s, graceful restart {}{}",
                l.asn,
                l.id,
                self.settings.port,
                l.hold,
                l.gr_time.map_or("off".to_string(), |t| format!("{t}s")),
                if self.listener.is_some() { "" } else { ", NOT listening" },
            )
                }
                None => format!("not running: {}", self.problem),
            };
        let written = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut text = super::status_text(&head, &self.routes, &peers, &|p| {
            now.duration_since(p.since).as_secs()
        });
        text.push_str(&format!(
            "(written at unix time {written}, {}s after start)\n",
            now.duration_since(self.started).as_secs()
        ));
        if let Err(e) = crate::daemon::write_atomic(&self.status_path, text.as_bytes()) {
            log::debug!("bgp: cannot write {}: {e}", self.status_path.display());
        }
        let m = super::metrics_text(&self.routes, &peers);
        // The served page is the overlay's metrics with this text at its end: replace it there
        // now, so the page follows session changes between reconciles.
        match self.page.lock() {
            Ok(mut g) => splice(&mut g, &m),
            Err(g) => splice(&mut g.into_inner(), &m),
        }
        match self.metrics.lock() {
            Ok(mut g) => *g = m,
            Err(g) => *g.into_inner() = m,
        }
    }
}

/// A locked copy of a shared text.
pub fn lock(m: &Mutex<String>) -> String {
    match m.lock() {
        Ok(g) => g.clone(),
        Err(g) => g.into_inner().clone(),
    }
}

fn splice(page: &mut String, bgp: &str) {
    if let Some(i) = page.find("# HELP kr_tunneld_bgp_") {
        page.truncate(i);
    }
    if !page.is_empty() {
        page.push_str(bgp);
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Connect to `to` from address `src` (std cannot bind before connect): socket, bind to
/// `src:0`, connect with a send timeout, then hand the descriptor to a `TcpStream`.
fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let (fam, sa, len) = sockaddr(SocketAddr::new(src, 0));
    let (_, da, dlen) = sockaddr(to);
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own; from here on the TcpStream closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SO_SNDTIMEO bounds connect(2) on Linux.
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    // SAFETY: `sa`/`da` are initialised sockaddr_storage values of the given lengths.
    let rc = unsafe { libc::bind(fd, std::ptr::addr_of!(sa).cast(), len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(da).cast(), dlen) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ));
        }
        return Err(e);
    }
    Ok(stream)
}

fn sockaddr(a: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is aligned for it.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin) };
            (
                libc::AF_INET,
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage, which is aligned for it.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin6) };
            (
                libc::AF_INET6,
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// Read messages from one connection until it fails, passing each to the speaker. The width of
/// AS numbers in AS_PATH follows the peer's OPEN (4-octet AS when it offered it; kr-tunneld
/// always does).
fn read_loop(conn: u64, mut s: TcpStream, q: &Queue) {
    let mut buf: Vec<u8> = Vec::with_capacity(codec::MAX);
    let mut chunk = [0u8; 4096];
    let mut as4 = true;
    loop {
        loop {
            let len = match codec::frame_len(&buf) {
                Ok(Some(n)) if buf.len() >= n => n,
                Ok(_) => break,
                Err(e) => return q.push(Cmd::Msg(conn, Err(e))),
            };
            let m = codec::decode(&buf[..len], as4);
            buf.drain(..len);
            if let Ok(Msg::Open(o)) = &m {
                as4 = o.as4;
            }
            let bad = m.is_err();
            q.push(Cmd::Msg(conn, m));
            if bad {
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return q.push(Cmd::Closed(conn, "closed by peer".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return q.push(Cmd::Closed(conn, e.to_string())),
        }
    }
}
