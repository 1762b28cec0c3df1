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
//! # The transport
//!
//! The netlink socket layer (`netlink::socket`) is being written in parallel; this module talks
//! to it through the small [`Netlink`] trait (request/ack and dump of a message that
//! [`Msg`] describes like `socket::Request`), so plugging the real socket in is one adapter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_core::{DefaultNla, Emitable, NlasIterator, Parseable, ParseableParametrized};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeader, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoIpTunnel, InfoKind, LinkAttribute, LinkFlags, LinkHeader, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
    RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage};
use netlink_packet_route::{AddressFamily, IpProtocol};

use crate::apply::KernelError;
use crate::dsr::{self, Diag, PodLink, PodNs, PodOp, PodWant, Settings};
use crate::model::{Addr, Family, FouPort, NextHop, Route, RouteKind, Rule};
pub use crate::netlink::ipvs::TransportError;

// ---------------------------------------------------------------------------------------------
// Transport

/// One request without its `nlmsghdr`, as `netlink::socket::Request`: the socket adds length,
/// sequence number, port ID and `NLM_F_REQUEST` plus `NLM_F_ACK` or `NLM_F_DUMP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// `nlmsg_type`: an `RTM_*` value or a generic netlink family ID.
    pub msg_type: u16,
    /// Request-specific flags (`NLM_F_CREATE`, `NLM_F_EXCL`, `NLM_F_REPLACE`).
    pub flags: u16,
    /// Everything after `nlmsghdr`.
    pub payload: Vec<u8>,
}

impl Msg {
    fn new(msg_type: u16, flags: u16, body: &impl Emitable) -> Msg {
        let mut payload = vec![0; body.buffer_len()];
        body.emit(&mut payload);
        Msg {
            msg_type,
            flags,
            payload,
        }
    }
}

/// A netlink socket of one protocol (`NETLINK_ROUTE` or `NETLINK_GENERIC`) in one namespace.
pub trait Netlink {
    /// Sends `m` with `NLM_F_ACK` and waits for the ack.
    fn request(&mut self, m: &Msg) -> Result<(), TransportError>;
    /// Sends `m` with `NLM_F_DUMP` and returns every reply's payload (after `nlmsghdr`).
    fn dump(&mut self, m: &Msg) -> Result<Vec<Vec<u8>>, TransportError>;
}

/// Opens sockets inside the calling thread's network namespace (called on the per-namespace
/// thread after `setns`).
pub trait Opener: Sync {
    /// The socket type.
    type Socket: Netlink;
    /// A `NETLINK_ROUTE` socket.
    fn route(&self) -> Result<Self::Socket, TransportError>;
    /// A `NETLINK_GENERIC` socket.
    fn generic(&self) -> Result<Self::Socket, TransportError>;
}

// ---------------------------------------------------------------------------------------------
// Wire format (pure builders and parsers)

// uapi <linux/rtnetlink.h>.
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
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
// uapi <linux/netconf.h>.
const NETCONFA_IFINDEX: u16 = 1;
const NETCONFA_RP_FILTER: u16 = 3;
const NETCONFA_IFINDEX_ALL: i32 = -1;
// uapi <linux/genetlink.h>: nlctrl.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
// uapi <linux/fou.h>.
const FOU_GENL_VERSION: u8 = 1;
const FOU_CMD_ADD: u8 = 1;
const FOU_CMD_DEL: u8 = 2;
const FOU_CMD_GET: u8 = 3;
const FOU_ATTR_PORT: u16 = 1;
const FOU_ATTR_AF: u16 = 2;
const FOU_ATTR_TYPE: u16 = 4;
const FOU_ENCAP_GUE: u8 = 2;

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

/// Dump of all links (with their `IFLA_AF_SPEC`, which carries the IPv4 devconf).
pub fn link_dump() -> Msg {
    Msg::new(RTM_GETLINK, 0, &LinkMessage::default())
}

/// Dump of all addresses.
pub fn addr_dump() -> Msg {
    Msg::new(RTM_GETADDR, 0, &AddressMessage::default())
}

/// Dump of all routes (both families, every table).
pub fn route_dump() -> Msg {
    Msg::new(RTM_GETROUTE, 0, &RouteMessage::default())
}

/// Dump of all rules (both families).
pub fn rule_dump() -> Msg {
    Msg::new(RTM_GETRULE, 0, &RuleMessage::default())
}

