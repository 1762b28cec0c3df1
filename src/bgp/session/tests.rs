//! The session machine driven with injected time: no sockets, no clock.

use super::*;

fn local(gr: bool) -> Local {
    Local {
        asn: 64512,
        id: Ipv4Addr::new(10, 0, 0, 1),
        hold: 90,
        gr_time: gr.then_some(90),
        families: vec![Family::V4, Family::V6],
    }
}

fn routes() -> Routes {
    Routes {
        nets: vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:244:1::/64".parse().unwrap(),
        ],
        nh4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        nh6: Some("fd00::1".parse().unwrap()),
    }
}

fn their_open(id: [u8; 4], hold: u16, gr: bool) -> Msg {
    Msg::Open(Open {
        asn: 64512,
        hold,
        id: Ipv4Addr::from(id),
        families: vec![Family::V4, Family::V6],
        mp: true,
        as4: true,
        route_refresh: true,
        gr: gr.then(|| GracefulRestart {
            restarting: false,
            time: 90,
            families: vec![],
        }),
    })
}

/// Decoded messages sent on `conn`.
fn sent(actions: &[Action], conn: u64) -> Vec<Msg> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(c, b) if *c == conn => Some(codec::decode(b, true).unwrap()),
            _ => None,
        })
        .collect()
}

fn states(actions: &[Action]) -> Vec<State> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::State(s, _) = a {
                Some(*s)
            } else {
                None
            }
        })
        .collect()
}

struct T {
    p: Peer,
    l: Local,
    r: Routes,
    now: Instant,
}

impl T {
    fn new(gr: bool) -> T {
        let now = Instant::now();
        T {
            p: Peer::new("10.0.0.2".parse().unwrap(), "n2", 64512, now),
            l: local(gr),
            r: routes(),
            now,
        }
    }
    fn ev(&mut self, e: Event) -> Vec<Action> {
        self.p.handle(e, &self.l, &self.r, self.now)
    }
    fn at(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
    }
    /// Connect outgoing on conn 1 and exchange OPEN and KEEPALIVE.
    fn establish(&mut self, hold: u16, gr: bool) -> Vec<Action> {
        let a = self.ev(Event::Tick);
        assert_eq!(
            a,
            vec![
                Action::Connect,
                Action::State(State::Connect, String::new())
            ]
        );
        let a = self.ev(Event::Connected {
            conn: 1,
            outgoing: true,
        });
        assert!(matches!(sent(&a, 1)[..], [Msg::Open(_)]));
        let a = self.ev(Event::Received(1, their_open([10, 0, 0, 2], hold, gr)));
        assert_eq!(sent(&a, 1), vec![Msg::Keepalive]);
        self.ev(Event::Received(1, Msg::Keepalive))
    }
}

