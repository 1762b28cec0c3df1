//! Rules: add and delete against iproute2's bytes; the rule parser against the kernel's dump
//! entries.

use crate::model::{Family, Rule};
use crate::netlink::rtnl::{
    parse_rule, rule_add, rule_delete, rule_dump, RTM_DELRULE, RTM_GETRULE, RTM_NEWRULE,
};
use crate::netlink::socket::flags::{NLM_F_CREATE, NLM_F_EXCL};

use super::full_flags;

/// `ip rule add pref 32000 from 10.244.0.0/24 lookup 77 proto 44`.
/// iproute2 6.1.0 in `unshare -n` on the dev host (kernel 6.18), captured with
/// `strace -f -e trace=sendmsg,sendto -e write=3 -xx -s 65535`.
/// Difference: `FRA_TABLE` is always sent.
#[rustfmt::skip]
const FROM4: &[u8] = &[
    0x02, 0x00, 0x18, 0x00, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET, dst_len 0, src_len 24, table 77, FR_ACT_TO_TBL
    0x08, 0x00, 0x06, 0x00, 0x00, 0x7d, 0x00, 0x00,   // FRA_PRIORITY 32000
    0x08, 0x00, 0x02, 0x00, 0x0a, 0xf4, 0x00, 0x00,   // FRA_SRC 10.244.0.0
    0x08, 0x00, 0x0f, 0x00, 0x4d, 0x00, 0x00, 0x00,   // FRA_TABLE 77 (added: iproute2 sends it only above 255)
    0x05, 0x00, 0x15, 0x00, 0x2c, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 44
];

/// `ip rule add pref 31000 to 192.0.2.10/32 ipproto tcp dport 80 lookup 78 proto 44` (DSR,
/// SPEC D-2). Captured as above; same difference.
#[rustfmt::skip]
const DSR4: &[u8] = &[
    0x02, 0x20, 0x00, 0x00, 0x4e, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET, dst_len 32, src_len 0, table 78, FR_ACT_TO_TBL
    0x08, 0x00, 0x06, 0x00, 0x18, 0x79, 0x00, 0x00,   // FRA_PRIORITY 31000
    0x08, 0x00, 0x01, 0x00, 0xc0, 0x00, 0x02, 0x0a,   // FRA_DST 192.0.2.10
    0x05, 0x00, 0x16, 0x00, 0x06, 0x00, 0x00, 0x00,   // FRA_IP_PROTO 6
    0x08, 0x00, 0x18, 0x00, 0x50, 0x00, 0x50, 0x00,   // FRA_DPORT_RANGE 5242960
    0x08, 0x00, 0x0f, 0x00, 0x4e, 0x00, 0x00, 0x00,   // FRA_TABLE 78 (added: iproute2 sends it only above 255)
    0x05, 0x00, 0x15, 0x00, 0x2c, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 44
];

/// `ip -6 rule add pref 32000 from fd10:244::/64 lookup 77 proto 44`. Captured as above; same
/// difference.
#[rustfmt::skip]
const FROM6: &[u8] = &[
    0x0a, 0x00, 0x40, 0x00, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET6, dst_len 0, src_len 64, table 77, FR_ACT_TO_TBL
    0x08, 0x00, 0x06, 0x00, 0x00, 0x7d, 0x00, 0x00,   // FRA_PRIORITY 32000
    0x14, 0x00, 0x02, 0x00, 0xfd, 0x10, 0x02, 0x44, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // FRA_SRC fd10:244::
    0x08, 0x00, 0x0f, 0x00, 0x4d, 0x00, 0x00, 0x00,   // FRA_TABLE 77 (added: iproute2 sends it only above 255)
    0x05, 0x00, 0x15, 0x00, 0x2c, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 44
];

/// `ip rule del pref 32000 from 10.244.0.0/24 lookup 77 proto 44`. Captured as above.
/// Differences: `FRA_TABLE` is sent, and the action is `FR_ACT_TO_TBL` where iproute2 sends 0
/// (any).
#[rustfmt::skip]
const DELETE4: &[u8] = &[
    0x02, 0x00, 0x18, 0x00, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET, dst_len 0, src_len 24, table 77, FR_ACT_TO_TBL
    0x08, 0x00, 0x06, 0x00, 0x00, 0x7d, 0x00, 0x00,   // FRA_PRIORITY 32000
    0x08, 0x00, 0x02, 0x00, 0x0a, 0xf4, 0x00, 0x00,   // FRA_SRC 10.244.0.0
    0x08, 0x00, 0x0f, 0x00, 0x4d, 0x00, 0x00, 0x00,   // FRA_TABLE 77 (added: iproute2 sends it only above 255)
    0x05, 0x00, 0x15, 0x00, 0x2c, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 44
];

