//! The generic netlink family "IPVS", assembled by hand (SPEC D-2, D-3): virtual services and
//! real servers (destinations) — add, edit, delete, dump — as `ipvsadm` does it.
//!
//! Core module: message builders and parsers only. They turn [`crate::dsr`] values into the
//! payload that follows `nlmsghdr` (the 4-byte `genlmsghdr` plus attributes) and back. Sequence
//! numbers, port IDs, `NLM_F_REQUEST|NLM_F_ACK` or `NLM_F_DUMP`, and the family ID (resolved
//! through nlctrl, e.g. 0x21 on a Debian 6.1 guest) belong to the socket layer; IPVS commands
//! need no further netlink flags (`ipvsadm` sends none, the kernel keys on the command).
//!
//! The executor at the end of the file ([`read_state`], [`apply`]) is the thin shell around these
//! builders: one request per [`IpvsOp`], generic over a [`GenlTransport`] so the real socket and
//! an in-memory fake are interchangeable. It decides nothing.
//!
//! Wire format (uapi `include/uapi/linux/ip_vs.h`, `net/netfilter/ipvs/ip_vs_ctl.c`), checked
//! against `ipvsadm` v1.31 on Debian's 6.1 kernel (see `tests/ipvs.rs`):
//!
//! * `IPVS_CMD_ATTR_SERVICE` and `IPVS_CMD_ATTR_DEST` are nested (`ipvsadm`/libnl sets
//!   `NLA_F_NESTED`, the kernel's dumps do not; both are accepted and parsed).
//! * Addresses are always 16 bytes (`union nf_inet_addr`); an IPv4 address fills the first 4.
//! * Ports (service and `TUN_PORT`) are big-endian; everything else is host order. The netmask
//!   is copied as 4 raw bytes (`nla_get_be32`): an all-ones IPv4 mask, or for IPv6 the prefix
//!   length as a host-order `u32` — what `ipvsadm` sends and the kernel dumps back.
//! * A "full entry" is mandatory for `NEW_SERVICE`/`SET_SERVICE` (SCHED_NAME, FLAGS, TIMEOUT,
//!   NETMASK) and for `NEW_DEST`/`SET_DEST` (FWD_METHOD, WEIGHT, U_THRESH, L_THRESH), else
//!   `EINVAL`. Other commands need only the identity (service: AF, PROTOCOL, ADDR, PORT; dest:
//!   ADDR, PORT), which is all this module sends for them.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable,
};
use netlink_packet_core::{NLA_F_NESTED, NLA_TYPE_MASK};

use super::genl::Genl;
use super::socket::{NetlinkError, Request};
use crate::apply::KernelError;
use crate::dsr::{
    Forward, IpvsOp, IpvsState, Protocol, RealServer, ServiceKey, TunnelType, VirtualService,
};
use crate::model::Family;

/// The generic netlink family name (`IPVS_GENL_NAME`).
pub const IPVS_GENL_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const IPVS_GENL_VERSION: u8 = 0x1;

// uapi <linux/ip_vs.h>: enum ipvs_cmds (commands used here).
const IPVS_CMD_NEW_SERVICE: u8 = 1;
const IPVS_CMD_SET_SERVICE: u8 = 2;
const IPVS_CMD_DEL_SERVICE: u8 = 3;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_NEW_DEST: u8 = 5;
const IPVS_CMD_SET_DEST: u8 = 6;
const IPVS_CMD_DEL_DEST: u8 = 7;
const IPVS_CMD_GET_DEST: u8 = 8;

// enum ipvs_cmd_attr.
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;

// enum ipvs_svc_attr.
const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_FWMARK: u16 = 5;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;

// enum ipvs_dest_attr.
const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
const IPVS_DEST_ATTR_TUN_TYPE: u16 = 13;
const IPVS_DEST_ATTR_TUN_PORT: u16 = 14;
const IPVS_DEST_ATTR_TUN_FLAGS: u16 = 15;

/// `IP_VS_SCHEDNAME_MAXLEN`, including the NUL.
const IP_VS_SCHEDNAME_MAXLEN: usize = 16;
/// `GENL_HDRLEN`.
const GENL_HDRLEN: usize = 4;

// ---------------------------------------------------------------------------------------------
// Attributes

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn af_of(f: Family) -> u16 {
    u16::from(f.af())
}

fn family_of_af(af: u16) -> Option<Family> {
    match i32::from(af) {
        libc::AF_INET => Some(Family::V4),
        libc::AF_INET6 => Some(Family::V6),
        _ => None,
    }
}

