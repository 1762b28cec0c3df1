//! The generic netlink family "fou" (Foo-over-UDP / GUE receive ports), assembled by hand: typed
//! attributes, the message type, builders for add, delete and dump, and the dump parser.
//!
//! Core module: pure builders and parsers. The family ID is resolved by [`super::genl::Genl`].
//!
//! GUE ports are added with port, type and family only. `FOU_ATTR_IPPROTO` is **never** sent with
//! GUE: the protocol comes from the GUE header, and kernels from 6.19 reject the attribute for GUE
//! (SPEC T-7). iproute2 6.1's `ip fou add port 5555 gue` sends the same three attributes.

use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{DecodeError, Emitable, Nla, ParseableParametrized};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use super::genl::{genl_request, parse_attrs, parse_genl, GenlAttr};
use super::socket::Request;
use crate::model::{Family, FouPort};

// uapi <linux/fou.h>.
/// `FOU_GENL_NAME`.
pub const FOU_GENL_NAME: &str = "fou";
const FOU_GENL_VERSION: u8 = 1;
const FOU_CMD_ADD: u8 = 1;
const FOU_CMD_DEL: u8 = 2;
const FOU_CMD_GET: u8 = 3;
const FOU_ATTR_PORT: u16 = 1;
const FOU_ATTR_AF: u16 = 2;
const FOU_ATTR_IPPROTO: u16 = 3;
const FOU_ATTR_TYPE: u16 = 4;
const FOU_ATTR_REMCSUM_NOPARTIAL: u16 = 5;
const FOU_ATTR_LOCAL_V4: u16 = 6;
const FOU_ATTR_LOCAL_V6: u16 = 7;
const FOU_ATTR_PEER_V4: u16 = 8;
const FOU_ATTR_PEER_V6: u16 = 9;
const FOU_ATTR_PEER_PORT: u16 = 10;
const FOU_ATTR_IFINDEX: u16 = 11;
const FOU_ENCAP_DIRECT: u8 = 1;
const FOU_ENCAP_GUE: u8 = 2;

/// One attribute of the "fou" family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FouAttr {
    /// `FOU_ATTR_PORT`: local UDP port (big-endian on the wire).
    Port(u16),
    /// `FOU_ATTR_AF`: `AF_INET` or `AF_INET6`.
    Af(u8),
    /// `FOU_ATTR_IPPROTO`: inner protocol, direct FOU only.
    IpProto(u8),
    /// `FOU_ATTR_TYPE`: `FOU_ENCAP_DIRECT` or `FOU_ENCAP_GUE`.
    Type(u8),
    /// `FOU_ATTR_REMCSUM_NOPARTIAL`.
    RemcsumNoPartial,
    /// `FOU_ATTR_LOCAL_V4`.
    LocalV4(Ipv4Addr),
    /// `FOU_ATTR_LOCAL_V6`.
    LocalV6(Ipv6Addr),
    /// `FOU_ATTR_PEER_V4`.
    PeerV4(Ipv4Addr),
    /// `FOU_ATTR_PEER_V6`.
    PeerV6(Ipv6Addr),
    /// `FOU_ATTR_PEER_PORT` (big-endian on the wire).
    PeerPort(u16),
    /// `FOU_ATTR_IFINDEX`.
    Ifindex(i32),
    /// Anything else.
    Other(GenlAttr),
}

impl FouAttr {
    fn to_genl(&self) -> GenlAttr {
        match self {
            FouAttr::Port(p) => GenlAttr::be16(FOU_ATTR_PORT, *p),
            FouAttr::Af(v) => GenlAttr::u8(FOU_ATTR_AF, *v),
            FouAttr::IpProto(v) => GenlAttr::u8(FOU_ATTR_IPPROTO, *v),
            FouAttr::Type(v) => GenlAttr::u8(FOU_ATTR_TYPE, *v),
            FouAttr::RemcsumNoPartial => GenlAttr::flag(FOU_ATTR_REMCSUM_NOPARTIAL),
            FouAttr::LocalV4(a) => GenlAttr::bytes(FOU_ATTR_LOCAL_V4, &a.octets()),
            FouAttr::LocalV6(a) => GenlAttr::bytes(FOU_ATTR_LOCAL_V6, &a.octets()),
            FouAttr::PeerV4(a) => GenlAttr::bytes(FOU_ATTR_PEER_V4, &a.octets()),
            FouAttr::PeerV6(a) => GenlAttr::bytes(FOU_ATTR_PEER_V6, &a.octets()),
            FouAttr::PeerPort(p) => GenlAttr::be16(FOU_ATTR_PEER_PORT, *p),
            FouAttr::Ifindex(i) => GenlAttr::bytes(FOU_ATTR_IFINDEX, &i.to_ne_bytes()),
            FouAttr::Other(a) => a.clone(),
        }
    }