#[test]
fn establishes_and_announces_routes_then_end_of_rib() {
    let mut t = T::new(false);
    let a = t.establish(90, false);
    assert_eq!(t.p.state, State::Established);
    assert_eq!(states(&a), vec![State::Established]);
    let msgs = sent(&a, 1);
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    let Msg::Update(u) = &msgs[0] else { panic!() };
    assert_eq!(u.nlri, vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(
        (u.origin, u.as_path.as_deref(), u.local_pref),
        (Some(0), Some(&[][..]), Some(100))
    );
    assert_eq!(u.next_hop, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert!(matches!(
        &msgs[1],
        Msg::Update(Update {
            eor: Some(Family::V4),
            ..
        })
    ));
    let Msg::Update(u) = &msgs[2] else { panic!() };
    assert_eq!(u.mp_next_hop, Some("fd00::1".parse().unwrap()));
    assert!(matches!(
        &msgs[3],
        Msg::Update(Update {
            eor: Some(Family::V6),
            ..
        })
    ));
}

#[test]
fn open_carries_capabilities_and_r_bit_only_first_time() {
    let mut t = T::new(true);
    t.ev(Event::Tick);
    let a = t.ev(Event::Connected {
        conn: 1,
        outgoing: true,
    });
    let Msg::Open(o) = &sent(&a, 1)[0] else {
        panic!()
    };
    assert!(o.as4 && o.route_refresh && o.asn == 64512 && o.hold == 90);
    assert_eq!(o.families, vec![Family::V4, Family::V6]);
    let gr = o.gr.as_ref().unwrap();
    assert!(
        gr.restarting
            && gr.time == 90
            && gr.families == vec![(Family::V4, true), (Family::V6, true)]
    );
    t.ev(Event::Received(1, their_open([10, 0, 0, 2], 90, true)));
    t.ev(Event::Received(1, Msg::Keepalive));
    t.ev(Event::Closed(1, "reset".into()));
    t.at(10);
    t.ev(Event::Tick);
    let a = t.ev(Event::Connected {
        conn: 2,
        outgoing: true,
    });
    let Msg::Open(o) = &sent(&a, 2)[0] else {
        panic!()
    };
    assert!(!o.gr.as_ref().unwrap().restarting);
}

#[test]
fn hold_time_is_negotiated_and_keepalives_follow() {
    let mut t = T::new(false);
    t.establish(9, false);
    t.at(3);
    let a = t.ev(Event::Tick);
    assert_eq!(sent(&a, 1), vec![Msg::Keepalive]);
    t.at(3);
    t.ev(Event::Received(1, Msg::Keepalive)); // resets the hold timer
    t.at(8);
    let a = t.ev(Event::Tick);
    assert_eq!(t.p.state, State::Established, "{a:?}");
    t.at(1);
    let a = t.ev(Event::Tick);
    assert_eq!(sent(&a, 1).last(), Some(&Msg::Notification(4, 0, vec![])));
    assert!(a.contains(&Action::Close(1)));
    assert_eq!(states(&a), vec![State::Active]);
}

#[test]
fn hold_time_zero_means_no_keepalives() {
    let mut t = T::new(false);
    t.establish(0, false);
    assert_eq!(t.p.deadline(), None);
    t.at(100_000);
    assert_eq!(t.ev(Event::Tick), vec![]);
}

#[test]
fn bad_opens_are_refused_with_the_right_code() {
    for (open, want) in [
        (
            Msg::Open(Open {
                asn: 65000,
                ..match their_open([10, 0, 0, 2], 90, false) {
                    Msg::Open(o) => o,
                    _ => unreachable!(),
                }
            }),
            (2, 2),
        ),
        (their_open([10, 0, 0, 1], 90, false), (2, 3)), // our own ID
        (their_open([0, 0, 0, 0], 90, false), (2, 3)),
        (their_open([10, 0, 0, 2], 2, false), (2, 6)),
        (Msg::Keepalive, (5, 1)),
    ] {
        let mut t = T::new(false);
        t.ev(Event::Tick);
        t.ev(Event::Connected {
            conn: 1,
            outgoing: true,
        });
        let a = t.ev(Event::Received(1, open));
        assert_eq!(sent(&a, 1), vec![Msg::Notification(want.0, want.1, vec![])]);
        assert_eq!(t.p.state, State::Active);
    }
}

#[test]
fn notification_from_peer_closes_and_retries_with_backoff() {
    let mut t = T::new(false);
    t.establish(90, false);
    t.ev(Event::Received(
        1,
        Msg::Update(Update {
            nlri: vec!["10.244.2.0/24".parse().unwrap()],
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 2)),
            origin: Some(0),
            as_path: Some(vec![]),
            ..Update::default()
        }),
    ));
    assert_eq!(t.p.received.len(), 1);
    let a = t.ev(Event::Received(1, Msg::Notification(6, 2, vec![])));
    assert!(a.contains(&Action::Close(1)));
    assert!(t.p.received.is_empty());
    let Some(Action::State(State::Active, why)) = a.last() else {
        panic!("{a:?}")
    };
    assert!(why.contains("6/2"), "{why}");
    // Backoff 1, 2, 4, 8, 8 s.
    let mut gaps = Vec::new();
    for _ in 0..5 {
        let due = t.p.deadline().unwrap();
        gaps.push(due.duration_since(t.now).as_secs());
        t.now = due;
        assert!(t.ev(Event::Tick).contains(&Action::Connect));
        t.ev(Event::ConnectFailed("refused".into()));
    }
    assert_eq!(gaps, vec![1, 2, 4, 8, 8]);
}

