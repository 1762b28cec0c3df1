//! netlink::rtnl (to be written)
