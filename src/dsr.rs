//! DSR (SPEC D-1…D-5): from Services and EndpointSlices to IPVS tunnel-mode virtual services,
//! the director's policy routing, and the receiving pods' configuration, with the planners that
//! turn desired vs actual state into ordered operations.
//!
//! Core module: pure. No sockets, no files, no clock, no logging: problems with the input are
//! returned as [`Diag`]s for the shell to log once per change.
//!
//! # The data path (no fwmark, no netfilter; verified on Debian's 6.1 kernel, design checks E3/E5)
//!
//! * Director (every node): an IPVS service `VIP:port/proto` (not a fwmark service) with real
//!   servers in tunnel mode; a rule `to VIP ipproto P dport N lookup 78` and the route
//!   `local default dev lo table 78` deliver the packet locally although no interface holds the
//!   VIP, so IPVS sees it in LOCAL_IN, and the director never answers ARP for the VIP.
//! * Real server (a pod on any node): an `ipip` (`ip6tnl` for IPv6) receive link `kt-dsr`
//!   (`kt-dsr6`) with local = the pod IP and any remote holds the VIP; replies leave through the
//!   pod's own default route, bypassing the director. A rule `from VIP lookup 78` in the pod
//!   sends them through a copy of that default route carrying `advmss`, so the SYN-ACK announces
//!   an MSS that fits after encapsulation.
//!
//! # Ownership (SPEC D-5, T-4)
//!
//! IPVS services carry no owner mark, and kube-proxy in IPVS mode creates services too. The
//! daemon keeps the set of [`ServiceKey`]s it created in a state file (`/run/kr-tunneld`,
//! [`render_owned`] / [`parse_owned`]): it lives exactly as long as the kernel's IPVS table
//! (survives daemon restarts, not reboots). Only recorded services are ever edited or deleted,
//! together with all their real servers; a wanted `VIP:port/proto` held by a service that is not
//! recorded is reported and left alone, and the director rule for it is not installed (the
//! traffic keeps going wherever the foreign service sends it). The record is written *before*
//! a service is created ([`IpvsPlan::record`]) and shrunk only after a deletion succeeded
//! ([`IpvsPlan::record_after`]), so a crash at any point leaves no unrecorded service of ours
//! (SPEC R-3). The one residual risk: a recorded service deleted behind our back and re-created
//! by someone else under the same key before the next pass is adopted.
//!
//! Director rules and the table-78 routes are ordinary owned rules/routes (our route protocol).
//! Pod-side state is owned by name, kind and link group (the receive links), by route protocol
//! (rules and routes in the pod), and by context (a GUE port in a pod network namespace that
//! holds our receive link is ours; pods do not open FOU ports themselves).
//!
//! # Wiring (daemon)
//!
//! On every reconcile with DSR enabled: read the ownership record ([`OWNED_FILE`] in the state
//! directory, [`parse_owned`]), read IPVS ([`crate::netlink::ipvs::IpvsKernel::read`]), call
//! [`plan`]; write [`IpvsPlan::record`], apply the IPVS ops, write [`IpvsPlan::record_after`];
//! then merge [`DsrPlan::rules`] and [`DsrPlan::routes`] into the overlay's desired rules and
//! routes before [`crate::reconcile::plan`] (so a VIP is steered to IPVS only once its service
//! exists); then run [`crate::podns::reconcile_pods`] with [`DsrPlan::pods`]. `cleanup` (and DSR
//! turned off) is the same with no Services: every recorded
//! service and every pod receiver of ours goes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{Config, EncapMode};
use crate::kube::types::{EndpointSlice, Service};
use crate::model::{Addr, Family, FouPort, NextHop, Route, RouteKind, Rule};

/// `tunnel` enables DSR for a Service (kube-router).
pub const ANN_DSR: &str = "kube-router.io/service.dsr";
/// IPVS scheduler: `rr` (default), `lc`, `dh`, `sh`, `mh`.
pub const ANN_SCHEDULER: &str = "kube-router.io/service.scheduler";
/// `flag-1,flag-2,flag-3`, honoured with `mh` only.
pub const ANN_SCHEDFLAGS: &str = "kube-router.io/service.schedflags";
/// `"true"`: external traffic policy Local.
pub const ANN_LOCAL: &str = "kube-router.io/service.local";
/// Present (and not `"false"`): ignore the LoadBalancer ingress IPs.
pub const ANN_SKIP_LB_IPS: &str = "kube-router.io/service.skiplbips";
/// Services labelled for another proxy are not ours (kube-router skips them too).
pub const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Headless services are skipped.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default (Kubernetes API: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Receive link in a pod for IPv4 VIPs.
pub const POD_LINK_V4: &str = "kt-dsr";
/// Receive link in a pod for IPv6 VIPs.
pub const POD_LINK_V6: &str = "kt-dsr6";

// uapi <linux/ip_vs.h>: virtual service flags (struct ip_vs_flags).
/// `IP_VS_SVC_F_PERSISTENT`.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every listed service, never by us.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`.
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1` (`mh`: fallback).
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2` (`mh`: port).
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;
/// `IP_VS_SVC_F_SCHED3`.
pub const IP_VS_SVC_F_SCHED3: u32 = 0x0020;
/// The flag bits kr-tunneld manages and compares (everything but HASHED).
pub const MANAGED_SVC_FLAGS: u32 = IP_VS_SVC_F_PERSISTENT
    | IP_VS_SVC_F_ONEPACKET
    | IP_VS_SVC_F_SCHED1
    | IP_VS_SVC_F_SCHED2
    | IP_VS_SVC_F_SCHED3;

/// Schedulers kube-router accepts in the annotation; anything else falls back to `rr`.
const SCHEDULERS: &[&str] = &["rr", "lc", "dh", "sh", "mh"];

// ---------------------------------------------------------------------------------------------
// IPVS values

/// Transport protocol of a virtual service (`IPVS_SVC_ATTR_PROTOCOL`, an `IPPROTO_*` number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// `IPPROTO_TCP` (6).
    Tcp,
    /// `IPPROTO_UDP` (17).
    Udp,
    /// `IPPROTO_SCTP` (132).
    Sctp,
    /// Anything else the kernel reports (fwmark services have 0).
    Other(u16),
}

impl Protocol {
    /// From a Service or EndpointSlice port's `protocol` (empty = the API default, TCP).
    pub fn from_api(s: &str) -> Option<Protocol> {
        match s {
            "" | "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The `IPPROTO_*` number.
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Other(n) => n,
        }
    }

    /// From an `IPPROTO_*` number.
    pub fn from_number(n: u16) -> Protocol {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            n => Protocol::Other(n),
        }
    }

    /// Lower-case name as in `ipvsadm` and the state file (`tcp`, `udp`, `sctp`, `proto<N>`).
    pub fn name(self) -> String {
        match self {
            Protocol::Tcp => "tcp".into(),
            Protocol::Udp => "udp".into(),
            Protocol::Sctp => "sctp".into(),
            Protocol::Other(n) => format!("proto{n}"),
        }
    }
}

/// The identity of an address-based IPVS virtual service: `VIP:port/proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The VIP.
    pub addr: IpAddr,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Service port.
    pub port: u16,
}

impl ServiceKey {
    /// Address family of the VIP.
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{} {a}:{}", self.protocol.name(), self.port),
            IpAddr::V6(a) => write!(f, "{} [{a}]:{}", self.protocol.name(), self.port),
        }
    }
}

