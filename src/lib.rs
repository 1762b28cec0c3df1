//! kr-tunneld: kube-router's overlay tunnels and IPVS tunnel-mode DSR as a small, synchronous daemon.
//!
//! The crate is a functional core with a thin imperative shell (see STYLE.md in the design notes):
//!
//! * core (pure, no I/O, no clock): [`cli`], [`config`], [`kube::types`], [`kube::watch`],
//!   [`model`], [`nodes`], [`reconcile`], [`adopt`], [`dsr`] and the netlink message builders/parsers;
//! * shell (one operation per function, decides nothing): [`kube::client`], [`netlink::socket`],
//!   [`apply`], [`podns`], [`systemd`], [`daemon`] and `main.rs`.

pub mod adopt;
pub mod apply;
pub mod bgp;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dsr;
pub mod health;
pub mod kube;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod nodes;
pub mod podns;
pub mod reconcile;
pub mod statefile;
pub mod systemd;
#[cfg(test)]
mod testutil;
