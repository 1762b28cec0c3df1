//! Netlink: the socket (shell) and the message builders/parsers (core) for rtnetlink and the
//! generic netlink families "fou" and "IPVS".

pub mod fou;
pub mod genl;
pub mod ipvs;
pub mod rtnl;
pub mod socket;

#[cfg(test)]
mod tests;
