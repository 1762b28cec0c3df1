//! One BGP peer's session state machine (RFC 4271 §8, simplified but correct), and the choice
//! of peers from Node objects as kube-router makes it (`reference/kube-router-bgp.md` §3).
//!
//! Core module: pure. The shell feeds [`Event`]s with the current time and executes the
//! returned [`Action`]s (connect, send, close, log); it never decides anything. A peer holds at
//! most two connections (one it initiated, one it accepted) until collision resolution (§6.8)
//! keeps one. Timers are deadlines compared with `now`: connect retry with backoff, hold timer
//! (negotiated as the smaller hold time; 0 = none, 1 and 2 are refused), keepalive at hold/3.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::codec::{self, CodecError, GracefulRestart, Msg, Open, Update};
use crate::model::Family;

/// Hold timer while waiting for the peer's OPEN (RFC 4271 §8: "a large value", 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);
/// Longest wait between connection attempts. kube-router itself retries only every 90-120 s and
/// refuses connections for 5 s after a session loss, so kr-tunneld keeps trying every few
/// seconds (reference §10.1).
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Session state (RFC 4271 §8.2.2). `Connect`: a connection attempt is under way; `Active`:
/// waiting for the next attempt, or for the peer to connect; `Idle`: stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Stopped.
    Idle,
    /// Connecting.
    Connect,
    /// Waiting to connect again (and listening).
    Active,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for a KEEPALIVE.
    OpenConfirm,
    /// Up.
    Established,
}

/// Every state, for metrics.
pub const STATES: [State; 6] = [
    State::Idle,
    State::Connect,
    State::Active,
    State::OpenSent,
    State::OpenConfirm,
    State::Established,
];

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Idle => "idle",
            State::Connect => "connect",
            State::Active => "active",
            State::OpenSent => "opensent",
            State::OpenConfirm => "openconfirm",
            State::Established => "established",
        })
    }
}

/// This speaker's side of every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// Our AS (the peers' too: iBGP only).
    pub asn: u32,
    /// BGP identifier (router ID).
    pub id: Ipv4Addr,
    /// Hold time we offer (seconds; 0 or at least 3).
    pub hold: u16,
    /// Graceful restart time when `--bgp-graceful-restart` is on.
    pub gr_time: Option<u16>,
    /// Families we offer (those enabled that this node has an address of).
    pub families: Vec<Family>,
}

/// What we announce: this node's pod CIDRs and the next hop of each family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Pod CIDRs, both families.
    pub nets: Vec<IpNet>,
    /// Next hop of IPv4 routes (our best IPv4).
    pub nh4: Option<Ipv4Addr>,
    /// Next hop of IPv6 routes (our best IPv6).
    pub nh6: Option<Ipv6Addr>,
}

impl Routes {
    /// The routes of one family that can be announced (they have a next hop).
    fn of(&self, f: Family) -> Vec<IpNet> {
        let has_nh = match f {
            Family::V4 => self.nh4.is_some(),
            Family::V6 => self.nh6.is_some(),
        };
        self.nets
            .iter()
            .filter(|n| has_nh && Family::of_net(n) == f)
            .copied()
            .collect()
    }

    fn announce(&self, f: Family, nlri: Vec<IpNet>) -> Update {
        Update {
            nlri,
            // iBGP attributes as GoBGP sets them for kube-router (reference §6).
            origin: Some(0),
            as_path: Some(Vec::new()),
            next_hop: self.nh4.filter(|_| f == Family::V4),
            mp_next_hop: self.nh6.filter(|_| f == Family::V6),
            local_pref: Some(100),
            ..Update::default()
        }
    }
}

/// Input to a peer's machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A TCP connection is up: one we initiated (after [`Action::Connect`]) or one we accepted.
    Connected {
        /// Connection id, chosen by the shell.
        conn: u64,
        /// We initiated it.
        outgoing: bool,
    },
    /// The connection attempt failed.
    ConnectFailed(String),
    /// A message arrived.
    Received(u64, Msg),
    /// A message could not be decoded.
    Malformed(u64, CodecError),
    /// The TCP connection closed or failed.
    Closed(u64, String),
    /// Timers only.
    Tick,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer; report `Connected` or `ConnectFailed`.
    Connect,
    /// Write bytes on a connection.
    Send(u64, Vec<u8>),
    /// Close a connection (after the sends before it).
    Close(u64),
    /// The peer's state changed (log one line, update metrics).
    State(State, String),
    /// Something worth a warning (a peer's announcement that disagrees with its Node: B-5).
    Warn(String),
}

