//! BGP-4 messages (RFC 4271 §4) with the parts kr-tunneld speaks: OPEN with the capabilities
//! kube-router's peers use (multiprotocol IPv4/IPv6 unicast RFC 4760, route refresh RFC 2918,
//! graceful restart RFC 4724, 4-octet AS RFC 6793), UPDATE (ORIGIN, AS_PATH, NEXT_HOP,
//! LOCAL_PREF, MP_REACH_NLRI / MP_UNREACH_NLRI, withdrawn routes, End-of-RIB), KEEPALIVE,
//! NOTIFICATION and ROUTE-REFRESH.
//!
//! Core module: pure, no I/O. Every length is checked before it is used; a malformed message is a
//! [`CodecError`] carrying the NOTIFICATION code and subcode RFC 4271 §6 prescribes, never a
//! panic (fuzzed: `tests/fuzz`, target `bgp`). Unknown capabilities, unknown optional attributes
//! and other address families are skipped. Messages are at most 4096 bytes (no extended
//! messages, RFC 8654, which kr-tunneld does not offer).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::model::Family;

/// Fixed header: 16-byte marker, 2-byte length, 1-byte type.
pub const HEADER: usize = 19;
/// Largest message (RFC 4271 §4.1).
pub const MAX: usize = 4096;
/// AS_TRANS (RFC 6793): the 2-octet "My AS" of a speaker with a 4-octet AS.
const AS_TRANS: u16 = 23456;

// Message types (RFC 4271 §4.1, RFC 2918 §3).
const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;
// Capability codes (IANA "Capability Codes").
const CAP_MP: u8 = 1;
const CAP_RR: u8 = 2;
const CAP_GR: u8 = 64;
const CAP_AS4: u8 = 65;
// Path attribute type codes (IANA "BGP Path Attributes").
const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
// Attribute flags.
const F_OPTIONAL: u8 = 0x80;
const F_TRANSITIVE: u8 = 0x40;
const F_EXTENDED: u8 = 0x10;
const AFI_IPV4: u16 = 1;
const AFI_IPV6: u16 = 2;
const SAFI_UNICAST: u8 = 1;

/// A malformed message: the NOTIFICATION to answer it with (RFC 4271 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecError {
    /// Error code: 1 header, 2 OPEN, 3 UPDATE.
    pub code: u8,
    /// Subcode.
    pub sub: u8,
    /// What was wrong, for the log.
    pub what: &'static str,
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}/{})", self.what, self.code, self.sub)
    }
}

fn err<T>(code: u8, sub: u8, what: &'static str) -> Result<T, CodecError> {
    Err(CodecError { code, sub, what })
}

/// Graceful restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    /// Restart time in seconds (12 bits).
    pub time: u16,
    /// Per family: the F bit (forwarding state preserved).
    pub families: Vec<(Family, bool)>,
}

/// An OPEN message with the capabilities kr-tunneld understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS: the 4-octet AS capability if present, else the 2-octet field.
    pub asn: u32,
    /// Proposed hold time in seconds.
    pub hold: u16,
    /// BGP identifier.
    pub id: Ipv4Addr,
    /// Multiprotocol capabilities for IPv4/IPv6 unicast, in order.
    pub families: Vec<Family>,
    /// Whether any multiprotocol capability was present (none means IPv4 unicast, RFC 4760 §8).
    pub mp: bool,
    /// 4-octet AS capability present.
    pub as4: bool,
    /// Route refresh capability present.
    pub route_refresh: bool,
    /// Graceful restart capability.
    pub gr: Option<GracefulRestart>,
}

