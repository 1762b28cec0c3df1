//! netlink::ipvs (to be written)