#[derive(Debug, Clone)]
struct Conn {
    id: u64,
    outgoing: bool,
    state: State,
    hold: Duration,
    hold_at: Option<Instant>,
    ka_at: Option<Instant>,
    open: Option<Open>,
}

/// One peer: its connections, timers, what it announced and what we sent it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address (its Node's primary IP).
    pub addr: IpAddr,
    /// Its Node's name.
    pub node: String,
    /// The AS its OPEN must carry.
    pub remote_as: u32,
    /// Current state.
    pub state: State,
    /// When the state last changed.
    pub since: Instant,
    /// Routes it announced, with their next hop (kept for status and metrics only).
    pub received: Vec<(IpNet, IpAddr)>,
    /// Families it sent End-of-RIB for in this session.
    pub eor: Vec<Family>,
    /// Families negotiated in this session.
    pub families: Vec<Family>,
    /// Its Node's pod CIDRs and IPs: what its announcements are checked against (B-5).
    pub expect: (Vec<IpNet>, Vec<IpAddr>),
    conns: Vec<Conn>,
    connecting: bool,
    next_connect: Instant,
    failures: u32,
    /// Sessions established since start (the first carries the R bit).
    sessions: u32,
    sent: Vec<IpNet>,
    sent_nh: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    warned: Vec<IpNet>,
    why: String,
}

fn notification(code: u8, sub: u8) -> Vec<u8> {
    codec::encode_notification(code, sub, &[])
}

impl Peer {
    /// A new peer; the first connection attempt is due at once.
    pub fn new(addr: IpAddr, node: &str, remote_as: u32, now: Instant) -> Peer {
        Peer {
            addr,
            node: node.to_string(),
            remote_as,
            state: State::Active,
            since: now,
            received: Vec::new(),
            eor: Vec::new(),
            families: Vec::new(),
            expect: (Vec::new(), Vec::new()),
            conns: Vec::new(),
            connecting: false,
            next_connect: now,
            failures: 0,
            sessions: 0,
            sent: Vec::new(),
            sent_nh: (None, None),
            warned: Vec::new(),
            why: String::new(),
        }
    }