/// An UPDATE, both families (IPv6 through MP_REACH/MP_UNREACH).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// Withdrawn routes (IPv4 field and MP_UNREACH_NLRI).
    pub withdrawn: Vec<IpNet>,
    /// Announced routes (IPv4 NLRI and MP_REACH_NLRI).
    pub nlri: Vec<IpNet>,
    /// ORIGIN (0 IGP, 1 EGP, 2 INCOMPLETE).
    pub origin: Option<u8>,
    /// AS_PATH, all segments flattened; `Some(vec![])` is an empty AS_PATH.
    pub as_path: Option<Vec<u32>>,
    /// NEXT_HOP (IPv4 NLRI).
    pub next_hop: Option<Ipv4Addr>,
    /// First next hop of MP_REACH_NLRI (the global address).
    pub mp_next_hop: Option<Ipv6Addr>,
    /// LOCAL_PREF.
    pub local_pref: Option<u32>,
    /// This UPDATE is an End-of-RIB marker for this family (RFC 4724 §2).
    pub eor: Option<Family>,
}

/// One BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// OPEN.
    Open(Open),
    /// UPDATE.
    Update(Update),
    /// NOTIFICATION: code, subcode, data.
    Notification(u8, u8, Vec<u8>),
    /// KEEPALIVE.
    Keepalive,
    /// ROUTE-REFRESH for a family (other AFI/SAFIs are `None`).
    RouteRefresh(Option<Family>),
}

/// The length of the message at the start of `buf` once its header is there: `Ok(None)` means
/// "read more". Checks the marker and the length bounds (RFC 4271 §6.1).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return err(1, 1, "connection not synchronized");
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    if !(HEADER..=MAX).contains(&len) {
        return err(1, 2, "bad message length");
    }
    Ok(Some(len))
}

/// A bounds-checked reader over a message body.
struct R<'a> {
    b: &'a [u8],
    // The error to report when the data runs out.
    code: u8,
    sub: u8,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.b.len() < n {
            return err(self.code, self.sub, "message too short");
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn family(afi: u16, safi: u8) -> Option<Family> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Some(Family::V4),
        (AFI_IPV6, SAFI_UNICAST) => Some(Family::V6),
        _ => None,
    }
}

fn afi(f: Family) -> u16 {
    match f {
        Family::V4 => AFI_IPV4,
        Family::V6 => AFI_IPV6,
    }
}

/// Decode one whole message (as delimited by [`frame_len`]). `as4`: the session negotiated
/// 4-octet AS numbers (AS_PATH then carries 4-byte ASNs).
pub fn decode(msg: &[u8], as4: bool) -> Result<Msg, CodecError> {
    let len = frame_len(msg)?.unwrap_or(0);
    if len != msg.len() {
        return err(1, 2, "bad message length");
    }
    let body = &msg[HEADER..];
    match msg[18] {
        OPEN => decode_open(body).map(Msg::Open),
        UPDATE => decode_update(body, as4).map(Msg::Update),
        NOTIFICATION if body.len() >= 2 => {
            Ok(Msg::Notification(body[0], body[1], body[2..].to_vec()))
        }
        KEEPALIVE if body.is_empty() => Ok(Msg::Keepalive),
        ROUTE_REFRESH if body.len() == 4 => Ok(Msg::RouteRefresh(family(
            u16::from_be_bytes([body[0], body[1]]),
            body[3],
        ))),
        NOTIFICATION | KEEPALIVE | ROUTE_REFRESH => err(1, 2, "bad message length"),
        _ => err(1, 3, "bad message type"),
    }
}

