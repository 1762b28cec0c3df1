//! The receiving side of DSR (SPEC D-4): find the network namespace of each local endpoint
//! without a container-runtime socket, and configure it: an `ipip` (`ip6tnl`) receive link
//! holding the VIPs, `rp_filter` off on it, a GUE port when the real servers use GUE, and a
//! `from VIP` policy route with `advmss`. What to do is decided by the pure
//! [`crate::dsr::plan_pod`]; this module finds namespaces, enters them, reads, and applies.
//!
//! Shell module. It must never leave a thread of the daemon in a pod's namespace other than the
//! short-lived one it spawns per namespace (the main thread owns the host's sockets), and never
//! writes `/proc/sys` (the unit runs with `ProtectKernelTunables=yes`): `rp_filter` is set per
//! device through `IFLA_AF_SPEC`/`IFLA_INET_CONF`, and a strict `all` value is reported.
//!
//! # Finding pod namespaces
//!
//! Candidates are the bind mounts in `/run/netns` (containerd and CRI-O name theirs `cni-…`) and
//! `/proc/<pid>/ns/net` of every process, deduplicated by (device, inode) of the nsfs file, minus
//! the daemon's own namespace (never configured: hostNetwork endpoints are node IPs anyway). Each
//! candidate is entered on its own thread (`setns(CLONE_NEWNET)`), which opens its netlink socket
//! *after* entering, so the socket belongs to that namespace; the thread lists links and
//! addresses, and only if the namespace holds a wanted endpoint IP or a receive link of ours does
//! it read the rest and converge. Cost per pass: one thread and two dumps per namespace.
//!
//! Needs CAP_SYS_ADMIN (setns), CAP_NET_ADMIN, and to see other users' `/proc/<pid>/ns/net`
//! CAP_SYS_PTRACE (or rely on `/run/netns`).
//!
//! # Messages
//!
//! Routes, rules, link and address dumps and FOU use the builders of [`crate::netlink::rtnl`] and
//! [`crate::netlink::fou`]; what only pods need (a receive link with remote any, VIP addresses,
//! per-device `rp_filter`, the netconf dump, and a route parser that keeps the main table's
//! default routes with their device and metric) is built and parsed here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_core::{DefaultNla, Emitable, NlasIterator, ParseableParametrized};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeader, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoIpTunnel, InfoKind, LinkAttribute, LinkFlags, LinkHeader, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::{AddressFamily, IpProtocol};

use crate::apply::KernelError;
use crate::dsr::{self, Diag, PodLink, PodNs, PodOp, PodWant, Settings};
use crate::model::{Family, FouPort, Route};
use crate::netlink::fou::{self, FOU_GENL_NAME};
use crate::netlink::genl::Genl;
use crate::netlink::rtnl;
use crate::netlink::socket::{NetlinkError, NlSocket, Reply, Request, NETLINK_ROUTE};
use crate::statefile::write_atomic;

// ---------------------------------------------------------------------------------------------
// Wire format (pure builders and parsers)

// uapi <linux/rtnetlink.h>.
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETROUTE: u16 = 26;
const RTM_GETNETCONF: u16 = 82;
const RT_TABLE_MAIN: u32 = 254;
// uapi <linux/netlink.h>.
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
// uapi <linux/if_link.h>: IFLA_AF_SPEC; <linux/if_link.h> IFLA_INET_CONF; <linux/ip.h>
// IPV4_DEVCONF_RP_FILTER.
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET_CONF: u16 = 1;
const IPV4_DEVCONF_RP_FILTER: u16 = 8;
const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;
// uapi <linux/rtnetlink.h>: RTA_OIF.
const RTA_OIF: u16 = 4;
// uapi <linux/netconf.h>.
const NETCONFA_IFINDEX: u16 = 1;
const NETCONFA_RP_FILTER: u16 = 3;
const NETCONFA_IFINDEX_ALL: i32 = -1;

fn af(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn family_of(a: AddressFamily) -> Option<Family> {
    match a {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

fn nla(kind: u16, value: Vec<u8>) -> DefaultNla {
    DefaultNla::new(kind, value)
}

fn nested(kind: u16, inner: &[DefaultNla]) -> DefaultNla {
    let mut v = vec![0; inner.buffer_len()];
    inner.emit(&mut v);
    DefaultNla::new(kind, v)
}

/// Dump of all routes (both families, every table).
pub fn route_dump() -> Request {
    Request::new(RTM_GETROUTE, 0, &RouteMessage::default())
}

/// Dump of the IPv4 netconf entries (per device, plus `all` and `default`): `struct netconfmsg`
/// is one byte, padded to 4.
pub fn netconf_dump() -> Request {
    Request {
        msg_type: RTM_GETNETCONF,
        flags: 0,
        payload: vec![libc::AF_INET as u8, 0, 0, 0],
    }
}

/// Creates the receive link: `ip link add NAME type ipip local POD remote 0.0.0.0` (or
/// `ip6tnl mode ip6ip6 local POD remote ::`), in our link group, up.
pub fn link_create(name: &str, family: Family, local: IpAddr, group: u32) -> Request {
    let (kind, proto) = match family {
        Family::V4 => (InfoKind::IpIp, IpProtocol::Ipip),
        Family::V6 => (InfoKind::Ip6Tnl, IpProtocol::Ipv6),
    };
    let mut m = LinkMessage::default();
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    // iproute2's order; no IFLA_IPTUN_REMOTE: "remote any" is the kernel's default.
    m.attributes.push(LinkAttribute::Group(group));
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(kind),
        LinkInfo::Data(InfoData::IpTunnel(vec![
            InfoIpTunnel::Protocol(proto),
            InfoIpTunnel::Local(local),
        ])),
    ]));
    Request::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &m)
}

/// Sets the link's IPv4 `rp_filter` to 0: `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF {
/// [IPV4_DEVCONF_RP_FILTER] = 0 } } }`, raw, because netlink-packet-route's `DevConfRequest`
/// leaves zero values out.
pub fn link_rp_filter_off(index: u32) -> Request {
    link_devconf(index, IPV4_DEVCONF_RP_FILTER, 0)
}

/// Sets the link's IPv4 `accept_local` to `value` (same message as [`link_rp_filter_off`]).
pub fn link_accept_local(index: u32, value: u32) -> Request {
    link_devconf(index, IPV4_DEVCONF_ACCEPT_LOCAL, value)
}

/// `route get IP` (IPv4 or IPv6): the kernel answers with the route, `RTA_OIF` included.
pub fn route_get(ip: IpAddr) -> Request {
    let mut m = RouteMessage::default();
    let (fam, len, a) = match ip {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    m.header.address_family = fam;
    m.header.destination_prefix_length = len;
    m.attributes.push(RouteAttribute::Destination(a));
    Request::new(RTM_GETROUTE, 0, &m)
}

/// `RTA_OIF` of a route message.
pub fn parse_route_oif(payload: &[u8]) -> Option<u32> {
    RouteHeader::parse(payload).ok()?;
    let (_, v) = attrs(payload.get(12..)?).find(|(k, _)| *k == RTA_OIF)?;
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn link_devconf(index: u32, key: u16, value: u32) -> Request {
    let conf = nested(IFLA_INET_CONF, &[nla(key, value.to_ne_bytes().to_vec())]);
    let inet = nested(libc::AF_INET as u16, &[conf]);
    let spec = nested(IFLA_AF_SPEC, &[inet]);
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::Other(spec));
    Request::new(RTM_NEWLINK, 0, &m)
}

fn addr_msg(index: u32, addr: &IpNet, scope: AddressScope) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header = AddressHeader {
        family: af(Family::of_net(addr)),
        prefix_len: addr.prefix_len(),
        index,
        scope,
        // IFA_F_NODAD fits in the header's 8 flag bits (iproute2 sends no IFA_FLAGS then).
        flags: match addr {
            IpNet::V4(_) => AddressHeaderFlags::empty(),
            IpNet::V6(_) => AddressHeaderFlags::Nodad,
        },
    };
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    m
}