#[test]
fn collision_keeps_the_connection_of_the_higher_id() {
    // We are 10.0.0.1. Peer 10.0.0.2 has the higher ID: its connection (incoming) stays.
    // Peer 10.0.0.0 ... use 9.0.0.9 for a lower ID: our outgoing stays.
    for (their_id, survivor) in [([10, 0, 0, 2], 2u64), ([9, 0, 0, 9], 1u64)] {
        let mut t = T::new(false);
        t.ev(Event::Tick);
        t.ev(Event::Connected {
            conn: 1,
            outgoing: true,
        });
        t.ev(Event::Connected {
            conn: 2,
            outgoing: false,
        });
        t.ev(Event::Received(1, their_open(their_id, 90, false)));
        let a = t.ev(Event::Received(2, their_open(their_id, 90, false)));
        let loser = 3 - survivor;
        assert_eq!(
            sent(&a, loser),
            vec![Msg::Notification(6, 7, vec![])],
            "{a:?}"
        );
        assert!(a.contains(&Action::Close(loser)));
        t.ev(Event::Received(survivor, Msg::Keepalive));
        assert_eq!(t.p.state, State::Established);
    }
}

#[test]
fn established_session_refuses_a_second_one_unless_graceful_restart() {
    let mut t = T::new(false);
    t.establish(90, false);
    t.ev(Event::Connected {
        conn: 2,
        outgoing: false,
    });
    let a = t.ev(Event::Received(2, their_open([10, 0, 0, 2], 90, false)));
    assert_eq!(sent(&a, 2), vec![Msg::Notification(6, 7, vec![])]);
    assert_eq!(t.p.state, State::Established);
    // With GR, the new connection is the peer restarting: the old one goes quietly.
    let mut t = T::new(true);
    t.establish(90, true);
    t.ev(Event::Connected {
        conn: 2,
        outgoing: false,
    });
    let a = t.ev(Event::Received(2, their_open([10, 0, 0, 2], 90, true)));
    assert!(
        sent(&a, 1).is_empty() && a.contains(&Action::Close(1)),
        "{a:?}"
    );
    assert_eq!(sent(&a, 2), vec![Msg::Keepalive]);
}

#[test]
fn route_changes_withdraw_and_announce() {
    let mut t = T::new(false);
    t.establish(90, false);
    let mut r = routes();
    r.nets[0] = "10.244.9.0/24".parse().unwrap();
    let a = t.p.set_routes(&r);
    let m = sent(&a, 1);
    assert!(
        matches!(&m[0], Msg::Update(u) if u.withdrawn == vec!["10.244.1.0/24".parse::<IpNet>().unwrap()])
    );
    assert!(
        matches!(&m[1], Msg::Update(u) if u.nlri == vec!["10.244.9.0/24".parse::<IpNet>().unwrap()])
    );
    assert_eq!(m.len(), 2);
    // A new next hop re-announces the family.
    r.nh6 = Some("fd00::9".parse().unwrap());
    let m = sent(&t.p.set_routes(&r), 1);
    assert!(matches!(&m[..], [Msg::Update(u)] if u.mp_next_hop == r.nh6));
    // Route refresh resends.
    let a = t.ev(Event::Received(1, Msg::RouteRefresh(Some(Family::V4))));
    assert!(matches!(&sent(&a, 1)[..], [Msg::Update(u)] if u.nlri.len() == 1));
}