fn decode_open(body: &[u8]) -> Result<Open, CodecError> {
    let mut r = R {
        b: body,
        code: 2,
        sub: 0,
    };
    let version = r.u8()?;
    if version != 4 {
        return err(2, 1, "unsupported version number");
    }
    let my_as = r.u16()?;
    let hold = r.u16()?;
    let id = Ipv4Addr::from(r.u32()?);
    let plen = usize::from(r.u8()?);
    if r.b.len() != plen {
        return err(2, 0, "bad optional parameters length");
    }
    let mut o = Open {
        asn: u32::from(my_as),
        hold,
        id,
        families: Vec::new(),
        mp: false,
        as4: false,
        route_refresh: false,
        gr: None,
    };
    while !r.b.is_empty() {
        let ptype = r.u8()?;
        let n = usize::from(r.u8()?);
        let param = r.take(n)?;
        if ptype != 2 {
            // RFC 4271 §6.2: an unrecognised optional parameter.
            return err(2, 4, "unsupported optional parameter");
        }
        let mut c = R {
            b: param,
            code: 2,
            sub: 0,
        };
        while !c.b.is_empty() {
            let code = c.u8()?;
            let n = usize::from(c.u8()?);
            let mut v = R {
                b: c.take(n)?,
                code: 2,
                sub: 0,
            };
            match code {
                CAP_MP if n == 4 => {
                    o.mp = true;
                    let a = v.u16()?;
                    let s = v.take(2)?[1];
                    if let Some(f) = family(a, s) {
                        if !o.families.contains(&f) {
                            o.families.push(f);
                        }
                    }
                }
                CAP_RR if n == 0 => o.route_refresh = true,
                CAP_AS4 if n == 4 => {
                    o.as4 = true;
                    o.asn = v.u32()?;
                }
                CAP_GR if n >= 2 && n % 4 == 2 => {
                    let flags = v.u16()?;
                    let mut g = GracefulRestart {
                        restarting: flags & 0x8000 != 0,
                        time: flags & 0x0fff,
                        families: Vec::new(),
                    };
                    while !v.b.is_empty() {
                        let a = v.u16()?;
                        let s = v.u8()?;
                        let fl = v.u8()?;
                        if let Some(f) = family(a, s) {
                            g.families.push((f, fl & 0x80 != 0));
                        }
                    }
                    o.gr = Some(g);
                }
                CAP_MP | CAP_RR | CAP_AS4 | CAP_GR => {
                    return err(2, 0, "bad capability length");
                }
                // Unknown capabilities are ignored (RFC 5492 §3).
                _ => {}
            }
        }
    }
    if o.as4 && o.asn == 0 {
        return err(2, 2, "bad peer AS");
    }
    Ok(o)
}

/// Read NLRI prefixes of one family until the data ends (RFC 4271 §4.3, RFC 4760 §5).
fn prefixes(mut b: &[u8], f: Family, out: &mut Vec<IpNet>) -> Result<(), CodecError> {
    let max = match f {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    while let Some((&bits, rest)) = b.split_first() {
        let n = usize::from(bits).div_ceil(8);
        if bits > max || rest.len() < n {
            return err(3, 10, "invalid network field");
        }
        let mut a = [0u8; 16];
        a[..n].copy_from_slice(&rest[..n]);
        let net = match f {
            Family::V4 => Ipv4Net::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]), bits)
                .map(|n| IpNet::V4(n.trunc())),
            Family::V6 => Ipv6Net::new(Ipv6Addr::from(a), bits).map(|n| IpNet::V6(n.trunc())),
        };
        // The prefix length was checked above, so `new` cannot fail.
        out.extend(net.ok());
        b = &rest[n..];
    }
    Ok(())
}