    /// The next time [`Event::Tick`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        let mut d = (self.conns.is_empty() && !self.connecting && self.state != State::Idle)
            .then_some(self.next_connect);
        for c in &self.conns {
            for t in [c.hold_at, c.ka_at].into_iter().flatten() {
                d = Some(d.map_or(t, |d: Instant| d.min(t)));
            }
        }
        d
    }

    fn open(&self, local: &Local) -> Vec<u8> {
        codec::encode_open(&Open {
            asn: local.asn,
            hold: local.hold,
            id: local.id,
            families: local.families.clone(),
            mp: true,
            as4: true,
            route_refresh: true,
            gr: local.gr_time.map(|time| GracefulRestart {
                // The R bit on the first session after a start (kube-router sets it on every
                // start): a GR peer then sends its routes at once instead of waiting for ours.
                restarting: self.sessions == 0,
                time,
                // F: kr-tunneld leaves the kernel state in place over restarts.
                families: local.families.iter().map(|f| (*f, true)).collect(),
            }),
        })
    }

    /// Feed one event; returns what to do.
    pub fn handle(
        &mut self,
        ev: Event,
        local: &Local,
        routes: &Routes,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::Connected { conn, outgoing } => {
                if outgoing {
                    self.connecting = false;
                }
                if self.state == State::Idle || self.conns.len() >= 2 {
                    out.push(Action::Close(conn));
                } else {
                    out.push(Action::Send(conn, self.open(local)));
                    self.conns.push(Conn {
                        id: conn,
                        outgoing,
                        state: State::OpenSent,
                        hold: OPEN_HOLD,
                        hold_at: Some(now + OPEN_HOLD),
                        ka_at: None,
                        open: None,
                    });
                }
            }
            Event::ConnectFailed(e) => {
                self.connecting = false;
                self.retry_later(now);
                self.why = format!("connect failed: {e}");
            }
            Event::Received(conn, msg) => self.received(conn, msg, local, routes, now, &mut out),
            Event::Malformed(conn, e) => {
                out.push(Action::Send(conn, notification(e.code, e.sub)));
                self.drop_conn(
                    conn,
                    format!("malformed message from peer: {e}"),
                    now,
                    &mut out,
                );
            }
            Event::Closed(conn, e) => {
                self.drop_conn(conn, format!("connection closed: {e}"), now, &mut out);
            }
            Event::Tick => {}
        }
        self.timers(local, now, &mut out);
        self.update_state(now, &mut out);
        out
    }

    fn retry_later(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let secs = 1u64 << self.failures.min(4).saturating_sub(1);
        self.next_connect = now + Duration::from_secs(secs).min(MAX_BACKOFF);
    }

    fn drop_conn(&mut self, conn: u64, why: String, now: Instant, out: &mut Vec<Action>) {
        let Some(i) = self.conns.iter().position(|c| c.id == conn) else {
            return;
        };
        let c = self.conns.remove(i);
        out.push(Action::Close(conn));
        if c.state == State::Established {
            self.received.clear();
            self.eor.clear();
            self.families.clear();
            self.sent.clear();
            self.warned.clear();
        }
        if self.conns.is_empty() {
            self.retry_later(now);
        }
        self.why = why;
    }

    fn timers(&mut self, local: &Local, now: Instant, out: &mut Vec<Action>) {
        let mut expired = Vec::new();
        for c in &mut self.conns {
            if c.hold_at.is_some_and(|t| now >= t) {
                expired.push(c.id);
            } else if c.ka_at.is_some_and(|t| now >= t) {
                out.push(Action::Send(c.id, codec::encode_keepalive()));
                c.ka_at = Some(now + c.hold / 3);
            }
        }
        for id in expired {
            out.push(Action::Send(id, notification(4, 0)));
            self.drop_conn(id, "hold timer expired".into(), now, out);
        }
        let _ = local;
        if self.conns.is_empty()
            && !self.connecting
            && self.state != State::Idle
            && now >= self.next_connect
        {
            self.connecting = true;
            out.push(Action::Connect);
        }
    }

    fn update_state(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.state == State::Idle {
            return;
        }
        let s = self
            .conns
            .iter()
            .map(|c| c.state)
            .max()
            .unwrap_or(if self.connecting {
                State::Connect
            } else {
                State::Active
            });
        if s != self.state {
            self.state = s;
            self.since = now;
            out.push(Action::State(s, std::mem::take(&mut self.why)));
        }
    }

    fn refuse(&mut self, conn: u64, code: u8, sub: u8, now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Send(conn, notification(code, sub)));
        let why = format!(
            "sent notification {code}/{sub} ({})",
            codec::notification_name(code, sub)
        );
        self.drop_conn(conn, why, now, out);
    }

    fn received(
        &mut self,
        conn: u64,
        msg: Msg,
        local: &Local,
        routes: &Routes,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.conns.iter().position(|c| c.id == conn) else {
            return;
        };
        if let Msg::Notification(code, sub, _) = msg {
            let why = format!(
                "notification {code}/{sub} from peer ({})",
                codec::notification_name(code, sub)
            );
            self.drop_conn(conn, why, now, out);
            return;
        }
        let c = &mut self.conns[i];
        if let Some(t) = c.hold_at.as_mut() {
            *t = now + c.hold;
        }
        match (c.state, msg) {
            (State::OpenSent, Msg::Open(o)) => self.on_open(i, o, local, now, out),
            (State::OpenConfirm, Msg::Keepalive) => {
                self.conns[i].state = State::Established;
                self.why = if self.conns[i].outgoing {
                    "we connected"
                } else {
                    "peer connected"
                }
                .into();
                self.sessions += 1;
                self.failures = 0;
                let fams = self.families.clone();
                for f in fams {
                    self.send_family(conn, f, routes, true, out);
                }
                self.sent_nh = (routes.nh4, routes.nh6);
                // Another connection still opening loses to the established one (§6.8).
                let others: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|o| o.id != conn)
                    .map(|o| o.id)
                    .collect();
                for o in others {
                    self.refuse(o, 6, 7, now, out);
                }
            }
            (State::Established, Msg::Keepalive) => {}
            (State::Established, Msg::Update(u)) => self.on_update(u, out),
            (State::Established, Msg::RouteRefresh(Some(f))) if self.families.contains(&f) => {
                self.send_family(conn, f, routes, false, out);
            }
            (State::Established, Msg::RouteRefresh(_)) => {}
            (State::OpenSent, _) => self.refuse(conn, 5, 1, now, out),
            (State::OpenConfirm, _) => self.refuse(conn, 5, 2, now, out),
            (_, _) => self.refuse(conn, 5, 3, now, out),
        }
    }

    fn on_open(&mut self, i: usize, o: Open, local: &Local, now: Instant, out: &mut Vec<Action>) {
        let conn = self.conns[i].id;
        if o.asn != self.remote_as {
            return self.refuse(conn, 2, 2, now, out);
        }
        if o.id.is_unspecified() || o.id == local.id {
            return self.refuse(conn, 2, 3, now, out);
        }
        if o.hold == 1 || o.hold == 2 {
            return self.refuse(conn, 2, 6, now, out);
        }
        // Collision resolution (RFC 4271 §6.8): with another connection past OpenSent, the
        // speaker with the higher BGP identifier keeps the connection it initiated. An
        // established session stays, unless graceful restart was negotiated on it: then the
        // new connection is the peer restarting (RFC 4724 §4.2) and replaces it.
        if let Some(j) =
            (0..self.conns.len()).find(|&j| j != i && self.conns[j].state >= State::OpenConfirm)
        {
            let other = &self.conns[j];
            let loser = if other.state == State::Established {
                let gr =
                    local.gr_time.is_some() && other.open.as_ref().is_some_and(|p| p.gr.is_some());
                if gr {
                    other.id
                } else {
                    conn
                }
            } else {
                let ours_wins = u32::from(local.id) > u32::from(o.id);
                if self.conns[i].outgoing == ours_wins {
                    other.id
                } else {
                    conn
                }
            };
            if loser == conn {
                return self.refuse(conn, 6, 7, now, out);
            }
            if self.conns[j].state == State::Established {
                // The peer restarted: drop the old session quietly.
                let old = self.conns[j].id;
                self.drop_conn(old, "peer restarted (new connection)".into(), now, out);
            } else {
                self.refuse(loser, 6, 7, now, out);
            }
        }
        let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) else {
            return;
        };
        let hold = o.hold.min(local.hold);
        c.hold = Duration::from_secs(u64::from(hold));
        c.hold_at = (hold > 0).then(|| now + c.hold);
        c.ka_at = (hold > 0).then(|| now + c.hold / 3);
        c.state = State::OpenConfirm;
        let theirs: &[Family] = if o.mp { &o.families } else { &[Family::V4] };
        self.families = local
            .families
            .iter()
            .filter(|f| theirs.contains(f))
            .copied()
            .collect();
        c.open = Some(o);
        out.push(Action::Send(conn, codec::encode_keepalive()));
    }

    fn on_update(&mut self, u: Update, out: &mut Vec<Action>) {
        if let Some(f) = u.eor {
            if !self.eor.contains(&f) {
                self.eor.push(f);
            }
            return;
        }
        self.received.retain(|(n, _)| !u.withdrawn.contains(n));
        self.warned.retain(|n| !u.withdrawn.contains(n));
        for n in u.nlri {
            let nh = match n {
                IpNet::V4(_) => u.next_hop.map(IpAddr::V4),
                IpNet::V6(_) => u.mp_next_hop.map(IpAddr::V6),
            };
            let Some(nh) = nh else { continue };
            let (cidrs, ips) = &self.expect;
            if (!cidrs.contains(&n) || !ips.contains(&nh)) && !self.warned.contains(&n) {
                self.warned.push(n);
                let why = if cidrs.contains(&n) {
                    "next hop"
                } else {
                    "prefix"
                };
                out.push(Action::Warn(format!(
                    "bgp: peer {} (node {}) announces {n} via {nh}: the {why} disagrees with its Node object; kept for status only, tunnels follow Node objects",
                    self.addr, self.node
                )));
            }
            match self.received.iter_mut().find(|(m, _)| *m == n) {
                Some(e) => e.1 = nh,
                None => self.received.push((n, nh)),
            }
        }
    }

    fn send_family(
        &mut self,
        conn: u64,
        f: Family,
        routes: &Routes,
        eor: bool,
        out: &mut Vec<Action>,
    ) {
        let nets = routes.of(f);
        if !nets.is_empty() {
            self.sent.retain(|n| !nets.contains(n));
            self.sent.extend(nets.iter().copied());
            out.push(Action::Send(
                conn,
                codec::encode_update(&routes.announce(f, nets), true),
            ));
        }
        if eor {
            let u = Update {
                eor: Some(f),
                ..Update::default()
            };
            out.push(Action::Send(conn, codec::encode_update(&u, true)));
        }
    }

    /// Our routes changed: withdraw what went, announce what came (all of a family whose next
    /// hop changed), on an established session.
    pub fn set_routes(&mut self, routes: &Routes) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(conn) = self
            .conns
            .iter()
            .find(|c| c.state == State::Established)
            .map(|c| c.id)
        else {
            return out;
        };
        for f in self.families.clone() {
            let now = routes.of(f);
            let nh_changed = match f {
                Family::V4 => self.sent_nh.0 != routes.nh4,
                Family::V6 => self.sent_nh.1 != routes.nh6,
            };
            let fam = |n: &&IpNet| Family::of_net(n) == f;
            let gone: Vec<IpNet> = self
                .sent
                .iter()
                .filter(fam)
                .filter(|n| !now.contains(n))
                .copied()
                .collect();
            let new: Vec<IpNet> = now
                .iter()
                .filter(|n| nh_changed || !self.sent.contains(n))
                .copied()
                .collect();
            if !gone.is_empty() {
                self.sent.retain(|n| !gone.contains(n));
                let u = Update {
                    withdrawn: gone,
                    ..Update::default()
                };
                out.push(Action::Send(conn, codec::encode_update(&u, true)));
            }
            if !new.is_empty() {
                self.sent.retain(|n| !new.contains(n));
                self.sent.extend(new.iter().copied());
                out.push(Action::Send(
                    conn,
                    codec::encode_update(&routes.announce(f, new), true),
                ));
            }
        }
        self.sent_nh = (routes.nh4, routes.nh6);
        out
    }

    /// Stop the peer. `cease`: send a Cease NOTIFICATION with this subcode first (2 =
    /// administrative shutdown, 3 = peer de-configured); `None` closes TCP without one, which
    /// peers with graceful restart treat as a restart and keep our routes (B-6).
    pub fn stop(&mut self, cease: Option<u8>, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for c in std::mem::take(&mut self.conns) {
            if let Some(sub) = cease {
                out.push(Action::Send(c.id, notification(6, sub)));
            }
            out.push(Action::Close(c.id));
        }
        if self.state != State::Idle {
            self.state = State::Idle;
            self.since = now;
            let why = match cease {
                Some(sub) => format!("stopped, sent {}", codec::notification_name(6, sub)),
                None => "stopped without notification (graceful restart)".to_string(),
            };
            out.push(Action::State(State::Idle, why));
        }
        out
    }
}