#[test]
fn announcement_that_disagrees_with_the_node_is_warned_once() {
    let mut t = T::new(false);
    t.p.expect = (
        vec!["10.244.2.0/24".parse().unwrap()],
        vec!["10.0.0.2".parse().unwrap()],
    );
    t.establish(90, false);
    let upd = |p: &str, nh: [u8; 4]| {
        Msg::Update(Update {
            nlri: vec![p.parse().unwrap()],
            next_hop: Some(Ipv4Addr::from(nh)),
            origin: Some(0),
            as_path: Some(vec![]),
            ..Update::default()
        })
    };
    assert!(t
        .ev(Event::Received(1, upd("10.244.2.0/24", [10, 0, 0, 2])))
        .is_empty());
    let a = t.ev(Event::Received(1, upd("0.0.0.0/0", [10, 0, 0, 2])));
    assert!(
        matches!(&a[..], [Action::Warn(w)] if w.contains("0.0.0.0/0")),
        "{a:?}"
    );
    assert!(t
        .ev(Event::Received(1, upd("0.0.0.0/0", [10, 0, 0, 2])))
        .is_empty());
    let a = t.ev(Event::Received(1, upd("10.244.2.0/24", [10, 9, 9, 9])));
    assert!(matches!(&a[..], [Action::Warn(_)]));
    assert_eq!(t.p.received.len(), 2);
}

#[test]
fn stop_closes_quietly_with_graceful_restart_else_ceases() {
    let mut t = T::new(true);
    t.establish(90, true);
    let a = t.p.stop(None, t.now);
    assert_eq!(a[0], Action::Close(1));
    assert!(sent(&a, 1).is_empty());
    let mut t = T::new(false);
    t.establish(90, false);
    let a = t.p.stop(Some(2), t.now);
    assert_eq!(sent(&a, 1), vec![Msg::Notification(6, 2, vec![])]);
    assert_eq!(t.p.deadline(), None);
}

fn node(name: &str, ip: &str) -> NodeBgp {
    let ip: IpAddr = ip.parse().unwrap();
    NodeBgp {
        name: name.into(),
        primary: Some(ip),
        ..NodeBgp::default()
    }
}

#[test]
fn peers_are_chosen_as_kube_router_does() {
    let me = node("a", "10.0.0.1");
    let mut nodes = vec![
        me.clone(),
        node("b", "10.0.0.2"),
        node("c", "fd00::3"),
        node("d", "10.0.0.4"),
    ];
    let (asn, w) = choose(&me, &nodes, 64512, true).unwrap();
    assert_eq!(asn, 64512);
    assert_eq!(
        w.iter().map(|w| w.node.as_str()).collect::<Vec<_>>(),
        ["b", "d"]
    );
    // Not full mesh: our node.asn is required; peers with another or no ASN are skipped.
    assert!(choose(&me, &nodes, 64512, false).is_err());
    let mut me2 = me.clone();
    me2.asn = Some("65001".into());
    nodes[1].asn = Some("65001".into());
    nodes[3].asn = Some("65002".into());
    let (asn, w) = choose(&me2, &nodes, 64512, false).unwrap();
    assert_eq!(
        (asn, w.len(), w[0].node.as_str(), w[0].asn),
        (65001, 1, "b", 65001)
    );
    // A route-reflector client peers only with servers; a server is refused.
    let mut me3 = me.clone();
    me3.rr_client = Some("1".into());
    nodes[3].rr_server = Some("1".into());
    let (_, w) = choose(&me3, &nodes, 64512, true).unwrap();
    assert_eq!(w.iter().map(|w| w.node.as_str()).collect::<Vec<_>>(), ["d"]);
    me3.rr_server = Some("1".into());
    assert!(choose(&me3, &nodes, 64512, true).is_err());
}

#[test]
fn router_id_defaults_to_the_node_ipv4() {
    let mut n = node("a", "10.0.0.1");
    assert_eq!(router_id("", &n), Ok(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(router_id("1.2.3.4", &n), Ok(Ipv4Addr::new(1, 2, 3, 4)));
    assert!(router_id("x", &n).is_err());
    assert!(router_id("generate", &n).is_ok());
    n.primary = Some("fd00::1".parse().unwrap());
    assert!(router_id("", &n).is_err());
    n.best.0 = Some(Ipv4Addr::new(10, 0, 0, 9));
    assert_eq!(router_id("", &n), Ok(Ipv4Addr::new(10, 0, 0, 9)));
}
