//! Golden-byte tests of the netlink message builders and parsers (no root needed).

mod ipvs;