/// Dump of the IPv4 netconf entries (per device, plus `all` and `default`): `struct netconfmsg`
/// is one byte, padded to 4.
pub fn netconf_dump() -> Msg {
    Msg {
        msg_type: RTM_GETNETCONF,
        flags: 0,
        payload: vec![libc::AF_INET as u8, 0, 0, 0],
    }
}

/// Creates the receive link: `ip link add NAME type ipip local POD remote 0.0.0.0` (or
/// `ip6tnl mode ip6ip6 local POD remote ::`), in our link group, up.
pub fn link_create(name: &str, family: Family, local: IpAddr, group: u32) -> Msg {
    let (kind, proto, any) = match family {
        Family::V4 => (InfoKind::IpIp, IpProtocol::Ipip, IpAddr::from([0u8; 4])),
        Family::V6 => (InfoKind::Ip6Tnl, IpProtocol::Ipv6, IpAddr::from([0u8; 16])),
    };
    let mut m = LinkMessage::default();
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes.push(LinkAttribute::Group(group));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(kind),
        LinkInfo::Data(InfoData::IpTunnel(vec![
            InfoIpTunnel::Local(local),
            InfoIpTunnel::Remote(any),
            InfoIpTunnel::Protocol(proto),
        ])),
    ]));
    Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &m)
}

/// Sets a link up.
pub fn link_set_up(index: u32) -> Msg {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    Msg::new(RTM_NEWLINK, 0, &m)
}

/// Deletes a link.
pub fn link_delete(index: u32) -> Msg {
    let mut m = LinkMessage::default();
    m.header.index = index;
    Msg::new(RTM_DELLINK, 0, &m)
}

/// Sets the link's IPv4 `rp_filter` to 0: `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF {
/// [IPV4_DEVCONF_RP_FILTER] = 0 } } }`, raw, because netlink-packet-route's `DevConfRequest`
/// leaves zero values out.
pub fn link_rp_filter_off(index: u32) -> Msg {
    let conf = nested(
        IFLA_INET_CONF,
        &[nla(IPV4_DEVCONF_RP_FILTER, 0u32.to_ne_bytes().to_vec())],
    );
    let inet = nested(libc::AF_INET as u16, &[conf]);
    let spec = nested(IFLA_AF_SPEC, &[inet]);
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::Other(spec));
    Msg::new(RTM_NEWLINK, 0, &m)
}

fn addr_msg(index: u32, addr: &IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header = AddressHeader {
        family: af(Family::of_net(addr)),
        prefix_len: addr.prefix_len(),
        index,
        // IPv4 VIPs with scope link, as kube-router and design check E3; IPv6 global with
        // NODAD (E5): usable at once, no duplicate detection on a NOARP tunnel.
        scope: match addr {
            IpNet::V4(_) => AddressScope::Link,
            IpNet::V6(_) => AddressScope::Universe,
        },
        flags: match addr {
            IpNet::V4(_) => AddressHeaderFlags::empty(),
            IpNet::V6(_) => AddressHeaderFlags::Nodad,
        },
    };
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    if addr.addr().is_ipv6() {
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    m
}

/// Adds an address (`ip addr add VIP/32 dev kt-dsr scope link`, or `VIP/128 nodad`).
pub fn addr_add(index: u32, addr: &IpNet) -> Msg {
    Msg::new(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_REPLACE,
        &addr_msg(index, addr),
    )
}

/// Deletes an address.
pub fn addr_del(index: u32, addr: &IpNet) -> Msg {
    Msg::new(RTM_DELADDR, 0, &addr_msg(index, addr))
}

fn route_addr(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn route_msg(r: &Route, oif: Option<u32>, full: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: af(r.family()),
        destination_prefix_length: r.dst.prefix_len(),
        table: u8::try_from(r.table).unwrap_or(0),
        protocol: RouteProtocol::from(r.protocol),
        kind: match r.kind {
            RouteKind::Local => RouteType::Local,
            _ => RouteType::Unicast,
        },
        scope: if !full {
            RouteScope::NoWhere
        } else if r.kind == RouteKind::Local {
            RouteScope::Host
        } else if matches!(r.nexthop, NextHop::Dev(_)) && r.family() == Family::V4 {
            RouteScope::Link
        } else {
            RouteScope::Universe
        },
        ..RouteHeader::default()
    };
    m.attributes
        .push(RouteAttribute::Destination(route_addr(r.dst.network())));
    m.attributes.push(RouteAttribute::Table(r.table));
    if let NextHop::Via(g) = r.nexthop {
        m.attributes.push(RouteAttribute::Gateway(route_addr(g)));
    }
    if let Some(oif) = oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if full {
        if let Some(mss) = r.advmss {
            m.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Advmss(mss)]));
        }
    }
    m
}

