//! Golden-byte tests: our messages against what iproute2 sends for the same object, and our
//! parsers against what the kernel answers. No root needed (STYLE.md §4).
//!
//! Each golden names the command it was derived from, the iproute2 and kernel versions and how the
//! bytes were captured, and lists the deliberate differences from iproute2's bytes. Goldens hold
//! the bytes after `nlmsghdr` (the `genlmsghdr` included for generic netlink), one attribute per
//! commented line; large opaque attributes of kernel answers span several lines under one comment.
//! Header flags are tested separately ([`full_flags`]), since sequence numbers and port IDs differ
//! from run to run.

mod addr;
mod fou;
mod ipvs;
mod link;
mod route;
mod rule;

use super::socket::{encode, Request};

/// `nlmsg_flags` as the socket sends `req` when it asks for an ack (`NLM_F_REQUEST|NLM_F_ACK`).
fn full_flags(req: &Request) -> u16 {
    let mut buf = Vec::new();
    encode(&mut buf, req, 0x01 | 0x04, 1);
    u16::from_ne_bytes([buf[6], buf[7]])
}
