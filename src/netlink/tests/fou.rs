//! The "fou" generic netlink family: add, delete and dump against iproute2's bytes (genlmsghdr
//! included); the port parser against the kernel's dump entries.

use crate::model::{Family, FouPort};
use crate::netlink::fou::{fou_add, fou_del, fou_dump, parse_fou_port};

use super::full_flags;

/// Family ID of "fou" in the captures (assigned by the kernel at module load).
const FOU_ID: u16 = 0x20;

/// `ip fou add port 5555 gue`. iproute2 6.1.0 under the Debian kernel 6.1.0-56-amd64 (VM),
/// captured with `strace -f -e trace=sendmsg -e write=4 -xx -s 65535` (fd 4 is the genl socket).
/// Identical. No `FOU_ATTR_IPPROTO` for GUE (kernels from 6.19 reject it, SPEC T-7).
#[rustfmt::skip]
const ADD4: &[u8] = &[
    0x01, 0x01, 0x00, 0x00,                         // genlmsghdr: FOU_CMD_ADD, version 1
    0x06, 0x00, 0x01, 0x00, 0x15, 0xb3, 0x00, 0x00, // FOU_ATTR_PORT 5555 (big-endian)
    0x05, 0x00, 0x04, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_TYPE FOU_ENCAP_GUE
    0x05, 0x00, 0x02, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_AF AF_INET
];

/// `ip -6 fou add port 5555 gue`, captured as above. Identical.
#[rustfmt::skip]
const ADD6: &[u8] = &[
    0x01, 0x01, 0x00, 0x00,                         // genlmsghdr: FOU_CMD_ADD, version 1
    0x06, 0x00, 0x01, 0x00, 0x15, 0xb3, 0x00, 0x00, // FOU_ATTR_PORT 5555
    0x05, 0x00, 0x04, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_TYPE FOU_ENCAP_GUE
    0x05, 0x00, 0x02, 0x00, 0x0a, 0x00, 0x00, 0x00, // FOU_ATTR_AF AF_INET6
];

/// `ip -6 fou del port 5555`, captured as above. Difference: iproute2 sends its default type
/// `FOU_ENCAP_DIRECT` (1); we send the port's type (GUE). The kernel matches family and port only.
#[rustfmt::skip]
const DEL6: &[u8] = &[
    0x02, 0x01, 0x00, 0x00,                         // genlmsghdr: FOU_CMD_DEL, version 1
    0x06, 0x00, 0x01, 0x00, 0x15, 0xb3, 0x00, 0x00, // FOU_ATTR_PORT 5555
    0x05, 0x00, 0x04, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_TYPE FOU_ENCAP_GUE (iproute2: 1)
    0x05, 0x00, 0x02, 0x00, 0x0a, 0x00, 0x00, 0x00, // FOU_ATTR_AF AF_INET6
];

/// `ip fou show`: the dump request, captured as above. Identical.
#[rustfmt::skip]
const DUMP: &[u8] = &[
    0x03, 0x01, 0x00, 0x00,                         // genlmsghdr: FOU_CMD_GET, version 1
];

/// The kernel's dump entry for the IPv6 port (6.1.0-56, answering `ip fou show`, captured with
/// `strace -f -e trace=recvmsg -e read=4 -xx -s 65535`).
#[rustfmt::skip]
const KERNEL_PORT6: &[u8] = &[
    0x03, 0x01, 0x00, 0x00,                         // genlmsghdr: FOU_CMD_GET, version 1
    0x05, 0x00, 0x02, 0x00, 0x0a, 0x00, 0x00, 0x00, // FOU_ATTR_AF AF_INET6
    0x06, 0x00, 0x01, 0x00, 0x15, 0xb3, 0x00, 0x00, // FOU_ATTR_PORT 5555
    0x06, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_PEER_PORT 0
    0x05, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_IPPROTO 0
    0x05, 0x00, 0x04, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_TYPE FOU_ENCAP_GUE
    0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_IFINDEX 0
    0x14, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_LOCAL_V6 ::
    0x14, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_PEER_V6 ::
];

/// The entry for the IPv4 port in the same dump.
#[rustfmt::skip]
const KERNEL_PORT4: &[u8] = &[
    0x03, 0x01, 0x00, 0x00,                         // genlmsghdr: FOU_CMD_GET, version 1
    0x05, 0x00, 0x02, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_AF AF_INET
    0x06, 0x00, 0x01, 0x00, 0x15, 0xb3, 0x00, 0x00, // FOU_ATTR_PORT 5555
    0x06, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_PEER_PORT 0
    0x05, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_IPPROTO 0
    0x05, 0x00, 0x04, 0x00, 0x02, 0x00, 0x00, 0x00, // FOU_ATTR_TYPE FOU_ENCAP_GUE
    0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_IFINDEX 0
    0x08, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_LOCAL_V4 0.0.0.0
    0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, // FOU_ATTR_PEER_V4 0.0.0.0
];

fn gue(family: Family) -> FouPort {
    FouPort {
        family,
        port: 5555,
        gue: true,
    }
}

#[test]
fn add_goldens() {
    for (raw, p) in [(ADD4, gue(Family::V4)), (ADD6, gue(Family::V6))] {
        let req = fou_add(FOU_ID, &p);
        assert_eq!((req.msg_type, req.payload.as_slice()), (FOU_ID, raw));
        assert_eq!(parse_fou_port(raw).unwrap(), Some(p));
    }
}

#[test]
fn delete_golden() {
    let req = fou_del(FOU_ID, &gue(Family::V6));
    assert_eq!(req.payload, DEL6);
    assert_eq!(parse_fou_port(DEL6).unwrap(), Some(gue(Family::V6)));
}

#[test]
fn dump_request() {
    assert_eq!(fou_dump(FOU_ID).payload, DUMP);
}

/// No request-specific flags: `NLM_F_REQUEST|NLM_F_ACK` (0x5) as iproute2 sends them.
#[test]
fn header_flags() {
    for req in [
        fou_add(FOU_ID, &gue(Family::V4)),
        fou_del(FOU_ID, &gue(Family::V4)),
    ] {
        assert_eq!(req.flags, 0);
        assert_eq!(full_flags(&req), 0x5);
    }
}

#[test]
fn parse_kernel_dump_entries() {
    assert_eq!(parse_fou_port(KERNEL_PORT6).unwrap(), Some(gue(Family::V6)));
    assert_eq!(parse_fou_port(KERNEL_PORT4).unwrap(), Some(gue(Family::V4)));
    for raw in [KERNEL_PORT6, KERNEL_PORT4] {
        for n in 0..raw.len() {
            let _ = parse_fou_port(&raw[..n]);
        }
    }
}

/// Never `FOU_ATTR_IPPROTO` (type 3) in what we send, for any port.
#[test]
fn never_ipproto() {
    for family in [Family::V4, Family::V6] {
        for gue in [true, false] {
            let p = FouPort {
                family,
                port: 6000,
                gue,
            };
            for req in [fou_add(FOU_ID, &p), fou_del(FOU_ID, &p)] {
                let attrs = crate::netlink::genl::parse_attrs(&req.payload[4..]).unwrap();
                assert!(attrs.iter().all(|a| a.id() != 3), "{attrs:?}");
            }
        }
    }
}
