//! netlink::genl (to be written)