/// Creates or replaces a route (`ip route replace default via GW dev eth0 table 78 advmss N
/// proto P`).
pub fn route_replace(r: &Route, oif: Option<u32>) -> Msg {
    Msg::new(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE,
        &route_msg(r, oif, true),
    )
}

/// Deletes a route (destination, table, type and protocol match).
pub fn route_delete(r: &Route) -> Msg {
    Msg::new(RTM_DELROUTE, 0, &route_msg(r, None, false))
}

fn rule_msg(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header = RuleHeader {
        family: af(r.family),
        src_len: r.src.map_or(0, |n| n.prefix_len()),
        dst_len: r.dst.map_or(0, |n| n.prefix_len()),
        table: u8::try_from(r.table).unwrap_or(0),
        action: RuleAction::ToTable,
        ..RuleHeader::default()
    };
    m.attributes.push(RuleAttribute::Priority(r.priority));
    if let Some(s) = r.src {
        m.attributes.push(RuleAttribute::Source(s.network()));
    }
    if let Some(d) = r.dst {
        m.attributes.push(RuleAttribute::Destination(d.network()));
    }
    m.attributes.push(RuleAttribute::Table(r.table));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(r.protocol)));
    m
}

/// Adds a rule (`ip rule add from VIP lookup 78 pref P proto N`).
pub fn rule_add(r: &Rule) -> Msg {
    Msg::new(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule_msg(r))
}

/// Deletes a rule.
pub fn rule_delete(r: &Rule) -> Msg {
    Msg::new(RTM_DELRULE, 0, &rule_msg(r))
}

fn genl(family_id: u16, cmd: u8, version: u8, attrs: &[DefaultNla]) -> Msg {
    let mut payload = vec![cmd, version, 0, 0];
    let mut a = vec![0; attrs.buffer_len()];
    attrs.emit(&mut a);
    payload.extend(a);
    Msg {
        msg_type: family_id,
        flags: 0,
        payload,
    }
}

/// nlctrl `CTRL_CMD_GETFAMILY` for `name` (answered with one message, read as a dump of one).
pub fn genl_family(name: &str) -> Msg {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    genl(
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        1,
        &[nla(CTRL_ATTR_FAMILY_NAME, n)],
    )
}

/// The family ID in an nlctrl reply.
pub fn parse_family_id(payload: &[u8]) -> Option<u16> {
    attrs(payload.get(4..)?)
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))
}

/// `ip fou add port P gue` (`-6` for IPv6). Never FOU_ATTR_IPPROTO with GUE (SPEC T-7).
pub fn fou_add(family_id: u16, p: &FouPort) -> Msg {
    genl(
        family_id,
        FOU_CMD_ADD,
        FOU_GENL_VERSION,
        &[
            nla(FOU_ATTR_PORT, p.port.to_be_bytes().to_vec()),
            nla(FOU_ATTR_AF, vec![p.family.af()]),
            nla(FOU_ATTR_TYPE, vec![FOU_ENCAP_GUE]),
        ],
    )
}

/// `ip fou del port P` (`-6` for IPv6).
pub fn fou_del(family_id: u16, p: &FouPort) -> Msg {
    genl(
        family_id,
        FOU_CMD_DEL,
        FOU_GENL_VERSION,
        &[
            nla(FOU_ATTR_PORT, p.port.to_be_bytes().to_vec()),
            nla(FOU_ATTR_AF, vec![p.family.af()]),
        ],
    )
}

/// Dump of the FOU ports.
pub fn fou_dump(family_id: u16) -> Msg {
    genl(family_id, FOU_CMD_GET, FOU_GENL_VERSION, &[])
}

/// A FOU port from a dump reply.
pub fn parse_fou(payload: &[u8]) -> Option<FouPort> {
    let (mut port, mut family, mut gue) = (None, None, false);
    for (k, v) in attrs(payload.get(4..)?) {
        match k {
            FOU_ATTR_PORT => port = Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)),
            FOU_ATTR_AF => {
                family = match i32::from(*v.first()?) {
                    libc::AF_INET => Some(Family::V4),
                    libc::AF_INET6 => Some(Family::V6),
                    _ => None,
                }
            }
            FOU_ATTR_TYPE => gue = v.first() == Some(&FOU_ENCAP_GUE),
            _ => {}
        }
    }
    Some(FouPort {
        family: family?,
        port: port?,
        gue,
    })
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