/// Adds an address: an IPv4 VIP `/32` with scope link (as kube-router and design check E3), an
/// IPv6 VIP `/128` global with `nodad` (E5: usable at once; no duplicate detection on a NOARP
/// tunnel). `NLM_F_REPLACE` rather than iproute2's `NLM_F_EXCL`: adding an existing VIP is a
/// success.
pub fn addr_add(index: u32, addr: &IpNet) -> Request {
    let scope = match addr {
        IpNet::V4(_) => AddressScope::Link,
        IpNet::V6(_) => AddressScope::Universe,
    };
    Request::new(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        &addr_msg(index, addr, scope),
    )
}

/// Deletes an address (the kernel matches local address, prefix length and device).
pub fn addr_del(index: u32, addr: &IpNet) -> Request {
    Request::new(
        RTM_DELADDR,
        0,
        &addr_msg(index, addr, AddressScope::Universe),
    )
}

/// (type without flags, value) of each attribute; stops at the first malformed one.
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, Vec<u8>)> + '_ {
    NlasIterator::new(buf)
        .map_while(|n| n.ok())
        .map(|n| (n.kind() & 0x3fff, n.value().to_vec()))
}

/// `net.ipv4.conf.all.rp_filter` from a netconf dump reply, if this is the `all` entry.
pub fn parse_netconf_all_rp_filter(payload: &[u8]) -> Option<u32> {
    let mut index = None;
    let mut rp = None;
    for (k, v) in attrs(payload.get(4..)?) {
        match k {
            NETCONFA_IFINDEX => index = Some(i32::from_ne_bytes(v.get(..4)?.try_into().ok()?)),
            NETCONFA_RP_FILTER => rp = Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)),
            _ => {}
        }
    }
    (index == Some(NETCONFA_IFINDEX_ALL))
        .then_some(rp)
        .flatten()
}