/// The kernel's (6.18, dev host) dump entry for the DSR4 rule, answering `ip rule show`.
/// Captured with `strace -f -e trace=recvmsg -e read=3 -xx -s 65535` in the same namespace.
/// `FRA_DPORT_MASK` is new in recent kernels: the parser skips it.
#[rustfmt::skip]
const KERNEL_DSR4: &[u8] = &[
    0x02, 0x20, 0x00, 0x00, 0x4e, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET, dst_len 32, src_len 0, table 78, FR_ACT_TO_TBL
    0x08, 0x00, 0x0f, 0x00, 0x4e, 0x00, 0x00, 0x00,   // FRA_TABLE 78
    0x08, 0x00, 0x0e, 0x00, 0xff, 0xff, 0xff, 0xff,   // FRA_SUPPRESS_PREFIXLEN 4294967295
    0x05, 0x00, 0x15, 0x00, 0x2c, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 44
    0x08, 0x00, 0x06, 0x00, 0x18, 0x79, 0x00, 0x00,   // FRA_PRIORITY 31000
    0x08, 0x00, 0x18, 0x00, 0x50, 0x00, 0x50, 0x00,   // FRA_DPORT_RANGE 5242960
    0x06, 0x00, 0x1d, 0x00, 0xff, 0xff, 0x00, 0x00,   // FRA_DPORT_MASK 65535
    0x05, 0x00, 0x16, 0x00, 0x06, 0x00, 0x00, 0x00,   // FRA_IP_PROTO 6
    0x08, 0x00, 0x01, 0x00, 0xc0, 0x00, 0x02, 0x0a,   // FRA_DST 192.0.2.10
];

/// Dump entry for the FROM4 rule, captured as above.
#[rustfmt::skip]
const KERNEL_FROM4: &[u8] = &[
    0x02, 0x00, 0x18, 0x00, 0x4d, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET, dst_len 0, src_len 24, table 77, FR_ACT_TO_TBL
    0x08, 0x00, 0x0f, 0x00, 0x4d, 0x00, 0x00, 0x00,   // FRA_TABLE 77
    0x08, 0x00, 0x0e, 0x00, 0xff, 0xff, 0xff, 0xff,   // FRA_SUPPRESS_PREFIXLEN 4294967295
    0x05, 0x00, 0x15, 0x00, 0x2c, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 44
    0x08, 0x00, 0x06, 0x00, 0x00, 0x7d, 0x00, 0x00,   // FRA_PRIORITY 32000
    0x08, 0x00, 0x02, 0x00, 0x0a, 0xf4, 0x00, 0x00,   // FRA_SRC 10.244.0.0
];

/// Dump entry for the kernel's `32766: from all lookup main`, captured as above.
#[rustfmt::skip]
const KERNEL_MAIN: &[u8] = &[
    0x02, 0x00, 0x00, 0x00, 0xfe, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // fib_rule_hdr: AF_INET, table main, FR_ACT_TO_TBL
    0x08, 0x00, 0x0f, 0x00, 0xfe, 0x00, 0x00, 0x00,   // FRA_TABLE 254
    0x08, 0x00, 0x0e, 0x00, 0xff, 0xff, 0xff, 0xff,   // FRA_SUPPRESS_PREFIXLEN 4294967295
    0x05, 0x00, 0x15, 0x00, 0x02, 0x00, 0x00, 0x00,   // FRA_PROTOCOL 2
    0x08, 0x00, 0x06, 0x00, 0xfe, 0x7f, 0x00, 0x00,   // FRA_PRIORITY 32766
];

fn from4() -> Rule {
    Rule {
        family: Family::V4,
        priority: 32000,
        src: Some("10.244.0.0/24".parse().unwrap()),
        dst: None,
        ipproto: None,
        dport: None,
        table: 77,
        protocol: 44,
    }
}

fn dsr4() -> Rule {
    Rule {
        priority: 31000,
        src: None,
        dst: Some("192.0.2.10/32".parse().unwrap()),
        ipproto: Some(6),
        dport: Some(80),
        table: 78,
        ..from4()
    }
}

fn from6() -> Rule {
    Rule {
        family: Family::V6,
        src: Some("fd10:244::/64".parse().unwrap()),
        ..from4()
    }
}

#[test]
fn add_goldens() {
    for (raw, r) in [(FROM4, from4()), (DSR4, dsr4()), (FROM6, from6())] {
        assert_eq!(rule_add(&r).payload, raw, "{r:?}");
        assert_eq!(parse_rule(raw).unwrap(), Some(r));
    }
}

#[test]
fn delete_golden() {
    assert_eq!(rule_delete(&from4()).payload, DELETE4);
    assert_eq!(parse_rule(DELETE4).unwrap(), Some(from4()));
}

/// The dump request: an all-zero `fib_rule_hdr`, family AF_UNSPEC for both families (iproute2's
/// `ip rule show` asks for AF_INET only).
#[test]
fn dump_request() {
    let d = rule_dump();
    assert_eq!(
        (d.msg_type, d.payload.as_slice()),
        (RTM_GETRULE, &[0u8; 12][..])
    );
}

#[test]
fn header_flags() {
    let add = rule_add(&from4());
    assert_eq!(
        (add.msg_type, add.flags),
        (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL)
    );
    assert_eq!(full_flags(&add), 0x605);
    let del = rule_delete(&from4());
    assert_eq!((del.msg_type, del.flags), (RTM_DELRULE, 0));
    assert_eq!(full_flags(&del), 0x5);
}

#[test]
fn parse_kernel_dump_entries() {
    assert_eq!(parse_rule(KERNEL_DSR4).unwrap(), Some(dsr4()));
    assert_eq!(parse_rule(KERNEL_FROM4).unwrap(), Some(from4()));
    let main = Rule {
        family: Family::V4,
        priority: 32766,
        src: None,
        dst: None,
        ipproto: None,
        dport: None,
        table: 254,
        protocol: 2,
    };
    assert_eq!(parse_rule(KERNEL_MAIN).unwrap(), Some(main));
    for raw in [KERNEL_DSR4, KERNEL_FROM4] {
        for n in 0..raw.len() {
            let _ = parse_rule(&raw[..n]);
        }
    }
}