/// An address from a dump reply (`IFA_LOCAL`, else `IFA_ADDRESS`).
pub fn parse_addr(payload: &[u8]) -> Option<Addr> {
    let h = AddressHeader::parse(payload).ok()?;
    let (mut local, mut address) = (None, None);
    for n in NlasIterator::new(payload.get(8..)?).map_while(|n| n.ok()) {
        match AddressAttribute::parse(&n) {
            Ok(AddressAttribute::Local(a)) => local = Some(a),
            Ok(AddressAttribute::Address(a)) => address = Some(a),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    Some(Addr {
        index: h.index,
        addr: IpNet::new(ip, h.prefix_len).ok()?,
    })
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
pub fn parse_route(payload: &[u8], protocol: u8, names: &BTreeMap<u32, String>) -> ParsedRoute {
    let Ok(h) = RouteHeader::parse(payload) else {
        return ParsedRoute::Other;
    };
    let Some(family) = family_of(h.address_family) else {
        return ParsedRoute::Other;
    };
    let mut table = u32::from(h.table);
    let (mut dst, mut gw, mut oif, mut advmss, mut prio, mut multipath) =
        (None, None, None, None, 0, false);
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
            RouteAttribute::Destination(a) => dst = ip(a),
            RouteAttribute::Gateway(a) => gw = ip(a),
            RouteAttribute::Oif(i) => oif = Some(i),
            RouteAttribute::Priority(p) => prio = p,
            RouteAttribute::MultiPath(_) => multipath = true,
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    if let RouteMetric::Advmss(v) = m {
                        advmss = Some(v);
                    }
                }
            }
            _ => {}
        }
    }
    let proto = u8::from(h.protocol);
    if proto == protocol {
        let Ok(dst) = IpNet::new(
            dst.unwrap_or_else(|| dsr::default_net(family).addr()),
            h.destination_prefix_length,
        ) else {
            return ParsedRoute::Other;
        };
        let nexthop = match (gw, oif) {
            (Some(g), _) => NextHop::Via(g),
            (None, Some(i)) => {
                NextHop::Dev(names.get(&i).cloned().unwrap_or_else(|| format!("if{i}")))
            }
            (None, None) => NextHop::Dev(String::new()),
        };
        return ParsedRoute::Owned(Route {
            table,
            dst,
            nexthop,
            src: None,
            protocol: proto,
            kind: match h.kind {
                RouteType::Local => RouteKind::Local,
                RouteType::Unicast => RouteKind::Unicast,
                other => RouteKind::Other(u8::from(other)),
            },
            advmss,
        });
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

/// A rule of ours from a dump reply (`None` for others and for what the model cannot hold).
pub fn parse_rule(payload: &[u8], protocol: u8) -> Option<Rule> {
    let h = RuleHeader::parse(payload).ok()?;
    let family = family_of(h.family)?;
    if h.action != RuleAction::ToTable {
        return None;
    }
    let mut r = Rule {
        family,
        priority: 0,
        src: None,
        dst: None,
        ipproto: None,
        dport: None,
        table: u32::from(h.table),
        protocol: 0,
    };
    for n in NlasIterator::new(payload.get(12..)?).map_while(|n| n.ok()) {
        match RuleAttribute::parse(&n) {
            Ok(RuleAttribute::Priority(p)) => r.priority = p,
            Ok(RuleAttribute::Source(ip)) => r.src = IpNet::new(ip, h.src_len).ok(),
            Ok(RuleAttribute::Destination(ip)) => r.dst = IpNet::new(ip, h.dst_len).ok(),
            Ok(RuleAttribute::IpProtocol(p)) => r.ipproto = u8::try_from(i32::from(p)).ok(),
            Ok(RuleAttribute::DestinationPortRange(p)) => {
                if p.start != p.end {
                    return None;
                }
                r.dport = Some(p.start);
            }
            Ok(RuleAttribute::Table(t)) => r.table = t,
            Ok(RuleAttribute::Protocol(p)) => r.protocol = u8::from(p),
            _ => {}
        }
    }
    (r.protocol == protocol).then_some(r)
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
/// result. Only that thread ever is in the namespace; it ends when `f` returns. A panic in `f`
/// is returned as an error, never propagated into the caller (SPEC R-1).
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
}

/// Converges one namespace: reads, plans with [`dsr::plan_pod`], applies. A namespace that holds
/// no wanted endpoint and no receive link of ours is left untouched after the first read.
pub fn converge(
    k: &mut impl PodKernel,
    wants: &BTreeMap<IpAddr, PodWant>,
    s: &Settings,
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
    if mine.is_empty() && !ours {
        return Ok(out);
    }
    k.read_rest(&mut ns, s.protocol)?;
    let ops = dsr::plan_pod(&mine, &ns, s, &mut out.diags);
    for op in &ops {
        match k.apply(op, &ns) {
            Ok(()) => out.applied.push(op.to_string()),
            Err(e) => out.failed.push(e),
        }
    }
    Ok(out)
}

/// [`PodKernel`] over netlink sockets opened in the namespace.
pub struct NetlinkPod<N: Netlink> {
    rt: N,
    genl: Option<N>,
    fou_id: Option<u16>,
    group: u32,
}

impl<N: Netlink> NetlinkPod<N> {
    /// A pod kernel over a route socket and, for FOU, a generic one (the family is resolved
    /// lazily; without it, FOU ports read as none and FOU ops fail). Links it creates get
    /// `group` (the ownership mark, `--link-group`).
    pub fn new(rt: N, genl: Option<N>, group: u32) -> NetlinkPod<N> {
        NetlinkPod {
            rt,
            genl,
            fou_id: None,
            group,
        }
    }

    fn dump(&mut self, what: &str, m: &Msg) -> Result<Vec<Vec<u8>>, KernelError> {
        self.rt.dump(m).map_err(|e| KernelError {
            op: format!("dump {what}"),
            errno: e.errno,
            msg: e.msg,
        })
    }

    /// The "fou" family ID; `None` when the family is not there (module not loaded).
    fn fou_family(&mut self) -> Result<Option<u16>, KernelError> {
        if let Some(id) = self.fou_id {
            return Ok(Some(id));
        }
        let Some(g) = self.genl.as_mut() else {
            return Ok(None);
        };
        match g.dump(&genl_family("fou")) {
            Ok(replies) => {
                self.fou_id = replies.iter().find_map(|r| parse_family_id(r));
                Ok(self.fou_id)
            }
            Err(e) if e.errno == libc::ENOENT => Ok(None),
            Err(e) => Err(KernelError {
                op: "resolve generic netlink family fou".into(),
                errno: e.errno,
                msg: e.msg,
            }),
        }
    }
}

impl<N: Netlink> PodKernel for NetlinkPod<N> {
    fn read_basic(&mut self) -> Result<PodNs, KernelError> {
        let links = self
            .dump("links", &link_dump())?
            .iter()
            .filter_map(|p| parse_link(p))
            .collect();
        let addrs = self
            .dump("addresses", &addr_dump())?
            .iter()
            .filter_map(|p| parse_addr(p))
            .collect();
        Ok(PodNs {
            links,
            addrs,
            ..PodNs::default()
        })
    }

    fn read_rest(&mut self, ns: &mut PodNs, protocol: u8) -> Result<(), KernelError> {
        let names: BTreeMap<u32, String> =
            ns.links.iter().map(|l| (l.index, l.name.clone())).collect();
        let mut best: BTreeMap<Family, (u32, dsr::DefaultRoute)> = BTreeMap::new();
        for p in self.dump("routes", &route_dump())? {
            match parse_route(&p, protocol, &names) {
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
            .dump("rules", &rule_dump())?
            .iter()
            .filter_map(|p| parse_rule(p, protocol))
            .collect();
        ns.all_rp_filter = match self.rt.dump(&netconf_dump()) {
            Ok(r) => r.iter().find_map(|p| parse_netconf_all_rp_filter(p)),
            Err(_) => None,
        };
        if let Some(id) = self.fou_family()? {
            if let Some(g) = self.genl.as_mut() {
                ns.fou = g
                    .dump(&fou_dump(id))
                    .map_err(|e| KernelError {
                        op: "dump fou ports".into(),
                        errno: e.errno,
                        msg: e.msg,
                    })?
                    .iter()
                    .filter_map(|p| parse_fou(p))
                    .collect();
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &PodOp, ns: &PodNs) -> Result<(), KernelError> {
        let fail = |e: TransportError| KernelError {
            op: op.to_string(),
            errno: e.errno,
            msg: e.msg,
        };
        let no_link = |name: &str| KernelError {
            op: op.to_string(),
            errno: libc::ENODEV,
            msg: format!("no link {name}"),
        };
        // A link created by this plan is not in `ns`: look it up by name.
        let index_of = |rt: &mut N, name: &str| -> Result<u32, KernelError> {
            if let Some(l) = ns.links.iter().find(|l| l.name == name) {
                return Ok(l.index);
            }
            let replies = rt.dump(&link_dump()).map_err(fail)?;
            replies
                .iter()
                .filter_map(|p| parse_link(p))
                .find(|l| l.name == name)
                .map(|l| l.index)
                .ok_or_else(|| no_link(name))
        };
        let tolerate = |r: Result<(), TransportError>, ok: &[i32]| match r {
            Err(e) if ok.contains(&e.errno) => Ok(()),
            other => other.map_err(fail),
        };
        match op {
            PodOp::CreateLink {
                name,
                family,
                local,
            } => self
                .rt
                .request(&link_create(name, *family, *local, self.group))
                .map_err(fail),
            PodOp::DeleteLink { index, .. } => {
                tolerate(self.rt.request(&link_delete(*index)), &[libc::ENODEV])
            }
            PodOp::SetUp { link } => {
                let i = index_of(&mut self.rt, link)?;
                self.rt.request(&link_set_up(i)).map_err(fail)
            }
            PodOp::DisableRpFilter { link } => {
                let i = index_of(&mut self.rt, link)?;
                self.rt.request(&link_rp_filter_off(i)).map_err(fail)
            }
            PodOp::AddAddr { link, addr } => {
                let i = index_of(&mut self.rt, link)?;
                self.rt.request(&addr_add(i, addr)).map_err(fail)
            }
            PodOp::DelAddr { link, addr } => {
                let i = index_of(&mut self.rt, link)?;
                tolerate(self.rt.request(&addr_del(i, addr)), &[libc::EADDRNOTAVAIL])
            }
            PodOp::ReplaceRoute { route, oif } => {
                self.rt.request(&route_replace(route, *oif)).map_err(fail)
            }
            PodOp::DeleteRoute(r) => tolerate(
                self.rt.request(&route_delete(r)),
                &[libc::ESRCH, libc::ENOENT],
            ),
            PodOp::AddRule(r) => tolerate(self.rt.request(&rule_add(r)), &[libc::EEXIST]),
            PodOp::DeleteRule(r) => tolerate(self.rt.request(&rule_delete(r)), &[libc::ENOENT]),
            PodOp::AddFouPort(p) | PodOp::DelFouPort(p) => {
                let id = self.fou_family()?.ok_or_else(|| KernelError {
                    op: op.to_string(),
                    errno: libc::ENOENT,
                    msg: "generic netlink family fou not available (modprobe fou fou6)".into(),
                })?;
                let g = self.genl.as_mut().ok_or_else(|| KernelError {
                    op: op.to_string(),
                    errno: libc::ENOTSUP,
                    msg: "no generic netlink socket".into(),
                })?;
                if matches!(op, PodOp::AddFouPort(_)) {
                    tolerate(g.request(&fou_add(id, p)), &[libc::EEXIST])
                } else {
                    tolerate(g.request(&fou_del(id, p)), &[libc::ENOENT])
                }
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
/// (`<proc>/self/ns/net`) is never touched.
pub fn reconcile_pods<O: Opener>(
    wants: &BTreeMap<IpAddr, PodWant>,
    s: &Settings,
    opener: &O,
    run_netns: &Path,
    proc: &Path,
) -> PodsReport {
    let own = ns_id(&proc.join("self/ns/net")).ok();
    let candidates = scan(run_netns, proc, own);
    let mut report = PodsReport {
        namespaces: candidates.len(),
        ..PodsReport::default()
    };
    let mut found: BTreeSet<IpAddr> = BTreeSet::new();
    for ns in candidates {
        let r = in_netns(&ns.path, || -> Result<NsOutcome, KernelError> {
            let terr = |what: &str, e: TransportError| KernelError {
                op: format!("open {what} socket"),
                errno: e.errno,
                msg: e.msg,
            };
            let rt = opener.route().map_err(|e| terr("route", e))?;
            let genl = opener.generic().ok();
            let mut k = NetlinkPod::new(rt, genl, s.link_group);
            converge(&mut k, wants, s)
        });
        match r {
            Ok(Ok(o)) => {
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
