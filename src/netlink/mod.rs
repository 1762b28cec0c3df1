//! Netlink: the socket (shell) and the message builders/parsers (core) for rtnetlink and the
//! generic netlink families "fou" and "IPVS", and [`NetlinkKernel`], the [`crate::apply::Kernel`]
//! over them (shell).
//!
//! * [`socket`] (shell): blocking socket, sequence numbers, acks with extack, dumps, batches;
//! * [`rtnl`] (core): links (ipip, ip6tnl), addresses, routes, rules;
//! * [`genl`] (core, plus the [`genl::Genl`] socket with its family cache): generic netlink;
//! * [`fou`] (core): the "fou" family;
//! * [`kernel`] (shell): [`NetlinkKernel`].

pub mod fou;
pub mod genl;
pub mod ipvs;
pub mod kernel;
pub mod rtnl;
pub mod socket;

pub use kernel::NetlinkKernel;

#[cfg(test)]
mod tests;
