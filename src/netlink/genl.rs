//! Generic netlink: a small payload type for hand-assembled families ("fou" now, "IPVS" later),
//! the nlctrl family-ID lookup, and [`Genl`], a socket that caches family IDs.
//!
//! Core parts ([`GenlAttr`], [`GenlPayload`], [`genl_request`], [`getfamily`],
//! [`parse_family_id`]) are pure builders and parsers. [`Genl`] is shell: it owns a
//! `NETLINK_GENERIC` socket and performs the lookups; it never decides what to send.
//!
//! Family IDs are assigned by the kernel when a module registers its family, so they are looked
//! up by name through nlctrl (`CTRL_CMD_GETFAMILY`) once per socket and cached. After a request
//! fails with ENOENT the family is looked up again: if the module was reloaded meanwhile, its ID
//! changed and the request is repeated once with the new ID; if not, the ENOENT was the answer.

use std::collections::HashMap;
use std::fmt::Debug;

use netlink_packet_core::{
    DecodeError, Emitable, Nla, NlaBuffer, ParseableParametrized, NLA_F_NESTED,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use super::socket::{Message, NetlinkError, NlSocket, Reply, Request, NETLINK_GENERIC};

// uapi <linux/genetlink.h>.
/// `GENL_ID_CTRL`: the fixed ID of the nlctrl family.
pub const GENL_ID_CTRL: u16 = 0x10;
const GENL_HDRLEN: usize = 4;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// nlctrl version sent, as libnl does (the kernel does not check it).
const CTRL_VERSION: u8 = 1;
// uapi <linux/netlink.h>: NLA_F_NESTED | NLA_F_NET_BYTEORDER are not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One generic netlink attribute: type (flag bits included) and raw value. Values are in host
/// byte order unless the family says otherwise (ports are big-endian: use
/// [`GenlAttr::be16`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlAttr {
    /// Attribute type, with `NLA_F_NESTED` for nested attributes.
    pub kind: u16,
    /// Value bytes, without padding.
    pub value: Vec<u8>,
}

impl GenlAttr {
    /// A `u8` attribute.
    pub fn u8(kind: u16, v: u8) -> GenlAttr {
        GenlAttr {
            kind,
            value: vec![v],
        }
    }
    /// A `u16` attribute in host byte order.
    pub fn u16(kind: u16, v: u16) -> GenlAttr {
        GenlAttr {
            kind,
            value: v.to_ne_bytes().to_vec(),
        }
    }
    /// A `__be16` attribute (ports).
    pub fn be16(kind: u16, v: u16) -> GenlAttr {
        GenlAttr {
            kind,
            value: v.to_be_bytes().to_vec(),
        }
    }
    /// A `u32` attribute in host byte order.
    pub fn u32(kind: u16, v: u32) -> GenlAttr {
        GenlAttr {
            kind,
            value: v.to_ne_bytes().to_vec(),
        }
    }
    /// A raw attribute (addresses, structs).
    pub fn bytes(kind: u16, v: &[u8]) -> GenlAttr {
        GenlAttr {
            kind,
            value: v.to_vec(),
        }
    }
    /// A NUL-terminated string attribute.
    pub fn string(kind: u16, s: &str) -> GenlAttr {
        let mut value = s.as_bytes().to_vec();
        value.push(0);
        GenlAttr { kind, value }
    }
    /// A flag attribute (no value).
    pub fn flag(kind: u16) -> GenlAttr {
        GenlAttr {
            kind,
            value: Vec::new(),
        }
    }
    /// A nested attribute holding `inner` (`NLA_F_NESTED` set, as newer kernels expect).
    pub fn nested(kind: u16, inner: &[GenlAttr]) -> GenlAttr {
        let mut value = vec![0; inner.buffer_len()];
        inner.emit(&mut value);
        GenlAttr {
            kind: kind | NLA_F_NESTED,
            value,
        }
    }