/// An address attribute (16 bytes) as an IP of `family`.
fn ip_of(family: Family, b: &[u8]) -> Result<IpAddr, DecodeError> {
    match family {
        Family::V4 => {
            let o: [u8; 4] = b
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or("short IPv4 address")?;
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        Family::V6 => {
            let o: [u8; 16] = b
                .get(..16)
                .and_then(|s| s.try_into().ok())
                .ok_or("short IPv6 address")?;
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
    }
}

fn u16_ne(b: &[u8]) -> Result<u16, DecodeError> {
    Ok(u16::from_ne_bytes(
        b.get(..2)
            .and_then(|s| s.try_into().ok())
            .ok_or("short u16")?,
    ))
}

fn u16_be(b: &[u8]) -> Result<u16, DecodeError> {
    Ok(u16::from_be_bytes(
        b.get(..2)
            .and_then(|s| s.try_into().ok())
            .ok_or("short u16")?,
    ))
}

fn u32_ne(b: &[u8]) -> Result<u32, DecodeError> {
    Ok(u32::from_ne_bytes(
        b.get(..4)
            .and_then(|s| s.try_into().ok())
            .ok_or("short u32")?,
    ))
}

/// One `IPVS_SVC_ATTR_*` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvcAttr {
    /// `IPVS_SVC_ATTR_AF` (u16).
    Af(u16),
    /// `IPVS_SVC_ATTR_PROTOCOL` (u16, `IPPROTO_*`).
    Protocol(u16),
    /// `IPVS_SVC_ATTR_ADDR` (16 bytes).
    Addr([u8; 16]),
    /// `IPVS_SVC_ATTR_PORT` (be16).
    Port(u16),
    /// `IPVS_SVC_ATTR_FWMARK` (u32).
    Fwmark(u32),
    /// `IPVS_SVC_ATTR_SCHED_NAME` (NUL-terminated string).
    SchedName(String),
    /// `IPVS_SVC_ATTR_FLAGS` (`struct ip_vs_flags { u32 flags; u32 mask; }`).
    Flags {
        /// New flag values.
        flags: u32,
        /// Which bits to set.
        mask: u32,
    },
    /// `IPVS_SVC_ATTR_TIMEOUT` (u32 seconds).
    Timeout(u32),
    /// `IPVS_SVC_ATTR_NETMASK` (4 raw bytes, see the module docs).
    Netmask(u32),
    /// Anything else (stats, PE name, ...).
    Other(DefaultNla),
}

impl Nla for SvcAttr {
    fn value_len(&self) -> usize {
        match self {
            SvcAttr::Af(_) | SvcAttr::Protocol(_) | SvcAttr::Port(_) => 2,
            SvcAttr::Addr(_) => 16,
            SvcAttr::Fwmark(_) | SvcAttr::Timeout(_) | SvcAttr::Netmask(_) => 4,
            SvcAttr::SchedName(s) => s.len() + 1,
            SvcAttr::Flags { .. } => 8,
            SvcAttr::Other(n) => n.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            SvcAttr::Af(_) => IPVS_SVC_ATTR_AF,
            SvcAttr::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            SvcAttr::Addr(_) => IPVS_SVC_ATTR_ADDR,
            SvcAttr::Port(_) => IPVS_SVC_ATTR_PORT,
            SvcAttr::Fwmark(_) => IPVS_SVC_ATTR_FWMARK,
            SvcAttr::SchedName(_) => IPVS_SVC_ATTR_SCHED_NAME,
            SvcAttr::Flags { .. } => IPVS_SVC_ATTR_FLAGS,
            SvcAttr::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            SvcAttr::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            SvcAttr::Other(n) => n.kind(),
        }
    }

    fn emit_value(&self, b: &mut [u8]) {
        match self {
            SvcAttr::Af(v) | SvcAttr::Protocol(v) => b.copy_from_slice(&v.to_ne_bytes()),
            SvcAttr::Port(v) => b.copy_from_slice(&v.to_be_bytes()),
            SvcAttr::Addr(a) => b.copy_from_slice(a),
            SvcAttr::Fwmark(v) | SvcAttr::Timeout(v) | SvcAttr::Netmask(v) => {
                b.copy_from_slice(&v.to_ne_bytes())
            }
            SvcAttr::SchedName(s) => {
                b[..s.len()].copy_from_slice(s.as_bytes());
                b[s.len()] = 0;
            }
            SvcAttr::Flags { flags, mask } => {
                b[..4].copy_from_slice(&flags.to_ne_bytes());
                b[4..].copy_from_slice(&mask.to_ne_bytes());
            }
            SvcAttr::Other(n) => n.emit_value(b),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for SvcAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() & NLA_TYPE_MASK {
            IPVS_SVC_ATTR_AF => SvcAttr::Af(u16_ne(v)?),
            IPVS_SVC_ATTR_PROTOCOL => SvcAttr::Protocol(u16_ne(v)?),
            IPVS_SVC_ATTR_ADDR => {
                let mut a = [0; 16];
                let n = v.len().min(16);
                a[..n].copy_from_slice(&v[..n]);
                SvcAttr::Addr(a)
            }
            IPVS_SVC_ATTR_PORT => SvcAttr::Port(u16_be(v)?),
            IPVS_SVC_ATTR_FWMARK => SvcAttr::Fwmark(u32_ne(v)?),
            IPVS_SVC_ATTR_SCHED_NAME => {
                let end = v.iter().position(|c| *c == 0).unwrap_or(v.len());
                SvcAttr::SchedName(String::from_utf8_lossy(&v[..end]).into_owned())
            }
            IPVS_SVC_ATTR_FLAGS => SvcAttr::Flags {
                flags: u32_ne(v)?,
                mask: u32_ne(v.get(4..).ok_or("short ip_vs_flags")?)?,
            },
            IPVS_SVC_ATTR_TIMEOUT => SvcAttr::Timeout(u32_ne(v)?),
            IPVS_SVC_ATTR_NETMASK => SvcAttr::Netmask(u32_ne(v)?),
            _ => SvcAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// One `IPVS_DEST_ATTR_*` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestAttr {
    /// `IPVS_DEST_ATTR_ADDR` (16 bytes).
    Addr([u8; 16]),
    /// `IPVS_DEST_ATTR_PORT` (be16).
    Port(u16),
    /// `IPVS_DEST_ATTR_FWD_METHOD` (u32 conn flags, `IP_VS_CONN_F_TUNNEL` = 2).
    FwdMethod(u32),
    /// `IPVS_DEST_ATTR_WEIGHT` (u32).
    Weight(u32),
    /// `IPVS_DEST_ATTR_U_THRESH` (u32).
    UThresh(u32),
    /// `IPVS_DEST_ATTR_L_THRESH` (u32).
    LThresh(u32),
    /// `IPVS_DEST_ATTR_ACTIVE_CONNS` (u32, dumps only).
    ActiveConns(u32),
    /// `IPVS_DEST_ATTR_INACT_CONNS` (u32, dumps only).
    InactConns(u32),
    /// `IPVS_DEST_ATTR_PERSIST_CONNS` (u32, dumps only).
    PersistConns(u32),
    /// `IPVS_DEST_ATTR_ADDR_FAMILY` (u16).
    AddrFamily(u16),
    /// `IPVS_DEST_ATTR_TUN_TYPE` (u8, `IP_VS_CONN_F_TUNNEL_TYPE_*`).
    TunType(u8),
    /// `IPVS_DEST_ATTR_TUN_PORT` (be16).
    TunPort(u16),
    /// `IPVS_DEST_ATTR_TUN_FLAGS` (u16, `IP_VS_TUNNEL_ENCAP_FLAG_*`).
    TunFlags(u16),
    /// Anything else (stats).
    Other(DefaultNla),
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            DestAttr::Addr(_) => 16,
            DestAttr::Port(_)
            | DestAttr::AddrFamily(_)
            | DestAttr::TunPort(_)
            | DestAttr::TunFlags(_) => 2,
            DestAttr::TunType(_) => 1,
            DestAttr::FwdMethod(_)
            | DestAttr::Weight(_)
            | DestAttr::UThresh(_)
            | DestAttr::LThresh(_)
            | DestAttr::ActiveConns(_)
            | DestAttr::InactConns(_)
            | DestAttr::PersistConns(_) => 4,
            DestAttr::Other(n) => n.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DestAttr::Addr(_) => IPVS_DEST_ATTR_ADDR,
            DestAttr::Port(_) => IPVS_DEST_ATTR_PORT,
            DestAttr::FwdMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            DestAttr::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            DestAttr::UThresh(_) => IPVS_DEST_ATTR_U_THRESH,
            DestAttr::LThresh(_) => IPVS_DEST_ATTR_L_THRESH,
            DestAttr::ActiveConns(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            DestAttr::InactConns(_) => IPVS_DEST_ATTR_INACT_CONNS,
            DestAttr::PersistConns(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            DestAttr::AddrFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            DestAttr::TunType(_) => IPVS_DEST_ATTR_TUN_TYPE,
            DestAttr::TunPort(_) => IPVS_DEST_ATTR_TUN_PORT,
            DestAttr::TunFlags(_) => IPVS_DEST_ATTR_TUN_FLAGS,
            DestAttr::Other(n) => n.kind(),
        }
    }

    fn emit_value(&self, b: &mut [u8]) {
        match self {
            DestAttr::Addr(a) => b.copy_from_slice(a),
            DestAttr::Port(v) | DestAttr::TunPort(v) => b.copy_from_slice(&v.to_be_bytes()),
            DestAttr::AddrFamily(v) | DestAttr::TunFlags(v) => b.copy_from_slice(&v.to_ne_bytes()),
            DestAttr::TunType(v) => b[0] = *v,
            DestAttr::FwdMethod(v)
            | DestAttr::Weight(v)
            | DestAttr::UThresh(v)
            | DestAttr::LThresh(v)
            | DestAttr::ActiveConns(v)
            | DestAttr::InactConns(v)
            | DestAttr::PersistConns(v) => b.copy_from_slice(&v.to_ne_bytes()),
            DestAttr::Other(n) => n.emit_value(b),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() & NLA_TYPE_MASK {
            IPVS_DEST_ATTR_ADDR => {
                let mut a = [0; 16];
                let n = v.len().min(16);
                a[..n].copy_from_slice(&v[..n]);
                DestAttr::Addr(a)
            }
            IPVS_DEST_ATTR_PORT => DestAttr::Port(u16_be(v)?),
            IPVS_DEST_ATTR_FWD_METHOD => DestAttr::FwdMethod(u32_ne(v)?),
            IPVS_DEST_ATTR_WEIGHT => DestAttr::Weight(u32_ne(v)?),
            IPVS_DEST_ATTR_U_THRESH => DestAttr::UThresh(u32_ne(v)?),
            IPVS_DEST_ATTR_L_THRESH => DestAttr::LThresh(u32_ne(v)?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => DestAttr::ActiveConns(u32_ne(v)?),
            IPVS_DEST_ATTR_INACT_CONNS => DestAttr::InactConns(u32_ne(v)?),
            IPVS_DEST_ATTR_PERSIST_CONNS => DestAttr::PersistConns(u32_ne(v)?),
            IPVS_DEST_ATTR_ADDR_FAMILY => DestAttr::AddrFamily(u16_ne(v)?),
            IPVS_DEST_ATTR_TUN_TYPE => DestAttr::TunType(*v.first().ok_or("empty tun type")?),
            IPVS_DEST_ATTR_TUN_PORT => DestAttr::TunPort(u16_be(v)?),
            IPVS_DEST_ATTR_TUN_FLAGS => DestAttr::TunFlags(u16_ne(v)?),
            _ => DestAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// One top-level `IPVS_CMD_ATTR_*` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IpvsAttr {
    /// `IPVS_CMD_ATTR_SERVICE` (nested).
    Service(Vec<SvcAttr>),
    /// `IPVS_CMD_ATTR_DEST` (nested).
    Dest(Vec<DestAttr>),
    /// Anything else (daemon, timeouts).
    Other(DefaultNla),
}

impl Nla for IpvsAttr {
    fn value_len(&self) -> usize {
        match self {
            IpvsAttr::Service(v) => v.as_slice().buffer_len(),
            IpvsAttr::Dest(v) => v.as_slice().buffer_len(),
            IpvsAttr::Other(n) => n.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        // NLA_F_NESTED as ipvsadm (libnl's nla_nest_start) sends it.
        match self {
            IpvsAttr::Service(_) => IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED,
            IpvsAttr::Dest(_) => IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
            IpvsAttr::Other(n) => n.kind(),
        }
    }

    fn emit_value(&self, b: &mut [u8]) {
        match self {
            IpvsAttr::Service(v) => v.as_slice().emit(b),
            IpvsAttr::Dest(v) => v.as_slice().emit(b),
            IpvsAttr::Other(n) => n.emit_value(b),
        }
    }
}

fn parse_nested<A>(v: &[u8]) -> Result<Vec<A>, DecodeError>
where
    A: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    NlasIterator::new(v).map(|nla| A::parse(&nla?)).collect()
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for IpvsAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        Ok(match buf.kind() & NLA_TYPE_MASK {
            IPVS_CMD_ATTR_SERVICE => IpvsAttr::Service(parse_nested(buf.value())?),
            IPVS_CMD_ATTR_DEST => IpvsAttr::Dest(parse_nested(buf.value())?),
            _ => IpvsAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// An IPVS generic netlink message: `genlmsghdr` (command, version [`IPVS_GENL_VERSION`],
/// reserved 0) and attributes. `Emitable` gives the payload after `nlmsghdr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    /// `IPVS_CMD_*`.
    pub cmd: u8,
    /// Attributes.
    pub attrs: Vec<IpvsAttr>,
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        GENL_HDRLEN + self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, b: &mut [u8]) {
        b[0] = self.cmd;
        b[1] = IPVS_GENL_VERSION;
        b[2] = 0;
        b[3] = 0;
        self.attrs.as_slice().emit(&mut b[GENL_HDRLEN..]);
    }
}

impl IpvsMessage {
    /// Parses the payload after `nlmsghdr`.
    pub fn parse(payload: &[u8]) -> Result<IpvsMessage, DecodeError> {
        let cmd = *payload.first().ok_or("empty generic netlink message")?;
        let attrs = payload.get(GENL_HDRLEN..).ok_or("short genlmsghdr")?;
        Ok(IpvsMessage {
            cmd,
            attrs: parse_nested(attrs)?,
        })
    }

    /// The payload bytes (what follows `nlmsghdr`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0; self.buffer_len()];
        self.emit(&mut b);
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Builders

/// The identity attributes of a service: AF, PROTOCOL, ADDR, PORT (what every command needs).
pub fn service_id(k: &ServiceKey) -> Vec<SvcAttr> {
    vec![
        SvcAttr::Af(af_of(k.family())),
        SvcAttr::Protocol(k.protocol.number()),
        SvcAttr::Addr(addr16(k.addr)),
        SvcAttr::Port(k.port),
    ]
}

/// The full service entry, in `ipvsadm`'s order. The flags mask is all ones (as `ipvsadm`):
/// every flag is set to exactly `s.flags`.
pub fn service_full(s: &VirtualService) -> Vec<SvcAttr> {
    let mut v = service_id(&s.key);
    // The kernel copies at most IP_VS_SCHEDNAME_MAXLEN - 1 bytes; a longer name cannot exist.
    let mut sched = s.scheduler.clone();
    sched.truncate(IP_VS_SCHEDNAME_MAXLEN - 1);
    v.push(SvcAttr::SchedName(sched));
    v.push(SvcAttr::Flags {
        flags: s.flags,
        mask: u32::MAX,
    });
    v.push(SvcAttr::Timeout(s.timeout));
    v.push(SvcAttr::Netmask(s.netmask));
    v
}

/// The full destination entry, in `ipvsadm`'s order.
pub fn dest_full(d: &RealServer) -> Vec<DestAttr> {
    vec![
        DestAttr::AddrFamily(af_of(Family::of(&d.addr))),
        DestAttr::Addr(addr16(d.addr)),
        DestAttr::Port(d.port),
        DestAttr::FwdMethod(d.forward.value()),
        DestAttr::Weight(d.weight),
        DestAttr::TunType(d.tun_type.value()),
        DestAttr::TunPort(d.tun_port),
        DestAttr::TunFlags(d.tun_flags),
        DestAttr::UThresh(d.upper),
        DestAttr::LThresh(d.lower),
    ]
}

/// `IPVS_CMD_NEW_SERVICE` (`ipvsadm -A`).
pub fn new_service(s: &VirtualService) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_NEW_SERVICE,
        attrs: vec![IpvsAttr::Service(service_full(s))],
    }
}

/// `IPVS_CMD_SET_SERVICE` (`ipvsadm -E`).
pub fn set_service(s: &VirtualService) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_SET_SERVICE,
        attrs: vec![IpvsAttr::Service(service_full(s))],
    }
}

/// `IPVS_CMD_DEL_SERVICE` (`ipvsadm -D`); its real servers go with it.
pub fn del_service(k: &ServiceKey) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_DEL_SERVICE,
        attrs: vec![IpvsAttr::Service(service_id(k))],
    }
}

/// `IPVS_CMD_GET_SERVICE` as a dump (send with `NLM_F_DUMP`): every service.
pub fn dump_services() -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_GET_SERVICE,
        attrs: vec![],
    }
}

/// `IPVS_CMD_GET_DEST` as a dump (send with `NLM_F_DUMP`): the real servers of one service.
pub fn dump_dests(k: &ServiceKey) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_GET_DEST,
        attrs: vec![IpvsAttr::Service(service_id(k))],
    }
}