fn decode_update(body: &[u8], as4: bool) -> Result<Update, CodecError> {
    let mut r = R {
        b: body,
        code: 3,
        sub: 1,
    };
    let mut u = Update::default();
    let wlen = usize::from(r.u16()?);
    prefixes(r.take(wlen)?, Family::V4, &mut u.withdrawn)?;
    let alen = usize::from(r.u16()?);
    let mut a = R {
        b: r.take(alen)?,
        code: 3,
        sub: 1,
    };
    let nlri = r.b;
    if wlen == 0 && alen == 0 && nlri.is_empty() {
        u.eor = Some(Family::V4);
        return Ok(u);
    }
    let mut seen = 0u64;
    let mut unreach_v6 = false;
    let mut attrs = 0;
    while !a.b.is_empty() {
        let flags = a.u8()?;
        let ty = a.u8()?;
        let n = if flags & F_EXTENDED != 0 {
            usize::from(a.u16()?)
        } else {
            usize::from(a.u8()?)
        };
        let mut v = R {
            b: a.take(n)?,
            code: 3,
            sub: 5,
        };
        attrs += 1;
        if ty < 64 {
            if seen & (1 << ty) != 0 {
                return err(3, 1, "attribute repeated");
            }
            seen |= 1 << ty;
        }
        let well_known = matches!(
            ty,
            ATTR_ORIGIN | ATTR_AS_PATH | ATTR_NEXT_HOP | ATTR_LOCAL_PREF
        );
        if well_known && flags & (F_OPTIONAL | F_TRANSITIVE) != F_TRANSITIVE {
            return err(3, 4, "attribute flags error");
        }
        match ty {
            ATTR_ORIGIN => {
                let o = v.u8()?;
                if n != 1 {
                    return err(3, 5, "attribute length error");
                }
                if o > 2 {
                    return err(3, 6, "invalid ORIGIN");
                }
                u.origin = Some(o);
            }
            ATTR_AS_PATH => {
                let w = if as4 { 4 } else { 2 };
                let mut path = Vec::new();
                while !v.b.is_empty() {
                    let seg = v.u8()?;
                    let cnt = usize::from(v.u8()?);
                    if !(1..=4).contains(&seg) || v.b.len() < cnt * w {
                        return err(3, 11, "malformed AS_PATH");
                    }
                    for _ in 0..cnt {
                        path.push(if as4 { v.u32()? } else { u32::from(v.u16()?) });
                    }
                }
                u.as_path = Some(path);
            }
            ATTR_NEXT_HOP => {
                if n != 4 {
                    return err(3, 5, "attribute length error");
                }
                u.next_hop = Some(Ipv4Addr::from(v.u32()?));
            }
            ATTR_LOCAL_PREF => {
                if n != 4 {
                    return err(3, 5, "attribute length error");
                }
                u.local_pref = Some(v.u32()?);
            }
            ATTR_MP_REACH => {
                v.sub = 9; // optional attribute error
                let f = family(v.u16()?, v.u8()?);
                let nh_len = usize::from(v.u8()?);
                let nh = v.take(nh_len)?;
                v.u8()?; // reserved
                if let Some(f) = f {
                    if f == Family::V6 {
                        if nh_len != 16 && nh_len != 32 {
                            return err(3, 9, "bad MP_REACH next hop length");
                        }
                        let mut b = [0u8; 16];
                        b.copy_from_slice(&nh[..16]);
                        u.mp_next_hop = Some(Ipv6Addr::from(b));
                    }
                    prefixes(v.b, f, &mut u.nlri)?;
                }
            }
            ATTR_MP_UNREACH => {
                v.sub = 9;
                let f = family(v.u16()?, v.u8()?);
                if let Some(f) = f {
                    unreach_v6 = f == Family::V6 && v.b.is_empty();
                    if f == Family::V4 && v.b.is_empty() {
                        u.eor = Some(Family::V4);
                    }
                    prefixes(v.b, f, &mut u.withdrawn)?;
                }
            }
            // Other attributes (MED, communities, ...) are not needed: skipped.
            _ => {}
        }
    }
    if unreach_v6 && attrs == 1 && wlen == 0 && nlri.is_empty() {
        u.eor = Some(Family::V6);
        return Ok(u);
    }
    if u.eor.is_some() && (attrs != 1 || wlen != 0 || !nlri.is_empty()) {
        u.eor = None;
    }
    prefixes(nlri, Family::V4, &mut u.nlri)?;
    let has_v4 = u.nlri.iter().any(|n| matches!(n, IpNet::V4(_)));
    let has_v6 = u.nlri.iter().any(|n| matches!(n, IpNet::V6(_)));
    if has_v4 || has_v6 {
        // RFC 4271 §6.3: mandatory attributes for announcements.
        if u.origin.is_none() || u.as_path.is_none() {
            return err(3, 3, "missing well-known attribute");
        }
    }
    if !nlri.is_empty() && u.next_hop.is_none() {
        return err(3, 3, "missing NEXT_HOP");
    }
    Ok(u)
}