    /// The type without flag bits.
    pub fn id(&self) -> u16 {
        self.kind & NLA_TYPE_MASK
    }
    /// The value as `u8`.
    pub fn as_u8(&self) -> Option<u8> {
        self.value
            .first()
            .copied()
            .filter(|_| self.value.len() == 1)
    }
    /// The value as host-order `u16`.
    pub fn as_u16(&self) -> Option<u16> {
        Some(u16::from_ne_bytes(self.value.as_slice().try_into().ok()?))
    }
    /// The value as big-endian `u16`.
    pub fn as_be16(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.value.as_slice().try_into().ok()?))
    }
    /// The value as host-order `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.value.as_slice().try_into().ok()?))
    }
    /// The attributes nested in this one.
    pub fn as_nested(&self) -> Result<Vec<GenlAttr>, DecodeError> {
        parse_attrs(&self.value)
    }
}

impl Nla for GenlAttr {
    fn value_len(&self) -> usize {
        self.value.len()
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.value);
    }
}

/// Parses a sequence of attributes (flag bits are kept in [`GenlAttr::kind`]).
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<GenlAttr>, DecodeError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let nla = NlaBuffer::new_checked(buf)?;
        let len = usize::from(nla.length());
        let mut kind = nla.kind();
        if nla.nested_flag() {
            kind |= NLA_F_NESTED;
        }
        out.push(GenlAttr {
            kind,
            value: nla.value().to_vec(),
        });
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(out)
}

/// A generic netlink message body of a family whose ID is resolved at run time: command,
/// version and attributes. Used for nlctrl here and meant for "IPVS".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlPayload {
    /// `genlmsghdr.cmd`.
    pub cmd: u8,
    /// `genlmsghdr.version`.
    pub version: u8,
    /// Top-level attributes.
    pub attrs: Vec<GenlAttr>,
}

impl GenlPayload {
    /// The first top-level attribute of type `id`.
    pub fn attr(&self, id: u16) -> Option<&GenlAttr> {
        self.attrs.iter().find(|a| a.id() == id)
    }
}

impl GenlFamily for GenlPayload {
    fn family_name() -> &'static str {
        // Not one family: the ID is always passed explicitly (see `genl_request`).
        ""
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        self.version
    }
}

impl Emitable for GenlPayload {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for GenlPayload {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(GenlPayload {
            cmd: header.cmd,
            version: header.version,
            attrs: parse_attrs(buf)?,
        })
    }
}

/// A request to family `family_id` carrying `payload` (its `genlmsghdr` included).
pub fn genl_request<F>(family_id: u16, flags: u16, payload: F) -> Request
where
    F: GenlFamily + Emitable + Debug,
{
    let msg = GenlMessage::new(
        GenlHeader {
            cmd: payload.command(),
            version: payload.version(),
        },
        payload,
        family_id,
    );
    Request::new(family_id, flags, &msg)
}

/// Parses a generic netlink message body (after `nlmsghdr`) of any family.
pub fn parse_genl<F>(payload: &[u8]) -> Result<F, DecodeError>
where
    F: ParseableParametrized<[u8], GenlHeader>,
{
    let header = GenlHeader::parse(payload)?;
    F::parse_with_param(&payload[GENL_HDRLEN.min(payload.len())..], header)
}

/// nlctrl `CTRL_CMD_GETFAMILY` for `name`.
pub fn getfamily(name: &str) -> Request {
    genl_request(
        GENL_ID_CTRL,
        0,
        GenlPayload {
            cmd: CTRL_CMD_GETFAMILY,
            version: CTRL_VERSION,
            attrs: vec![GenlAttr::string(CTRL_ATTR_FAMILY_NAME, name)],
        },
    )
}

/// The family ID in an nlctrl `CTRL_CMD_NEWFAMILY` answer.
pub fn parse_family_id(payload: &[u8]) -> Result<u16, DecodeError> {
    let p: GenlPayload = parse_genl(payload)?;
    p.attr(CTRL_ATTR_FAMILY_ID)
        .and_then(GenlAttr::as_u16)
        .ok_or_else(|| DecodeError::from("nlctrl answer without CTRL_ATTR_FAMILY_ID"))
}

/// A `NETLINK_GENERIC` socket with a per-socket cache of family IDs.
#[derive(Debug)]
pub struct Genl {
    sock: NlSocket,
    families: HashMap<String, u16>,
}

