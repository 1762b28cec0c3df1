//! netlink::socket (to be written)