    fn from_genl(a: GenlAttr) -> FouAttr {
        let v = &a.value;
        let parsed = match a.id() {
            FOU_ATTR_PORT => a.as_be16().map(FouAttr::Port),
            FOU_ATTR_AF => a.as_u8().map(FouAttr::Af),
            FOU_ATTR_IPPROTO => a.as_u8().map(FouAttr::IpProto),
            FOU_ATTR_TYPE => a.as_u8().map(FouAttr::Type),
            FOU_ATTR_REMCSUM_NOPARTIAL => Some(FouAttr::RemcsumNoPartial),
            FOU_ATTR_LOCAL_V4 => <[u8; 4]>::try_from(v.as_slice())
                .ok()
                .map(|o| FouAttr::LocalV4(o.into())),
            FOU_ATTR_LOCAL_V6 => <[u8; 16]>::try_from(v.as_slice())
                .ok()
                .map(|o| FouAttr::LocalV6(o.into())),
            FOU_ATTR_PEER_V4 => <[u8; 4]>::try_from(v.as_slice())
                .ok()
                .map(|o| FouAttr::PeerV4(o.into())),
            FOU_ATTR_PEER_V6 => <[u8; 16]>::try_from(v.as_slice())
                .ok()
                .map(|o| FouAttr::PeerV6(o.into())),
            FOU_ATTR_PEER_PORT => a.as_be16().map(FouAttr::PeerPort),
            FOU_ATTR_IFINDEX => <[u8; 4]>::try_from(v.as_slice())
                .ok()
                .map(|o| FouAttr::Ifindex(i32::from_ne_bytes(o))),
            _ => None,
        };
        parsed.unwrap_or(FouAttr::Other(a))
    }
}

impl Nla for FouAttr {
    fn value_len(&self) -> usize {
        self.to_genl().value.len()
    }
    fn kind(&self) -> u16 {
        self.to_genl().kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.to_genl().value);
    }
}

/// A "fou" message: command and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FouMessage {
    /// `FOU_CMD_*`.
    pub cmd: u8,
    /// Attributes.
    pub attrs: Vec<FouAttr>,
}

impl GenlFamily for FouMessage {
    fn family_name() -> &'static str {
        FOU_GENL_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        FOU_GENL_VERSION
    }
}

impl Emitable for FouMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for FouMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(FouMessage {
            cmd: header.cmd,
            attrs: parse_attrs(buf)?
                .into_iter()
                .map(FouAttr::from_genl)
                .collect(),
        })
    }
}

fn encap_type(p: &FouPort) -> u8 {
    if p.gue {
        FOU_ENCAP_GUE
    } else {
        FOU_ENCAP_DIRECT
    }
}

/// The `FOU_CMD_ADD` message for `p`: port, type, family, in iproute2's order. A direct
/// (non-GUE) port would need `FOU_ATTR_IPPROTO`, which the model does not carry: kr-tunneld only
/// opens GUE ports, so none is sent.
pub fn add_msg(p: &FouPort) -> FouMessage {
    FouMessage {
        cmd: FOU_CMD_ADD,
        attrs: vec![
            FouAttr::Port(p.port),
            FouAttr::Type(encap_type(p)),
            FouAttr::Af(p.family.af()),
        ],
    }
}

/// The `FOU_CMD_DEL` message for `p`. The kernel matches family and port (plus addresses and
/// device, which we never set); the type is sent for symmetry with add and ignored.
pub fn del_msg(p: &FouPort) -> FouMessage {
    FouMessage {
        cmd: FOU_CMD_DEL,
        ..add_msg(p)
    }
}

/// Opens FOU port `p` (family ID `id` from [`super::genl::Genl::family_id`]).
pub fn fou_add(id: u16, p: &FouPort) -> Request {
    genl_request(id, 0, add_msg(p))
}

/// Closes FOU port `p`.
pub fn fou_del(id: u16, p: &FouPort) -> Request {
    genl_request(id, 0, del_msg(p))
}

/// Dumps the ports of both families (the kernel's dump ignores attributes).
pub fn fou_dump(id: u16) -> Request {
    genl_request(
        id,
        0,
        FouMessage {
            cmd: FOU_CMD_GET,
            attrs: Vec::new(),
        },
    )
}

/// Parses one port of a `FOU_CMD_GET` dump (or one of our add/del requests). `None` for ports
/// of an unknown family.
pub fn parse_fou_port(payload: &[u8]) -> Result<Option<FouPort>, DecodeError> {
    let m: FouMessage = parse_genl(payload)?;
    let mut port = None;
    let mut af = None;
    let mut kind = None;
    for a in m.attrs {
        match a {
            FouAttr::Port(p) => port = Some(p),
            FouAttr::Af(f) => af = Some(f),
            FouAttr::Type(t) => kind = Some(t),
            _ => {}
        }
    }
    let port = port.ok_or_else(|| DecodeError::from("fou port without FOU_ATTR_PORT"))?;
    let family = match af.map(i32::from) {
        Some(libc::AF_INET) => Family::V4,
        Some(libc::AF_INET6) => Family::V6,
        _ => return Ok(None),
    };
    Ok(Some(FouPort {
        family,
        port,
        gue: kind == Some(FOU_ENCAP_GUE),
    }))
}