impl Genl {
    /// Opens a generic netlink socket.
    pub fn open() -> Result<Genl, NetlinkError> {
        Ok(Genl {
            sock: NlSocket::open(NETLINK_GENERIC)?,
            families: HashMap::new(),
        })
    }

    /// The ID of family `name`, from the cache or nlctrl. ENOENT means the family is not
    /// registered (its module is not loaded).
    pub fn family_id(&mut self, name: &str) -> Result<u16, NetlinkError> {
        if let Some(id) = self.families.get(name) {
            return Ok(*id);
        }
        let replies = self.sock.request(&getfamily(name)).map_err(|e| match e {
            NetlinkError::Kernel { errno, extack } if errno == libc::ENOENT => {
                let extack = if extack.is_empty() {
                    missing_module(name)
                } else {
                    extack
                };
                NetlinkError::Kernel { errno, extack }
            }
            e => e,
        })?;
        let id = replies
            .iter()
            .find(|r| r.msg_type == GENL_ID_CTRL)
            .ok_or_else(|| NetlinkError::Malformed("no nlctrl answer".into()))
            .and_then(|r| {
                parse_family_id(&r.payload).map_err(|e| NetlinkError::Malformed(e.to_string()))
            })?;
        self.families.insert(name.to_string(), id);
        Ok(id)
    }

    /// Runs `op` with the ID of `family`; after ENOENT, looks the family up again and repeats
    /// `op` once if the ID changed (module reloaded).
    fn with_family<T>(
        &mut self,
        family: &str,
        mut op: impl FnMut(&mut NlSocket, u16) -> Result<T, NetlinkError>,
    ) -> Result<T, NetlinkError> {
        let id = self.family_id(family)?;
        match op(&mut self.sock, id) {
            Err(e) if e.errno() == libc::ENOENT => {
                self.families.remove(family);
                match self.family_id(family) {
                    Ok(new) if new != id => {
                        log::debug!("genl: family {family} moved from id {id} to {new}");
                        op(&mut self.sock, new)
                    }
                    _ => Err(e),
                }
            }
            r => r,
        }
    }

    /// Sends the request `build(family_id)` with an ack and returns the messages before the ack.
    pub fn request(
        &mut self,
        family: &str,
        build: impl Fn(u16) -> Request,
    ) -> Result<Vec<Reply>, NetlinkError> {
        self.with_family(family, |sock, id| sock.request(&build(id)))
    }

    /// Dumps `build(family_id)` and returns an owned copy of every message.
    pub fn dump(
        &mut self,
        family: &str,
        build: impl Fn(u16) -> Request,
    ) -> Result<Vec<Reply>, NetlinkError> {
        self.with_family(family, |sock, id| sock.dump(&build(id)))
    }