/// A Node as BGP peer selection sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeBgp {
    /// Node name.
    pub name: String,
    /// Primary IP (SPEC N-2).
    pub primary: Option<IpAddr>,
    /// Best IPv4 and IPv6 (SPEC N-2).
    pub best: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    /// Pod CIDRs (SPEC N-3).
    pub cidrs: Vec<IpNet>,
    /// `kube-router.io/node.asn`.
    pub asn: Option<String>,
    /// `kube-router.io/rr.server`.
    pub rr_server: Option<String>,
    /// `kube-router.io/rr.client`.
    pub rr_client: Option<String>,
}

/// A peer to have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// Its primary IP.
    pub addr: IpAddr,
    /// Node name.
    pub node: String,
    /// Its AS (= ours).
    pub asn: u32,
    /// Its pod CIDRs and IPs, to check its announcements against.
    pub expect: (Vec<IpNet>, Vec<IpAddr>),
}

fn rr_ok(v: &str) -> bool {
    v.parse::<u32>().is_ok() || v.parse::<IpAddr>().is_ok()
}

/// Our AS and the peers to have, as kube-router chooses them (reference §3): every other Node
/// whose primary IP is of our primary IP's family; with `full_mesh` off, only Nodes whose
/// `node.asn` equals ours (ours is then required); when we are a route-reflector client, only
/// route-reflector servers. kr-tunneld is never a route reflector itself (it would have to
/// reflect the other nodes' routes): an `rr.server` annotation on this node is an error.
pub fn choose(
    local: &NodeBgp,
    nodes: &[NodeBgp],
    cluster_asn: u32,
    full_mesh: bool,
) -> Result<(u32, Vec<Want>), String> {
    let asn = if full_mesh {
        cluster_asn
    } else {
        let a = local.asn.as_deref().ok_or(
            "no kube-router.io/node.asn annotation on this node (--nodes-full-mesh=false)",
        )?;
        a.trim()
            .parse::<u32>()
            .ok()
            .filter(|a| *a != 0)
            .ok_or_else(|| format!("bad kube-router.io/node.asn '{a}'"))?
    };
    if local.rr_server.is_some() {
        return Err(
            "this node is annotated kube-router.io/rr.server: kr-tunneld is not a route reflector"
                .into(),
        );
    }
    if let Some(v) = local.rr_client.as_deref().filter(|v| !rr_ok(v)) {
        return Err(format!(
            "bad kube-router.io/rr.client '{v}': expected a number or an IP"
        ));
    }
    let primary = local.primary.ok_or("this node has no IP address")?;
    let mut out = Vec::new();
    for n in nodes {
        let Some(addr) = n.primary else { continue };
        if n.name == local.name || addr == primary || addr.is_ipv4() != primary.is_ipv4() {
            continue;
        }
        if local.rr_client.is_some() && n.rr_server.is_none() {
            continue;
        }
        if !full_mesh && n.asn.as_deref().and_then(|a| a.trim().parse::<u32>().ok()) != Some(asn) {
            continue;
        }
        let mut ips: Vec<IpAddr> = vec![addr];
        ips.extend(n.best.0.map(IpAddr::V4));
        ips.extend(n.best.1.map(IpAddr::V6));
        ips.dedup();
        out.push(Want {
            addr,
            node: n.name.clone(),
            asn,
            expect: (n.cidrs.clone(), ips),
        });
    }
    Ok((asn, out))
}

/// The router ID: `--router-id` (an IPv4 address, or `generate`: the FNV-32a hash of the
/// primary IP's bytes, as kube-router), else the primary IP if IPv4, else the best IPv4 (SPEC
/// B-1; an IPv6-only node needs `--router-id`).
pub fn router_id(flag: &str, local: &NodeBgp) -> Result<Ipv4Addr, String> {
    match flag {
        "" => match local.primary {
            Some(IpAddr::V4(a)) => Ok(a),
            _ => local
                .best
                .0
                .ok_or_else(|| "this node has no IPv4 address: set --router-id".into()),
        },
        "generate" => {
            let bytes = match local.primary.ok_or("this node has no IP address")? {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            let mut h: u32 = 0x811c_9dc5;
            for b in bytes {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
            Ok(Ipv4Addr::from(h))
        }
        s => s
            .parse::<Ipv4Addr>()
            .ok()
            .filter(|a| !a.is_unspecified())
            .ok_or_else(|| format!("bad --router-id '{s}'")),
    }
}

#[cfg(test)]
mod tests;