/// A link from a dump reply. Attributes that do not parse are skipped (SPEC R-1).
pub fn parse_link(payload: &[u8]) -> Option<PodLink> {
    let h = LinkHeader::parse(payload).ok()?;
    let mut l = PodLink {
        index: h.index,
        name: String::new(),
        kind: String::new(),
        group: 0,
        mtu: 0,
        up: h.flags.contains(LinkFlags::Up),
        local: None,
        remote: None,
        rp_filter: None,
        accept_local: None,
    };
    for n in NlasIterator::new(payload.get(16..)?).map_while(|n| n.ok()) {
        let Ok(a) = LinkAttribute::parse_with_param(&n, h.interface_family) else {
            continue;
        };
        match a {
            LinkAttribute::IfName(s) => l.name = s,
            LinkAttribute::Mtu(m) => l.mtu = m,
            LinkAttribute::Group(g) => l.group = g,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = k.to_string(),
                        LinkInfo::Data(InfoData::IpTunnel(v)) => {
                            for t in v {
                                match t {
                                    InfoIpTunnel::Local(a) => l.local = Some(a),
                                    InfoIpTunnel::Remote(a) => l.remote = Some(a),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            LinkAttribute::AfSpecUnspec(specs) => {
                for s in specs {
                    if let netlink_packet_route::link::AfSpecUnspec::Inet(v) = s {
                        for i in v {
                            if let netlink_packet_route::link::AfSpecInet::DevConf(c) = i {
                                l.rp_filter = u32::try_from(c.rp_filter).ok();
                                l.accept_local = u32::try_from(c.accept_local).ok();
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(l)
}

/// What a route dump entry is to the pod planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedRoute {
    /// A default route of the main table, with its metric (lowest wins).
    Default(dsr::DefaultRoute, u32),
    /// A route of ours.
    Owned(Route),
    /// Anything else.
    Other,
}

/// Classifies a route from a dump reply. `names` maps ifindex to link name.
pub fn parse_route(payload: &[u8], protocol: u8, names: &HashMap<u32, String>) -> ParsedRoute {
    let Ok(h) = RouteHeader::parse(payload) else {
        return ParsedRoute::Other;
    };
    let Some(family) = family_of(h.address_family) else {
        return ParsedRoute::Other;
    };
    let mut table = u32::from(h.table);
    let (mut gw, mut oif, mut prio, mut multipath) = (None, None, 0, false);
    let param = (
        h.address_family,
        h.kind,
        netlink_packet_route::route::RouteLwEnCapType::None,
    );
    for n in NlasIterator::new(payload.get(12..).unwrap_or(&[])).map_while(|n| n.ok()) {
        let Ok(a) = RouteAttribute::parse_with_param(&n, param) else {
            continue;
        };
        let ip = |a: RouteAddress| match a {
            RouteAddress::Inet(v) => Some(IpAddr::V4(v)),
            RouteAddress::Inet6(v) => Some(IpAddr::V6(v)),
            _ => None,
        };
        match a {
            RouteAttribute::Table(t) => table = t,
            RouteAttribute::Gateway(a) => gw = ip(a),
            RouteAttribute::Oif(i) => oif = Some(i),
            RouteAttribute::Priority(p) => prio = p,
            RouteAttribute::MultiPath(_) => multipath = true,
            _ => {}
        }
    }
    if u8::from(h.protocol) == protocol {
        return match rtnl::parse_route(payload, names) {
            Ok(Some(r)) => ParsedRoute::Owned(r),
            _ => ParsedRoute::Other,
        };
    }
    if table == RT_TABLE_MAIN
        && h.destination_prefix_length == 0
        && h.kind == RouteType::Unicast
        && !multipath
    {
        if let Some(oif) = oif {
            return ParsedRoute::Default(
                dsr::DefaultRoute {
                    family,
                    gateway: gw,
                    oif,
                },
                prio,
            );
        }
    }
    ParsedRoute::Other
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// A candidate network namespace: a path that opens it and its nsfs identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsRef {
    /// `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub path: PathBuf,
    /// (st_dev, st_ino) of the namespace.
    pub id: (u64, u64),
}

/// The identity of the namespace at `path` (follows the magic link).
pub fn ns_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Candidate namespaces: `<run_netns>/*`, then `<proc>/<pid>/ns/net`, deduplicated by identity,
/// without `skip` (the daemon's own). Unreadable entries (processes that exited, permission)
/// are left out.
pub fn scan(run_netns: &Path, proc: &Path, skip: Option<(u64, u64)>) -> Vec<NsRef> {
    let mut seen: BTreeSet<(u64, u64)> = skip.into_iter().collect();
    let mut out = Vec::new();
    let mut add = |path: PathBuf, out: &mut Vec<NsRef>| {
        if let Ok(id) = ns_id(&path) {
            if seen.insert(id) {
                out.push(NsRef { path, id });
            }
        }
    };
    if let Ok(rd) = std::fs::read_dir(run_netns) {
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            add(p, &mut out);
        }
    }
    if let Ok(rd) = std::fs::read_dir(proc) {
        let mut pids: Vec<u32> = rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            add(proc.join(pid.to_string()).join("ns/net"), &mut out);
        }
    }
    out
}

/// Failure to enter a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsError {
    /// The namespace path.
    pub path: PathBuf,
    /// What failed.
    pub msg: String,
}

impl fmt::Display for NsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "enter network namespace {}: {}",
            self.path.display(),
            self.msg
        )
    }
}

impl std::error::Error for NsError {}

/// Runs `f` on a new thread that first joins the network namespace at `path`, and returns its
/// result. Only that thread ever is in the namespace; it ends when `f` returns.
///
/// A panic in `f` is a bug (SPEC R-1: nothing here panics on input). Release builds use
/// `panic = "abort"`, so such a panic ends the whole process there, as anywhere else in the
/// daemon, and systemd restarts it; the kernel state stays (SPEC O-4). Only builds that unwind
/// (debug, tests) get as far as the `join` below, which turns the panic into an error instead of
/// propagating it into the caller.
pub fn in_netns<R, F>(path: &Path, f: F) -> Result<R, NsError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let err = |msg: String| NsError {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            // SAFETY: setns(2) takes a file descriptor we own (`file` lives until the scope
            // ends) and a flag; it touches no memory of ours. CLONE_NEWNET changes only the
            // calling thread, this fresh scoped thread, which ends when `f` returns, so no other
            // thread of the daemon (in particular the main thread and its sockets) leaves the
            // host's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        });
        match h.join() {
            Ok(r) => r.map_err(err),
            // Reached only when panics unwind (not in release builds: see above).
            Err(_) => Err(err("the namespace thread panicked".into())),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// One namespace

/// What the pod-side shell needs from one namespace's kernel: implemented over netlink sockets
/// opened inside it ([`NetlinkPod`]), and in memory for tests.
pub trait PodKernel {
    /// Links and addresses (enough to decide whether the namespace matters).
    fn read_basic(&mut self) -> Result<PodNs, KernelError>;
    /// The rest: main-table default routes, owned routes and rules, FOU ports, `all`
    /// rp_filter.
    fn read_rest(&mut self, ns: &mut PodNs, protocol: u8) -> Result<(), KernelError>;
    /// Applies one op; `ns` is the state read before planning (for link indexes).
    fn apply(&mut self, op: &PodOp, ns: &PodNs) -> Result<(), KernelError>;
}

/// What happened in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsOutcome {
    /// Wanted endpoint IPs found in this namespace.
    pub found: Vec<IpAddr>,
    /// Ops applied successfully.
    pub applied: Vec<String>,
    /// Ops that failed.
    pub failed: Vec<KernelError>,
    /// Problems the planner reported.
    pub diags: Vec<Diag>,
    /// FOU ports of ours closed here.
    pub closed: Vec<FouPort>,
}

/// Converges one namespace: reads, plans with [`dsr::plan_pod`], applies. A namespace that holds
/// no wanted endpoint, no receive link of ours and no FOU port of ours (`ours_fou`, from the
/// record) is left untouched after the first read. `record` is called before a FOU port is
/// opened (write-ahead; an error keeps it closed).
pub fn converge(
    k: &mut impl PodKernel,
    wants: &BTreeMap<IpAddr, PodWant>,
    s: &Settings,
    ours_fou: &[FouPort],
    record: &mut dyn FnMut(FouPort) -> std::io::Result<()>,
) -> Result<NsOutcome, KernelError> {
    let mut ns = k.read_basic()?;
    let ips = ns.ips();
    let mine: Vec<&PodWant> = wants.values().filter(|w| ips.contains(&w.ip)).collect();
    let ours = ns.links.iter().any(|l| {
        (l.name == dsr::POD_LINK_V4 || l.name == dsr::POD_LINK_V6) && l.group == s.link_group
    });
    let mut out = NsOutcome {
        found: mine.iter().map(|w| w.ip).collect(),
        ..NsOutcome::default()
    };
    if mine.is_empty() && !ours && ours_fou.is_empty() {
        return Ok(out);
    }
    k.read_rest(&mut ns, s.protocol)?;
    ns.ours_fou = ours_fou.to_vec();
    let ops = dsr::plan_pod(&mine, &ns, s, &mut out.diags);
    for op in &ops {
        if let PodOp::AddFouPort(p) = op {
            if let Err(e) = record(*p) {
                out.failed.push(KernelError {
                    op: op.to_string(),
                    errno: 0,
                    msg: format!("cannot record it: {e}"),
                });
                continue;
            }
        }
        match k.apply(op, &ns) {
            Ok(()) => {
                if let PodOp::DelFouPort(p) = op {
                    out.closed.push(*p);
                }
                out.applied.push(op.to_string())
            }
            Err(e) => out.failed.push(e),
        }
    }
    Ok(out)
}

/// [`PodKernel`] over netlink sockets opened in the namespace.
#[derive(Debug)]
pub struct NetlinkPod {
    rt: NlSocket,
    genl: Genl,
    group: u32,
}

fn kerr(op: impl Into<String>, e: &NetlinkError) -> KernelError {
    KernelError {
        op: op.into(),
        errno: e.errno(),
        msg: e.message(),
    }
}

impl NetlinkPod {
    /// Opens a route and a generic netlink socket in the calling thread's namespace. Links it
    /// creates get `group` (the ownership mark, `--link-group`).
    pub fn open(group: u32) -> Result<NetlinkPod, KernelError> {
        let rt =
            NlSocket::open(NETLINK_ROUTE).map_err(|e| kerr("open route netlink socket", &e))?;
        let genl = Genl::open().map_err(|e| kerr("open generic netlink socket", &e))?;
        Ok(NetlinkPod { rt, genl, group })
    }

    fn dump(&mut self, what: &str, r: &Request) -> Result<Vec<Reply>, KernelError> {
        self.rt
            .dump(r)
            .map_err(|e| kerr(format!("dump {what}"), &e))
    }

    /// A link's ifindex: from `ns`, or (created by this plan) from a fresh dump.
    fn index_of(&mut self, op: &PodOp, ns: &PodNs, name: &str) -> Result<u32, KernelError> {
        if let Some(l) = ns.links.iter().find(|l| l.name == name) {
            return Ok(l.index);
        }
        self.dump("links", &rtnl::link_dump())?
            .iter()
            .filter_map(|r| parse_link(&r.payload))
            .find(|l| l.name == name)
            .map(|l| l.index)
            .ok_or_else(|| KernelError {
                op: op.to_string(),
                errno: libc::ENODEV,
                msg: format!("no link {name}"),
            })
    }
}

/// `Ok` for success and for the errnos that mean "already so".
fn tolerate(
    op: &PodOp,
    r: Result<Vec<Reply>, NetlinkError>,
    ok: &[i32],
) -> Result<(), KernelError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if ok.contains(&e.errno()) => Ok(()),
        Err(e) => Err(kerr(op.to_string(), &e)),
    }
}

impl PodKernel for NetlinkPod {
    fn read_basic(&mut self) -> Result<PodNs, KernelError> {
        let links = self
            .dump("links", &rtnl::link_dump())?
            .iter()
            .filter_map(|r| parse_link(&r.payload))
            .collect();
        let addrs = self
            .dump("addresses", &rtnl::addr_dump())?
            .iter()
            .filter_map(|r| rtnl::parse_addr(&r.payload).ok().flatten())
            .collect();
        Ok(PodNs {
            links,
            addrs,
            ..PodNs::default()
        })
    }

    fn read_rest(&mut self, ns: &mut PodNs, protocol: u8) -> Result<(), KernelError> {
        let names: HashMap<u32, String> =
            ns.links.iter().map(|l| (l.index, l.name.clone())).collect();
        let mut best: BTreeMap<Family, (u32, dsr::DefaultRoute)> = BTreeMap::new();
        for r in self.dump("routes", &route_dump())? {
            match parse_route(&r.payload, protocol, &names) {
                ParsedRoute::Owned(r) => ns.routes.push(r),
                ParsedRoute::Default(d, prio) => {
                    if best.get(&d.family).is_none_or(|(p, _)| prio < *p) {
                        best.insert(d.family, (prio, d));
                    }
                }
                ParsedRoute::Other => {}
            }
        }
        ns.defaults = best.into_values().map(|(_, d)| d).collect();
        ns.rules = self
            .dump("rules", &rtnl::rule_dump())?
            .iter()
            .filter_map(|r| rtnl::parse_rule(&r.payload).ok().flatten())
            .filter(|r| r.protocol == protocol)
            .collect();
        // Best effort: without it, a strict `all` just goes unreported.
        ns.all_rp_filter = self.rt.dump(&netconf_dump()).ok().and_then(|rs| {
            rs.iter()
                .find_map(|r| parse_netconf_all_rp_filter(&r.payload))
        });
        ns.fou = match self.genl.dump(FOU_GENL_NAME, fou::fou_dump) {
            Ok(rs) => rs
                .iter()
                .filter_map(|r| fou::parse_fou_port(&r.payload).ok().flatten())
                .collect(),
            // The fou module is not loaded: there are no ports.
            Err(e) if e.errno() == libc::ENOENT => Vec::new(),
            Err(e) => return Err(kerr("dump fou ports", &e)),
        };
        Ok(())
    }

    fn apply(&mut self, op: &PodOp, ns: &PodNs) -> Result<(), KernelError> {
        match op {
            PodOp::CreateLink {
                name,
                family,
                local,
            } => {
                let r = self
                    .rt
                    .request(&link_create(name, *family, *local, self.group));
                tolerate(op, r, &[])
            }
            PodOp::DeleteLink { index, .. } => {
                let r = self.rt.request(&rtnl::link_delete(*index));
                tolerate(op, r, &[libc::ENODEV])
            }
            PodOp::SetUp { link } => {
                let i = self.index_of(op, ns, link)?;
                let r = self.rt.request(&rtnl::link_set_up(i));
                tolerate(op, r, &[])
            }
            PodOp::DisableRpFilter { link } => {
                let i = self.index_of(op, ns, link)?;
                let r = self.rt.request(&link_rp_filter_off(i));
                tolerate(op, r, &[])
            }
            PodOp::AddAddr { link, addr } => {
                let i = self.index_of(op, ns, link)?;
                let r = self.rt.request(&addr_add(i, addr));
                tolerate(op, r, &[])
            }
            PodOp::DelAddr { link, addr } => {
                let i = self.index_of(op, ns, link)?;
                let r = self.rt.request(&addr_del(i, addr));
                tolerate(op, r, &[libc::EADDRNOTAVAIL])
            }
            PodOp::ReplaceRoute { route, oif } => {
                let r = self.rt.request(&rtnl::route_replace(route, *oif));
                tolerate(op, r, &[])
            }
            PodOp::DeleteRoute(route) => {
                let r = self.rt.request(&rtnl::route_delete(route, None));
                tolerate(op, r, &[libc::ESRCH, libc::ENOENT])
            }
            PodOp::AddRule(rule) => {
                let r = self.rt.request(&rtnl::rule_add(rule));
                tolerate(op, r, &[libc::EEXIST])
            }
            PodOp::DeleteRule(rule) => {
                let r = self.rt.request(&rtnl::rule_delete(rule));
                tolerate(op, r, &[libc::ENOENT])
            }
            PodOp::AddFouPort(p) => {
                let r = self.genl.request(FOU_GENL_NAME, |id| fou::fou_add(id, p));
                tolerate(op, r, &[libc::EEXIST, libc::EALREADY, libc::EADDRINUSE])
            }
            PodOp::DelFouPort(p) => {
                // The plan only closes ports it read; EINVAL is the kernel's "no such port".
                let r = self.genl.request(FOU_GENL_NAME, |id| fou::fou_del(id, p));
                tolerate(op, r, &[libc::EINVAL, libc::ENOENT])
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// All namespaces

/// What one pass over the pod namespaces did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodsReport {
    /// Candidate namespaces looked at.
    pub namespaces: usize,
    /// Namespaces where something was found or done.
    pub outcomes: Vec<(PathBuf, NsOutcome)>,
    /// Namespaces that could not be entered or read (often harmless: a process that exited).
    pub unreadable: Vec<String>,
    /// Wanted endpoint IPs found in no namespace (reported as diagnostics too).
    pub missing: Vec<IpAddr>,
    /// Problems to log once per change.
    pub diags: Vec<Diag>,
}

impl PodsReport {
    /// Ops that failed, over all namespaces.
    pub fn failed(&self) -> impl Iterator<Item = &KernelError> {
        self.outcomes.iter().flat_map(|(_, o)| o.failed.iter())
    }
}

/// One pass over every candidate namespace (SPEC D-4, D-5): configures the local endpoints in
/// `wants` where their IP lives, and removes our state from namespaces that no longer need it.
/// `run_netns` and `proc` are normally `/run/netns` and `/proc`; the daemon's own namespace
/// (`<proc>/self/ns/net`) is never touched. `open` makes the [`PodKernel`] on the namespace's
/// thread (normally `|| NetlinkPod::open(settings.link_group)`).
pub fn reconcile_pods<K, F>(
    wants: &BTreeMap<IpAddr, PodWant>,
    s: &Settings,
    open: F,
    run_netns: &Path,
    proc: &Path,
    record: &Path,
) -> PodsReport
where
    K: PodKernel,
    F: Fn() -> Result<K, KernelError> + Sync,
{
    let own = ns_id(&proc.join("self/ns/net")).ok();
    let candidates = scan(run_netns, proc, own);
    let mut report = PodsReport {
        namespaces: candidates.len(),
        ..PodsReport::default()
    };
    // The FOU ports opened in pods, by namespace identity; those of vanished namespaces go.
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let mut owned: Vec<((u64, u64), FouPort)> = parse_pod_fou(&text)
        .into_iter()
        .filter(|(id, _)| candidates.iter().any(|c| c.id == *id))
        .collect();
    let mut found: BTreeSet<IpAddr> = BTreeSet::new();
    for ns in candidates {
        let ours: Vec<FouPort> = owned.iter().filter(|o| o.0 == ns.id).map(|o| o.1).collect();
        let mut rec = |p: FouPort| {
            owned.push((ns.id, p));
            write_atomic(record, render_pod_fou(&owned).as_bytes())
        };
        let r = in_netns(&ns.path, || {
            converge(&mut open()?, wants, s, &ours, &mut rec)
        });
        match r {
            Ok(Ok(o)) => {
                owned.retain(|(id, p)| *id != ns.id || !o.closed.contains(p));
                found.extend(o.found.iter().copied());
                if !o.found.is_empty()
                    || !o.applied.is_empty()
                    || !o.failed.is_empty()
                    || !o.diags.is_empty()
                {
                    report.diags.extend(o.diags.iter().cloned());
                    report.outcomes.push((ns.path, o));
                }
            }
            Ok(Err(e)) => report
                .unreadable
                .push(format!("{}: {e}", ns.path.display())),
            Err(e) => report.unreadable.push(e.to_string()),
        }
    }
    let now = render_pod_fou(&owned);
    if now != text {
        if let Err(e) = write_atomic(record, now.as_bytes()) {
            report.unreadable.push(format!("{}: {e}", record.display()));
        }
    }
    for ip in wants.keys().filter(|ip| !found.contains(ip)) {
        report.missing.push(*ip);
        report.diags.push(Diag {
            object: format!("pod {ip}"),
            msg: "local endpoint found in no network namespace; its DSR receiver is not configured"
                .into(),
        });
    }
    report
}

/// File name of the record of FOU ports opened in pods (in the state directory).
pub const POD_FOU_FILE: &str = "dsr-pod-fou";

/// The record as text: `dev ino family port` per port opened in the namespace `(dev, ino)`.
fn render_pod_fou(owned: &[((u64, u64), FouPort)]) -> String {
    owned
        .iter()
        .map(|((d, i), p)| format!("{d} {i} {} {}\n", p.family, p.port))
        .collect()
}

/// Parses [`render_pod_fou`] text; unreadable lines are dropped (a port then stays open).
fn parse_pod_fou(text: &str) -> Vec<((u64, u64), FouPort)> {
    text.lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.split(' ').collect();
            let [d, i, f, p] = v[..] else { return None };
            let family = match f {
                "ipv4" => Family::V4,
                "ipv6" => Family::V6,
                _ => return None,
            };
            let port = FouPort {
                family,
                port: p.parse().ok()?,
                gue: true,
            };
            Some(((d.parse().ok()?, i.parse().ok()?), port))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Capabilities

/// The capabilities DSR needs beyond the overlay's CAP_NET_ADMIN that the process does not have
/// in its effective set (capget(2)), by name: CAP_SYS_ADMIN for setns(2) into pod namespaces,
/// CAP_SYS_PTRACE to open other users' `/proc/<pid>/ns/net`. Checked at start so that
/// `--enable-dsr` without them fails at once, not halfway through a pass.
pub fn missing_dsr_capabilities() -> Vec<&'static str> {
    // uapi <linux/capability.h>.
    const VERSION_3: u32 = 0x2008_0522;
    const NEEDED: [(u32, &str); 2] = [(21, "CAP_SYS_ADMIN"), (19, "CAP_SYS_PTRACE")];
    let mut header = [VERSION_3, 0u32]; // version, pid 0 = this thread
    let mut data = [0u32; 6]; // two {effective, permitted, inheritable}
                              // SAFETY: capget(2) with a version-3 header and room for its two data structs.
    let r = unsafe { libc::syscall(libc::SYS_capget, header.as_mut_ptr(), data.as_mut_ptr()) };
    NEEDED
        .iter()
        .filter(|(cap, _)| r != 0 || data[0] & (1 << cap) == 0)
        .map(|(_, name)| *name)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The node side: accept_local on the devices that carry DSR replies (IPv4)

/// Devices whose IPv4 `accept_local` kr-tunneld set to 1, one `ifindex name` a line, in the
/// state directory.
pub const ACCEPT_LOCAL_FILE: &str = "dsr-accept-local";

/// What [`plan_accept_local`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptLocalPlan {
    /// Devices (ifindex, name) to set to 1 (they are 0 now).
    pub on: Vec<(u32, String)>,
    /// Devices (ifindex, name) to set back to 0 (ours, no longer needed).
    pub off: Vec<(u32, String)>,
    /// The record to write before applying (`ifindex name` per device): what was recorded
    /// and still exists, plus `on`.
    pub record: BTreeSet<String>,
}

/// Why kr-tunneld sets `accept_local` (issue 13; README, DSR): every node is a director, so the
/// reverse-path check of a reply forwarded from a local DSR pod (source = the VIP) looks the VIP
/// up with the ports swapped, matches the director rule, finds `local default` in the DSR table
/// and drops the reply as a martian unless `accept_local` is 1 on the device it came in by. The
/// kernel makes that lookup with iif = the reply's *outgoing* device and mark 0, so it is the
/// same lookup as a client's packet to the VIP arriving there: no policy rule can tell them apart
/// (kube-router avoids it with an iptables fwmark). So `accept_local` is set on exactly the
/// devices the local DSR endpoints' traffic arrives by (the route to each endpoint IP: the
/// pod's veth, or the CNI bridge), only where it is 0, recorded first, and set back to 0 when no
/// local endpoint needs it any more, on `cleanup`, and with DSR turned off. A device already at
/// 1 is the operator's and is never recorded or changed.
///
/// `wanted`: ifindex of each device carrying a local endpoint's traffic; `links`: every link
/// with its current `accept_local`; `recorded`: the record.
pub fn plan_accept_local(
    wanted: &[u32],
    links: &[PodLink],
    recorded: &BTreeSet<String>,
) -> AcceptLocalPlan {
    let mut p = AcceptLocalPlan::default();
    for l in links {
        // A recorded device that is gone, or whose index now names another one, is forgotten.
        let key = format!("{} {}", l.index, l.name);
        let ours = recorded.contains(&key);
        let dev = (l.index, l.name.clone());
        if wanted.contains(&l.index) {
            if l.accept_local == Some(0) {
                p.on.push(dev);
            } else if !ours {
                continue; // already 1: the operator's
            }
        } else if !ours {
            continue;
        } else if l.accept_local == Some(1) {
            p.off.push(dev);
        }
        p.record.insert(key);
    }
    p
}

/// Parses the record: one `ifindex name` a line.
pub fn parse_accept_local(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Renders the record.
pub fn render_accept_local(r: &BTreeSet<String>) -> String {
    r.iter().map(|k| format!("{k}\n")).collect()
}

/// The node side of one DSR pass, in the daemon's own network namespace: [`plan_accept_local`]
/// for the IPv4 endpoints in `wants` (empty on `cleanup` and with DSR off: undo everything),
/// with its record in `state_dir`. What was done and what failed come back as an outcome for
/// the pass's report.
pub fn node_accept_local(wants: &BTreeMap<IpAddr, PodWant>, state_dir: &Path) -> NsOutcome {
    let path = state_dir.join(ACCEPT_LOCAL_FILE);
    let recorded = parse_accept_local(&std::fs::read_to_string(&path).unwrap_or_default());
    let mut out = NsOutcome::default();
    let v4: Vec<IpAddr> = wants.keys().filter(|ip| ip.is_ipv4()).copied().collect();
    if v4.is_empty() && recorded.is_empty() {
        return out;
    }
    let fail = |op: &str, e: &NetlinkError| kerr(format!("node: {op}"), e);
    let mut rt = match NlSocket::open(NETLINK_ROUTE) {
        Ok(s) => s,
        Err(e) => {
            out.failed.push(fail("open route netlink socket", &e));
            return out;
        }
    };
    let mut wanted = Vec::new();
    for ip in &v4 {
        match rt.request(&route_get(*ip)) {
            Ok(rs) => wanted.extend(
                rs.iter()
                    .filter_map(|r| parse_route_oif(&r.payload))
                    .filter(|&i| i != 1), // never lo
            ),
            Err(e) => out.failed.push(fail(&format!("route get {ip}"), &e)),
        }
    }
    let links: Vec<PodLink> = match rt.dump(&rtnl::link_dump()) {
        Ok(rs) => rs.iter().filter_map(|r| parse_link(&r.payload)).collect(),
        Err(e) => {
            out.failed.push(fail("dump links", &e));
            return out;
        }
    };
    let plan = plan_accept_local(&wanted, &links, &recorded);
    let write = |r: &BTreeSet<String>| {
        crate::daemon::write_atomic(&path, render_accept_local(r).as_bytes())
    };
    if plan.record != recorded {
        if let Err(e) = write(&plan.record) {
            out.diags.push(Diag {
                object: path.display().to_string(),
                msg: format!("cannot record accept_local devices: {e}; not changing them"),
            });
            return out;
        }
    }
    let mut after = plan.record.clone();
    for (dev, v) in plan
        .on
        .iter()
        .map(|d| (d, 1))
        .chain(plan.off.iter().map(|d| (d, 0)))
    {
        let what = format!("set accept_local {v} on {} (DSR replies)", dev.1);
        match rt.request(&link_accept_local(dev.0, v)) {
            Ok(_) => {
                out.applied.push(what);
                if v == 0 {
                    after.remove(&format!("{} {}", dev.0, dev.1));
                }
            }
            Err(e) => out.failed.push(fail(&what, &e)),
        }
    }
    if after != plan.record {
        if let Err(e) = write(&after) {
            out.diags.push(Diag {
                object: path.display().to_string(),
                msg: format!("cannot record accept_local devices: {e}"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsr::DestTunnel;

    fn hex(b: &[u8]) -> String {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    fn net(a: &str) -> IpNet {
        a.parse().unwrap()
    }

    // Golden payloads (after nlmsghdr). The iproute2 references were captured with
    // `strace -f -e trace=sendmsg -e write=3 ip ...` (iproute2 6.1.0, Debian 12) in `unshare -n`
    // on the 6.18 host; addresses on `lo` (ifindex 1).

    /// `ip addr add 10.96.0.10/32 dev lo scope link`: identical bytes (we send NLM_F_REPLACE
    /// where iproute2 sends NLM_F_EXCL; header flags are the socket's business).
    #[rustfmt::skip]
    const ADDR_ADD_V4: &[u8] = &[
        0x02, 0x20, 0x00, 0xfd,  // ifaddrmsg: AF_INET, /32, flags 0, scope link (253)
        0x01, 0x00, 0x00, 0x00,  // ifindex 1
        0x08, 0x00, 0x02, 0x00, 0x0a, 0x60, 0x00, 0x0a,  // IFA_LOCAL 10.96.0.10
        0x08, 0x00, 0x01, 0x00, 0x0a, 0x60, 0x00, 0x0a,  // IFA_ADDRESS 10.96.0.10
    ];

    /// `ip -6 addr add 2001:db8:100::10/128 dev lo nodad`: identical bytes.
    #[rustfmt::skip]
    const ADDR_ADD_V6: &[u8] = &[
        0x0a, 0x80, 0x02, 0x00,  // ifaddrmsg: AF_INET6, /128, IFA_F_NODAD, scope universe
        0x01, 0x00, 0x00, 0x00,  // ifindex 1
        0x14, 0x00, 0x02, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00, 0x00, 0x00,
                                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,  // IFA_LOCAL
        0x14, 0x00, 0x01, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00, 0x00, 0x00,
                                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,  // IFA_ADDRESS
    ];

    /// `ip addr del 10.96.0.10/32 dev lo`: identical bytes.
    #[rustfmt::skip]
    const ADDR_DEL_V4: &[u8] = &[
        0x02, 0x20, 0x00, 0x00,  // ifaddrmsg: AF_INET, /32, flags 0, scope 0
        0x01, 0x00, 0x00, 0x00,  // ifindex 1
        0x08, 0x00, 0x02, 0x00, 0x0a, 0x60, 0x00, 0x0a,  // IFA_LOCAL
        0x08, 0x00, 0x01, 0x00, 0x0a, 0x60, 0x00, 0x0a,  // IFA_ADDRESS
    ];

    /// `ip -4 netconf show` (the dump request): identical bytes.
    const NETCONF_DUMP: &[u8] = &[0x02, 0x00, 0x00, 0x00]; // netconfmsg: AF_INET + padding

    /// Derived from `ip link add kt-dsr group 19284 up type ipip local 10.244.1.5 remote any`.
    /// Same header, group, name and order; deliberate differences in IFLA_LINKINFO: the kind
    /// carries its NUL (netlink-packet-route), IFLA_IPTUN_PROTO is IPPROTO_IPIP (iproute2: 0,
    /// any), and iproute2's defaults (PMTUDISC 1, TOS 0, TTL 0 = inherit, LINK 0, FWMARK 0, the
    /// four ENCAP_* zeros) are left to the kernel, which has the same defaults.
    #[rustfmt::skip]
    const LINK_CREATE_IPIP: &[u8] = &[
        0x00, 0x00, 0x00, 0x00,  // ifinfomsg: AF_UNSPEC, pad, type 0
        0x00, 0x00, 0x00, 0x00,  // ifindex 0
        0x01, 0x00, 0x00, 0x00,  // flags IFF_UP
        0x01, 0x00, 0x00, 0x00,  // change IFF_UP
        0x08, 0x00, 0x1b, 0x00, 0x54, 0x4b, 0x00, 0x00,  // IFLA_GROUP 19284
        0x0b, 0x00, 0x03, 0x00, b'k', b't', b'-', b'd', b's', b'r', 0x00, 0x00,  // IFLA_IFNAME
        0x24, 0x00, 0x12, 0x00,  // IFLA_LINKINFO
            0x09, 0x00, 0x01, 0x00, b'i', b'p', b'i', b'p', 0x00, 0x00, 0x00, 0x00,  // KIND
            0x14, 0x00, 0x02, 0x00,  // IFLA_INFO_DATA
                0x05, 0x00, 0x09, 0x00, 0x04, 0x00, 0x00, 0x00,  // IFLA_IPTUN_PROTO IPPROTO_IPIP
                0x08, 0x00, 0x02, 0x00, 0x0a, 0xf4, 0x01, 0x05,  // IFLA_IPTUN_LOCAL
    ];

    /// Derived from `ip link add kt-dsr6 group 19284 up type ip6tnl mode ip6ip6 local
    /// fd00:244:1::5 remote any`; as above, plus iproute2's TTL 64, ENCAP_LIMIT 4, FLOWINFO 0,
    /// FLAGS 0 and ENCAP_FLAGS 2 are left out (they concern transmit; this link only receives).
    #[rustfmt::skip]
    const LINK_CREATE_IP6TNL: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // ifinfomsg (family, type, index 0)
        0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,  // flags, change: IFF_UP
        0x08, 0x00, 0x1b, 0x00, 0x54, 0x4b, 0x00, 0x00,  // IFLA_GROUP 19284
        0x0c, 0x00, 0x03, 0x00, b'k', b't', b'-', b'd', b's', b'r', b'6', 0x00,  // IFLA_IFNAME
        0x30, 0x00, 0x12, 0x00,  // IFLA_LINKINFO
            0x0b, 0x00, 0x01, 0x00, b'i', b'p', b'6', b't', b'n', b'l', 0x00, 0x00,  // KIND
            0x20, 0x00, 0x02, 0x00,  // IFLA_INFO_DATA
                0x05, 0x00, 0x09, 0x00, 0x29, 0x00, 0x00, 0x00,  // PROTO IPPROTO_IPV6 (ip6ip6)
                0x14, 0x00, 0x02, 0x00, 0xfd, 0x00, 0x02, 0x44, 0x00, 0x01, 0x00, 0x00,
                                        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05,  // LOCAL
    ];

    /// `rp_filter` 0 on ifindex 7: no iproute2 command sends this (sysctl writes /proc/sys);
    /// built from the uapi layout, which `inet_set_link_af` reads, and checked live in the VM
    /// (tests/dsr_kernel.rs reads /proc/sys/net/ipv4/conf/kt-dsr/rp_filter back as 0).
    #[rustfmt::skip]
    const RP_FILTER_OFF: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,  // ifinfomsg: ifindex 7
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // no flag change
        0x14, 0x00, 0x1a, 0x00,  // IFLA_AF_SPEC
            0x10, 0x00, 0x02, 0x00,  // AF_INET
                0x0c, 0x00, 0x01, 0x00,  // IFLA_INET_CONF
                    0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00,  // [IPV4_DEVCONF_RP_FILTER] = 0
    ];

    #[test]
    fn goldens() {
        assert_eq!(
            hex(&addr_add(1, &net("10.96.0.10/32")).payload),
            hex(ADDR_ADD_V4)
        );
        assert_eq!(
            hex(&addr_add(1, &net("2001:db8:100::10/128")).payload),
            hex(ADDR_ADD_V6)
        );
        assert_eq!(
            hex(&addr_del(1, &net("10.96.0.10/32")).payload),
            hex(ADDR_DEL_V4)
        );
        assert_eq!(hex(&netconf_dump().payload), hex(NETCONF_DUMP));
        let l4 = link_create("kt-dsr", Family::V4, ip("10.244.1.5"), 19284);
        assert_eq!(hex(&l4.payload), hex(LINK_CREATE_IPIP));
        let l6 = link_create("kt-dsr6", Family::V6, ip("fd00:244:1::5"), 19284);
        assert_eq!(hex(&l6.payload), hex(LINK_CREATE_IP6TNL));
        assert_eq!(hex(&link_rp_filter_off(7).payload), hex(RP_FILTER_OFF));
        // Message types and request flags.
        assert_eq!(
            (l4.msg_type, l4.flags),
            (RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        );
        let a = addr_add(1, &net("10.96.0.10/32"));
        assert_eq!(
            (a.msg_type, a.flags),
            (RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE)
        );
        assert_eq!(addr_del(1, &net("10.96.0.10/32")).msg_type, RTM_DELADDR);
        assert_eq!(netconf_dump().msg_type, RTM_GETNETCONF);
    }

    #[test]
    fn parses_our_receive_link_with_rp_filter() {
        use netlink_packet_route::link::{AfSpecInet, AfSpecUnspec, InetDevConf};
        let mut m = LinkMessage::default();
        m.header.index = 9;
        m.header.flags = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName("kt-dsr".into()));
        m.attributes.push(LinkAttribute::Mtu(1480));
        m.attributes.push(LinkAttribute::Group(19284));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::IpIp),
            LinkInfo::Data(InfoData::IpTunnel(vec![
                InfoIpTunnel::Local(ip("10.244.1.5")),
                InfoIpTunnel::Remote(ip("0.0.0.0")),
            ])),
        ]));
        let mut conf = InetDevConf::default();
        conf.rp_filter = 2;
        m.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConf(conf),
            ])]));
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        let l = parse_link(&buf).unwrap();
        assert_eq!(
            l,
            PodLink {
                index: 9,
                name: "kt-dsr".into(),
                kind: "ipip".into(),
                group: 19284,
                mtu: 1480,
                up: true,
                local: Some(ip("10.244.1.5")),
                remote: Some(ip("0.0.0.0")),
                rp_filter: Some(2),
                accept_local: Some(0),
            }
        );
        assert_eq!(parse_link(&buf[..10]), None);
    }

    /// The `all` entry of an IPv4 netconf dump, as Linux 6.18 answers `ip -4 netconf show`
    /// after `sysctl net.ipv4.conf.all.rp_filter=1` (strace -e read=3).
    #[rustfmt::skip]
    const NETCONF_ALL: &[u8] = &[
        0x02, 0x00, 0x00, 0x00,  // netconfmsg AF_INET
        0x08, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff,  // NETCONFA_IFINDEX = -1 (all)
        0x08, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,  // NETCONFA_FORWARDING
        0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00,  // NETCONFA_RP_FILTER = 1
        0x08, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00,  // NETCONFA_MC_FORWARDING
        0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00,  // NETCONFA_BC_FORWARDING
        0x08, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00,  // NETCONFA_PROXY_NEIGH
        0x08, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00,  // NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN
    ];

    #[test]
    fn netconf_all_rp_filter() {
        assert_eq!(parse_netconf_all_rp_filter(NETCONF_ALL), Some(1));
        // The `lo` entry (ifindex 1) of the same dump is not `all`.
        let mut lo = NETCONF_ALL.to_vec();
        lo[8..12].copy_from_slice(&1i32.to_ne_bytes());
        assert_eq!(parse_netconf_all_rp_filter(&lo), None);
        assert_eq!(parse_netconf_all_rp_filter(&[2]), None);
    }

    fn route_payload(table: u8, proto: u8, dst_len: u8, attrs: Vec<RouteAttribute>) -> Vec<u8> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = table;
        m.header.protocol = netlink_packet_route::route::RouteProtocol::from(proto);
        m.header.destination_prefix_length = dst_len;
        m.header.kind = RouteType::Unicast;
        m.attributes = attrs;
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        buf
    }

    #[test]
    fn route_classification() {
        let names: HashMap<u32, String> = [(3, "eth0".to_string())].into_iter().collect();
        let gw = RouteAttribute::Gateway(RouteAddress::Inet("10.244.1.1".parse().unwrap()));
        let def = route_payload(
            254,
            4,
            0,
            vec![
                gw.clone(),
                RouteAttribute::Oif(3),
                RouteAttribute::Priority(100),
            ],
        );
        assert_eq!(
            parse_route(&def, 157, &names),
            ParsedRoute::Default(
                dsr::DefaultRoute {
                    family: Family::V4,
                    gateway: Some(ip("10.244.1.1")),
                    oif: 3
                },
                100
            )
        );
        let ours = route_payload(
            78,
            157,
            0,
            vec![RouteAttribute::Table(78), gw, RouteAttribute::Oif(3)],
        );
        let ParsedRoute::Owned(r) = parse_route(&ours, 157, &names) else {
            panic!()
        };
        assert_eq!(
            (r.table, r.nexthop),
            (78, crate::model::NextHop::Via(ip("10.244.1.1")))
        );
        let subnet = route_payload(254, 2, 24, vec![RouteAttribute::Oif(3)]);
        assert_eq!(parse_route(&subnet, 157, &names), ParsedRoute::Other);
        assert_eq!(parse_route(&[1, 2], 157, &names), ParsedRoute::Other);
    }

    #[test]
    fn scan_dedups_by_identity_and_skips_our_own() {
        let dir = std::env::temp_dir().join(format!("krdsr-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = dir.join("run");
        let proc = dir.join("proc");
        for p in ["1/ns", "2/ns", "10/ns", "self/ns"] {
            std::fs::create_dir_all(proc.join(p)).unwrap();
        }
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("cni-a"), b"").unwrap();
        std::fs::hard_link(run.join("cni-a"), run.join("cni-b")).unwrap(); // same namespace
        std::os::unix::fs::symlink(run.join("cni-a"), proc.join("1/ns/net")).unwrap(); // same again
        std::fs::write(proc.join("2/ns/net"), b"").unwrap(); // "our own"
        std::fs::write(proc.join("10/ns/net"), b"").unwrap();
        std::os::unix::fs::symlink(proc.join("10/ns/net"), proc.join("self/ns/net")).unwrap();
        let own = ns_id(&proc.join("2/ns/net")).ok();
        let got: Vec<PathBuf> = scan(&run, &proc, own).into_iter().map(|n| n.path).collect();
        assert_eq!(got, vec![run.join("cni-a"), proc.join("10/ns/net")]);
        // Missing directories: nothing, no error.
        assert!(scan(&dir.join("nope"), &dir.join("nope"), None).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A pod namespace in memory, applying ops with [`dsr::apply_pod`].
    struct FakePod {
        ns: PodNs,
        s: Settings,
        full_reads: usize,
    }

    impl PodKernel for FakePod {
        fn read_basic(&mut self) -> Result<PodNs, KernelError> {
            Ok(PodNs {
                links: self.ns.links.clone(),
                addrs: self.ns.addrs.clone(),
                ..PodNs::default()
            })
        }
        fn read_rest(&mut self, ns: &mut PodNs, _protocol: u8) -> Result<(), KernelError> {
            self.full_reads += 1;
            *ns = self.ns.clone();
            Ok(())
        }
        fn apply(&mut self, op: &PodOp, _ns: &PodNs) -> Result<(), KernelError> {
            dsr::apply_pod(&mut self.ns, op, &self.s).map_err(|errno| KernelError {
                op: op.to_string(),
                errno,
                msg: String::new(),
            })
        }
    }

    fn settings() -> Settings {
        Settings {
            external_ip_ranges: vec![],
            lb_ip_ranges: vec![],
            ipv4: true,
            ipv6: true,
            tunnel: DestTunnel::Ipip,
            table: 78,
            rule_priority: 32000,
            protocol: 157,
            link_group: 19284,
            slice_managers: Vec::new(),
        }
    }

    fn fake(pod_ip: &str) -> FakePod {
        let eth0 = PodLink {
            index: 2,
            name: "eth0".into(),
            kind: "veth".into(),
            group: 0,
            mtu: 1500,
            up: true,
            local: None,
            remote: None,
            rp_filter: Some(0),
            accept_local: None,
        };
        FakePod {
            ns: PodNs {
                links: vec![eth0],
                addrs: vec![crate::model::Addr {
                    index: 2,
                    addr: net(&format!("{pod_ip}/24")),
                }],
                defaults: vec![dsr::DefaultRoute {
                    family: Family::V4,
                    gateway: Some(ip("10.244.1.1")),
                    oif: 2,
                }],
                ..PodNs::default()
            },
            s: settings(),
            full_reads: 0,
        }
    }

    #[test]
    fn converge_touches_only_namespaces_that_matter() {
        let s = settings();
        let want = PodWant {
            ip: ip("10.244.1.5"),
            vips: [ip("10.96.0.10")].into_iter().collect(),
            gue_port: None,
            origins: BTreeSet::new(),
        };
        let wants: BTreeMap<IpAddr, PodWant> = [(want.ip, want)].into_iter().collect();
        // Another pod: read cheaply, left alone.
        let mut other = fake("10.244.1.9");
        let o = converge(&mut other, &wants, &s, &[], &mut |_| Ok(())).unwrap();
        assert_eq!(
            (o.found.len(), o.applied.len(), other.full_reads),
            (0, 0, 0)
        );
        // The endpoint's pod: configured, then nothing more to do.
        let mut pod = fake("10.244.1.5");
        let o = converge(&mut pod, &wants, &s, &[], &mut |_| Ok(())).unwrap();
        assert_eq!(o.found, vec![ip("10.244.1.5")]);
        assert!(o.failed.is_empty() && o.applied.len() == 5, "{o:?}");
        let o = converge(&mut pod, &wants, &s, &[], &mut |_| Ok(())).unwrap();
        assert_eq!(o.applied, Vec::<String>::new());
        // The endpoint went away: our link is noticed and everything is removed.
        let o = converge(&mut pod, &BTreeMap::new(), &s, &[], &mut |_| Ok(())).unwrap();
        assert!(o.found.is_empty() && !o.applied.is_empty(), "{o:?}");
        assert_eq!(pod.ns.links.len(), 1);
        assert!(pod.ns.rules.is_empty() && pod.ns.routes.is_empty());
    }

    #[test]
    fn in_netns_reports_a_bad_path() {
        let e = in_netns(Path::new("/nonexistent/ns"), || ()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("enter network namespace /nonexistent/ns: "),
            "{e}"
        );
    }

    #[test]
    fn parsers_never_panic_on_junk() {
        let names = HashMap::new();
        let mut x: u32 = 12345;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = parse_link(&junk);
            let _ = parse_route(&junk, 157, &names);
            let _ = parse_netconf_all_rp_filter(&junk);
            let _ = parse_route_oif(&junk);
            let _ = parse_accept_local(&String::from_utf8_lossy(&junk));
        }
    }

    fn dev(index: u32, name: &str, accept_local: u32) -> PodLink {
        PodLink {
            index,
            name: name.into(),
            kind: "veth".into(),
            group: 0,
            mtu: 1500,
            up: true,
            local: None,
            remote: None,
            rp_filter: Some(0),
            accept_local: Some(accept_local),
        }
    }

    /// accept_local (issue 13): set where 0 and wanted, recorded first; an operator's 1 is never
    /// taken over; ours set back when unwanted; a reused ifindex or a gone device is forgotten.
    #[test]
    fn accept_local_is_set_only_where_needed_and_undone() {
        let k = |i: u32, n: &str| (i, n.to_string());
        let r =
            |keys: &[&str]| -> BTreeSet<String> { keys.iter().map(|k| k.to_string()).collect() };
        let links = [
            dev(5, "vpod", 0),
            dev(6, "cni0", 1),
            dev(7, "veth1", 1),
            dev(8, "other", 1),
        ];
        // cni0 is already 1 and not recorded: the operator's. veth1 is ours and no longer
        // wanted; "9 gone" disappeared; 8 was "old" and is now another device.
        let p = plan_accept_local(&[5, 6], &links, &r(&["7 veth1", "9 gone", "8 old"]));
        assert_eq!(p.on, vec![k(5, "vpod")]);
        assert_eq!(p.off, vec![k(7, "veth1")]);
        assert_eq!(p.record, r(&["5 vpod", "7 veth1"]));
        // Nothing wanted (cleanup, DSR off): only ours goes back to 0.
        let p = plan_accept_local(&[], &links, &r(&["6 cni0"]));
        assert_eq!((p.on.len(), p.off.clone()), (0, vec![k(6, "cni0")]));
        // Someone reset a recorded, wanted device: set again.
        let p = plan_accept_local(&[5], &links, &r(&["5 vpod"]));
        assert_eq!(p.on, vec![k(5, "vpod")]);
        let text = render_accept_local(&p.record);
        assert_eq!(text, "5 vpod\n");
        assert_eq!(parse_accept_local(&text), p.record);
    }

    #[test]
    fn route_get_reply_gives_the_device() {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.attributes.push(RouteAttribute::Oif(42));
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        assert_eq!(parse_route_oif(&buf), Some(42));
        assert_eq!(parse_route_oif(&buf[..12]), None);
        assert!(!route_get("10.244.1.10".parse().unwrap()).payload.is_empty());
    }
}
