//! The kernel objects kr-tunneld manages, as plain values: tunnels, FOU ports, routes and rules.
//!
//! Core module: pure data, no I/O. The same types describe the *desired* state (built from Node
//! objects by [`crate::nodes`]) and the *actual* state (read from the kernel by the netlink shell),
//! so that [`crate::reconcile`] can compare them field by field and emit [`Op`]s.
//!
//! Ownership (SPEC T-4) is decided by [`Ownership`]: a link is ours when its kind is a tunnel kind,
//! its name carries our prefix and its link group is ours; routes and rules are ours when they carry
//! our protocol number. Readers filter on these marks, so a plan can never touch foreign state.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Address family of a tunnel, route, rule or FOU port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// AF_INET.
    V4,
    /// AF_INET6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family of a prefix.
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// The kernel's `AF_*` number.
    pub fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    /// Host prefix length (32 or 128).
    pub fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// Transmit encapsulation of a tunnel (`IFLA_IPTUN_ENCAP_*`, uapi `if_tunnel.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encap {
    /// Plain IPIP / ip6ip6 (`TUNNEL_ENCAP_NONE`).
    None,
    /// Generic UDP Encapsulation (`TUNNEL_ENCAP_GUE`). `sport` 0 means "auto" (flow hash).
    Gue {
        /// Source port, 0 = auto.
        sport: u16,
        /// Destination port: the peer's FOU receive port.
        dport: u16,
    },
    /// Anything else the kernel reports (FOU direct, MPLS, unknown): never what we want.
    Other {
        /// `IFLA_IPTUN_ENCAP_TYPE`.
        kind: u16,
        /// `IFLA_IPTUN_ENCAP_SPORT`.
        sport: u16,
        /// `IFLA_IPTUN_ENCAP_DPORT`.
        dport: u16,
    },
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encap::None => f.write_str("ipip"),
            Encap::Gue { dport, .. } => write!(f, "gue:{dport}"),
            Encap::Other { kind, dport, .. } => write!(f, "encap{kind}:{dport}"),
        }
    }
}

/// Link kind as reported in `IFLA_INFO_KIND`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// `ipip` (IPv4 in IPv4).
    Ipip,
    /// `ip6tnl` (we only create mode ip6ip6).
    Ip6Tnl,
    /// Any other kind (or none, for physical devices).
    Other(String),
}

impl LinkKind {
    /// The tunnel kind carrying a family.
    pub fn for_family(family: Family) -> LinkKind {
        match family {
            Family::V4 => LinkKind::Ipip,
            Family::V6 => LinkKind::Ip6Tnl,
        }
    }
}

/// The attributes of a point-to-point tunnel that kr-tunneld compares and repairs (SPEC T-2, T-5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tunnel {
    /// Interface name (at most 15 bytes, see [`crate::nodes::tunnel_name`]).
    pub name: String,
    /// IPv4 → `ipip`, IPv6 → `ip6tnl` mode ip6ip6.
    pub family: Family,
    /// Our underlay address.
    pub local: IpAddr,
    /// The peer's underlay address.
    pub remote: IpAddr,
    /// Transmit encapsulation.
    pub encap: Encap,
    /// Outer TTL / hop limit (never 0 = inherit: set explicitly, SPEC T-2).
    pub ttl: u8,
    /// Path MTU discovery on the outer header (IPv4 only; ip6tnl always discovers).
    pub pmtudisc: bool,
    /// Device MTU.
    pub mtu: u32,
}

/// A link as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND`.
    pub kind: LinkKind,
    /// `IFLA_GROUP`.
    pub group: u32,
    /// `IFLA_MTU`.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Tunnel attributes, for `ipip` and `ip6tnl` links (name and mtu copied from the link).
    pub tunnel: Option<Tunnel>,
}

/// An interface address (`RTM_NEWADDR`), used for the "same subnet" decision (SPEC T-1) and to
/// find the underlay device MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    /// ifindex of the device holding the address.
    pub index: u32,
    /// Address with its prefix length.
    pub addr: IpNet,
}

/// A FOU receive port (generic netlink family "fou").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FouPort {
    /// Address family of the UDP socket.
    pub family: Family,
    /// UDP port.
    pub port: u16,
    /// GUE (`FOU_ENCAP_GUE`) rather than direct FOU.
    pub gue: bool,
}

/// Route type (`rtm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// `RTN_UNICAST`.
    Unicast,
    /// `RTN_LOCAL` (DSR: `local default dev lo table 78`).
    Local,
    /// Anything else.
    Other(u8),
}

/// Where a route sends packets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// Out of a device (by name); for tunnels: `dev kt0a000005`.
    Dev(String),
    /// Through a gateway (`via`); the kernel picks the device.
    Via(IpAddr),
}

/// A route (`RTM_NEWROUTE`) with the fields kr-tunneld sets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Routing table (up to 2^32 - 1; 254 = main).
    pub table: u32,
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop.
    pub nexthop: NextHop,
    /// Preferred source (`src`).
    pub src: Option<IpAddr>,
    /// Route protocol: ours, [`Ownership::protocol`].
    pub protocol: u8,
    /// `rtm_type`.
    pub kind: RouteKind,
    /// `RTAX_ADVMSS` metric (DSR pod routes).
    pub advmss: Option<u32>,
}

impl Route {
    /// Address family of the destination.
    pub fn family(&self) -> Family {
        Family::of_net(&self.dst)
    }
}