fn header(buf: &mut Vec<u8>, ty: u8) {
    buf.extend_from_slice(&[0xff; 16]);
    buf.extend_from_slice(&[0, 0, ty]);
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = buf.len() as u16;
    buf[16..18].copy_from_slice(&len.to_be_bytes());
    buf
}

fn cap(buf: &mut Vec<u8>, code: u8, value: &[u8]) {
    buf.extend_from_slice(&[code, value.len() as u8]);
    buf.extend_from_slice(value);
}

/// Encode an OPEN. Multiprotocol, route refresh and 4-octet AS are always offered.
pub fn encode_open(o: &Open) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    header(&mut b, OPEN);
    b.push(4);
    let my_as = u16::try_from(o.asn).unwrap_or(AS_TRANS);
    b.extend_from_slice(&my_as.to_be_bytes());
    b.extend_from_slice(&o.hold.to_be_bytes());
    b.extend_from_slice(&o.id.octets());
    // All capabilities in one optional parameter, as GoBGP sends them.
    b.extend_from_slice(&[0, 2, 0]); // parameter lengths, set below
    cap(&mut b, CAP_RR, &[]);
    for f in &o.families {
        let a = afi(*f).to_be_bytes();
        cap(&mut b, CAP_MP, &[a[0], a[1], 0, SAFI_UNICAST]);
    }
    cap(&mut b, CAP_AS4, &o.asn.to_be_bytes());
    if let Some(g) = &o.gr {
        let mut v = (g.time & 0x0fff | if g.restarting { 0x8000 } else { 0 })
            .to_be_bytes()
            .to_vec();
        for (f, fwd) in &g.families {
            v.extend_from_slice(&afi(*f).to_be_bytes());
            v.extend_from_slice(&[SAFI_UNICAST, if *fwd { 0x80 } else { 0 }]);
        }
        cap(&mut b, CAP_GR, &v);
    }
    b[28] = (b.len() - 29) as u8;
    b[30] = (b.len() - 31) as u8;
    finish(b)
}

fn put_prefix(b: &mut Vec<u8>, n: &IpNet) {
    let bits = n.prefix_len();
    b.push(bits);
    let k = usize::from(bits).div_ceil(8);
    match n.addr() {
        IpAddr::V4(a) => b.extend_from_slice(&a.octets()[..k]),
        IpAddr::V6(a) => b.extend_from_slice(&a.octets()[..k]),
    }
}

fn attr(b: &mut Vec<u8>, flags: u8, ty: u8, v: &[u8]) {
    if v.len() > 255 {
        b.extend_from_slice(&[flags | F_EXTENDED, ty]);
        b.extend_from_slice(&(v.len() as u16).to_be_bytes());
    } else {
        b.extend_from_slice(&[flags, ty, v.len() as u8]);
    }
    b.extend_from_slice(v);
}

