//! Golden bytes: what Debian's GoBGP 3.10.0 (`gobgpd`, the same library kube-router embeds at
//! v4.8) sends, captured on loopback, and what kr-tunneld sends. Capture recipe (two gobgpd
//! on 127.0.0.2 and 127.0.0.3, port 1790, AS 64512, neighbours with graceful restart (restart
//! time 90) and ipv4-unicast + ipv6-unicast with MP graceful restart, as kube-router configures
//! its node peers; the configuration is `tests/bgp_peers.rs`' `gobgp_config`):
//!
//! ```text
//! tcpdump -i lo -w cap.pcap -U 'tcp port 1790' &
//! gobgpd -f a.toml --api-hosts 127.0.0.1:50052 -p & gobgpd -f b.toml --api-hosts 127.0.0.1:50053 -p &
//! gobgp -p 50052 global rib add 10.244.1.0/24 -a ipv4 origin igp nexthop 192.0.2.2
//! gobgp -p 50052 global rib add fd00:244:1::/64 -a ipv6 origin igp nexthop fd00::2
//! gobgp -p 50052 global rib del 10.244.1.0/24 -a ipv4
//! gobgp -p 50052 global rib del fd00:244:1::/64 -a ipv6
//! gobgp -p 50052 neighbor 127.0.0.3 shutdown
//! ```
//!
//! The TCP payloads were split into messages; each test holds one message.

use super::*;

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((HEADER + body.len()) as u16).to_be_bytes());
    m.push(ty);
    m.extend_from_slice(body);
    m
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// GoBGP's OPEN from 127.0.0.2.
#[rustfmt::skip]
const GOBGP_OPEN: &[u8] = &[
    0x04,                   // version 4
    0xfc, 0x00,             // my AS 64512
    0x00, 0x5a,             // hold time 90
    0x7f, 0x00, 0x00, 0x02, // BGP identifier 127.0.0.2
    0x30,                   // optional parameters: 48 bytes
    0x02, 0x2e,             // one parameter: capabilities, 46 bytes
    0x02, 0x00,                                     // route refresh
    0x49, 0x04, 0x02, 0x76, 0x6d, 0x00,             // FQDN (73) "vm": ignored
    0x01, 0x04, 0x00, 0x01, 0x00, 0x01,             // MP ipv4 unicast
    0x01, 0x04, 0x00, 0x02, 0x00, 0x01,             // MP ipv6 unicast
    0x41, 0x04, 0x00, 0x00, 0xfc, 0x00,             // 4-octet AS 64512
    0x40, 0x0a, 0x00, 0x5a,                         // graceful restart, R=0, time 90
          0x00, 0x01, 0x01, 0x00,                   //   ipv4 unicast, F=0
          0x00, 0x02, 0x01, 0x00,                   //   ipv6 unicast, F=0
    0x05, 0x06, 0x00, 0x01, 0x00, 0x01, 0x00, 0x02, // extended next hop (5): ignored
];

#[test]
fn parses_gobgp_open() {
    let m = decode(&msg(1, GOBGP_OPEN), false).unwrap();
    assert_eq!(
        m,
        Msg::Open(Open {
            asn: 64512,
            hold: 90,
            id: Ipv4Addr::new(127, 0, 0, 2),
            families: vec![Family::V4, Family::V6],
            mp: true,
            as4: true,
            route_refresh: true,
            gr: Some(GracefulRestart {
                restarting: false,
                time: 90,
                families: vec![(Family::V4, false), (Family::V6, false)],
            }),
        })
    );
}

/// kr-tunneld's OPEN: GoBGP's capabilities in GoBGP's layout and order (one parameter), without
/// FQDN and extended next hop, with the R and F bits of a restarted speaker that
/// kept its forwarding state (kr-tunneld leaves the kernel state in place).
#[rustfmt::skip]
const OUR_OPEN: &[u8] = &[
    0x04, 0xfc, 0x00, 0x00, 0x5a, 0xc0, 0x00, 0x02, 0x02, // v4, AS 64512, hold 90, id 192.0.2.2
    0x22, 0x02, 0x20,                                     // 34 bytes, capabilities 32 bytes
    0x02, 0x00,                                           // route refresh
    0x01, 0x04, 0x00, 0x01, 0x00, 0x01,                   // MP ipv4 unicast
    0x01, 0x04, 0x00, 0x02, 0x00, 0x01,                   // MP ipv6 unicast
    0x41, 0x04, 0x00, 0x00, 0xfc, 0x00,                   // 4-octet AS 64512
    0x40, 0x0a, 0x80, 0x5a,                               // graceful restart, R=1, time 90
          0x00, 0x01, 0x01, 0x80,                         //   ipv4 unicast, F=1
          0x00, 0x02, 0x01, 0x80,                         //   ipv6 unicast, F=1
];

fn our_open() -> Open {
    Open {
        asn: 64512,
        hold: 90,
        id: Ipv4Addr::new(192, 0, 2, 2),
        families: vec![Family::V4, Family::V6],
        mp: true,
        as4: true,
        route_refresh: true,
        gr: Some(GracefulRestart {
            restarting: true,
            time: 90,
            families: vec![(Family::V4, true), (Family::V6, true)],
        }),
    }
}