/// `IPVS_CMD_NEW_DEST` (`ipvsadm -a`).
pub fn new_dest(k: &ServiceKey, d: &RealServer) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_NEW_DEST,
        attrs: vec![
            IpvsAttr::Service(service_id(k)),
            IpvsAttr::Dest(dest_full(d)),
        ],
    }
}

/// `IPVS_CMD_SET_DEST` (`ipvsadm -e`).
pub fn set_dest(k: &ServiceKey, d: &RealServer) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_SET_DEST,
        attrs: vec![
            IpvsAttr::Service(service_id(k)),
            IpvsAttr::Dest(dest_full(d)),
        ],
    }
}

/// `IPVS_CMD_DEL_DEST` (`ipvsadm -d`): identity only (address family, address, port).
pub fn del_dest(k: &ServiceKey, d: &RealServer) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_DEL_DEST,
        attrs: vec![
            IpvsAttr::Service(service_id(k)),
            IpvsAttr::Dest(vec![
                DestAttr::AddrFamily(af_of(Family::of(&d.addr))),
                DestAttr::Addr(addr16(d.addr)),
                DestAttr::Port(d.port),
            ]),
        ],
    }
}

/// The message for one planned op.
pub fn op_msg(op: &IpvsOp) -> IpvsMessage {
    match op {
        IpvsOp::AddService(s) => new_service(s),
        IpvsOp::EditService(s) => set_service(s),
        IpvsOp::DeleteService(k) => del_service(k),
        IpvsOp::AddDest(k, d) => new_dest(k, d),
        IpvsOp::EditDest(k, d) => set_dest(k, d),
        IpvsOp::DeleteDest(k, d) => del_dest(k, d),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsers

/// A service as listed by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedService {
    /// An address-based service (the only kind kr-tunneld creates).
    Addr(VirtualService),
    /// A fwmark service (kube-router's, or anyone's): never ours.
    Fwmark {
        /// Address family.
        family: Family,
        /// The mark.
        mark: u32,
    },
}

/// Parses one `IPVS_CMD_NEW_SERVICE` reply of a service dump. `None` for families other than
/// IPv4/IPv6.
pub fn parse_service(payload: &[u8]) -> Result<Option<ListedService>, DecodeError> {
    let msg = IpvsMessage::parse(payload)?;
    let Some(attrs) = msg.attrs.iter().find_map(|a| match a {
        IpvsAttr::Service(v) => Some(v),
        _ => None,
    }) else {
        return Err("service reply without IPVS_CMD_ATTR_SERVICE".into());
    };
    let (mut af, mut proto, mut addr, mut port, mut mark) = (None, 0, None, 0, None);
    let (mut sched, mut flags, mut timeout, mut netmask) = (String::new(), 0, 0, 0);
    for a in attrs {
        match a {
            SvcAttr::Af(v) => af = Some(*v),
            SvcAttr::Protocol(v) => proto = *v,
            SvcAttr::Addr(v) => addr = Some(*v),
            SvcAttr::Port(v) => port = *v,
            SvcAttr::Fwmark(v) => mark = Some(*v),
            SvcAttr::SchedName(v) => sched = v.clone(),
            SvcAttr::Flags { flags: f, .. } => flags = *f,
            SvcAttr::Timeout(v) => timeout = *v,
            SvcAttr::Netmask(v) => netmask = *v,
            SvcAttr::Other(_) => {}
        }
    }
    let Some(family) = af.and_then(family_of_af) else {
        return Ok(None);
    };
    if let Some(mark) = mark.filter(|m| *m != 0) {
        return Ok(Some(ListedService::Fwmark { family, mark }));
    }
    let addr = ip_of(family, &addr.ok_or("service without address")?)?;
    Ok(Some(ListedService::Addr(VirtualService {
        key: ServiceKey {
            addr,
            protocol: Protocol::from_number(proto),
            port,
        },
        scheduler: sched,
        flags,
        timeout,
        netmask,
    })))
}

/// Parses one `IPVS_CMD_NEW_DEST` reply of a dest dump; `family` is the service's, used when
/// the kernel does not report `IPVS_DEST_ATTR_ADDR_FAMILY` (before 3.18).
pub fn parse_dest(payload: &[u8], family: Family) -> Result<RealServer, DecodeError> {
    let msg = IpvsMessage::parse(payload)?;
    let Some(attrs) = msg.attrs.iter().find_map(|a| match a {
        IpvsAttr::Dest(v) => Some(v),
        _ => None,
    }) else {
        return Err("dest reply without IPVS_CMD_ATTR_DEST".into());
    };
    let mut family = family;
    let mut addr = None;
    let mut d = RealServer {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port: 0,
        forward: Forward::Masq,
        weight: 0,
        upper: 0,
        lower: 0,
        tun_type: TunnelType::Ipip,
        tun_port: 0,
        tun_flags: 0,
    };
    for a in attrs {
        match a {
            DestAttr::Addr(v) => addr = Some(*v),
            DestAttr::Port(v) => d.port = *v,
            DestAttr::FwdMethod(v) => d.forward = Forward::from_value(*v),
            DestAttr::Weight(v) => d.weight = *v,
            DestAttr::UThresh(v) => d.upper = *v,
            DestAttr::LThresh(v) => d.lower = *v,
            DestAttr::AddrFamily(v) => {
                family = family_of_af(*v).ok_or_else(|| format!("dest address family {v}"))?
            }
            DestAttr::TunType(v) => d.tun_type = TunnelType::from_value(*v),
            DestAttr::TunPort(v) => d.tun_port = *v,
            DestAttr::TunFlags(v) => d.tun_flags = *v,
            _ => {}
        }
    }
    d.addr = ip_of(family, &addr.ok_or("dest without address")?)?;
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// Executor (shell)

/// A generic netlink socket talking to the IPVS family: it knows the family ID and adds
/// `nlmsghdr`, sequence numbers and `NLM_F_REQUEST|NLM_F_ACK` / `NLM_F_DUMP`. Implemented by
/// [`IpvsSocket`]; tests use an in-memory one.
pub trait GenlTransport {
    /// Sends one request (payload after `nlmsghdr`) and waits for its ack.
    fn request(&mut self, payload: &[u8]) -> Result<(), NetlinkError>;
    /// Sends a dump request and folds the payload of every reply message (after `nlmsghdr`) into
    /// an accumulator as it arrives. An interrupted dump is repeated from a fresh `start()`.
    fn dump_fold<A>(
        &mut self,
        payload: &[u8],
        start: impl FnMut() -> A,
        each: impl FnMut(&mut A, &[u8]),
    ) -> Result<A, NetlinkError>;
}

/// [`GenlTransport`] over [`Genl`], which resolves the "IPVS" family through nlctrl, caches the
/// ID and resolves it again after ENOENT (module reloaded). Open it on the thread and in the
/// namespace whose IPVS table is meant (the daemon: the main thread, host namespace).
#[derive(Debug)]
pub struct IpvsSocket(pub Genl);

impl IpvsSocket {
    /// Opens a generic netlink socket for IPVS.
    pub fn open() -> Result<IpvsSocket, KernelError> {
        Genl::open()
            .map(IpvsSocket)
            .map_err(|e| kerr("open generic netlink socket".into(), e))
    }
}

fn req(id: u16, payload: &[u8]) -> Request {
    Request {
        msg_type: id,
        flags: 0,
        payload: payload.to_vec(),
    }
}

impl GenlTransport for IpvsSocket {
    fn request(&mut self, payload: &[u8]) -> Result<(), NetlinkError> {
        self.0
            .request(IPVS_GENL_NAME, |id| req(id, payload))
            .map(|_| ())
    }

    fn dump_fold<A>(
        &mut self,
        payload: &[u8],
        start: impl FnMut() -> A,
        mut each: impl FnMut(&mut A, &[u8]),
    ) -> Result<A, NetlinkError> {
        self.0.dump_fold(
            IPVS_GENL_NAME,
            |id| req(id, payload),
            start,
            |acc, m| each(acc, m.payload),
        )
    }
}

fn kerr(op: String, e: NetlinkError) -> KernelError {
    KernelError {
        op,
        errno: e.errno(),
        msg: e.message(),
    }
}

/// Reads the IPVS state the planner needs: every address-based service (one dump), and the
/// real servers of the services in `owned` (one dump each). Foreign services' real servers are
/// never read.
pub fn read_state(
    t: &mut impl GenlTransport,
    owned: &BTreeSet<ServiceKey>,
) -> Result<IpvsState, KernelError> {
    let mut st = IpvsState::default();
    // Replies are decoded as they arrive; the first undecodable one fails the read (the dump is
    // still read to its end).
    let malformed = |op: &str, e: DecodeError| KernelError {
        op: op.into(),
        errno: 0,
        msg: format!("malformed reply: {e}"),
    };
    st.services = t
        .dump_fold(
            &dump_services().to_bytes(),
            || Ok(Vec::new()),
            |acc: &mut Result<Vec<VirtualService>, DecodeError>, p| {
                if let Ok(services) = acc {
                    match parse_service(p) {
                        Ok(Some(ListedService::Addr(s))) => services.push(s),
                        Ok(_) => {}
                        Err(e) => *acc = Err(e),
                    }
                }
            },
        )
        .map_err(|e| kerr("dump ipvs services".into(), e))?
        .map_err(|e| malformed("dump ipvs services", e))?;
    let keys: Vec<ServiceKey> = st
        .services
        .iter()
        .map(|s| s.key)
        .filter(|k| owned.contains(k))
        .collect();
    for k in keys {
        let op = format!("dump ipvs real servers of {k}");
        let dests = t
            .dump_fold(
                &dump_dests(&k).to_bytes(),
                || Ok(Vec::new()),
                |acc: &mut Result<Vec<RealServer>, DecodeError>, p| {
                    if let Ok(dests) = acc {
                        match parse_dest(p, k.family()) {
                            Ok(d) => dests.push(d),
                            Err(e) => *acc = Err(e),
                        }
                    }
                },
            )
            .map_err(|e| kerr(op.clone(), e))?
            .map_err(|e| malformed(&op, e))?;
        st.dests.insert(k, dests);
    }
    Ok(st)
}

/// Applies `ops` in order, one request each; a failure does not stop the others (SPEC R-2).
/// Idempotent like the other verbs (T-10): EEXIST on a real server add and ENOENT/ESRCH on a
/// delete count as done. EEXIST on a service add is a failure: someone else created that key
/// since the dump, and [`crate::dsr::IpvsPlan::record_after`] then drops it from the record.
/// Returns the index and error of each failed op.
pub fn apply(t: &mut impl GenlTransport, ops: &[IpvsOp]) -> Vec<(usize, KernelError)> {
    let mut failed = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match t.request(&op_msg(op).to_bytes()) {
            Ok(()) => log::info!("{op}"),
            Err(e) if tolerated(op, e.errno()) => log::debug!("{op}: {e} (already so)"),
            Err(e) => failed.push((i, kerr(op.to_string(), e))),
        }
    }
    failed
}

/// Errors that mean the op's effect is already in place.
fn tolerated(op: &IpvsOp, errno: i32) -> bool {
    match op {
        IpvsOp::AddDest(..) => errno == libc::EEXIST,
        IpvsOp::DeleteService(_) | IpvsOp::DeleteDest(..) => {
            errno == libc::ENOENT || errno == libc::ESRCH
        }
        IpvsOp::AddService(_) | IpvsOp::EditService(_) | IpvsOp::EditDest(..) => false,
    }
}

/// What the daemon needs from IPVS, like [`crate::apply::Kernel`] for links and routes:
/// implemented over netlink by [`IpvsSocket`] and in memory by [`FakeIpvs`].
pub trait IpvsKernel {
    /// Every address-based service, and the real servers of the `owned` ones.
    fn read(&mut self, owned: &BTreeSet<ServiceKey>) -> Result<IpvsState, KernelError>;
    /// Applies `ops` in order; returns the index and error of each failed op.
    fn apply(&mut self, ops: &[IpvsOp]) -> Vec<(usize, KernelError)>;
}

impl IpvsKernel for IpvsSocket {
    fn read(&mut self, owned: &BTreeSet<ServiceKey>) -> Result<IpvsState, KernelError> {
        read_state(self, owned)
    }

    fn apply(&mut self, ops: &[IpvsOp]) -> Vec<(usize, KernelError)> {
        apply(self, ops)
    }
}

/// An in-memory IPVS table ([`crate::dsr::apply_ipvs`]) that records the ops applied.
#[derive(Debug, Default)]
pub struct FakeIpvs {
    /// The table.
    pub state: IpvsState,
    /// Every op applied, in order.
    pub log: Vec<IpvsOp>,
}

impl IpvsKernel for FakeIpvs {
    fn read(&mut self, owned: &BTreeSet<ServiceKey>) -> Result<IpvsState, KernelError> {
        let mut s = self.state.clone();
        s.dests.retain(|k, _| owned.contains(k));
        Ok(s)
    }

    fn apply(&mut self, ops: &[IpvsOp]) -> Vec<(usize, KernelError)> {
        let mut failed = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            self.log.push(op.clone());
            if let Err(errno) = crate::dsr::apply_ipvs(&mut self.state, op) {
                if !tolerated(op, errno) {
                    failed.push((
                        i,
                        KernelError {
                            op: op.to_string(),
                            errno,
                            msg: String::new(),
                        },
                    ));
                }
            }
        }
        failed
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn short_and_odd_input_never_panics() {
        for len in 0..40 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            let _ = parse_service(&junk);
            let _ = parse_dest(&junk, Family::V4);
        }
        // A nested attribute whose length runs past the end.
        let bad = [1, 1, 0, 0, 0x20, 0, 1, 0, 6, 0, 1, 0];
        assert!(parse_service(&bad).is_err());
    }

    /// A transport that answers each request with a scripted errno and each dump with the
    /// given payloads, recording the commands it saw.
    struct Scripted {
        errnos: Vec<i32>,
        dumps: Vec<Vec<Vec<u8>>>,
        seen: Vec<u8>,
    }

    impl GenlTransport for Scripted {
        fn request(&mut self, payload: &[u8]) -> Result<(), NetlinkError> {
            self.seen.push(payload[0]);
            match self.errnos.remove(0) {
                0 => Ok(()),
                errno => Err(NetlinkError::Kernel {
                    errno,
                    extack: String::new(),
                }),
            }
        }
        fn dump_fold<A>(
            &mut self,
            payload: &[u8],
            mut start: impl FnMut() -> A,
            mut each: impl FnMut(&mut A, &[u8]),
        ) -> Result<A, NetlinkError> {
            self.seen.push(payload[0]);
            let mut acc = start();
            for p in self.dumps.remove(0) {
                each(&mut acc, &p);
            }
            Ok(acc)
        }
    }

    fn key() -> ServiceKey {
        ServiceKey {
            addr: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn svc() -> VirtualService {
        VirtualService {
            key: key(),
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            netmask: u32::MAX,
        }
    }

    fn dest() -> RealServer {
        crate::dsr::real_server(
            "10.244.1.5".parse().unwrap(),
            80,
            crate::dsr::DestTunnel::Ipip,
        )
    }

    #[test]
    fn apply_semantics() {
        let ops = vec![
            IpvsOp::AddService(svc()),
            IpvsOp::AddDest(key(), dest()),
            IpvsOp::DeleteDest(key(), dest()),
            IpvsOp::DeleteService(key()),
            IpvsOp::EditService(svc()),
        ];
        // EEXIST on a dest add and ENOENT/ESRCH on deletes are "already so"; EEXIST on a service
        // add (someone else's) and any error on an edit are failures.
        let mut t = Scripted {
            errnos: vec![
                libc::EEXIST,
                libc::EEXIST,
                libc::ENOENT,
                libc::ESRCH,
                libc::ESRCH,
            ],
            dumps: vec![],
            seen: vec![],
        };
        let failed: Vec<usize> = apply(&mut t, &ops).into_iter().map(|(i, _)| i).collect();
        assert_eq!(failed, vec![0, 4]);
        assert_eq!(t.seen, vec![1, 5, 7, 3, 2]);
        let e = &apply(
            &mut Scripted {
                errnos: vec![libc::EPERM],
                dumps: vec![],
                seen: vec![],
            },
            &ops[..1],
        )[0]
        .1;
        assert_eq!(e.op, "add ipvs service tcp 10.0.0.1:80 scheduler rr");
        assert_eq!(e.errno, libc::EPERM);
    }

    #[test]
    fn read_state_lists_all_services_and_dests_of_owned_ones() {
        let listed = |s: &VirtualService| new_service(s).to_bytes();
        let other = VirtualService {
            key: ServiceKey { port: 443, ..key() },
            ..svc()
        };
        let mut t = Scripted {
            errnos: vec![],
            dumps: vec![
                vec![listed(&svc()), listed(&other)],
                vec![new_dest(&key(), &dest()).to_bytes()],
            ],
            seen: vec![],
        };
        let owned: BTreeSet<ServiceKey> = [key()].into_iter().collect();
        let st = read_state(&mut t, &owned).unwrap();
        assert_eq!(st.services, vec![svc(), other]);
        assert_eq!(st.dests.len(), 1);
        assert_eq!(st.dests[&key()], vec![dest()]);
        // One service dump, one dest dump (of the owned service only).
        assert_eq!(t.seen, vec![4, 8]);
        // A garbled reply is an error naming the dump, not a panic.
        let mut bad = Scripted {
            errnos: vec![],
            dumps: vec![vec![vec![1, 1]]],
            seen: vec![],
        };
        let e = read_state(&mut bad, &owned).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("dump ipvs services: malformed reply"),
            "{e}"
        );
    }

    #[test]
    fn fake_ipvs_converges_with_the_planner() {
        let mut k = FakeIpvs::default();
        let mut d = crate::dsr::Desired::default();
        d.services.insert(
            key(),
            crate::dsr::WantedService {
                service: svc(),
                dests: vec![dest()],
                origin: "default/web".into(),
                locals: Vec::new(),
            },
        );
        let mut owned = BTreeSet::new();
        let p = crate::dsr::plan_ipvs(&d, &k.read(&owned).unwrap(), &owned);
        assert!(k.apply(&p.ops).is_empty());
        owned = p.record_after(&[]);
        assert_eq!(
            crate::dsr::plan_ipvs(&d, &k.read(&owned).unwrap(), &owned).ops,
            vec![]
        );
        assert_eq!(k.log.len(), 2);
    }
}