/// Encode an UPDATE. IPv6 routes go in MP_REACH_NLRI / MP_UNREACH_NLRI; IPv4 in the classic
/// fields. The caller keeps each message under [`MAX`] (kr-tunneld announces a node's few pod
/// CIDRs); `as4` selects the AS_PATH width.
pub fn encode_update(u: &Update, as4: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    header(&mut b, UPDATE);
    if u.eor == Some(Family::V6) {
        b.extend_from_slice(&[0, 0, 0, 6]);
        attr(&mut b, F_OPTIONAL, ATTR_MP_UNREACH, &[0, 2, 1]);
        return finish(b);
    }
    let v4 = |n: &&IpNet| matches!(n, IpNet::V4(_));
    let mut w = Vec::new();
    for n in u.withdrawn.iter().filter(v4) {
        put_prefix(&mut w, n);
    }
    b.extend_from_slice(&(w.len() as u16).to_be_bytes());
    b.extend_from_slice(&w);
    let mut a = Vec::new();
    if let Some(o) = u.origin {
        attr(&mut a, F_TRANSITIVE, ATTR_ORIGIN, &[o]);
    }
    if let Some(p) = &u.as_path {
        let mut v = Vec::new();
        if !p.is_empty() {
            v.extend_from_slice(&[2, p.len() as u8]); // AS_SEQUENCE
            for asn in p {
                if as4 {
                    v.extend_from_slice(&asn.to_be_bytes());
                } else {
                    v.extend_from_slice(&u16::try_from(*asn).unwrap_or(AS_TRANS).to_be_bytes());
                }
            }
        }
        attr(&mut a, F_TRANSITIVE, ATTR_AS_PATH, &v);
    }
    if let Some(nh) = u.next_hop {
        attr(&mut a, F_TRANSITIVE, ATTR_NEXT_HOP, &nh.octets());
    }
    if let Some(lp) = u.local_pref {
        attr(&mut a, F_TRANSITIVE, ATTR_LOCAL_PREF, &lp.to_be_bytes());
    }
    let mut un = vec![0, 2, 1];
    for n in u.withdrawn.iter().filter(|n| !v4(n)) {
        put_prefix(&mut un, n);
    }
    if un.len() > 3 {
        attr(&mut a, F_OPTIONAL, ATTR_MP_UNREACH, &un);
    }
    let v6: Vec<&IpNet> = u.nlri.iter().filter(|n| !v4(n)).collect();
    if let (Some(nh), false) = (u.mp_next_hop, v6.is_empty()) {
        let mut r = vec![0, 2, 1, 16];
        r.extend_from_slice(&nh.octets());
        r.push(0);
        for n in v6 {
            put_prefix(&mut r, n);
        }
        attr(&mut a, F_OPTIONAL, ATTR_MP_REACH, &r);
    }
    b.extend_from_slice(&(a.len() as u16).to_be_bytes());
    b.extend_from_slice(&a);
    for n in u.nlri.iter().filter(v4) {
        put_prefix(&mut b, n);
    }
    finish(b)
}

/// Encode a KEEPALIVE.
pub fn encode_keepalive() -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER);
    header(&mut b, KEEPALIVE);
    finish(b)
}

/// Encode a NOTIFICATION.
pub fn encode_notification(code: u8, sub: u8, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + 2 + data.len());
    header(&mut b, NOTIFICATION);
    b.extend_from_slice(&[code, sub]);
    b.extend_from_slice(&data[..data.len().min(MAX - HEADER - 2)]);
    finish(b)
}

/// Encode a ROUTE-REFRESH for a family.
pub fn encode_route_refresh(f: Family) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + 4);
    header(&mut b, ROUTE_REFRESH);
    b.extend_from_slice(&afi(f).to_be_bytes());
    b.extend_from_slice(&[0, SAFI_UNICAST]);
    finish(b)
}

/// The name of a NOTIFICATION code and subcode (RFC 4271 §4.5, RFC 4486 for Cease), for logs.
pub fn notification_name(code: u8, sub: u8) -> &'static str {
    match (code, sub) {
        (1, _) => "message header error",
        (2, 1) => "OPEN: unsupported version number",
        (2, 2) => "OPEN: bad peer AS",
        (2, 3) => "OPEN: bad BGP identifier",
        (2, 6) => "OPEN: unacceptable hold time",
        (2, _) => "OPEN message error",
        (3, _) => "UPDATE message error",
        (4, _) => "hold timer expired",
        (5, _) => "finite state machine error",
        (6, 2) => "cease: administrative shutdown",
        (6, 3) => "cease: peer de-configured",
        (6, 4) => "cease: administrative reset",
        (6, 5) => "cease: connection rejected",
        (6, 7) => "cease: connection collision resolution",
        (6, _) => "cease",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests;