#[test]
fn our_open_round_trips() {
    assert_eq!(encode_open(&our_open()), msg(1, OUR_OPEN));
    assert_eq!(
        decode(&msg(1, OUR_OPEN), false).unwrap(),
        Msg::Open(our_open())
    );
}

#[test]
fn four_octet_as_sends_as_trans() {
    let o = Open {
        asn: 4_200_000_001,
        gr: None,
        ..our_open()
    };
    let b = encode_open(&o);
    assert_eq!(&b[20..22], &[0x5b, 0xa0]); // 23456
    assert_eq!(decode(&b, false).unwrap(), Msg::Open(o));
}

/// GoBGP announcing 10.244.1.0/24 (IPv4 NLRI, 4-octet AS session).
#[rustfmt::skip]
const GOBGP_ANNOUNCE_V4: &[u8] = &[
    0x00, 0x00,                         // no withdrawn routes
    0x00, 0x15,                         // path attributes: 21 bytes
    0x40, 0x01, 0x01, 0x00,             // ORIGIN IGP
    0x40, 0x02, 0x00,                   // AS_PATH empty
    0x40, 0x03, 0x04, 0xc0, 0x00, 0x02, 0x02, // NEXT_HOP 192.0.2.2
    0x40, 0x05, 0x04, 0x00, 0x00, 0x00, 0x64, // LOCAL_PREF 100
    0x18, 0x0a, 0xf4, 0x01,             // NLRI 10.244.1.0/24
];

fn announce_v4() -> Update {
    Update {
        nlri: vec![net("10.244.1.0/24")],
        origin: Some(0),
        as_path: Some(vec![]),
        next_hop: Some(Ipv4Addr::new(192, 0, 2, 2)),
        local_pref: Some(100),
        ..Update::default()
    }
}

#[test]
fn announce_v4_is_gobgps() {
    assert_eq!(
        decode(&msg(2, GOBGP_ANNOUNCE_V4), true).unwrap(),
        Msg::Update(announce_v4())
    );
    assert_eq!(
        encode_update(&announce_v4(), true),
        msg(2, GOBGP_ANNOUNCE_V4)
    );
}

/// GoBGP announcing fd00:244:1::/64 (MP_REACH_NLRI, one global next hop).
#[rustfmt::skip]
const GOBGP_ANNOUNCE_V6: &[u8] = &[
    0x00, 0x00, 0x00, 0x2f,             // no withdrawn routes; attributes 47 bytes
    0x40, 0x01, 0x01, 0x00,             // ORIGIN IGP
    0x40, 0x02, 0x00,                   // AS_PATH empty
    0x40, 0x05, 0x04, 0x00, 0x00, 0x00, 0x64, // LOCAL_PREF 100
    0x80, 0x0e, 0x1e,                   // MP_REACH_NLRI, optional, 30 bytes
    0x00, 0x02, 0x01,                   //   ipv6 unicast
    0x10, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // next hop fd00::2
          0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02,
    0x00,                               //   reserved
    0x40, 0xfd, 0x00, 0x02, 0x44, 0x00, 0x01, 0x00, 0x00, // fd00:244:1::/64
];

fn announce_v6() -> Update {
    Update {
        nlri: vec![net("fd00:244:1::/64")],
        origin: Some(0),
        as_path: Some(vec![]),
        mp_next_hop: Some("fd00::2".parse().unwrap()),
        local_pref: Some(100),
        ..Update::default()
    }
}

#[test]
fn announce_v6_is_gobgps() {
    assert_eq!(
        decode(&msg(2, GOBGP_ANNOUNCE_V6), true).unwrap(),
        Msg::Update(announce_v6())
    );
    assert_eq!(
        encode_update(&announce_v6(), true),
        msg(2, GOBGP_ANNOUNCE_V6)
    );
}

/// GoBGP's End-of-RIB markers: an empty UPDATE (IPv4), an empty MP_UNREACH_NLRI (IPv6).
const GOBGP_EOR_V4: &[u8] = &[0x00, 0x00, 0x00, 0x00];
#[rustfmt::skip]
const GOBGP_EOR_V6: &[u8] = &[
    0x00, 0x00, 0x00, 0x06,             // no withdrawn routes; attributes 6 bytes
    0x80, 0x0f, 0x03, 0x00, 0x02, 0x01, // MP_UNREACH_NLRI ipv6 unicast, nothing
];

#[test]
fn end_of_rib_is_gobgps() {
    for (f, raw) in [(Family::V4, GOBGP_EOR_V4), (Family::V6, GOBGP_EOR_V6)] {
        let u = Update {
            eor: Some(f),
            ..Update::default()
        };
        assert_eq!(decode(&msg(2, raw), true).unwrap(), Msg::Update(u.clone()));
        assert_eq!(encode_update(&u, true), msg(2, raw));
    }
}