/// An IPVS virtual service with the attributes kr-tunneld sets and compares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualService {
    /// Identity.
    pub key: ServiceKey,
    /// Scheduler name (`rr`, `lc`, `dh`, `sh`, `mh`, ...).
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` bits; compare through [`MANAGED_SVC_FLAGS`] (the kernel adds HASHED).
    pub flags: u32,
    /// Persistence timeout in seconds (0 when not persistent).
    pub timeout: u32,
    /// Persistence netmask: a big-endian mask for IPv4 (`0xffffffff`), a prefix length for
    /// IPv6 (128), as `ipvsadm` sends them.
    pub netmask: u32,
}

impl VirtualService {
    /// Whether `self` (read from the kernel) must be edited to become `want`.
    pub fn differs(&self, want: &VirtualService) -> bool {
        self.scheduler != want.scheduler
            || self.flags & MANAGED_SVC_FLAGS != want.flags & MANAGED_SVC_FLAGS
            || self.timeout != want.timeout
            || self.netmask != want.netmask
    }
}

/// Forwarding method of a real server (`IP_VS_CONN_F_FWD_MASK` part of the conn flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Forward {
    /// `IP_VS_CONN_F_MASQ` (0).
    Masq,
    /// `IP_VS_CONN_F_LOCALNODE` (1).
    Local,
    /// `IP_VS_CONN_F_TUNNEL` (2): what DSR uses.
    Tunnel,
    /// `IP_VS_CONN_F_DROUTE` (3).
    Route,
    /// Anything else.
    Other(u32),
}

impl Forward {
    /// The conn-flags value.
    pub fn value(self) -> u32 {
        match self {
            Forward::Masq => 0,
            Forward::Local => 1,
            Forward::Tunnel => 2,
            Forward::Route => 3,
            Forward::Other(n) => n,
        }
    }

    /// From conn flags (masked with `IP_VS_CONN_F_FWD_MASK` = 7).
    pub fn from_value(n: u32) -> Forward {
        match n & 0x7 {
            0 => Forward::Masq,
            1 => Forward::Local,
            2 => Forward::Tunnel,
            3 => Forward::Route,
            n => Forward::Other(n),
        }
    }
}

/// Tunnel type of a tunnel-mode real server (`IP_VS_CONN_F_TUNNEL_TYPE_*`; these are not the
/// `if_tunnel.h` encap numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TunnelType {
    /// `IP_VS_CONN_F_TUNNEL_TYPE_IPIP` (0): IPIP / ip6ip6.
    Ipip,
    /// `IP_VS_CONN_F_TUNNEL_TYPE_GUE` (1).
    Gue,
    /// `IP_VS_CONN_F_TUNNEL_TYPE_GRE` (2).
    Gre,
    /// Anything else.
    Other(u8),
}

impl TunnelType {
    /// The uapi number.
    pub fn value(self) -> u8 {
        match self {
            TunnelType::Ipip => 0,
            TunnelType::Gue => 1,
            TunnelType::Gre => 2,
            TunnelType::Other(n) => n,
        }
    }

    /// From the uapi number.
    pub fn from_value(n: u8) -> TunnelType {
        match n {
            0 => TunnelType::Ipip,
            1 => TunnelType::Gue,
            2 => TunnelType::Gre,
            n => TunnelType::Other(n),
        }
    }
}

/// An IPVS real server (destination) of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RealServer {
    /// Endpoint (pod) IP.
    pub addr: IpAddr,
    /// Port (for tunnel mode, the service port: IPIP cannot remap ports).
    pub port: u16,
    /// Forwarding method.
    pub forward: Forward,
    /// Weight.
    pub weight: u32,
    /// Upper connection threshold (0 = none).
    pub upper: u32,
    /// Lower connection threshold (0 = none).
    pub lower: u32,
    /// Tunnel type (tunnel mode only).
    pub tun_type: TunnelType,
    /// GUE destination port (0 unless GUE).
    pub tun_port: u16,
    /// `IP_VS_TUNNEL_ENCAP_FLAG_*` (0 = no checksum).
    pub tun_flags: u16,
}

impl RealServer {
    /// Identity within a service.
    pub fn id(&self) -> (IpAddr, u16) {
        (self.addr, self.port)
    }
}

/// One IPVS operation. Creates come service first, deletes of real servers before the service
/// is deleted (a service deletion takes its real servers with it anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsOp {
    /// `IPVS_CMD_NEW_SERVICE`.
    AddService(VirtualService),
    /// `IPVS_CMD_SET_SERVICE` (scheduler, flags, timeout, netmask).
    EditService(VirtualService),
    /// `IPVS_CMD_DEL_SERVICE` (with all its real servers).
    DeleteService(ServiceKey),
    /// `IPVS_CMD_NEW_DEST`.
    AddDest(ServiceKey, RealServer),
    /// `IPVS_CMD_SET_DEST`.
    EditDest(ServiceKey, RealServer),
    /// `IPVS_CMD_DEL_DEST`.
    DeleteDest(ServiceKey, RealServer),
}

/// When an IPVS op is applied, relative to the pod receivers and the director rules, so that no
/// connection is black-holed (issue 13): a real server is added only after its receiver exists
/// and removed before its receiver goes; a service is deleted only after its director rule is
/// gone (else the VIP's packets hit `local default` with no service and get a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// First: services created or edited, real servers removed.
    BeforePods,
    /// After the pod receivers, before the director rules: real servers added or changed.
    AfterPods,
    /// Last, after the director rules: services deleted.
    AfterRules,
}

impl IpvsOp {
    /// The [`Stage`] this op belongs to.
    pub fn stage(&self) -> Stage {
        match self {
            IpvsOp::AddService(_) | IpvsOp::EditService(_) | IpvsOp::DeleteDest(..) => {
                Stage::BeforePods
            }
            IpvsOp::AddDest(..) | IpvsOp::EditDest(..) => Stage::AfterPods,
            IpvsOp::DeleteService(_) => Stage::AfterRules,
        }
    }
}

impl fmt::Display for IpvsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let svc = |f: &mut fmt::Formatter<'_>, s: &VirtualService| {
            write!(f, "{} scheduler {}", s.key, s.scheduler)?;
            if s.flags & IP_VS_SVC_F_PERSISTENT != 0 {
                write!(f, " persistent {}", s.timeout)?;
            }
            if s.flags & MANAGED_SVC_FLAGS & !IP_VS_SVC_F_PERSISTENT != 0 {
                write!(f, " flags {:#x}", s.flags & MANAGED_SVC_FLAGS)?;
            }
            Ok(())
        };
        let dest = |f: &mut fmt::Formatter<'_>, d: &RealServer| {
            match d.addr {
                IpAddr::V4(a) => write!(f, "{a}:{}", d.port)?,
                IpAddr::V6(a) => write!(f, "[{a}]:{}", d.port)?,
            }
            match (d.forward, d.tun_type) {
                (Forward::Tunnel, TunnelType::Gue) => write!(f, " tunnel gue:{}", d.tun_port)?,
                (Forward::Tunnel, TunnelType::Ipip) => write!(f, " tunnel ipip")?,
                (fwd, t) => write!(f, " forward {} tun-type {}", fwd.value(), t.value())?,
            }
            write!(f, " weight {}", d.weight)
        };
        match self {
            IpvsOp::AddService(s) => {
                f.write_str("add ipvs service ")?;
                svc(f, s)
            }
            IpvsOp::EditService(s) => {
                f.write_str("edit ipvs service ")?;
                svc(f, s)
            }
            IpvsOp::DeleteService(k) => write!(f, "delete ipvs service {k}"),
            IpvsOp::AddDest(k, d) => {
                write!(f, "add ipvs real server {k} -> ")?;
                dest(f, d)
            }
            IpvsOp::EditDest(k, d) => {
                write!(f, "edit ipvs real server {k} -> ")?;
                dest(f, d)
            }
            IpvsOp::DeleteDest(k, d) => {
                write!(f, "delete ipvs real server {k} -> ")?;
                dest(f, d)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings and inputs

/// Tunnel type towards the real servers (SPEC D-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestTunnel {
    /// `--overlay-encap=ipip`: plain IPIP / ip6ip6.
    Ipip,
    /// `--overlay-encap=fou`: GUE to this UDP port (`--overlay-encap-port`); the pods open it.
    Gue(u16),
}

/// Everything the DSR planners need from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `--service-external-ip-range`.
    pub external_ip_ranges: Vec<IpNet>,
    /// `--loadbalancer-ip-range`.
    pub lb_ip_ranges: Vec<IpNet>,
    /// `--enable-ipv4`.
    pub ipv4: bool,
    /// `--enable-ipv6`.
    pub ipv6: bool,
    /// Tunnel type of the real servers.
    pub tunnel: DestTunnel,
    /// `--dsr-table`: table 78 on the director, and the pods' `from VIP` table.
    pub table: u32,
    /// `--dsr-rule-priority`: the director's `to VIP` rules and the pods' `from VIP` rules.
    pub rule_priority: u32,
    /// `--route-protocol`: marks our rules and routes, on the node and in pods.
    pub protocol: u8,
    /// `--link-group`: marks the pods' receive links.
    pub link_group: u32,
    /// `--dsr-endpointslice-managers`: `managed-by` values trusted besides [`SLICE_CONTROLLER`].
    pub slice_managers: Vec<String>,
}

impl Settings {
    /// The DSR settings of a validated configuration.
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            external_ip_ranges: cfg.dsr.external_ip_ranges.clone(),
            lb_ip_ranges: cfg.dsr.lb_ip_ranges.clone(),
            ipv4: cfg.overlay.ipv4,
            ipv6: cfg.overlay.ipv6,
            tunnel: match cfg.overlay.encap {
                EncapMode::Ipip => DestTunnel::Ipip,
                EncapMode::Fou => DestTunnel::Gue(cfg.overlay.port),
            },
            table: cfg.dsr.table,
            rule_priority: cfg.dsr.rule_priority,
            protocol: cfg.overlay.own.protocol,
            link_group: cfg.overlay.own.link_group,
            slice_managers: cfg.dsr.slice_managers.clone(),
        }
    }

    fn family_enabled(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.ipv4,
            Family::V6 => self.ipv6,
        }
    }
}

/// The cluster state DSR is computed from (the watch caches plus the local node's identity).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// All Services (only annotated ones are used).
    pub services: &'a [Service],
    /// All EndpointSlices.
    pub slices: &'a [EndpointSlice],
    /// This node's name (endpoints with this `nodeName` are local).
    pub local_node: &'a str,
    /// Every address of every Node (`status.addresses`, parsed): an endpoint with one of these
    /// IPs is a hostNetwork pod and is skipped (SPEC D-3).
    pub node_ips: &'a BTreeSet<IpAddr>,
    /// The recorded claims (`key`, `namespace/name`) of the services kr-tunneld programmed
    /// ([`parse_record`]): the incumbent of a key keeps it.
    pub incumbents: &'a [(ServiceKey, String)],
}

/// A problem with the input, for the shell to log once per change (like [`crate::nodes::Diag`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diag {
    /// What it is about: `service ns/name`, `pod 10.244.1.5`, or `dsr` for global problems.
    pub object: String,
    /// What is wrong and what was done about it.
    pub msg: String,
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.msg)
    }
}

fn diag(diags: &mut Vec<Diag>, object: &str, msg: String) {
    diags.push(Diag {
        object: object.to_string(),
        msg,
    });
}

// ---------------------------------------------------------------------------------------------
// Desired state

/// A virtual service kr-tunneld wants, with its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedService {
    /// The virtual service.
    pub service: VirtualService,
    /// Real servers, sorted by (addr, port).
    pub dests: Vec<RealServer>,
    /// The Service it comes from (`namespace/name`), for logs and the record.
    pub origin: String,
    /// Its endpoints on this node (pod IPs), for the pod side.
    pub locals: Vec<IpAddr>,
}

/// What a local endpoint's pod network namespace must hold (SPEC D-4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWant {
    /// The endpoint (pod) IP: the receive link's local address.
    pub ip: IpAddr,
    /// VIPs (of the pod IP's family) to put on the receive link.
    pub vips: BTreeSet<IpAddr>,
    /// GUE receive port to open in the pod, when the real servers use GUE.
    pub gue_port: Option<u16>,
    /// The Services it serves (`namespace/name`), for logs.
    pub origins: BTreeSet<String>,
}

/// The desired DSR state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Virtual services by key.
    pub services: BTreeMap<ServiceKey, WantedService>,
    /// Local endpoints by pod IP.
    pub pods: BTreeMap<IpAddr, PodWant>,
}

/// Whether the Service asks for DSR (`kube-router.io/service.dsr: tunnel`).
pub fn is_dsr(svc: &Service) -> bool {
    svc.metadata.annotations.get(ANN_DSR).map(String::as_str) == Some("tunnel")
}

/// Scheduler and `IP_VS_SVC_F_SCHED*` flags from the annotations (kube-router semantics:
/// unknown schedulers fall back to `rr`, sched flags count only with `mh`).
pub fn scheduler(svc: &Service, object: &str, diags: &mut Vec<Diag>) -> (String, u32) {
    let ann = &svc.metadata.annotations;
    let sched = match ann.get(ANN_SCHEDULER).map(|s| s.trim()) {
        None | Some("") => "rr",
        Some(s) if SCHEDULERS.contains(&s) => s,
        Some(s) => {
            diag(
                diags,
                object,
                format!("unknown scheduler '{s}' in {ANN_SCHEDULER}; using rr"),
            );
            "rr"
        }
    };
    let mut flags = 0;
    if let Some(v) = ann.get(ANN_SCHEDFLAGS) {
        if sched != "mh" {
            diag(
                diags,
                object,
                format!("{ANN_SCHEDFLAGS} is only used with the mh scheduler; ignored"),
            );
        } else {
            for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                match f {
                    "flag-1" => flags |= IP_VS_SVC_F_SCHED1,
                    "flag-2" => flags |= IP_VS_SVC_F_SCHED2,
                    "flag-3" => flags |= IP_VS_SVC_F_SCHED3,
                    other => diag(
                        diags,
                        object,
                        format!("unknown scheduler flag '{other}' ignored"),
                    ),
                }
            }
        }
    }
    (sched.to_string(), flags)
}

/// Persistence from `sessionAffinity: ClientIP`: (`IP_VS_SVC_F_PERSISTENT`, timeout) or (0, 0).
pub fn persistence(svc: &Service) -> (u32, u32) {
    if svc.spec.session_affinity != "ClientIP" {
        return (0, 0);
    }
    let timeout = svc
        .spec
        .session_affinity_config
        .client_ip
        .timeout_seconds
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
    (IP_VS_SVC_F_PERSISTENT, timeout)
}

/// Whether only local endpoints serve external traffic (`externalTrafficPolicy: Local` or
/// `kube-router.io/service.local: "true"`).
pub fn local_only(svc: &Service) -> bool {
    svc.spec.external_traffic_policy == "Local"
        || svc.metadata.annotations.get(ANN_LOCAL).map(String::as_str) == Some("true")
}

/// The VIPs of a DSR Service, each checked against its range (SPEC D-1). Invalid or out-of-range
/// addresses are reported and skipped.
pub fn vips(svc: &Service, s: &Settings, object: &str, diags: &mut Vec<Diag>) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut check = |raw: &str, what: &str, flag: &str, ranges: &[IpNet], diags: &mut Vec<Diag>| {
        let Ok(ip) = raw.trim().parse::<IpAddr>() else {
            diag(
                diags,
                object,
                format!("{what} '{raw}' is not an IP address; skipped"),
            );
            return;
        };
        if ranges.is_empty() {
            diag(
                diags,
                object,
                format!("{what} {ip} ignored: no {flag} configured"),
            );
        } else if !ranges.iter().any(|r| r.contains(&ip)) {
            diag(
                diags,
                object,
                format!("{what} {ip} is outside {flag}; skipped"),
            );
        } else if !s.family_enabled(Family::of(&ip)) {
            diag(
                diags,
                object,
                format!("{what} {ip} skipped: {} is not enabled", Family::of(&ip)),
            );
        } else {
            out.insert(ip);
        }
    };
    for ip in &svc.spec.external_ips {
        check(
            ip,
            "externalIP",
            "--service-external-ip-range",
            &s.external_ip_ranges,
            diags,
        );
    }
    let skip_lb = svc
        .metadata
        .annotations
        .get(ANN_SKIP_LB_IPS)
        .is_some_and(|v| v.trim() != "false");
    if !skip_lb {
        for ing in &svc.status.load_balancer.ingress {
            if ing.ip.is_empty() || ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            check(
                &ing.ip,
                "LoadBalancer IP",
                "--loadbalancer-ip-range",
                &s.lb_ip_ranges,
                diags,
            );
        }
    }
    out
}

/// Why a Service is not handled by a kube-router-style proxy at all, if it is not.
fn skip_reason(svc: &Service) -> Option<&'static str> {
    let labels = &svc.metadata.labels;
    if svc.spec.type_ == "ExternalName" {
        Some("type ExternalName")
    } else if labels
        .get(LABEL_PROXY_NAME)
        .is_some_and(|v| v != "kube-router" && v != "kr-tunneld")
    {
        Some("labelled for another service proxy")
    } else if labels.contains_key(LABEL_HEADLESS) {
        Some("headless")
    } else {
        None
    }
}

/// One endpoint address that may become a real server.
struct Ep<'a> {
    ip: IpAddr,
    node: Option<&'a str>,
    /// The endpoint port for the service port (for the remap warning).
    port: Option<i32>,
}

/// The usable endpoints of a Service port: from the Service's slices (label and namespace) with
/// a trusted manager (`trusted`), the slice port with the same name and protocol, ready or
/// serving, of the given family, deduped by IP (the first address of an endpoint is its IP, per
/// the API).
fn endpoints<'a>(
    svc: &Service,
    slices: &'a [EndpointSlice],
    trusted: &[String],
    port_name: &str,
    proto: Protocol,
    family: Family,
) -> Vec<Ep<'a>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let want_type = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    for slice in slices {
        if slice.metadata.namespace != svc.metadata.namespace
            || slice.service_name() != Some(svc.metadata.name.as_str())
            || slice.address_type != want_type
            || !slice_trusted(slice, trusted)
        {
            continue;
        }
        let Some(sp) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && Protocol::from_api(&p.protocol) == Some(proto))
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if !(ep.conditions.is_ready() || ep.conditions.is_serving()) {
                continue;
            }
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if Family::of(&ip) != family || !seen.insert(ip) {
                continue;
            }
            out.push(Ep {
                ip,
                node: ep.node_name.as_deref(),
                port: sp.port,
            });
        }
    }
    out
}

/// Whether the slice is managed by the EndpointSlice controller or one of `others` (review S3:
/// anyone who may write a slice must not be able to steer a VIP).
fn slice_trusted(slice: &EndpointSlice, others: &[String]) -> bool {
    let m = slice
        .metadata
        .labels
        .get(MANAGED_BY)
        .map_or("", String::as_str);
    m == SLICE_CONTROLLER || others.iter().any(|o| o == m)
}

/// The real server for an endpoint, with the configured tunnel type.
pub fn real_server(ip: IpAddr, port: u16, tunnel: DestTunnel) -> RealServer {
    let (tun_type, tun_port) = match tunnel {
        DestTunnel::Ipip => (TunnelType::Ipip, 0),
        DestTunnel::Gue(p) => (TunnelType::Gue, p),
    };
    RealServer {
        addr: ip,
        port,
        forward: Forward::Tunnel,
        weight: 1,
        upper: 0,
        lower: 0,
        tun_type,
        tun_port,
        tun_flags: 0,
    }
}

/// The persistence netmask `ipvsadm` sends: an all-ones IPv4 mask, a /128 for IPv6.
pub fn default_netmask(f: Family) -> u32 {
    match f {
        Family::V4 => u32::MAX,
        Family::V6 => 128,
    }
}

/// The EndpointSlice label naming the controller that manages the slice.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The EndpointSlice controller's `managed-by` value, always trusted.
pub const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The desired DSR state from the cluster state (SPEC D-1…D-4). When Services claim the same
/// `VIP:port/proto`, a name never decides: the incumbent (the recorded claim) keeps it, else
/// the oldest Service (`creationTimestamp`, then `uid`); the others are reported naming both,
/// and their endpoints get no pod-side state for that key.
pub fn desired(inp: &Inputs<'_>, s: &Settings, diags: &mut Vec<Diag>) -> Desired {
    let mut d = Desired::default();
    let mut svcs: Vec<&Service> = inp.services.iter().filter(|s| is_dsr(s)).collect();
    svcs.sort_by_cached_key(|s| {
        let m = &s.metadata;
        // A missing timestamp (never from a real API server) sorts last.
        let ts = m.creation_timestamp.clone();
        (ts.is_empty(), ts, m.uid.clone(), m.key())
    });
    if !svcs.is_empty() && s.external_ip_ranges.is_empty() && s.lb_ip_ranges.is_empty() {
        diag(
            diags,
            "dsr",
            "no --service-external-ip-range or --loadbalancer-ip-range configured: no DSR VIP is accepted"
                .into(),
        );
    }
    for svc in svcs {
        let object = format!("service {}", svc.metadata.key());
        let origin = svc.metadata.key();
        if let Some(why) = skip_reason(svc) {
            diag(diags, &object, format!("DSR annotation ignored: {why}"));
            continue;
        }
        let vips = vips(svc, s, &object, diags);
        if vips.is_empty() {
            continue;
        }
        for sl in inp.slices.iter().filter(|sl| {
            sl.metadata.namespace == svc.metadata.namespace
                && sl.service_name() == Some(svc.metadata.name.as_str())
                && !slice_trusted(sl, &s.slice_managers)
        }) {
            diag(
                diags,
                &format!("endpointslice {}", sl.metadata.key()),
                format!("not managed by {SLICE_CONTROLLER} nor a --dsr-endpointslice-managers value; ignored"),
            );
        }
        let (sched, sched_flags) = scheduler(svc, &object, diags);
        let (persist, timeout) = persistence(svc);
        let local = local_only(svc);
        let mut warned_remap = BTreeSet::new();
        for sp in &svc.spec.ports {
            let Some(proto) = Protocol::from_api(&sp.protocol) else {
                diag(
                    diags,
                    &object,
                    format!(
                        "port {}: protocol '{}' not supported; skipped",
                        sp.port, sp.protocol
                    ),
                );
                continue;
            };
            let Some(port) = u16::try_from(sp.port).ok().filter(|p| *p != 0) else {
                diag(
                    diags,
                    &object,
                    format!("port {} out of range; skipped", sp.port),
                );
                continue;
            };
            for &vip in &vips {
                let family = Family::of(&vip);
                let key = ServiceKey {
                    addr: vip,
                    protocol: proto,
                    port,
                };
                let mut dests = Vec::new();
                let mut locals = Vec::new();
                for ep in endpoints(svc, inp.slices, &s.slice_managers, &sp.name, proto, family) {
                    if inp.node_ips.contains(&ep.ip) {
                        diag(
                            diags,
                            &object,
                            format!(
                                "endpoint {} is a node address (hostNetwork pod): skipped for DSR",
                                ep.ip
                            ),
                        );
                        continue;
                    }
                    let is_local = ep.node == Some(inp.local_node);
                    if is_local {
                        locals.push(ep.ip);
                    }
                    if local && !is_local {
                        continue;
                    }
                    if let Some(ep_port) = ep.port {
                        if ep_port != i32::from(port) && warned_remap.insert((port, ep_port)) {
                            diag(
                                diags,
                                &object,
                                format!(
                                    "port {port}: endpoints listen on {ep_port}, but DSR cannot remap ports \
                                     (the pod receives {port})"
                                ),
                            );
                        }
                    }
                    dests.push(real_server(ep.ip, port, s.tunnel));
                }
                if local && locals.is_empty() {
                    // kube-router: with a Local policy and no local endpoint this node does not
                    // serve the VIP at all (the load balancer's health check steers away).
                    continue;
                }
                dests.sort_by_key(RealServer::id);
                if let Some(other) = d.services.get(&key) {
                    // Services come oldest first: the one already here is older, unless this
                    // one is the incumbent.
                    let incumbent = inp
                        .incumbents
                        .iter()
                        .any(|(k, o)| *k == key && *o == origin);
                    let (keeps, loses) = if incumbent {
                        (origin.as_str(), other.origin.as_str())
                    } else {
                        (other.origin.as_str(), origin.as_str())
                    };
                    diag(
                        diags,
                        "dsr",
                        format!(
                            "{key} is claimed by {keeps} and {loses}: {keeps} keeps it ({}), {loses} is skipped",
                            if incumbent { "programmed first" } else { "older" }
                        ),
                    );
                    if !incumbent {
                        continue;
                    }
                }
                let service = VirtualService {
                    key,
                    scheduler: sched.clone(),
                    flags: persist | sched_flags,
                    timeout,
                    netmask: default_netmask(family),
                };
                d.services.insert(
                    key,
                    WantedService {
                        service,
                        dests,
                        origin: origin.clone(),
                        locals,
                    },
                );
            }
        }
    }
    // Pod-side wants from the services that won their keys only.
    for (key, w) in &d.services {
        for &ip in &w.locals {
            let pw = d.pods.entry(ip).or_insert_with(|| PodWant {
                ip,
                vips: BTreeSet::new(),
                gue_port: None,
                origins: BTreeSet::new(),
            });
            pw.vips.insert(key.addr);
            pw.origins.insert(w.origin.clone());
            if let DestTunnel::Gue(p) = s.tunnel {
                pw.gue_port = Some(p);
            }
        }
    }
    d
}

/// The director's policy routing for the services not `blocked` by foreign IPVS services
/// (SPEC D-2): `to VIP ipproto P dport N lookup <table>` per service, and
/// `local default dev lo table <table>` for each family that has a rule. The lead merges these
/// into the overlay's desired rules and routes (same protocol, same reconcile).
pub fn director_routing(
    d: &Desired,
    blocked: &BTreeSet<ServiceKey>,
    s: &Settings,
) -> (Vec<Rule>, Vec<Route>) {
    let mut rules = BTreeSet::new();
    let mut families = BTreeSet::new();
    for key in d.services.keys().filter(|k| !blocked.contains(k)) {
        let family = key.family();
        families.insert(family);
        rules.insert(Rule {
            family,
            priority: s.rule_priority,
            src: None,
            dst: Some(IpNet::from(key.addr)),
            // IPPROTO numbers above 255 cannot be services of ours (from_api gives 6/17/132).
            ipproto: u8::try_from(key.protocol.number()).ok(),
            dport: Some(key.port),
            table: s.table,
            protocol: s.protocol,
        });
    }
    let routes = families
        .into_iter()
        .map(|f| Route {
            table: s.table,
            dst: default_net(f),
            nexthop: NextHop::Dev("lo".into()),
            src: None,
            protocol: s.protocol,
            kind: RouteKind::Local,
            advmss: None,
        })
        .collect();
    (rules.into_iter().collect(), routes)
}

/// `0.0.0.0/0` or `::/0`.
pub fn default_net(f: Family) -> IpNet {
    match f {
        Family::V4 => IpNet::V4(Ipv4Net::default()),
        Family::V6 => IpNet::V6(Ipv6Net::default()),
    }
}

// ---------------------------------------------------------------------------------------------
// IPVS planner

/// The IPVS state read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpvsState {
    /// Every address-based virtual service (fwmark services are never ours and are not listed).
    pub services: Vec<VirtualService>,
    /// Real servers of the services that were read (the shell reads those of owned services).
    pub dests: BTreeMap<ServiceKey, Vec<RealServer>>,
}

/// An IPVS plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpvsPlan {
    /// Ops in order: per wanted service its creation or edit and its real servers (adds and
    /// edits before deletions, so a service never runs empty needlessly), then deletions of
    /// services nothing wants.
    pub ops: Vec<IpvsOp>,
    /// Wanted keys held by foreign services: not touched, and no director rule for them.
    pub blocked: BTreeSet<ServiceKey>,
    /// Problems to report (one per blocked key).
    pub clashes: Vec<Diag>,
    /// The ownership record to persist *before* applying: recorded keys still present in the
    /// kernel, plus every key this plan creates.
    pub record: BTreeSet<ServiceKey>,
}

impl IpvsPlan {
    /// The record to persist after applying: [`IpvsPlan::record`] minus the services whose
    /// deletion succeeded, and minus those whose creation failed with `EEXIST` (someone else
    /// created that key in the meantime: not ours). `failed` lists the index and errno of each
    /// failed op. Other failed creations stay recorded (a lost ack may hide a success); a
    /// recorded key the kernel does not have is forgotten by the next plan.
    pub fn record_after(&self, failed: &[(usize, i32)]) -> BTreeSet<ServiceKey> {
        let mut r = self.record.clone();
        for (i, op) in self.ops.iter().enumerate() {
            let errno = failed.iter().find(|(j, _)| *j == i).map(|(_, e)| *e);
            match (op, errno) {
                (IpvsOp::DeleteService(k), None) => {
                    r.remove(k);
                }
                (IpvsOp::AddService(s), Some(libc::EEXIST)) => {
                    r.remove(&s.key);
                }
                _ => {}
            }
        }
        r
    }
}

/// Plans IPVS changes: desired services vs the kernel's, touching only services in `owned`
/// (SPEC D-5, T-4).
pub fn plan_ipvs(d: &Desired, actual: &IpvsState, owned: &BTreeSet<ServiceKey>) -> IpvsPlan {
    let mut p = IpvsPlan::default();
    let present: BTreeMap<ServiceKey, &VirtualService> =
        actual.services.iter().map(|s| (s.key, s)).collect();
    p.record = owned
        .iter()
        .filter(|k| present.contains_key(k))
        .copied()
        .collect();
    for (key, want) in &d.services {
        match present.get(key) {
            None => {
                p.ops.push(IpvsOp::AddService(want.service.clone()));
                for dst in &want.dests {
                    p.ops.push(IpvsOp::AddDest(*key, dst.clone()));
                }
                p.record.insert(*key);
            }
            Some(_) if !owned.contains(key) => {
                p.blocked.insert(*key);
                p.clashes.push(Diag {
                    object: format!("service {}", want.origin),
                    msg: format!(
                        "IPVS service {key} exists and was not created by kr-tunneld (kube-proxy?); leaving it alone"
                    ),
                });
            }
            Some(have) => {
                if have.differs(&want.service) {
                    p.ops.push(IpvsOp::EditService(want.service.clone()));
                }
                let empty = Vec::new();
                let have_dests: BTreeMap<(IpAddr, u16), &RealServer> = actual
                    .dests
                    .get(key)
                    .unwrap_or(&empty)
                    .iter()
                    .map(|r| (r.id(), r))
                    .collect();
                let want_ids: BTreeSet<(IpAddr, u16)> =
                    want.dests.iter().map(RealServer::id).collect();
                for dst in &want.dests {
                    match have_dests.get(&dst.id()) {
                        None => p.ops.push(IpvsOp::AddDest(*key, dst.clone())),
                        Some(h) if *h != dst => p.ops.push(IpvsOp::EditDest(*key, dst.clone())),
                        Some(_) => {}
                    }
                }
                for (id, h) in &have_dests {
                    if !want_ids.contains(id) {
                        p.ops.push(IpvsOp::DeleteDest(*key, (*h).clone()));
                    }
                }
            }
        }
    }
    for key in owned {
        if present.contains_key(key) && !d.services.contains_key(key) {
            p.ops.push(IpvsOp::DeleteService(*key));
        }
    }
    p
}

/// Everything one DSR pass decides, in one call: the IPVS plan, the director's rules and routes
/// (to merge into the overlay's desired rules and routes), the local endpoints' pod-side wants,
/// and the problems to report (input diagnostics plus IPVS clashes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsrPlan {
    /// IPVS ops and the ownership record.
    pub ipvs: IpvsPlan,
    /// Director rules (`to VIP ipproto P dport N lookup <table>`).
    pub rules: Vec<Rule>,
    /// Director routes (`local default dev lo table <table>` per family in use).
    pub routes: Vec<Route>,
    /// Pod-side wants of this node's endpoints, for [`crate::podns::reconcile_pods`].
    pub pods: BTreeMap<IpAddr, PodWant>,
    /// Problems to log once per change.
    pub diags: Vec<Diag>,
    /// Who claims each key, for [`render_owned`].
    pub claims: Vec<(ServiceKey, String)>,
}

/// One DSR pass: [`desired`], [`plan_ipvs`] against the kernel's IPVS table and the ownership
/// record, and [`director_routing`] for the services not blocked by foreign ones.
pub fn plan(
    inp: &Inputs<'_>,
    s: &Settings,
    ipvs: &IpvsState,
    owned: &BTreeSet<ServiceKey>,
) -> DsrPlan {
    let mut diags = Vec::new();
    let d = desired(inp, s, &mut diags);
    let mut ipvs = plan_ipvs(&d, ipvs, owned);
    // Grouped by stage (stable), so each stage is one contiguous run of ops.
    let mut ops = std::mem::take(&mut ipvs.ops);
    for stage in [Stage::BeforePods, Stage::AfterPods, Stage::AfterRules] {
        let (now, later) = ops.into_iter().partition(|op: &IpvsOp| op.stage() == stage);
        ipvs.ops.extend::<Vec<IpvsOp>>(now);
        ops = later;
    }
    diags.extend(ipvs.clashes.iter().cloned());
    let (rules, routes) = director_routing(&d, &ipvs.blocked, s);
    DsrPlan {
        ipvs,
        rules,
        routes,
        claims: claims(&d, inp.incumbents),
        pods: d.pods,
        diags,
    }
}

/// Every address of every Node (for the hostNetwork check, SPEC D-3); unparsable ones are
/// skipped (the node model reports them).
pub fn node_ips<'a>(
    nodes: impl IntoIterator<Item = &'a crate::nodes::NodeInfo>,
) -> BTreeSet<IpAddr> {
    nodes
        .into_iter()
        .flat_map(|n| n.addresses.iter())
        .filter_map(|(_, a)| a.trim().parse().ok())
        .collect()
}

/// File name of the IPVS ownership record in the state directory (`/run/kr-tunneld`).
pub const OWNED_FILE: &str = "ipvs-services";

/// The ownership record as file text: one `proto addr port origin` line per key, sorted;
/// `origin` (the claiming Service, `namespace/name`) comes from `claims`, and is `-` when unknown.
pub fn render_owned(keys: &BTreeSet<ServiceKey>, claims: &[(ServiceKey, String)]) -> String {
    keys.iter()
        .map(|k| {
            let o = claims
                .iter()
                .find(|c| c.0 == *k)
                .map_or("-", |c| c.1.as_str());
            format!("{} {} {} {o}\n", k.protocol.name(), k.addr, k.port)
        })
        .collect()
}

/// The keys of [`parse_record`].
pub fn parse_owned(text: &str) -> BTreeSet<ServiceKey> {
    parse_record(text).into_iter().map(|c| c.0).collect()
}

/// Parses [`render_owned`] text into (key, origin); unreadable lines are dropped (a garbled
/// record can only make kr-tunneld leave a service alone, never take a foreign one). Lines of
/// older versions have no origin (`-`).
pub fn parse_record(text: &str) -> Vec<(ServiceKey, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let protocol = match it.next()? {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                other => Protocol::Other(other.strip_prefix("proto")?.parse().ok()?),
            };
            let addr = it.next()?.parse().ok()?;
            let port = it.next()?.parse().ok()?;
            let origin = it.next().unwrap_or("-").to_string();
            it.next().is_none().then_some((
                ServiceKey {
                    addr,
                    protocol,
                    port,
                },
                origin,
            ))
        })
        .collect()
}

/// The claims to record: the origin of each wanted key, and for the others the recorded one.
fn claims(d: &Desired, old: &[(ServiceKey, String)]) -> Vec<(ServiceKey, String)> {
    let mut c: Vec<(ServiceKey, String)> = d
        .services
        .iter()
        .map(|(k, w)| (*k, w.origin.clone()))
        .collect();
    c.extend(
        old.iter()
            .filter(|o| !d.services.contains_key(&o.0))
            .cloned(),
    );
    c
}

// ---------------------------------------------------------------------------------------------
// Pod side

/// TCP MSS to advertise from a pod whose path MTU towards the director is `mtu`, so that the
/// client's segments still fit after encapsulation (SPEC D-4): MTU − 60 for IPv4 (outer and
/// inner IPv4 header, TCP header: 3 × 20), MTU − 100 for IPv6 (2 × 40 + 20), and 12 more for GUE
/// (UDP header 8 + GUE header 4). `None` when the MTU is too small to carry anything.
pub fn advmss(family: Family, mtu: u32, gue: bool) -> Option<u32> {
    let overhead = match family {
        Family::V4 => 60,
        Family::V6 => 100,
    } + if gue { 12 } else { 0 };
    mtu.checked_sub(overhead).filter(|m| *m > 0)
}

/// An IPv6 link-local address (`fe80::/10`).
fn is_link_local(a: &IpNet) -> bool {
    matches!(a.addr(), IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
}

/// The receive link name for a family.
pub fn pod_link_name(f: Family) -> &'static str {
    match f {
        Family::V4 => POD_LINK_V4,
        Family::V6 => POD_LINK_V6,
    }
}

/// A link in a pod network namespace, as far as the pod planner cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`ipip`, `ip6tnl`, `veth`, ...; empty when none).
    pub kind: String,
    /// `IFLA_GROUP`.
    pub group: u32,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Tunnel local address (ipip / ip6tnl).
    pub local: Option<IpAddr>,
    /// Tunnel remote address (ipip / ip6tnl); unspecified = any.
    pub remote: Option<IpAddr>,
    /// IPv4 `rp_filter` of the device (from `IFLA_AF_SPEC`), when reported.
    pub rp_filter: Option<u32>,
    /// IPv4 `accept_local` of the device (from `IFLA_AF_SPEC`), when reported.
    pub accept_local: Option<u32>,
}

/// The pod's default route in the main table (where its replies go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    /// Family.
    pub family: Family,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Output device ifindex.
    pub oif: u32,
}

/// The state of one pod network namespace (read inside it by [`crate::podns`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNs {
    /// All links.
    pub links: Vec<PodLink>,
    /// All addresses.
    pub addrs: Vec<Addr>,
    /// Default routes of the main table.
    pub defaults: Vec<DefaultRoute>,
    /// Owned routes (our protocol).
    pub routes: Vec<Route>,
    /// Owned rules (our protocol).
    pub rules: Vec<Rule>,
    /// FOU ports.
    pub fou: Vec<FouPort>,
    /// The FOU ports kr-tunneld opened here (from its record, not from the kernel): the only
    /// ones it ever closes.
    pub ours_fou: Vec<FouPort>,
    /// `net.ipv4.conf.all.rp_filter` (RTM_GETNETCONF), when read.
    pub all_rp_filter: Option<u32>,
}

impl PodNs {
    /// The addresses held by any link (to match endpoint IPs to this namespace).
    pub fn ips(&self) -> BTreeSet<IpAddr> {
        self.addrs.iter().map(|a| a.addr.addr()).collect()
    }

    fn our_link(&self, f: Family, s: &Settings) -> Option<&PodLink> {
        self.links.iter().find(|l| {
            l.name == pod_link_name(f) && l.kind == link_kind(f) && l.group == s.link_group
        })
    }
}

fn link_kind(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipip",
        Family::V6 => "ip6tnl",
    }
}

/// One change inside a pod network namespace. Links are named, not indexed, where the link may
/// be created by the same plan; the shell resolves the name after creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOp {
    /// Open a FOU (GUE) receive port.
    AddFouPort(FouPort),
    /// Close a FOU port.
    DelFouPort(FouPort),
    /// Create the receive link (`ipip` / `ip6tnl` mode any, local = pod IP, remote any, our link
    /// group), then set it up.
    CreateLink {
        /// `kt-dsr` / `kt-dsr6`.
        name: String,
        /// Family.
        family: Family,
        /// The pod IP.
        local: IpAddr,
    },
    /// Delete a link (its addresses go with it).
    DeleteLink {
        /// ifindex.
        index: u32,
        /// Name, for logs.
        name: String,
    },
    /// Set a link up.
    SetUp {
        /// Link name.
        link: String,
    },
    /// Set the IPv4 `rp_filter` of a link to 0 (IFLA_AF_SPEC / IFLA_INET_CONF).
    DisableRpFilter {
        /// Link name.
        link: String,
    },
    /// Add an address (a VIP as /32 or /128; IPv6 with IFA_F_NODAD).
    AddAddr {
        /// Link name.
        link: String,
        /// The address.
        addr: IpNet,
    },
    /// Delete an address.
    DelAddr {
        /// Link name.
        link: String,
        /// The address.
        addr: IpNet,
    },
    /// Create or replace a route; `oif` is the device ifindex (the pod's default route device).
    ReplaceRoute {
        /// The route.
        route: Route,
        /// Output device.
        oif: Option<u32>,
    },
    /// Delete a route.
    DeleteRoute(Route),
    /// Add a rule.
    AddRule(Rule),
    /// Delete a rule.
    DeleteRule(Rule),
}

impl fmt::Display for PodOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::model::{RouteDisplay, RuleDisplay};
        match self {
            PodOp::AddFouPort(p) => write!(f, "add fou port {} {} gue", p.family, p.port),
            PodOp::DelFouPort(p) => write!(f, "del fou port {} {}", p.family, p.port),
            PodOp::CreateLink {
                name,
                family,
                local,
            } => {
                write!(
                    f,
                    "create {} receive link {name} local {local}",
                    link_kind(*family)
                )
            }
            PodOp::DeleteLink { name, .. } => write!(f, "delete link {name}"),
            PodOp::SetUp { link } => write!(f, "set link {link} up"),
            PodOp::DisableRpFilter { link } => write!(f, "set rp_filter 0 on {link}"),
            PodOp::AddAddr { link, addr } => write!(f, "add address {addr} to {link}"),
            PodOp::DelAddr { link, addr } => write!(f, "delete address {addr} from {link}"),
            PodOp::ReplaceRoute { route, .. } => write!(f, "replace route {}", RouteDisplay(route)),
            PodOp::DeleteRoute(r) => write!(f, "delete route {}", RouteDisplay(r)),
            PodOp::AddRule(r) => write!(f, "add rule {}", RuleDisplay(r)),
            PodOp::DeleteRule(r) => write!(f, "delete rule {}", RuleDisplay(r)),
        }
    }
}

/// Plans the changes inside one pod network namespace. `wants` are the local endpoints whose IP
/// this namespace holds (none: remove everything of ours). Pure: the shell reads [`PodNs`] inside
/// the namespace, calls this, and applies the ops there.
pub fn plan_pod(wants: &[&PodWant], ns: &PodNs, s: &Settings, diags: &mut Vec<Diag>) -> Vec<PodOp> {
    let mut ops = Vec::new();
    let mut del_rules = Vec::new();
    let mut del_routes = Vec::new();
    let mut wanted_rules: BTreeSet<Rule> = BTreeSet::new();
    let mut wanted_routes: Vec<(Route, u32)> = Vec::new();
    let mut wanted_fou: BTreeSet<FouPort> = BTreeSet::new();
    for family in [Family::V4, Family::V6] {
        let name = pod_link_name(family);
        let want = wants.iter().find(|w| Family::of(&w.ip) == family);
        let ours = ns.our_link(family, s);
        let Some(want) = want else {
            if let Some(l) = ours {
                ops.push(PodOp::DeleteLink {
                    index: l.index,
                    name: l.name.clone(),
                });
            }
            continue;
        };
        let object = format!("pod {}", want.ip);
        // 1. The receive link.
        let mut fresh = false;
        match ours {
            Some(l) if l.local == Some(want.ip) && l.remote.is_none_or(|r| r.is_unspecified()) => {
                if !l.up {
                    ops.push(PodOp::SetUp { link: name.into() });
                }
            }
            Some(l) => {
                // Same name, other pod IP (the IP changed under the same netns): replace.
                ops.push(PodOp::DeleteLink {
                    index: l.index,
                    name: l.name.clone(),
                });
                ops.push(PodOp::CreateLink {
                    name: name.into(),
                    family,
                    local: want.ip,
                });
                fresh = true;
            }
            None => {
                if let Some(l) = ns.links.iter().find(|l| l.name == name) {
                    diag(
                        diags,
                        &object,
                        format!("a link named {name} exists and is not ours (ifindex {}); DSR not configured", l.index),
                    );
                    continue;
                }
                ops.push(PodOp::CreateLink {
                    name: name.into(),
                    family,
                    local: want.ip,
                });
                fresh = true;
            }
        }
        // 2. rp_filter (IPv4 only; IPv6 has none in the kernel's input path).
        if family == Family::V4 {
            if fresh || ours.is_some_and(|l| l.rp_filter != Some(0)) {
                ops.push(PodOp::DisableRpFilter { link: name.into() });
            }
            if ns.all_rp_filter == Some(1) {
                diag(
                    diags,
                    &object,
                    "net.ipv4.conf.all.rp_filter is 1 (strict) in the pod: decapsulated DSR traffic will be \
                     dropped; set it to 0 or 2 for the pod (kr-tunneld does not write sysctls)"
                        .into(),
                );
            }
        }
        // 3. VIPs on the link.
        // IPv6 link-local addresses are the kernel's (address generation on the new link, also
        // on ipip: fe80::5efe:<IPv4>), not ours to remove.
        let have_addrs: BTreeSet<IpNet> = match (fresh, ours) {
            (false, Some(l)) => ns
                .addrs
                .iter()
                .filter(|a| a.index == l.index && !is_link_local(&a.addr))
                .map(|a| a.addr)
                .collect(),
            _ => BTreeSet::new(),
        };
        let want_addrs: BTreeSet<IpNet> = want.vips.iter().map(|v| IpNet::from(*v)).collect();
        for a in want_addrs.difference(&have_addrs) {
            ops.push(PodOp::AddAddr {
                link: name.into(),
                addr: *a,
            });
        }
        for a in have_addrs.difference(&want_addrs) {
            ops.push(PodOp::DelAddr {
                link: name.into(),
                addr: *a,
            });
        }
        // 4. GUE receive port for the outer header (the pod IP's family).
        if let Some(port) = want.gue_port {
            wanted_fou.insert(FouPort {
                family,
                port,
                gue: true,
            });
        }
        // 5. `from VIP lookup T` and the copy of the default route with advmss.
        let Some(def) = ns.defaults.iter().find(|d| d.family == family) else {
            diag(
                diags,
                &object,
                format!("no {family} default route in the pod: no advmss route for DSR replies"),
            );
            continue;
        };
        let Some(dev) = ns.links.iter().find(|l| l.index == def.oif) else {
            continue;
        };
        let Some(mss) = advmss(family, dev.mtu, want.gue_port.is_some()) else {
            diag(
                diags,
                &object,
                format!("device {} MTU {} too small for DSR", dev.name, dev.mtu),
            );
            continue;
        };
        let route = Route {
            table: s.table,
            dst: default_net(family),
            nexthop: match def.gateway {
                Some(g) => NextHop::Via(g),
                None => NextHop::Dev(dev.name.clone()),
            },
            src: None,
            protocol: s.protocol,
            kind: RouteKind::Unicast,
            advmss: Some(mss),
        };
        wanted_routes.push((route, def.oif));
        for vip in &want.vips {
            wanted_rules.insert(Rule {
                family,
                priority: s.rule_priority,
                src: Some(IpNet::from(*vip)),
                dst: None,
                ipproto: None,
                dport: None,
                table: s.table,
                protocol: s.protocol,
            });
        }
    }
    // FOU: open missing ports before anything can be sent to them.
    let mut fou_ops = Vec::new();
    for f in &wanted_fou {
        match ns
            .fou
            .iter()
            .find(|a| a.family == f.family && a.port == f.port)
        {
            Some(a) if a.gue => {}
            Some(_) => diag(
                diags,
                "pod",
                format!(
                    "fou port {} {} exists with another encapsulation type; not changing it",
                    f.family, f.port
                ),
            ),
            None => fou_ops.push(PodOp::AddFouPort(*f)),
        }
    }
    // The GUE ports we opened here that nothing wants (review S3: never anyone else's).
    for a in &ns.fou {
        if ns.ours_fou.contains(a)
            && !wanted_fou
                .iter()
                .any(|f| f.family == a.family && f.port == a.port)
        {
            ops.push(PodOp::DelFouPort(*a));
        }
    }
    // Routes and rules of ours that nothing wants; then the wanted ones.
    for r in &ns.routes {
        if r.protocol == s.protocol
            && !wanted_routes
                .iter()
                .any(|(w, _)| w.table == r.table && w.dst == r.dst)
        {
            del_routes.push(PodOp::DeleteRoute(r.clone()));
        }
    }
    for (r, oif) in &wanted_routes {
        if !ns.routes.contains(r) {
            ops.push(PodOp::ReplaceRoute {
                route: r.clone(),
                oif: Some(*oif),
            });
        }
    }
    for r in &wanted_rules {
        if !ns.rules.contains(r) {
            ops.push(PodOp::AddRule(r.clone()));
        }
    }
    let mut seen = BTreeSet::new();
    for r in &ns.rules {
        if r.protocol == s.protocol && (!wanted_rules.contains(r) || !seen.insert(r)) {
            del_rules.push(PodOp::DeleteRule(r.clone()));
        }
    }
    // Order: FOU adds, rule deletions (stop steering before the route goes), link work, routes,
    // rules, route deletions.
    let mut out = fou_ops;
    out.extend(del_rules);
    out.extend(ops);
    out.extend(del_routes);
    out
}

// ---------------------------------------------------------------------------------------------
// In-memory kernels (for tests here and in the daemon)

/// Applies `op` to an in-memory IPVS table the way the kernel does (errno on failure: EEXIST
/// for a duplicate, ESRCH for a missing service, ENOENT for a missing real server). Used to prove
/// that plan → apply → plan converges to nothing.
pub fn apply_ipvs(state: &mut IpvsState, op: &IpvsOp) -> Result<(), i32> {
    let find = |state: &IpvsState, k: &ServiceKey| state.services.iter().position(|s| s.key == *k);
    match op {
        IpvsOp::AddService(s) => {
            if find(state, &s.key).is_some() {
                return Err(libc::EEXIST);
            }
            let mut s = s.clone();
            s.flags |= IP_VS_SVC_F_HASHED;
            state.dests.insert(s.key, Vec::new());
            state.services.push(s);
        }
        IpvsOp::EditService(s) => {
            let i = find(state, &s.key).ok_or(libc::ESRCH)?;
            state.services[i] = VirtualService {
                flags: s.flags | IP_VS_SVC_F_HASHED,
                ..s.clone()
            };
        }
        IpvsOp::DeleteService(k) => {
            let i = find(state, k).ok_or(libc::ESRCH)?;
            state.services.remove(i);
            state.dests.remove(k);
        }
        IpvsOp::AddDest(k, d) | IpvsOp::EditDest(k, d) | IpvsOp::DeleteDest(k, d) => {
            find(state, k).ok_or(libc::ESRCH)?;
            let dests = state.dests.entry(*k).or_default();
            let at = dests.iter().position(|x| x.id() == d.id());
            match (op, at) {
                (IpvsOp::AddDest(..), Some(_)) => return Err(libc::EEXIST),
                (IpvsOp::AddDest(..), None) => dests.push(d.clone()),
                (IpvsOp::EditDest(..), Some(i)) => dests[i] = d.clone(),
                (IpvsOp::DeleteDest(..), Some(i)) => {
                    dests.remove(i);
                }
                _ => return Err(libc::ENOENT),
            }
        }
    }
    Ok(())
}

/// Applies `op` to an in-memory pod namespace the way the kernel does (created links are up,
/// MTU 1480, rp_filter 1 until disabled). For tests.
pub fn apply_pod(ns: &mut PodNs, op: &PodOp, s: &Settings) -> Result<(), i32> {
    let index_of =
        |ns: &PodNs, name: &str| ns.links.iter().find(|l| l.name == name).map(|l| l.index);
    match op {
        PodOp::AddFouPort(p) => {
            if ns
                .fou
                .iter()
                .any(|q| q.family == p.family && q.port == p.port)
            {
                return Err(libc::EEXIST);
            }
            ns.fou.push(*p);
            ns.ours_fou.push(*p);
        }
        PodOp::DelFouPort(p) => {
            let i = ns
                .fou
                .iter()
                .position(|q| q.family == p.family && q.port == p.port)
                .ok_or(libc::ENOENT)?;
            ns.fou.remove(i);
            ns.ours_fou.retain(|q| q != p);
        }
        PodOp::CreateLink {
            name,
            family,
            local,
        } => {
            if index_of(ns, name).is_some() {
                return Err(libc::EEXIST);
            }
            let index = ns.links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
            ns.links.push(PodLink {
                index,
                name: name.clone(),
                kind: link_kind(*family).into(),
                group: s.link_group,
                mtu: 1480,
                up: true,
                local: Some(*local),
                remote: None,
                rp_filter: (*family == Family::V4).then_some(1),
                accept_local: None,
            });
        }
        PodOp::DeleteLink { index, .. } => {
            let i = ns
                .links
                .iter()
                .position(|l| l.index == *index)
                .ok_or(libc::ENODEV)?;
            ns.links.remove(i);
            ns.addrs.retain(|a| a.index != *index);
        }
        PodOp::SetUp { link } | PodOp::DisableRpFilter { link } => {
            let l = ns
                .links
                .iter_mut()
                .find(|l| l.name == *link)
                .ok_or(libc::ENODEV)?;
            if matches!(op, PodOp::SetUp { .. }) {
                l.up = true;
            } else {
                l.rp_filter = Some(0);
            }
        }
        PodOp::AddAddr { link, addr } => {
            let index = index_of(ns, link).ok_or(libc::ENODEV)?;
            if ns.addrs.iter().any(|a| a.index == index && a.addr == *addr) {
                return Err(libc::EEXIST);
            }
            ns.addrs.push(Addr { index, addr: *addr });
        }
        PodOp::DelAddr { link, addr } => {
            let index = index_of(ns, link).ok_or(libc::ENODEV)?;
            let i = ns
                .addrs
                .iter()
                .position(|a| a.index == index && a.addr == *addr)
                .ok_or(libc::EADDRNOTAVAIL)?;
            ns.addrs.remove(i);
        }
        PodOp::ReplaceRoute { route, .. } => {
            ns.routes
                .retain(|x| !(x.table == route.table && x.dst == route.dst));
            ns.routes.push(route.clone());
        }
        PodOp::DeleteRoute(r) => {
            let i = ns
                .routes
                .iter()
                .position(|x| x.table == r.table && x.dst == r.dst)
                .ok_or(libc::ESRCH)?;
            ns.routes.remove(i);
        }
        PodOp::AddRule(r) => {
            if ns.rules.contains(r) {
                return Err(libc::EEXIST);
            }
            ns.rules.push(r.clone());
        }
        PodOp::DeleteRule(r) => {
            let i = ns.rules.iter().position(|x| x == r).ok_or(libc::ENOENT)?;
            ns.rules.remove(i);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn settings() -> Settings {
        Settings {
            external_ip_ranges: vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8:100::/64".parse().unwrap(),
            ],
            lb_ip_ranges: vec!["198.51.100.0/24".parse().unwrap()],
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

    /// A DSR service `default/web` on port 80/TCP with externalIP 203.0.113.10; `extra` is merged
    /// into the object (shallow per top-level key; `metadata`, `spec`, `status` are merged one
    /// level deeper).
    fn web(extra: serde_json::Value) -> Service {
        let mut base = json!({
            "metadata": {"name": "web", "namespace": "default",
                         "annotations": {"kube-router.io/service.dsr": "tunnel"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "externalIPs": ["203.0.113.10"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]},
            "status": {}
        });
        if let serde_json::Value::Object(m) = extra {
            for (k, v) in m {
                match (base.get_mut(&k), v) {
                    (Some(serde_json::Value::Object(b)), serde_json::Value::Object(v)) => {
                        for (k2, v2) in v {
                            if k2 == "annotations" {
                                let a = b.entry("annotations").or_insert(json!({}));
                                for (k3, v3) in v2.as_object().unwrap() {
                                    a[k3] = v3.clone();
                                }
                            } else {
                                b.insert(k2, v2);
                            }
                        }
                    }
                    (_, v) => {
                        base[&k] = v;
                    }
                }
            }
        }
        svc(base)
    }

    /// Endpoints of `default/web`: (ip, node, ready, serving).
    fn web_slice(name: &str, family: &str, eps: &[(&str, &str, bool, bool)]) -> EndpointSlice {
        let eps: Vec<serde_json::Value> = eps
            .iter()
            .map(|(ip, node, ready, serving)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ready, "serving": serving}})
            })
            .collect();
        slice(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web",
                                    MANAGED_BY: "endpointslice-controller.k8s.io"}},
            "addressType": family,
            "endpoints": eps,
            "ports": [{"name": "http", "protocol": "TCP", "port": 80}]
        }))
    }

    fn two_nodes() -> Vec<EndpointSlice> {
        vec![web_slice(
            "web-1",
            "IPv4",
            &[
                ("10.244.1.5", "node1", true, true),
                ("10.244.2.7", "node2", true, true),
            ],
        )]
    }

    fn run(services: &[Service], slices: &[EndpointSlice], s: &Settings) -> (Desired, Vec<Diag>) {
        run_with(services, slices, s, &[])
    }

    fn run_with(
        services: &[Service],
        slices: &[EndpointSlice],
        s: &Settings,
        incumbents: &[(ServiceKey, String)],
    ) -> (Desired, Vec<Diag>) {
        let node_ips: BTreeSet<IpAddr> = ["192.168.1.1", "192.168.1.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let inp = Inputs {
            services,
            slices,
            local_node: "node1",
            node_ips: &node_ips,
            incumbents,
        };
        let mut diags = Vec::new();
        let d = desired(&inp, s, &mut diags);
        (d, diags)
    }

    fn key(addr: &str, port: u16) -> ServiceKey {
        ServiceKey {
            addr: addr.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    fn has(diags: &[Diag], needle: &str) -> bool {
        diags.iter().any(|d| d.to_string().contains(needle))
    }

    #[test]
    fn only_services_annotated_tunnel() {
        let s = settings();
        let plain =
            web(json!({"metadata": {"annotations": {"kube-router.io/service.dsr": "true"}}}));
        let (d, _) = run(&[plain], &two_nodes(), &s);
        assert!(d.services.is_empty());
        let (d, diags) = run(&[web(json!({}))], &two_nodes(), &s);
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            vec![key("203.0.113.10", 80)],
            "{diags:?}"
        );
        let w = &d.services[&key("203.0.113.10", 80)];
        assert_eq!(w.origin, "default/web");
        assert_eq!(w.service.scheduler, "rr");
        assert_eq!(w.service.flags, 0);
        assert_eq!(w.service.timeout, 0);
        assert_eq!(w.service.netmask, 0xffff_ffff);
        let ips: Vec<IpAddr> = w.dests.iter().map(|d| d.addr).collect();
        assert_eq!(ips, vec![ip("10.244.1.5"), ip("10.244.2.7")]);
        assert!(w.dests.iter().all(|d| d.forward == Forward::Tunnel
            && d.tun_type == TunnelType::Ipip
            && d.tun_port == 0
            && d.weight == 1
            && d.port == 80));
    }

    #[test]
    fn vips_must_be_inside_their_range() {
        let s = settings();
        let svc = web(json!({
            "spec": {"externalIPs": ["203.0.113.10", "192.0.2.1", "198.51.100.9", "not-an-ip"]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.20"}, {"ip": "203.0.113.99"}, {"hostname": "lb.example"}]}}
        }));
        let (d, diags) = run(&[svc], &two_nodes(), &s);
        let vips: BTreeSet<IpAddr> = d.services.keys().map(|k| k.addr).collect();
        // externalIPs are checked against the external range, LB IPs against the LB range.
        assert_eq!(
            vips,
            [ip("203.0.113.10"), ip("198.51.100.20")]
                .into_iter()
                .collect()
        );
        assert!(has(
            &diags,
            "externalIP 192.0.2.1 is outside --service-external-ip-range"
        ));
        assert!(has(
            &diags,
            "externalIP 198.51.100.9 is outside --service-external-ip-range"
        ));
        assert!(has(
            &diags,
            "LoadBalancer IP 203.0.113.99 is outside --loadbalancer-ip-range"
        ));
        assert!(has(&diags, "externalIP 'not-an-ip' is not an IP address"));
    }

    #[test]
    fn no_range_configured_accepts_nothing_and_says_so_once() {
        let s = Settings {
            external_ip_ranges: vec![],
            lb_ip_ranges: vec![],
            ..settings()
        };
        let svc = web(json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}}));
        let other = web(json!({"metadata": {"name": "other"}}));
        let (d, diags) = run(&[svc, other], &two_nodes(), &s);
        assert!(d.services.is_empty());
        assert_eq!(
            diags.iter().filter(|d| d.object == "dsr").count(),
            1,
            "{diags:?}"
        );
        assert!(has(
            &diags,
            "externalIP 203.0.113.10 ignored: no --service-external-ip-range configured"
        ));
        assert!(has(
            &diags,
            "LoadBalancer IP 198.51.100.20 ignored: no --loadbalancer-ip-range configured"
        ));
    }

    #[test]
    fn lb_ips_ip_mode_proxy_and_skiplbips() {
        let s = settings();
        let ingress = json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.20", "ipMode": "Proxy"}, {"ip": "198.51.100.21", "ipMode": "VIP"},
            {"ip": "198.51.100.22"}]}});
        let (d, _) = run(
            &[web(
                json!({"spec": {"externalIPs": []}, "status": ingress.clone()}),
            )],
            &two_nodes(),
            &s,
        );
        let vips: Vec<IpAddr> = d.services.keys().map(|k| k.addr).collect();
        assert_eq!(vips, vec![ip("198.51.100.21"), ip("198.51.100.22")]);
        let skip = web(
            json!({"metadata": {"annotations": {"kube-router.io/service.skiplbips": "true"}},
                              "spec": {"externalIPs": []}, "status": ingress.clone()}),
        );
        assert!(run(&[skip], &two_nodes(), &s).0.services.is_empty());
        let keep = web(
            json!({"metadata": {"annotations": {"kube-router.io/service.skiplbips": "false"}},
                              "spec": {"externalIPs": []}, "status": ingress}),
        );
        assert_eq!(run(&[keep], &two_nodes(), &s).0.services.len(), 2);
    }

    #[test]
    fn scheduler_and_flags_from_annotations() {
        let s = settings();
        let get = |ann: serde_json::Value| {
            let (d, diags) = run(
                &[web(json!({"metadata": {"annotations": ann}}))],
                &two_nodes(),
                &s,
            );
            let v = d.services.values().next().unwrap().service.clone();
            (v.scheduler, v.flags, diags)
        };
        assert_eq!(
            get(json!({"kube-router.io/service.scheduler": "lc"})).0,
            "lc"
        );
        let (sched, _, diags) = get(json!({"kube-router.io/service.scheduler": "fancy"}));
        assert_eq!(sched, "rr");
        assert!(has(&diags, "unknown scheduler 'fancy'"));
        let (sched, flags, _) = get(json!({"kube-router.io/service.scheduler": "mh",
                                           "kube-router.io/service.schedflags": "flag-1, flag-2"}));
        assert_eq!(
            (sched.as_str(), flags),
            ("mh", IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2)
        );
        let (_, flags, diags) = get(json!({"kube-router.io/service.scheduler": "sh",
                                           "kube-router.io/service.schedflags": "flag-1"}));
        assert_eq!(flags, 0);
        assert!(has(&diags, "only used with the mh scheduler"));
    }

    #[test]
    fn session_affinity_gives_persistence() {
        let s = settings();
        let get = |spec: serde_json::Value| {
            let (d, _) = run(&[web(json!({"spec": spec}))], &two_nodes(), &s);
            let v = d.services.values().next().unwrap().service.clone();
            (v.flags, v.timeout)
        };
        assert_eq!(
            get(json!({"sessionAffinity": "ClientIP"})),
            (IP_VS_SVC_F_PERSISTENT, 10800)
        );
        assert_eq!(
            get(json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}})),
            (IP_VS_SVC_F_PERSISTENT, 600)
        );
        assert_eq!(
            get(json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -5}}})),
            (IP_VS_SVC_F_PERSISTENT, 10800)
        );
        assert_eq!(get(json!({"sessionAffinity": "None"})), (0, 0));
    }

    #[test]
    fn local_policy_keeps_local_endpoints_only() {
        let s = settings();
        for extra in [
            json!({"spec": {"externalTrafficPolicy": "Local"}}),
            json!({"metadata": {"annotations": {"kube-router.io/service.local": "true"}}}),
        ] {
            let (d, _) = run(&[web(extra.clone())], &two_nodes(), &s);
            let ips: Vec<IpAddr> = d
                .services
                .values()
                .next()
                .unwrap()
                .dests
                .iter()
                .map(|d| d.addr)
                .collect();
            assert_eq!(ips, vec![ip("10.244.1.5")], "{extra}");
            // No local endpoint: this node does not serve the VIP at all.
            let remote_only = vec![web_slice(
                "web-1",
                "IPv4",
                &[("10.244.2.7", "node2", true, true)],
            )];
            let (d, _) = run(&[web(extra.clone())], &remote_only, &s);
            assert!(d.services.is_empty(), "{extra}");
            assert!(d.pods.is_empty());
        }
        // Cluster policy with no endpoints at all: the service exists, empty.
        let (d, _) = run(&[web(json!({}))], &[], &s);
        assert_eq!(d.services.values().next().unwrap().dests, vec![]);
    }

    #[test]
    fn ready_or_serving_endpoints_of_the_right_slices() {
        let s = settings();
        let mut slices = vec![
            web_slice(
                "web-1",
                "IPv4",
                &[
                    ("10.244.1.5", "node1", true, true),
                    ("10.244.1.6", "node1", false, true), // terminating but serving
                    ("10.244.1.7", "node1", false, false),
                ],
            ),
            // The same endpoint in a second slice (during a slice rebalance): once.
            web_slice("web-2", "IPv4", &[("10.244.1.5", "node1", true, true)]),
            // Another family: not for an IPv4 VIP.
            web_slice("web-3", "IPv6", &[("fd00::5", "node1", true, true)]),
        ];
        // Same name in another namespace, and another service's slice.
        let mut other_ns = web_slice("web-4", "IPv4", &[("10.244.9.9", "node1", true, true)]);
        other_ns.metadata.namespace = "prod".into();
        let mut other_svc = web_slice("db-1", "IPv4", &[("10.244.9.8", "node1", true, true)]);
        other_svc
            .metadata
            .labels
            .insert("kubernetes.io/service-name".into(), "db".into());
        slices.extend([other_ns, other_svc]);
        let (d, _) = run(&[web(json!({}))], &slices, &s);
        let ips: Vec<IpAddr> = d
            .services
            .values()
            .next()
            .unwrap()
            .dests
            .iter()
            .map(|d| d.addr)
            .collect();
        assert_eq!(ips, vec![ip("10.244.1.5"), ip("10.244.1.6")]);
    }

    #[test]
    fn host_network_endpoints_are_skipped_one_by_one() {
        let s = settings();
        let slices = vec![web_slice(
            "web-1",
            "IPv4",
            &[
                ("192.168.1.2", "node2", true, true),
                ("10.244.1.5", "node1", true, true),
            ],
        )];
        let (d, diags) = run(&[web(json!({}))], &slices, &s);
        let ips: Vec<IpAddr> = d
            .services
            .values()
            .next()
            .unwrap()
            .dests
            .iter()
            .map(|d| d.addr)
            .collect();
        assert_eq!(ips, vec![ip("10.244.1.5")]);
        assert!(has(
            &diags,
            "endpoint 192.168.1.2 is a node address (hostNetwork pod)"
        ));
    }

    #[test]
    fn gue_or_ipip_tunnel_type() {
        let s = Settings {
            tunnel: DestTunnel::Gue(5555),
            ..settings()
        };
        let (d, _) = run(&[web(json!({}))], &two_nodes(), &s);
        let w = d.services.values().next().unwrap();
        assert!(w
            .dests
            .iter()
            .all(|d| d.tun_type == TunnelType::Gue && d.tun_port == 5555));
        assert_eq!(d.pods[&ip("10.244.1.5")].gue_port, Some(5555));
        let (d, _) = run(&[web(json!({}))], &two_nodes(), &settings());
        assert_eq!(d.pods[&ip("10.244.1.5")].gue_port, None);
    }

    #[test]
    fn pods_are_the_local_endpoints_with_all_their_vips() {
        let s = settings();
        let svc = web(
            json!({"spec": {"externalIPs": ["203.0.113.10", "203.0.113.11"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80},
                      {"name": "dns", "protocol": "UDP", "port": 53}]}}),
        );
        let mut slices = two_nodes();
        slices[0].ports.push(crate::kube::types::EndpointPort {
            name: "dns".into(),
            protocol: "UDP".into(),
            port: Some(53),
        });
        let (d, _) = run(&[svc], &slices, &s);
        assert_eq!(d.services.len(), 4);
        assert_eq!(
            d.services
                .keys()
                .filter(|k| k.protocol == Protocol::Udp)
                .count(),
            2
        );
        assert_eq!(
            d.pods.keys().copied().collect::<Vec<_>>(),
            vec![ip("10.244.1.5")]
        );
        assert_eq!(
            d.pods[&ip("10.244.1.5")].vips,
            [ip("203.0.113.10"), ip("203.0.113.11")]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn ipv6_vip_with_ipv6_endpoints() {
        let s = settings();
        let svc = web(json!({"spec": {"externalIPs": ["2001:db8:100::10", "203.0.113.10"]}}));
        let mut slices = two_nodes();
        slices.push(web_slice(
            "web-6",
            "IPv6",
            &[("fd00:244:1::5", "node1", true, true)],
        ));
        let (d, _) = run(&[svc], &slices, &s);
        let v6 = &d.services[&key("2001:db8:100::10", 80)];
        assert_eq!(v6.service.netmask, 128);
        assert_eq!(
            v6.dests.iter().map(|d| d.addr).collect::<Vec<_>>(),
            vec![ip("fd00:244:1::5")]
        );
        assert_eq!(
            d.pods[&ip("fd00:244:1::5")].vips,
            [ip("2001:db8:100::10")].into_iter().collect()
        );
        // IPv6 disabled: the IPv6 VIP is skipped with a word.
        let (d, diags) = run(
            &[web(json!({"spec": {"externalIPs": ["2001:db8:100::10"]}}))],
            &slices,
            &Settings {
                ipv6: false,
                ..settings()
            },
        );
        assert!(d.services.is_empty());
        assert!(has(&diags, "ipv6 is not enabled"));
    }

    #[test]
    fn port_remap_and_bad_ports_are_reported() {
        let s = settings();
        let mut slices = two_nodes();
        slices[0].ports[0].port = Some(8080);
        let svc = web(json!({"spec": {"ports": [
            {"name": "http", "protocol": "TCP", "port": 80},
            {"name": "q", "protocol": "QUIC", "port": 443},
            {"name": "z", "protocol": "TCP", "port": 70000}]}}));
        let (d, diags) = run(&[svc], &slices, &s);
        assert_eq!(d.services.len(), 1);
        assert!(has(
            &diags,
            "endpoints listen on 8080, but DSR cannot remap ports"
        ));
        assert!(has(&diags, "protocol 'QUIC' not supported"));
        assert!(has(&diags, "port 70000 out of range"));
    }

    /// `ns/name` claiming 203.0.113.10:80 like `default/web`, created at `ts`, with one local
    /// endpoint `pod` on node1 (its own slice).
    fn claimant(ns: &str, name: &str, ts: &str, uid: &str, pod: &str) -> (Service, EndpointSlice) {
        let s = web(json!({"metadata": {"name": name, "namespace": ns,
                                        "creationTimestamp": ts, "uid": uid}}));
        let sl = slice(json!({
            "metadata": {"name": format!("{name}-1"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [pod], "nodeName": "node1", "conditions": {"ready": true}}],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80}]
        }));
        (s, sl)
    }

    #[test]
    fn a_newcomer_never_takes_a_vip_by_its_name() {
        let s = settings();
        // No incumbent: the older Service keeps the VIP, whatever the names; the loser's pod
        // gets nothing.
        let (prod, prod_sl) = claimant(
            "prod",
            "web",
            "2020-01-01T00:00:00Z",
            "u-prod",
            "10.244.1.5",
        );
        let (aaa, aaa_sl) = claimant("aaa", "x", "2026-12-01T00:00:00Z", "u-aaa", "10.244.1.99");
        let (d, diags) = run(
            &[aaa.clone(), prod.clone()],
            &[aaa_sl.clone(), prod_sl.clone()],
            &s,
        );
        assert_eq!(d.services[&key("203.0.113.10", 80)].origin, "prod/web");
        assert!(!d.pods.contains_key(&ip("10.244.1.99")), "{:?}", d.pods);
        assert!(d.pods.contains_key(&ip("10.244.1.5")));
        assert!(has(&diags, "dsr: tcp 203.0.113.10:80 is claimed by prod/web and aaa/x: prod/web keeps it (older), aaa/x is skipped"), "{diags:?}");
        assert_eq!(diags.len(), 1);

        // The incumbent (recorded claim) keeps the key even when it is the younger one.
        let rec = [(key("203.0.113.10", 80), "aaa/x".to_string())];
        let (d, diags) = run_with(
            &[prod.clone(), aaa.clone()],
            &[prod_sl.clone(), aaa_sl.clone()],
            &s,
            &rec,
        );
        assert_eq!(d.services[&key("203.0.113.10", 80)].origin, "aaa/x");
        assert!(d.pods.contains_key(&ip("10.244.1.99")));
        assert!(!d.pods.contains_key(&ip("10.244.1.5")), "{:?}", d.pods);
        assert!(
            has(
                &diags,
                "aaa/x keeps it (programmed first), prod/web is skipped"
            ),
            "{diags:?}"
        );

        // A recorded claim of a Service that no longer claims the key gives no right: age decides.
        let rec = [(key("203.0.113.10", 80), "gone/svc".to_string())];
        let (d, _) = run_with(
            &[aaa.clone(), prod.clone()],
            &[aaa_sl.clone(), prod_sl.clone()],
            &s,
            &rec,
        );
        assert_eq!(d.services[&key("203.0.113.10", 80)].origin, "prod/web");

        // Same second: the uid decides, not the name; order of the list does not matter.
        let (zzz, zzz_sl) = claimant("zzz", "y", "2020-01-01T00:00:00Z", "u-0", "10.244.1.77");
        for list in [[zzz.clone(), prod.clone()], [prod.clone(), zzz.clone()]] {
            let (d, _) = run(&list, &[zzz_sl.clone(), prod_sl.clone()], &s);
            assert_eq!(d.services[&key("203.0.113.10", 80)].origin, "zzz/y");
            assert_eq!(
                d.pods.keys().copied().collect::<Vec<_>>(),
                [ip("10.244.1.77")]
            );
        }

        // The plan records who claims what, and a restart reads it back as the incumbent.
        let inp = Inputs {
            services: &[aaa.clone(), prod.clone()],
            slices: &[aaa_sl, prod_sl],
            local_node: "node1",
            node_ips: &BTreeSet::new(),
            incumbents: &[],
        };
        let p = plan(&inp, &s, &IpvsState::default(), &BTreeSet::new());
        let text = render_owned(&p.ipvs.record, &p.claims);
        assert_eq!(text, "tcp 203.0.113.10 80 prod/web\n");
        assert_eq!(
            parse_record(&text),
            [(key("203.0.113.10", 80), "prod/web".to_string())]
        );
    }

    #[test]
    fn only_slices_of_trusted_managers_are_used() {
        let s = settings();
        let svc = [web(json!({}))];
        let k = key("203.0.113.10", 80);
        let (d, _) = run(&svc, &two_nodes(), &s);
        assert_eq!(d.services[&k].dests.len(), 2);
        for manager in [Some("manual-test"), None] {
            let mut sl = two_nodes();
            sl[0].metadata.labels.remove(MANAGED_BY);
            if let Some(m) = manager {
                sl[0].metadata.labels.insert(MANAGED_BY.into(), m.into());
            }
            let (d, diags) = run(&svc, &sl, &s);
            assert!(d.services[&k].dests.is_empty(), "{manager:?}");
            assert!(d.pods.is_empty());
            assert!(
                has(
                    &diags,
                    "endpointslice default/web-1: not managed by endpointslice-controller.k8s.io"
                ),
                "{diags:?}"
            );
            assert_eq!(diags.len(), 1, "{diags:?}");
        }
        // --dsr-endpointslice-managers adds a manager.
        let mut sl = two_nodes();
        sl[0]
            .metadata
            .labels
            .insert(MANAGED_BY.into(), "manual-test".into());
        let s = Settings {
            slice_managers: vec!["manual-test".into()],
            ..settings()
        };
        let (d, diags) = run(&svc, &sl, &s);
        assert_eq!(d.services[&k].dests.len(), 2);
        assert!(diags.is_empty(), "{diags:?}");
    }

    #[test]
    fn skipped_kinds_of_service() {
        let s = settings();
        for extra in [
            json!({"spec": {"type": "ExternalName"}}),
            json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "cilium"}}}),
            json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}),
        ] {
            let (d, diags) = run(&[web(extra.clone())], &two_nodes(), &s);
            assert!(d.services.is_empty(), "{extra}");
            assert!(has(&diags, "DSR annotation ignored"), "{extra}");
        }
    }

    #[test]
    fn advmss_arithmetic() {
        assert_eq!(advmss(Family::V4, 1500, false), Some(1440));
        assert_eq!(advmss(Family::V4, 1500, true), Some(1428));
        assert_eq!(advmss(Family::V6, 1500, false), Some(1400));
        assert_eq!(advmss(Family::V6, 1500, true), Some(1388));
        assert_eq!(advmss(Family::V4, 1450, false), Some(1390));
        assert_eq!(advmss(Family::V4, 60, false), None);
        assert_eq!(advmss(Family::V6, 0, true), None);
    }

    #[test]
    fn director_rules_and_local_routes() {
        let s = settings();
        let svc = web(json!({"spec": {"externalIPs": ["203.0.113.10", "2001:db8:100::10"]}}));
        let (d, _) = run(&[svc], &two_nodes(), &s);
        let (rules, routes) = director_routing(&d, &BTreeSet::new(), &s);
        assert_eq!(rules.len(), 2);
        let r4 = rules.iter().find(|r| r.family == Family::V4).unwrap();
        assert_eq!(
            crate::model::RuleDisplay(r4).to_string(),
            "ipv4 pref 32000 to 203.0.113.10/32 ipproto 6 dport 80 lookup 78 proto 157"
        );
        let shown: Vec<String> = routes
            .iter()
            .map(|r| crate::model::RouteDisplay(r).to_string())
            .collect();
        assert_eq!(
            shown,
            [
                "local 0.0.0.0/0 dev lo table 78 proto 157",
                "local ::/0 dev lo table 78 proto 157"
            ]
        );
        // A blocked key gets no rule; a family without rules gets no local route.
        let blocked: BTreeSet<ServiceKey> = [key("2001:db8:100::10", 80)].into_iter().collect();
        let (rules, routes) = director_routing(&d, &blocked, &s);
        assert_eq!(rules.len(), 1);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].family(), Family::V4);
    }

    // ----- IPVS planner

    fn plan_apply(d: &Desired, k: &mut IpvsState, owned: &mut BTreeSet<ServiceKey>) -> IpvsPlan {
        let p = plan_ipvs(d, k, owned);
        *owned = p.record.clone();
        let mut failed = Vec::new();
        for (i, op) in p.ops.iter().enumerate() {
            if let Err(e) = apply_ipvs(k, op) {
                failed.push((i, e));
            }
        }
        assert!(failed.is_empty(), "{:?}", p.ops);
        *owned = p.record_after(&failed);
        p
    }

    fn foreign() -> VirtualService {
        VirtualService {
            key: key("10.96.0.1", 443),
            scheduler: "rr".into(),
            flags: IP_VS_SVC_F_HASHED,
            timeout: 0,
            netmask: u32::MAX,
        }
    }

    #[test]
    fn ipvs_plan_converges_and_cleans_up() {
        let s = settings();
        let (d, _) = run(
            &[web(
                json!({"spec": {"externalIPs": ["203.0.113.10", "203.0.113.11"]}}),
            )],
            &two_nodes(),
            &s,
        );
        let mut k = IpvsState {
            services: vec![foreign()],
            ..IpvsState::default()
        };
        let mut owned = BTreeSet::new();
        let p = plan_apply(&d, &mut k, &mut owned);
        let kinds: Vec<String> = p.ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "add ipvs service tcp 203.0.113.10:80 scheduler rr",
                "add ipvs real server tcp 203.0.113.10:80 -> 10.244.1.5:80 tunnel ipip weight 1",
                "add ipvs real server tcp 203.0.113.10:80 -> 10.244.2.7:80 tunnel ipip weight 1",
                "add ipvs service tcp 203.0.113.11:80 scheduler rr",
                "add ipvs real server tcp 203.0.113.11:80 -> 10.244.1.5:80 tunnel ipip weight 1",
                "add ipvs real server tcp 203.0.113.11:80 -> 10.244.2.7:80 tunnel ipip weight 1",
            ]
        );
        assert_eq!(
            owned,
            [key("203.0.113.10", 80), key("203.0.113.11", 80)]
                .into_iter()
                .collect()
        );
        // Plan again: nothing (the kernel adds HASHED to the flags; that is not a difference).
        assert_eq!(plan_ipvs(&d, &k, &owned).ops, vec![]);
        // Scheduler, persistence, endpoints and tunnel type change.
        let svc = web(
            json!({"metadata": {"annotations": {"kube-router.io/service.scheduler": "sh"}},
                             "spec": {"externalIPs": ["203.0.113.10"], "sessionAffinity": "ClientIP"}}),
        );
        let slices = vec![web_slice(
            "web-1",
            "IPv4",
            &[
                ("10.244.1.5", "node1", true, true),
                ("10.244.3.3", "node3", true, true),
            ],
        )];
        let gue = Settings {
            tunnel: DestTunnel::Gue(5555),
            ..settings()
        };
        let (d2, _) = run(&[svc], &slices, &gue);
        let p = plan_apply(&d2, &mut k, &mut owned);
        let kinds: Vec<String> = p.ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "edit ipvs service tcp 203.0.113.10:80 scheduler sh persistent 10800",
                "edit ipvs real server tcp 203.0.113.10:80 -> 10.244.1.5:80 tunnel gue:5555 weight 1",
                "add ipvs real server tcp 203.0.113.10:80 -> 10.244.3.3:80 tunnel gue:5555 weight 1",
                "delete ipvs real server tcp 203.0.113.10:80 -> 10.244.2.7:80 tunnel ipip weight 1",
                "delete ipvs service tcp 203.0.113.11:80",
            ]
        );
        assert_eq!(owned, [key("203.0.113.10", 80)].into_iter().collect());
        assert_eq!(plan_ipvs(&d2, &k, &owned).ops, vec![]);
        // Nothing wanted (service deleted, or `cleanup`): everything of ours goes, foreign stays.
        let p = plan_apply(&Desired::default(), &mut k, &mut owned);
        assert_eq!(p.ops, vec![IpvsOp::DeleteService(key("203.0.113.10", 80))]);
        assert_eq!(k.services, vec![foreign()]);
        assert!(owned.is_empty());
    }

    #[test]
    fn foreign_service_on_a_wanted_key_is_reported_not_touched() {
        let s = settings();
        let (d, _) = run(&[web(json!({}))], &two_nodes(), &s);
        let held = VirtualService {
            key: key("203.0.113.10", 80),
            scheduler: "wlc".into(),
            ..foreign()
        };
        let k = IpvsState {
            services: vec![held, foreign()],
            ..IpvsState::default()
        };
        let p = plan_ipvs(&d, &k, &BTreeSet::new());
        assert_eq!(p.ops, vec![]);
        assert_eq!(p.blocked, [key("203.0.113.10", 80)].into_iter().collect());
        assert!(
            p.clashes[0]
                .to_string()
                .contains("was not created by kr-tunneld"),
            "{:?}",
            p.clashes
        );
        assert!(p.record.is_empty());
        // And the director gets no rule for it.
        assert!(director_routing(&d, &p.blocked, &s).0.is_empty());
    }

    #[test]
    fn record_is_pruned_and_written_ahead() {
        let s = settings();
        let (d, _) = run(&[web(json!({}))], &two_nodes(), &s);
        // A recorded key whose service is gone (ip_vs reloaded, or deleted by hand): forgotten.
        let stale: BTreeSet<ServiceKey> = [key("203.0.113.99", 80)].into_iter().collect();
        let p = plan_ipvs(&d, &IpvsState::default(), &stale);
        // Written before applying: the key about to be created is already in it (R-3).
        assert_eq!(p.record, [key("203.0.113.10", 80)].into_iter().collect());
        // A failed delete keeps the key.
        let mut k = IpvsState::default();
        for op in &p.ops {
            apply_ipvs(&mut k, op).unwrap();
        }
        let p = plan_ipvs(&Desired::default(), &k, &p.record);
        assert_eq!(p.ops.len(), 1);
        assert_eq!(p.record_after(&[(0, libc::EPERM)]), p.record);
        assert!(p.record_after(&[]).is_empty());
        // A creation that lost the race against someone else (EEXIST) is not ours.
        let p = plan_ipvs(&d, &IpvsState::default(), &BTreeSet::new());
        assert!(matches!(p.ops[0], IpvsOp::AddService(_)));
        assert!(p.record_after(&[(0, libc::EEXIST)]).is_empty());
        assert_eq!(p.record_after(&[(0, libc::ENOENT)]), p.record);
    }

    #[test]
    fn owned_record_text_round_trip() {
        let keys: BTreeSet<ServiceKey> = [
            key("203.0.113.10", 80),
            ServiceKey {
                addr: ip("2001:db8::1"),
                protocol: Protocol::Udp,
                port: 53,
            },
            ServiceKey {
                addr: ip("203.0.113.10"),
                protocol: Protocol::Sctp,
                port: 9,
            },
        ]
        .into_iter()
        .collect();
        let claims = [(key("203.0.113.10", 80), "prod/web".to_string())];
        let text = render_owned(&keys, &claims);
        assert_eq!(
            text,
            "tcp 203.0.113.10 80 prod/web\nsctp 203.0.113.10 9 -\nudp 2001:db8::1 53 -\n"
        );
        assert_eq!(parse_owned(&text), keys);
        assert_eq!(parse_record(&text)[0], claims[0]);
        let garbled = "tcp 203.0.113.10 80\nicmp 1.2.3.4 1\ntcp 1.2.3.4\ntcp 1.2.3.4 99999\nudp x 1\ntcp 1.1.1.1 1 a/b extra\n";
        assert_eq!(
            parse_owned(garbled),
            [key("203.0.113.10", 80)].into_iter().collect()
        );
    }

    // ----- pod side

    fn pod_ns() -> PodNs {
        PodNs {
            links: vec![
                PodLink {
                    index: 1,
                    name: "lo".into(),
                    kind: String::new(),
                    group: 0,
                    mtu: 65536,
                    up: true,
                    local: None,
                    remote: None,
                    rp_filter: Some(0),
                    accept_local: None,
                },
                PodLink {
                    index: 3,
                    name: "eth0".into(),
                    kind: "veth".into(),
                    group: 0,
                    mtu: 1450,
                    up: true,
                    local: None,
                    remote: None,
                    rp_filter: Some(2),
                    accept_local: None,
                },
            ],
            addrs: vec![
                Addr {
                    index: 1,
                    addr: "127.0.0.1/8".parse().unwrap(),
                },
                Addr {
                    index: 3,
                    addr: "10.244.1.5/24".parse().unwrap(),
                },
            ],
            defaults: vec![DefaultRoute {
                family: Family::V4,
                gateway: Some(ip("10.244.1.1")),
                oif: 3,
            }],
            all_rp_filter: Some(0),
            ..PodNs::default()
        }
    }

    fn pod_want(vips: &[&str], gue: Option<u16>) -> PodWant {
        PodWant {
            ip: ip("10.244.1.5"),
            vips: vips.iter().map(|v| ip(v)).collect(),
            gue_port: gue,
            origins: ["default/web".to_string()].into_iter().collect(),
        }
    }

    fn pod_converge(ns: &mut PodNs, wants: &[&PodWant], s: &Settings) -> Vec<PodOp> {
        let mut diags = Vec::new();
        let ops = plan_pod(wants, ns, s, &mut diags);
        for op in &ops {
            apply_pod(ns, op, s).unwrap_or_else(|e| panic!("{op}: errno {e}"));
        }
        assert_eq!(
            plan_pod(wants, ns, s, &mut Vec::new()),
            vec![],
            "after {ops:?}"
        );
        ops
    }

    #[test]
    fn pod_from_nothing_then_converged() {
        let s = settings();
        let mut ns = pod_ns();
        let w = pod_want(&["203.0.113.10", "203.0.113.11"], None);
        let ops = pod_converge(&mut ns, &[&w], &s);
        let shown: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            shown,
            [
                "create ipip receive link kt-dsr local 10.244.1.5",
                "set rp_filter 0 on kt-dsr",
                "add address 203.0.113.10/32 to kt-dsr",
                "add address 203.0.113.11/32 to kt-dsr",
                // advmss: eth0 MTU 1450 - 60.
                "replace route 0.0.0.0/0 via 10.244.1.1 table 78 proto 157 advmss 1390",
                "add rule ipv4 pref 32000 from 203.0.113.10/32 lookup 78 proto 157",
                "add rule ipv4 pref 32000 from 203.0.113.11/32 lookup 78 proto 157",
            ]
        );
        assert!(matches!(&ops[4], PodOp::ReplaceRoute { oif: Some(3), .. }));
    }

    #[test]
    fn pod_changes_vips_encap_and_cleans_up() {
        let s = settings();
        let mut ns = pod_ns();
        pod_converge(
            &mut ns,
            &[&pod_want(&["203.0.113.10", "203.0.113.11"], None)],
            &s,
        );
        // One VIP goes, GUE comes: FOU port first, advmss 12 lower.
        let ops = pod_converge(&mut ns, &[&pod_want(&["203.0.113.10"], Some(5555))], &s);
        let shown: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            shown,
            [
                "add fou port ipv4 5555 gue",
                "delete rule ipv4 pref 32000 from 203.0.113.11/32 lookup 78 proto 157",
                "delete address 203.0.113.11/32 from kt-dsr",
                "replace route 0.0.0.0/0 via 10.244.1.1 table 78 proto 157 advmss 1378",
            ]
        );
        // Back to IPIP: the GUE port we opened is closed.
        let ops = pod_converge(&mut ns, &[&pod_want(&["203.0.113.10"], None)], &s);
        assert!(ops.contains(&PodOp::DelFouPort(FouPort {
            family: Family::V4,
            port: 5555,
            gue: true
        })));
        // Nothing wanted any more: link (with its VIPs), rule and route go.
        let ops = pod_converge(&mut ns, &[], &s);
        let shown: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            shown,
            [
                "delete rule ipv4 pref 32000 from 203.0.113.10/32 lookup 78 proto 157",
                "delete link kt-dsr",
                "delete route 0.0.0.0/0 via 10.244.1.1 table 78 proto 157 advmss 1390",
            ]
        );
        assert_eq!(ns, pod_ns());
    }

    #[test]
    fn pod_never_closes_a_fou_port_it_did_not_open() {
        let s = settings();
        let mut ns = pod_ns();
        let gue = |port| FouPort {
            family: Family::V4,
            port,
            gue: true,
        };
        // Someone else's GUE ports: 6666, and 5555, the one DSR wants (used, never closed).
        ns.fou = vec![gue(6666), gue(5555)];
        pod_converge(&mut ns, &[&pod_want(&["203.0.113.10"], Some(5555))], &s);
        pod_converge(&mut ns, &[&pod_want(&["203.0.113.10"], None)], &s);
        pod_converge(&mut ns, &[], &s);
        assert_eq!(ns.fou, [gue(6666), gue(5555)]);
    }

    #[test]
    fn pod_repairs_and_refuses_foreign_links() {
        let s = settings();
        let mut ns = pod_ns();
        let w = pod_want(&["203.0.113.10"], None);
        pod_converge(&mut ns, &[&w], &s);
        // The kernel's IPv6 link-local address on our link is not a VIP to remove.
        let index = ns.links.iter().find(|l| l.name == "kt-dsr").unwrap().index;
        ns.addrs.push(Addr {
            index,
            addr: "fe80::5efe:af4:105/64".parse().unwrap(),
        });
        assert_eq!(plan_pod(&[&w], &ns, &s, &mut Vec::new()), vec![]);
        // Someone set it down and rp_filter back to 1.
        for l in ns.links.iter_mut().filter(|l| l.name == "kt-dsr") {
            l.up = false;
            l.rp_filter = Some(1);
        }
        let ops = pod_converge(&mut ns, &[&w], &s);
        assert_eq!(
            ops,
            vec![
                PodOp::SetUp {
                    link: "kt-dsr".into()
                },
                PodOp::DisableRpFilter {
                    link: "kt-dsr".into()
                }
            ]
        );
        // A foreign link with our name: reported, left alone.
        let mut ns = pod_ns();
        ns.links.push(PodLink {
            index: 9,
            name: "kt-dsr".into(),
            kind: "dummy".into(),
            group: 0,
            ..ns.links[1].clone()
        });
        let mut diags = Vec::new();
        let ops = plan_pod(&[&w], &ns, &s, &mut diags);
        assert_eq!(ops, vec![]);
        assert!(has(&diags, "a link named kt-dsr exists and is not ours"));
        // Strict rp_filter for `all` is reported (we cannot write sysctls).
        let mut ns = pod_ns();
        ns.all_rp_filter = Some(1);
        let mut diags = Vec::new();
        plan_pod(&[&w], &ns, &s, &mut diags);
        assert!(has(&diags, "net.ipv4.conf.all.rp_filter is 1"));
    }

    #[test]
    fn pod_ipv6_dual_stack() {
        let s = settings();
        let mut ns = pod_ns();
        ns.addrs.push(Addr {
            index: 3,
            addr: "fd00:244:1::5/128".parse().unwrap(),
        });
        ns.defaults.push(DefaultRoute {
            family: Family::V6,
            gateway: None,
            oif: 3,
        });
        let w4 = pod_want(&["203.0.113.10"], Some(5555));
        let w6 = PodWant {
            ip: ip("fd00:244:1::5"),
            vips: [ip("2001:db8:100::10")].into_iter().collect(),
            ..w4.clone()
        };
        let ops = pod_converge(&mut ns, &[&w4, &w6], &s);
        let shown: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert!(
            shown.contains(&"create ip6tnl receive link kt-dsr6 local fd00:244:1::5".to_string()),
            "{shown:?}"
        );
        assert!(shown.contains(&"add address 2001:db8:100::10/128 to kt-dsr6".to_string()));
        assert!(shown.contains(&"add fou port ipv6 5555 gue".to_string()));
        // No gateway: through the device; MTU 1450 - 100 - 12.
        assert!(
            shown.contains(
                &"replace route ::/0 dev eth0 table 78 proto 157 advmss 1338".to_string()
            ),
            "{shown:?}"
        );
        assert!(!shown.iter().any(|s| s.contains("rp_filter 0 on kt-dsr6")));
        // The IPv4 endpoint goes, the IPv6 one stays.
        let ops = pod_converge(&mut ns, &[&w6], &s);
        assert!(ops
            .iter()
            .any(|o| matches!(o, PodOp::DeleteLink { name, .. } if name == "kt-dsr")));
        assert!(ops.contains(&PodOp::DelFouPort(FouPort {
            family: Family::V4,
            port: 5555,
            gue: true
        })));
        assert!(!ops
            .iter()
            .any(|o| matches!(o, PodOp::DeleteLink { name, .. } if name == "kt-dsr6")));
    }

    #[test]
    fn pod_without_default_route_gets_the_link_only() {
        let s = settings();
        let mut ns = pod_ns();
        ns.defaults.clear();
        let w = pod_want(&["203.0.113.10"], None);
        let mut diags = Vec::new();
        let ops = plan_pod(&[&w], &ns, &s, &mut diags);
        assert!(has(&diags, "no ipv4 default route in the pod"));
        assert!(!ops
            .iter()
            .any(|o| matches!(o, PodOp::ReplaceRoute { .. } | PodOp::AddRule(_))));
        assert!(ops.iter().any(|o| matches!(o, PodOp::AddAddr { .. })));
    }

    #[test]
    fn one_call_plan_and_node_ips() {
        let s = settings();
        let nodes = vec![crate::nodes::NodeInfo {
            name: "node2".into(),
            addresses: vec![
                ("InternalIP".into(), "10.244.2.7".into()),
                ("Hostname".into(), "node2".into()),
            ],
            ..crate::nodes::NodeInfo::default()
        }];
        let ips = node_ips(&nodes);
        assert_eq!(ips, [ip("10.244.2.7")].into_iter().collect());
        // 10.244.2.7 is now a node address: skipped as a hostNetwork endpoint.
        let svc = [web(json!({}))];
        let slices = two_nodes();
        let inp = Inputs {
            services: &svc,
            slices: &slices,
            local_node: "node1",
            node_ips: &ips,
            incumbents: &[],
        };
        let held = VirtualService {
            key: key("203.0.113.10", 80),
            ..foreign()
        };
        let p = plan(
            &inp,
            &s,
            &IpvsState {
                services: vec![held],
                ..IpvsState::default()
            },
            &BTreeSet::new(),
        );
        assert!(p.ipvs.ops.is_empty() && p.rules.is_empty() && p.routes.is_empty());
        assert!(has(&p.diags, "hostNetwork"));
        assert!(has(&p.diags, "was not created by kr-tunneld"));
        assert_eq!(
            p.pods.keys().copied().collect::<Vec<_>>(),
            vec![ip("10.244.1.5")]
        );
        let p = plan(&inp, &s, &IpvsState::default(), &BTreeSet::new());
        assert_eq!((p.ipvs.ops.len(), p.rules.len(), p.routes.len()), (2, 1, 1));
    }
}