    /// Dumps `build(family_id)`, folding the messages into an accumulator as they arrive (see
    /// [`NlSocket::dump_fold`]; a repeat after the family moved starts from `start()` again).
    pub fn dump_fold<A>(
        &mut self,
        family: &str,
        build: impl Fn(u16) -> Request,
        mut start: impl FnMut() -> A,
        mut each: impl FnMut(&mut A, Message<'_>),
    ) -> Result<A, NetlinkError> {
        self.with_family(family, |sock, id| {
            sock.dump_fold(&build(id), &mut start, &mut each)
        })
    }
}

/// What to do when a generic netlink family is missing: its module is not loaded. `fou` has no
/// module alias for its family on 6.1 and IPVS is loaded on demand only by ipvsadm, and the unit
/// may not load modules (ProtectKernelModules=yes).
fn missing_module(family: &str) -> String {
    let module = if family == "IPVS" { "ip_vs" } else { family };
    format!(
        "generic netlink family {family} not found: the kernel module {module} is not loaded; \
         run `modprobe {module}` (the package lists it in \
         /usr/lib/modules-load.d/kr-tunneld.conf, loaded at boot and on installation)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_accessors() {
        assert_eq!(GenlAttr::u8(1, 7).as_u8(), Some(7));
        assert_eq!(GenlAttr::u16(1, 0x1234).as_u16(), Some(0x1234));
        assert_eq!(GenlAttr::be16(1, 5555).value, vec![0x15, 0xb3]);
        assert_eq!(GenlAttr::be16(1, 5555).as_be16(), Some(5555));
        assert_eq!(GenlAttr::u32(1, 9).as_u32(), Some(9));
        assert_eq!(GenlAttr::u32(1, 9).as_u16(), None);
        assert_eq!(GenlAttr::string(2, "fou").value, b"fou\0");
    }

    #[test]
    fn nested_round_trip() {
        let inner = vec![
            GenlAttr::u16(1, 2),
            GenlAttr::be16(4, 80),
            GenlAttr::flag(9),
        ];
        let outer = GenlAttr::nested(3, &inner);
        assert_eq!(outer.id(), 3);
        assert_eq!(outer.kind, 3 | NLA_F_NESTED);
        assert_eq!(outer.as_nested().unwrap(), inner);
        let p = GenlPayload {
            cmd: 5,
            version: 1,
            attrs: vec![outer.clone(), GenlAttr::u8(2, 1)],
        };
        let req = genl_request(0x20, 0, p.clone());
        assert_eq!(req.msg_type, 0x20);
        assert_eq!(&req.payload[..4], &[5, 1, 0, 0]);
        assert_eq!(parse_genl::<GenlPayload>(&req.payload).unwrap(), p);
    }

    /// nlctrl lookup as iproute2 6.1 sends it for `ip fou add port 5555 gue` (strace -xx of fd 4
    /// in the Debian 6.1.0-56 VM), except the version byte: iproute2 sends 0, we send 1 as libnl
    /// does (nlctrl ignores it).
    #[rustfmt::skip]
    #[test]
    fn getfamily_golden() {
        let raw = [
            0x03, 0x01, 0x00, 0x00,                         // CTRL_CMD_GETFAMILY, version 1
            0x08, 0x00, 0x02, 0x00, 0x66, 0x6f, 0x75, 0x00, // CTRL_ATTR_FAMILY_NAME "fou"
        ];
        let req = getfamily("fou");
        assert_eq!((req.msg_type, req.flags), (GENL_ID_CTRL, 0));
        assert_eq!(req.payload, raw);
    }

    /// The kernel's whole answer to that lookup (6.1.0-56, strace -e read=4): the family ID is
    /// 0x20 on that boot.
    #[rustfmt::skip]
    #[test]
    fn family_id_from_answer() {
        let raw = [
            0x01, 0x02, 0x00, 0x00,                         // CTRL_CMD_NEWFAMILY, version 2
            0x08, 0x00, 0x02, 0x00, 0x66, 0x6f, 0x75, 0x00, // CTRL_ATTR_FAMILY_NAME "fou"
            0x06, 0x00, 0x01, 0x00, 0x20, 0x00, 0x00, 0x00, // CTRL_ATTR_FAMILY_ID 0x20
            0x08, 0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, // CTRL_ATTR_VERSION 1
            0x08, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, // CTRL_ATTR_HDRSIZE 0
            0x08, 0x00, 0x05, 0x00, 0x0b, 0x00, 0x00, 0x00, // CTRL_ATTR_MAXATTR 11
            // CTRL_ATTR_OPS (nested): ADD, DEL, GET with their flags
            0x40, 0x00, 0x06, 0x00, 0x14, 0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00,
            0x08, 0x00, 0x02, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x14, 0x00, 0x02, 0x00, 0x08, 0x00, 0x01, 0x00,
            0x02, 0x00, 0x00, 0x00, 0x08, 0x00, 0x02, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x14, 0x00, 0x03, 0x00,
            0x08, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, 0x08, 0x00, 0x02, 0x00, 0x0e, 0x00, 0x00, 0x00,
        ];
        assert_eq!(parse_family_id(&raw).unwrap(), 0x20);
        assert!(parse_family_id(&raw[..12]).is_err());
        for n in 0..raw.len() {
            let _ = parse_family_id(&raw[..n]);
        }
    }
}