/// GoBGP withdrawing both routes.
#[rustfmt::skip]
const GOBGP_WITHDRAW_V4: &[u8] = &[
    0x00, 0x04, 0x18, 0x0a, 0xf4, 0x01, // withdrawn: 10.244.1.0/24
    0x00, 0x00,                         // no attributes
];
#[rustfmt::skip]
const GOBGP_WITHDRAW_V6: &[u8] = &[
    0x00, 0x00, 0x00, 0x0f,             // no withdrawn routes; attributes 15 bytes
    0x80, 0x0f, 0x0c, 0x00, 0x02, 0x01, // MP_UNREACH_NLRI ipv6 unicast
    0x40, 0xfd, 0x00, 0x02, 0x44, 0x00, 0x01, 0x00, 0x00, // fd00:244:1::/64
];

#[test]
fn withdraw_is_gobgps() {
    for (n, raw) in [
        ("10.244.1.0/24", GOBGP_WITHDRAW_V4),
        ("fd00:244:1::/64", GOBGP_WITHDRAW_V6),
    ] {
        let u = Update {
            withdrawn: vec![net(n)],
            ..Update::default()
        };
        assert_eq!(decode(&msg(2, raw), true).unwrap(), Msg::Update(u.clone()));
        assert_eq!(encode_update(&u, true), msg(2, raw));
    }
}

#[test]
fn keepalive_notification_route_refresh() {
    // GoBGP's KEEPALIVE (header only) and its Cease on `neighbor shutdown`: 6/2.
    assert_eq!(decode(&msg(4, &[]), true).unwrap(), Msg::Keepalive);
    assert_eq!(encode_keepalive(), msg(4, &[]));
    assert_eq!(
        decode(&msg(3, &[6, 2]), true).unwrap(),
        Msg::Notification(6, 2, vec![])
    );
    assert_eq!(encode_notification(6, 2, &[]), msg(3, &[6, 2]));
    let rr = [0x00, 0x02, 0x00, 0x01];
    assert_eq!(
        decode(&msg(5, &rr), true).unwrap(),
        Msg::RouteRefresh(Some(Family::V6))
    );
    assert_eq!(encode_route_refresh(Family::V6), msg(5, &rr));
}

#[test]
fn two_octet_as_path() {
    // AS_SEQUENCE 65001 65002 on a session without 4-octet AS.
    let body = [
        0, 0, 0, 20, 0x40, 1, 1, 0, 0x40, 2, 6, 2, 2, 0xfd, 0xe9, 0xfd, 0xea, 0x40, 3, 4, 10, 0, 0,
        1, 8, 10,
    ];
    let Msg::Update(u) = decode(&msg(2, &body), false).unwrap() else {
        panic!()
    };
    assert_eq!(u.as_path, Some(vec![65001, 65002]));
    assert_eq!(u.nlri, vec![net("10.0.0.0/8")]);
}

#[test]
fn malformed_messages_are_notifications() {
    let cases: &[(u8, &[u8], (u8, u8))] = &[
        (9, &[], (1, 3)),                                         // unknown type
        (4, &[0], (1, 2)),                                        // KEEPALIVE with a body
        (3, &[6], (1, 2)),                                        // NOTIFICATION without subcode
        (1, &[3, 0, 1, 0, 90, 1, 2, 3, 4, 0], (2, 1)),            // version 3
        (1, &[4, 0, 1, 0, 90, 1, 2, 3, 4, 5], (2, 0)),            // parameters overrun
        (1, &[4, 0, 1, 0, 90, 1, 2, 3, 4, 2, 1, 0], (2, 4)),      // auth parameter
        (2, &[0, 9, 0, 0], (3, 1)),                               // withdrawn overruns
        (2, &[0, 1, 24, 0, 0], (3, 10)), // withdrawn prefix overruns the field
        (2, &[0, 0, 0, 4, 0x40, 1, 1, 3], (3, 6)), // ORIGIN 3
        (2, &[0, 0, 0, 4, 0xc0, 1, 1, 0], (3, 4)), // ORIGIN marked optional
        (2, &[0, 0, 0, 8, 0x40, 1, 1, 0, 0x40, 1, 1, 0], (3, 1)), // ORIGIN twice
        (2, &[0, 0, 0, 4, 0x40, 1, 1, 0, 24, 10, 0, 0], (3, 3)), // NLRI without AS_PATH
        (2, &[0, 0, 0, 5, 0x40, 2, 2, 2, 1], (3, 11)), // AS_PATH segment overruns
        (2, &[0, 0, 0, 4, 0x40, 3, 1, 9], (3, 5)), // NEXT_HOP of 1 byte
        (2, &[0, 0, 0, 0, 33, 1, 2, 3, 4, 5], (3, 10)), // /33
    ];
    for (ty, body, want) in cases {
        let e = decode(&msg(*ty, body), true).unwrap_err();
        assert_eq!((e.code, e.sub), *want, "type {ty} {body:?}: {e}");
    }
    assert_eq!(frame_len(&[0u8; 19]).unwrap_err().sub, 1);
    let mut long = msg(4, &[]);
    long[16..18].copy_from_slice(&4097u16.to_be_bytes());
    assert_eq!(frame_len(&long).unwrap_err().sub, 2);
    assert_eq!(frame_len(&long[..18]).unwrap(), None);
}
