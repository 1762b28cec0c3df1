//! Helpers shared by the unit tests of the pure core (compiled only for tests).

use crate::config::Config;
use crate::model::{Actual, Addr, Link, LinkKind};

/// A validated configuration from command-line arguments (no environment).
pub fn config(args: &[&str]) -> Config {
    let crate::cli::Parsed::Args(a) = crate::cli::parse(args.iter().copied(), &|_| None).unwrap()
    else {
        panic!("{args:?} is not a run command line")
    };
    Config::from_args(&a).unwrap()
}

/// The local host as the kernel shows it: eth0 (ifindex 2, MTU 1500) holding 192.168.1.10/24, and
/// fd00:1::10/64 too when `v6`.
pub fn host(v6: bool) -> Actual {
    let mut addrs = vec![Addr {
        index: 2,
        addr: "192.168.1.10/24".parse().unwrap(),
    }];
    if v6 {
        addrs.push(Addr {
            index: 2,
            addr: "fd00:1::10/64".parse().unwrap(),
        });
    }
    Actual {
        links: vec![Link {
            index: 2,
            name: "eth0".into(),
            kind: LinkKind::Other(String::new()),
            group: 0,
            mtu: 1500,
            up: true,
            tunnel: None,
        }],
        addrs,
        ..Actual::default()
    }
}
