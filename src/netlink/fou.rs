//! netlink::fou (to be written)