/// A policy-routing rule (`RTM_NEWRULE`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Address family.
    pub family: Family,
    /// `FRA_PRIORITY` (always explicit, SPEC T-6).
    pub priority: u32,
    /// `from` prefix.
    pub src: Option<IpNet>,
    /// `to` prefix.
    pub dst: Option<IpNet>,
    /// `ipproto` (DSR).
    pub ipproto: Option<u8>,
    /// `dport` (DSR), a single port.
    pub dport: Option<u16>,
    /// `lookup` table.
    pub table: u32,
    /// `FRA_PROTOCOL`: ours, [`Ownership::protocol`].
    pub protocol: u8,
}

/// The marks that make an object ours (SPEC T-4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// Prefix of every link name we create (`kt` by default).
    pub name_prefix: String,
    /// `IFLA_GROUP` of every link we create.
    pub link_group: u32,
    /// Protocol number of our routes and rules (`rtm_protocol`, `FRA_PROTOCOL`).
    pub protocol: u8,
}

impl Ownership {
    /// Whether a link read from the kernel is ours.
    pub fn owns_link(&self, link: &Link) -> bool {
        matches!(link.kind, LinkKind::Ipip | LinkKind::Ip6Tnl)
            && link.group == self.link_group
            && link.name.starts_with(&self.name_prefix)
    }
}

/// The kernel state kr-tunneld looks at, read with one dump per object type.
///
/// `links` and `addrs` hold *every* link and address (needed for name clashes, the subnet decision
/// and the underlay MTU); `routes`, `rules` and `fou` hold only owned objects (routes and rules by
/// protocol; FOU ports carry no owner mark, so readers return all and the planner only removes
/// ports it has recorded as its own, see [`crate::reconcile`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    /// All links.
    pub links: Vec<Link>,
    /// All interface addresses.
    pub addrs: Vec<Addr>,
    /// Owned routes, all tables.
    pub routes: Vec<Route>,
    /// Owned rules.
    pub rules: Vec<Rule>,
    /// All FOU ports.
    pub fou: Vec<FouPort>,
}

/// One step of a plan. Creation ops come dependencies first (FOU port, link, up, routes, rules),
/// deletions in reverse (SPEC T-9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Open a FOU receive port.
    AddFouPort(FouPort),
    /// Close a FOU receive port.
    DelFouPort(FouPort),
    /// Create a tunnel link (with our group), then set it up.
    CreateTunnel(Tunnel),
    /// Change a tunnel in place (RTM_NEWLINK on the existing ifindex, SPEC T-5).
    ChangeTunnel {
        /// ifindex of the existing link.
        index: u32,
        /// The attributes it must have.
        want: Tunnel,
    },
    /// Set a link administratively up.
    SetUp {
        /// ifindex.
        index: u32,
        /// Name, for logs.
        name: String,
    },
    /// Delete a link.
    DeleteTunnel {
        /// ifindex.
        index: u32,
        /// Name, for logs.
        name: String,
    },
    /// Create or replace a route (`NLM_F_REPLACE`).
    ReplaceRoute(Route),
    /// Delete a route.
    DeleteRoute(Route),
    /// Add a rule.
    AddRule(Rule),
    /// Delete a rule.
    DeleteRule(Rule),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddFouPort(p) => write!(f, "add fou port {} {}", p.family, p.port),
            Op::DelFouPort(p) => write!(f, "del fou port {} {}", p.family, p.port),
            Op::CreateTunnel(t) => write!(
                f,
                "create tunnel {} local {} remote {} encap {} ttl {} mtu {}",
                t.name, t.local, t.remote, t.encap, t.ttl, t.mtu
            ),
            Op::ChangeTunnel { index, want: t } => write!(
                f,
                "change tunnel {} (ifindex {index}) local {} remote {} encap {} ttl {} mtu {}",
                t.name, t.local, t.remote, t.encap, t.ttl, t.mtu
            ),
            Op::SetUp { name, .. } => write!(f, "set link {name} up"),
            Op::DeleteTunnel { name, .. } => write!(f, "delete tunnel {name}"),
            Op::ReplaceRoute(r) => write!(f, "replace route {}", RouteDisplay(r)),
            Op::DeleteRoute(r) => write!(f, "delete route {}", RouteDisplay(r)),
            Op::AddRule(r) => write!(f, "add rule {}", RuleDisplay(r)),
            Op::DeleteRule(r) => write!(f, "delete rule {}", RuleDisplay(r)),
        }
    }
}

/// `ip route`-like rendering of a route.
pub struct RouteDisplay<'a>(pub &'a Route);

impl fmt::Display for RouteDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        if r.kind == RouteKind::Local {
            f.write_str("local ")?;
        }
        write!(f, "{}", r.dst)?;
        match &r.nexthop {
            NextHop::Dev(d) => write!(f, " dev {d}")?,
            NextHop::Via(g) => write!(f, " via {g}")?,
        }
        if let Some(s) = r.src {
            write!(f, " src {s}")?;
        }
        write!(f, " table {} proto {}", r.table, r.protocol)?;
        if let Some(m) = r.advmss {
            write!(f, " advmss {m}")?;
        }
        Ok(())
    }
}

/// `ip rule`-like rendering of a rule.
pub struct RuleDisplay<'a>(pub &'a Rule);

impl fmt::Display for RuleDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(f, "{} pref {}", r.family, r.priority)?;
        if let Some(s) = r.src {
            write!(f, " from {s}")?;
        }
        if let Some(d) = r.dst {
            write!(f, " to {d}")?;
        }
        if let Some(p) = r.ipproto {
            write!(f, " ipproto {p}")?;
        }
        if let Some(p) = r.dport {
            write!(f, " dport {p}")?;
        }
        write!(f, " lookup {} proto {}", r.table, r.protocol)
    }
}
