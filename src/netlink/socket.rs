//! A blocking netlink socket: sequence numbers, acknowledgements, dumps and batches.
//!
//! Shell module: every function here performs socket I/O and decides nothing about what is sent.
//! Callers hand in [`Request`]s (message type, request-specific flags such as
//! `NLM_F_CREATE|NLM_F_EXCL`, and the payload after `nlmsghdr`, built by the pure builders in
//! [`super::rtnl`], [`super::genl`] and [`super::fou`]); this module alone adds `NLM_F_REQUEST`,
//! `NLM_F_ACK` or `NLM_F_DUMP`, the sequence number and the length, and matches replies to
//! requests by sequence number and port ID.
//!
//! Design notes:
//!
//! * `NETLINK_EXT_ACK` is requested, so kernel error messages ("Unknown device type", "Invalid
//!   attribute") travel with the errno into [`NetlinkError::Kernel`] and from there into the
//!   daemon's logs (SPEC R-2). `NETLINK_CAP_ACK` is requested too, so an error ack does not
//!   echo the whole request back: this keeps acks small when a [`NlSocket::batch`] has hundreds
//!   in flight.
//! * Reads are bounded by `SO_RCVTIMEO` ([`RECV_TIMEOUT`]): a kernel that never answers costs one
//!   timeout, not a hung daemon. Replies that do not carry our port ID or the sequence number we
//!   wait for (for example a late answer to a request that timed out) are skipped.
//! * Dumps are read until `NLMSG_DONE`; a dump in which any part carries `NLM_F_DUMP_INTR` (the
//!   kernel's table changed while it was dumping) is read to its end and then started again, at
//!   most [`DUMP_ATTEMPTS`] times (SPEC T-10).
//! * Dump messages are handed to the caller as each datagram arrives ([`NlSocket::dump_with`],
//!   [`NlSocket::dump_fold`]), borrowed from the receive buffer, so that a caller decoding them
//!   into compact types never holds the raw dump: at 5,000 tunnels the link dump alone is about
//!   6 MiB of kernel messages. [`NlSocket::dump`] collects owned copies for small dumps.
//! * A batch packs many requests, each with its own sequence number and `NLM_F_ACK`, into as few
//!   `send` calls as fit in [`BATCH_BYTES`] and [`BATCH_MESSAGES`], then collects one ack per
//!   request. The kernel handles the messages of one datagram in order and keeps going after a
//!   failed one (`netlink_rcv_skb`), so each request gets its own result. The message cap keeps
//!   the acks of one send well inside the receive buffer: an ack the kernel cannot queue is dropped
//!   (`ENOBUFS`), and its request's outcome would then be unknown.
//! * Dump datagrams are peeked first (`MSG_PEEK|MSG_TRUNC`) so that a message larger than the
//!   buffer (a link with many attributes) grows the buffer instead of being cut, as iproute2 does.
//!   Acks are small and read directly.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::Emitable;
use netlink_sys::{Socket, SocketAddr};

pub use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};

// uapi <linux/netlink.h>: message flags and types.
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_MULTI: u16 = 0x02;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_ROOT: u16 = 0x100;
const NLM_F_MATCH: u16 = 0x200;
const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;
// Flags of an NLMSG_ERROR message (same bits as ROOT/MATCH, other meaning).
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
// uapi <linux/netlink.h> enum nlmsgerr_attrs.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_MISS_TYPE: u16 = 5;

/// Flags a caller may put into [`Request::flags`] (uapi `<linux/netlink.h>`).
pub mod flags {
    /// Replace an existing object.
    pub const NLM_F_REPLACE: u16 = 0x100;
    /// Fail if the object exists.
    pub const NLM_F_EXCL: u16 = 0x200;
    /// Create the object if it does not exist.
    pub const NLM_F_CREATE: u16 = 0x400;
    /// Add to the end of a list.
    pub const NLM_F_APPEND: u16 = 0x800;
}

/// Longest wait for one datagram from the kernel. Requests are handled inside `send`, so acks
/// are queued by the time we read; this bounds only kernel bugs and very slow dumps.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// A dump interrupted (`NLM_F_DUMP_INTR`) this many times in a row is reported as an error.
pub const DUMP_ATTEMPTS: usize = 5;
/// Largest datagram a batch sends.
pub const BATCH_BYTES: usize = 32 * 1024;
/// Most requests a batch has in flight (one ack each must fit in the receive buffer).
pub const BATCH_MESSAGES: usize = 128;
/// Receive buffer asked for (`SO_RCVBUFFORCE`, else `SO_RCVBUF` up to `rmem_max`).
const RCVBUF_BYTES: libc::c_int = 4 * 1024 * 1024;
/// Initial size of the receive buffer in user space; grows for larger datagrams.
const RECV_BUF: usize = 64 * 1024;

/// One request, without its `nlmsghdr`: the socket adds length, sequence number, port ID and
/// `NLM_F_REQUEST` plus `NLM_F_ACK` or `NLM_F_DUMP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `nlmsg_type` (an `RTM_*` value or a generic netlink family ID).
    pub msg_type: u16,
    /// Request-specific flags ([`flags`]): `NLM_F_CREATE`, `NLM_F_EXCL`, `NLM_F_REPLACE`.
    pub flags: u16,
    /// Everything after `nlmsghdr` (family header and attributes).
    pub payload: Vec<u8>,
}

impl AsRef<Request> for Request {
    fn as_ref(&self) -> &Request {
        self
    }
}

impl Request {
    /// Bytes this request takes in a datagram: `nlmsghdr`, payload and padding.
    pub fn encoded_len(&self) -> usize {
        nlmsg_align(NLMSG_HDRLEN + self.payload.len())
    }

    /// A request whose payload is `body` serialized.
    pub fn new(msg_type: u16, flags: u16, body: &impl Emitable) -> Request {
        let mut payload = vec![0; body.buffer_len()];
        body.emit(&mut payload);
        Request {
            msg_type,
            flags,
            payload,
        }
    }
}

/// One message received from the kernel, without its `nlmsghdr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// Everything after `nlmsghdr`.
    pub payload: Vec<u8>,
}

/// What [`NlSocket::dump_with`] hands its callback, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpPart<'a> {
    /// An attempt begins: the first, or a repeat after the previous one was interrupted
    /// (`NLM_F_DUMP_INTR`). Whatever the callback kept from an earlier attempt is out of date.
    Start,
    /// One message of the dump (never `NLMSG_DONE` or `NLMSG_ERROR`).
    Message(Message<'a>),
}

/// One message received from the kernel, without its `nlmsghdr`, borrowed from the receive
/// buffer (the borrowed form of [`Reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// Everything after `nlmsghdr`.
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// An owned copy.
    pub fn to_reply(self) -> Reply {
        Reply {
            msg_type: self.msg_type,
            flags: self.flags,
            payload: self.payload.to_vec(),
        }
    }
}

/// A failed netlink exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetlinkError {
    /// A system call on the socket failed (a receive timeout is `EAGAIN` from `recv`).
    Io {
        /// The system call.
        call: &'static str,
        /// Positive errno.
        errno: i32,
    },
    /// The kernel rejected the request.
    Kernel {
        /// Positive errno.
        errno: i32,
        /// The extended ack message, empty when the kernel sent none.
        extack: String,
    },
    /// A reply could not be decoded.
    Malformed(String),
    /// Every attempt at a dump was interrupted by concurrent changes (`NLM_F_DUMP_INTR`).
    Interrupted,
}

impl NetlinkError {
    /// Positive errno, 0 for [`NetlinkError::Malformed`]; an interrupted dump counts as `EINTR`.
    pub fn errno(&self) -> i32 {
        match self {
            NetlinkError::Io { errno, .. } | NetlinkError::Kernel { errno, .. } => *errno,
            NetlinkError::Malformed(_) => 0,
            NetlinkError::Interrupted => libc::EINTR,
        }
    }

    /// The extended ack text or a description of the failure (without the errno text).
    pub fn message(&self) -> String {
        match self {
            NetlinkError::Io { call, .. } => call.to_string(),
            NetlinkError::Kernel { extack, .. } => extack.clone(),
            NetlinkError::Malformed(m) => m.clone(),
            NetlinkError::Interrupted => format!("dump interrupted {DUMP_ATTEMPTS} times"),
        }
    }

    /// Worth retrying soon: timeouts, lost acks, busy kernel, interrupted dumps.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.errno(),
            libc::EAGAIN | libc::ENOBUFS | libc::EBUSY | libc::EINTR | libc::ETIMEDOUT
        )
    }

    fn io(call: &'static str, e: &io::Error) -> NetlinkError {
        NetlinkError::Io {
            call,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetlinkError::Io { call, errno } => {
                write!(f, "{call}: {}", io::Error::from_raw_os_error(*errno))
            }
            NetlinkError::Kernel { errno, extack } => {
                write!(f, "{}", io::Error::from_raw_os_error(*errno))?;
                if !extack.is_empty() {
                    write!(f, ": {extack}")?;
                }
                Ok(())
            }
            NetlinkError::Malformed(m) => write!(f, "malformed netlink reply: {m}"),
            NetlinkError::Interrupted => {
                write!(
                    f,
                    "dump interrupted {DUMP_ATTEMPTS} times by concurrent changes"
                )
            }
        }
    }
}

impl std::error::Error for NetlinkError {}

/// A message as found in a received datagram (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawMessage<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub payload: &'a [u8],
}

impl<'a> RawMessage<'a> {
    fn message(self) -> Message<'a> {
        Message {
            msg_type: self.msg_type,
            flags: self.flags,
            payload: self.payload,
        }
    }

    fn to_reply(self) -> Reply {
        self.message().to_reply()
    }
}

fn nlmsg_align(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends `req` with its `nlmsghdr` to `buf`.
pub(crate) fn encode(buf: &mut Vec<u8>, req: &Request, flags: u16, seq: u32) {
    let len = NLMSG_HDRLEN + req.payload.len();
    // A netlink message is at most one datagram; our requests are a few hundred bytes.
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len32.to_ne_bytes());
    buf.extend_from_slice(&req.msg_type.to_ne_bytes());
    buf.extend_from_slice(&(flags | req.flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the sender's port.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&req.payload);
    buf.resize(nlmsg_align(buf.len()), 0);
}

/// Splits a datagram into its messages.
pub(crate) fn split(mut data: &[u8]) -> Result<Vec<RawMessage<'_>>, NetlinkError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < NLMSG_HDRLEN {
            return Err(NetlinkError::Malformed(format!(
                "{} trailing bytes",
                data.len()
            )));
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(NetlinkError::Malformed(format!(
                "message length {len} in a datagram of {}",
                data.len()
            )));
        }
        out.push(RawMessage {
            msg_type: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            pid: u32::from_ne_bytes([data[12], data[13], data[14], data[15]]),
            payload: &data[NLMSG_HDRLEN..len],
        });
        data = &data[nlmsg_align(len).min(data.len())..];
    }
    Ok(out)
}

/// Decodes an `NLMSG_ERROR` (or `NLMSG_DONE`) payload: `Ok(())` for an ack, the errno and extack
/// text for a failure.
pub(crate) fn ack_result(msg: &RawMessage<'_>) -> Result<(), NetlinkError> {
    let p = msg.payload;
    if p.len() < 4 {
        // A bare NLMSG_DONE from an old kernel carries no code.
        return if msg.msg_type == NLMSG_DONE {
            Ok(())
        } else {
            Err(NetlinkError::Malformed("short NLMSG_ERROR".into()))
        };
    }
    let code = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    if code == 0 {
        return Ok(());
    }
    let mut extack = String::new();
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // NLMSG_ERROR: the TLVs follow the echoed request (only its header when capped).
        // NLMSG_DONE: they follow the code.
        let tlv_start = if msg.msg_type == NLMSG_ERROR {
            let echoed = if msg.flags & NLM_F_CAPPED != 0 || p.len() < 8 {
                NLMSG_HDRLEN
            } else {
                u32::from_ne_bytes([p[4], p[5], p[6], p[7]]) as usize
            };
            4 + nlmsg_align(echoed)
        } else {
            4
        };
        extack = extack_text(p.get(tlv_start..).unwrap_or(&[]));
    }
    Err(NetlinkError::Kernel {
        errno: code.saturating_neg(),
        extack,
    })
}

/// The human-readable part of extended ack TLVs.
fn extack_text(mut tlvs: &[u8]) -> String {
    let mut msg = String::new();
    let mut missing = None;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            break;
        }
        let value = &tlvs[4..len];
        match kind {
            NLMSGERR_ATTR_MSG => {
                let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                msg = String::from_utf8_lossy(&value[..end]).into_owned();
            }
            NLMSGERR_ATTR_MISS_TYPE if value.len() >= 4 => {
                missing = Some(u32::from_ne_bytes([value[0], value[1], value[2], value[3]]));
            }
            _ => {}
        }
        tlvs = &tlvs[nlmsg_align(len).min(tlvs.len())..];
    }
    match (msg.is_empty(), missing) {
        (true, Some(t)) => format!("missing attribute {t}"),
        (false, Some(t)) => format!("{msg} (missing attribute {t})"),
        _ => msg,
    }
}

/// Handles one received datagram of the dump with sequence number `seq` sent from port `pid`:
/// hands our messages to `each`, notes `NLM_F_DUMP_INTR` in `interrupted`, and returns `Ok(true)`
/// once the dump ended (`NLMSG_DONE`, or an ack of 0), the kernel's error if it failed.
pub(crate) fn dump_datagram(
    data: &[u8],
    pid: u32,
    seq: u32,
    interrupted: &mut bool,
    each: &mut dyn FnMut(DumpPart<'_>),
) -> Result<bool, NetlinkError> {
    for m in split(data)? {
        if m.pid != pid || m.seq != seq {
            log::debug!("netlink: skipping reply seq {} pid {}", m.seq, m.pid);
            continue;
        }
        *interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
        match m.msg_type {
            NLMSG_DONE => return ack_result(&m).map(|()| true),
            NLMSG_ERROR => {
                ack_result(&m)?;
                // An ack of 0 inside a dump ends it as well.
                return Ok(true);
            }
            _ => {
                if m.flags & NLM_F_MULTI == 0 {
                    log::debug!("netlink: dump part without NLM_F_MULTI");
                }
                each(DumpPart::Message(m.message()));
            }
        }
    }
    Ok(false)
}

/// Runs dump attempts (`once`: `Ok(true)` when interrupted) until one is not interrupted, at most
/// [`DUMP_ATTEMPTS`], announcing each to `each` with [`DumpPart::Start`].
fn retry_dump(
    msg_type: u16,
    each: &mut dyn FnMut(DumpPart<'_>),
    mut once: impl FnMut(&mut dyn FnMut(DumpPart<'_>)) -> Result<bool, NetlinkError>,
) -> Result<(), NetlinkError> {
    for attempt in 1..=DUMP_ATTEMPTS {
        each(DumpPart::Start);
        if !once(each)? {
            return Ok(());
        }
        log::debug!("netlink: dump of type {msg_type} interrupted (attempt {attempt})");
    }
    Err(NetlinkError::Interrupted)
}

/// [`NlSocket::dump_fold`] over any `dump` that reports like [`NlSocket::dump_with`].
fn fold_dump<A>(
    dump: impl FnOnce(&mut dyn FnMut(DumpPart<'_>)) -> Result<(), NetlinkError>,
    mut start: impl FnMut() -> A,
    mut each: impl FnMut(&mut A, Message<'_>),
) -> Result<A, NetlinkError> {
    let mut acc = None;
    dump(&mut |part| match part {
        DumpPart::Start => {
            // Drop the interrupted attempt's accumulator before building the next one.
            acc = None;
            acc = Some(start());
        }
        DumpPart::Message(m) => {
            if let Some(a) = acc.as_mut() {
                each(a, m);
            }
        }
    })?;
    // A dump announces an attempt before it can succeed, so this is always `Some`.
    acc.ok_or_else(|| NetlinkError::Malformed("dump without an attempt".into()))
}

/// Groups requests into datagrams: returns the index ranges of `reqs` for each send.
pub(crate) fn chunks<R: AsRef<Request>>(
    reqs: &[R],
    max_bytes: usize,
    max_msgs: usize,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, r) in reqs.iter().enumerate() {
        let len = r.as_ref().encoded_len();
        if i > start && (bytes + len > max_bytes || i - start >= max_msgs) {
            out.push((start, i));
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < reqs.len() {
        out.push((start, reqs.len()));
    }
    out
}

/// A blocking netlink socket bound to a kernel-assigned port.
pub struct NlSocket {
    sock: Socket,
    pid: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl fmt::Debug for NlSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NlSocket")
            .field("pid", &self.pid)
            .field("seq", &self.seq)
            .finish()
    }
}

impl NlSocket {
    /// Opens, binds and configures a socket of `protocol` ([`NETLINK_ROUTE`],
    /// [`NETLINK_GENERIC`]).
    pub fn open(protocol: isize) -> Result<NlSocket, NetlinkError> {
        let mut sock = Socket::new(protocol).map_err(|e| NetlinkError::io("socket", &e))?;
        let addr = sock.bind_auto().map_err(|e| NetlinkError::io("bind", &e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| NetlinkError::io("connect", &e))?;
        // Extended acks and capped acks are optional (kernel >= 4.12 / 4.2): without them errors
        // carry no text and acks echo the request; both still work.
        if let Err(e) = sock.set_ext_ack(true) {
            log::debug!("netlink: NETLINK_EXT_ACK unavailable: {e}");
        }
        if let Err(e) = sock.set_cap_ack(true) {
            log::debug!("netlink: NETLINK_CAP_ACK unavailable: {e}");
        }
        if protocol == NETLINK_ROUTE {
            // Strict checking lets the kernel filter route dumps by protocol (>= 4.20); we
            // filter again on our side, so an older kernel only costs a longer dump.
            if let Err(e) = sock.set_netlink_get_strict_chk(true) {
                log::debug!("netlink: NETLINK_GET_STRICT_CHK unavailable: {e}");
            }
        }
        let fd = sock.as_raw_fd();
        if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF_BYTES).is_err() {
            // Without CAP_NET_ADMIN only SO_RCVBUF (capped at rmem_max) is allowed.
            if let Err(e) = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &RCVBUF_BYTES) {
                log::debug!("netlink: SO_RCVBUF: {e}");
            }
        }
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
            .map_err(|e| NetlinkError::io("setsockopt SO_RCVTIMEO", &e))?;
        Ok(NlSocket {
            sock,
            pid: addr.port_number(),
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// The port ID the kernel assigned to this socket.
    pub fn port_id(&self) -> u32 {
        self.pid
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Reserves `n` consecutive sequence numbers and returns the first.
    fn reserve_seqs(&mut self, n: usize) -> u32 {
        let first = self.next_seq();
        if first.checked_add(n as u32).is_none() {
            // Restart below the wrap so that a batch's numbers stay consecutive.
            self.seq = 0;
            return self.reserve_seqs(n);
        }
        self.seq = first + n as u32 - 1;
        first
    }

    fn send(&self, data: &[u8]) -> Result<(), NetlinkError> {
        if log::log_enabled!(log::Level::Trace) {
            log::trace!("netlink send {} bytes: {}", data.len(), hex(data));
        }
        loop {
            match self.sock.send(data, 0) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => {
                    return Err(NetlinkError::Malformed(format!(
                        "short send: {n} of {} bytes",
                        data.len()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetlinkError::io("send", &e)),
            }
        }
    }

    /// Receives one datagram into `self.buf`. With `peek`, the datagram's size is learnt first
    /// and the buffer grown to hold it.
    fn recv(&mut self, peek: bool) -> Result<(), NetlinkError> {
        if peek {
            let mut probe: Vec<u8> = Vec::new();
            let n = self.recv_raw(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC)?;
            if n > self.buf.capacity() {
                self.buf.reserve(n);
            }
        }
        let cap = self.buf.capacity().max(RECV_BUF);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(cap);
        let res = self.recv_raw(&mut buf, libc::MSG_TRUNC);
        self.buf = buf;
        let n = res?;
        if n > self.buf.len() {
            // The tail is lost; remember the size so that the next datagram fits.
            let got = self.buf.len();
            self.buf.reserve(n);
            return Err(NetlinkError::Malformed(format!(
                "datagram of {n} bytes cut at {got}"
            )));
        }
        if log::log_enabled!(log::Level::Trace) {
            log::trace!("netlink recv {} bytes: {}", n, hex(&self.buf));
        }
        Ok(())
    }

    fn recv_raw(&self, buf: &mut Vec<u8>, flags: libc::c_int) -> Result<usize, NetlinkError> {
        loop {
            match self.sock.recv_from(buf, flags) {
                Ok((n, from)) => {
                    if from.port_number() != 0 {
                        // Not from the kernel: drop it and read again.
                        log::debug!(
                            "netlink: ignoring datagram from port {}",
                            from.port_number()
                        );
                        if flags & libc::MSG_PEEK != 0 {
                            let mut sink: Vec<u8> = Vec::new();
                            let _ = self.sock.recv(&mut sink, libc::MSG_TRUNC);
                        }
                        buf.clear();
                        continue;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetlinkError::io("recv", &e)),
            }
        }
    }

    /// Sends `req` with `NLM_F_ACK` and waits for the ack. Messages that arrive before the ack
    /// (the answer to a `GET` that is not a dump, for example) are returned.
    pub fn request(&mut self, req: &Request) -> Result<Vec<Reply>, NetlinkError> {
        let seq = self.next_seq();
        let mut out = Vec::with_capacity(NLMSG_HDRLEN + req.payload.len());
        encode(&mut out, req, NLM_F_REQUEST | NLM_F_ACK, seq);
        self.send(&out)?;
        let mut replies = Vec::new();
        loop {
            self.recv(false)?;
            for m in split(&self.buf)? {
                if m.pid != self.pid || m.seq != seq {
                    log::debug!("netlink: skipping reply seq {} pid {}", m.seq, m.pid);
                    continue;
                }
                match m.msg_type {
                    NLMSG_ERROR => return ack_result(&m).map(|()| replies),
                    NLMSG_DONE => {}
                    _ => replies.push(m.to_reply()),
                }
            }
        }
    }

    /// Sends `req` with `NLM_F_DUMP` and returns an owned copy of every message of the reply.
    /// Dumps marked `NLM_F_DUMP_INTR` are repeated (at most [`DUMP_ATTEMPTS`] times). Meant for
    /// small dumps; large ones are better decoded as they arrive ([`NlSocket::dump_fold`]).
    pub fn dump(&mut self, req: &Request) -> Result<Vec<Reply>, NetlinkError> {
        self.dump_fold(req, Vec::new, |replies, m| replies.push(m.to_reply()))
    }

    /// Sends `req` with `NLM_F_DUMP` and folds its messages into an accumulator as they arrive:
    /// every attempt starts from a fresh `start()` and `each` sees the attempt's messages in
    /// order; an attempt marked `NLM_F_DUMP_INTR` is dropped, accumulator included, and the dump
    /// repeated (at most [`DUMP_ATTEMPTS`] times). Returns the accumulator of the attempt that was
    /// not interrupted.
    pub fn dump_fold<A>(
        &mut self,
        req: &Request,
        start: impl FnMut() -> A,
        each: impl FnMut(&mut A, Message<'_>),
    ) -> Result<A, NetlinkError> {
        fold_dump(|parts| self.dump_with(req, parts), start, each)
    }

    /// Sends `req` with `NLM_F_DUMP` and hands `each` a [`DumpPart::Start`] before every attempt
    /// and a [`DumpPart::Message`] for every message of it, as each datagram arrives. Replies
    /// that are not ours (port ID, sequence number) are skipped. An attempt in which any part
    /// carries `NLM_F_DUMP_INTR` is read to its end and repeated, at most [`DUMP_ATTEMPTS`]
    /// times, then [`NetlinkError::Interrupted`]. An `NLMSG_ERROR` or a failed `NLMSG_DONE` ends
    /// the dump with that error (extended ack included).
    pub fn dump_with(
        &mut self,
        req: &Request,
        mut each: impl FnMut(DumpPart<'_>),
    ) -> Result<(), NetlinkError> {
        retry_dump(req.msg_type, &mut each, |parts| self.dump_once(req, parts))
    }

    /// One attempt of a dump; `Ok(true)` when it was interrupted.
    fn dump_once(
        &mut self,
        req: &Request,
        each: &mut dyn FnMut(DumpPart<'_>),
    ) -> Result<bool, NetlinkError> {
        let seq = self.next_seq();
        let mut out = Vec::with_capacity(NLMSG_HDRLEN + req.payload.len());
        encode(&mut out, req, NLM_F_REQUEST | NLM_F_DUMP, seq);
        self.send(&out)?;
        let mut interrupted = false;
        loop {
            self.recv(true)?;
            if dump_datagram(&self.buf, self.pid, seq, &mut interrupted, each)? {
                return Ok(interrupted);
            }
        }
    }

    /// Sends every request with `NLM_F_ACK`, packed into as few datagrams as fit (see the module
    /// notes), and returns one result per request, in order. Requests are handled by the kernel
    /// in order; a failed one does not stop the rest.
    pub fn batch<R: AsRef<Request>>(&mut self, reqs: &[R]) -> Vec<Result<(), NetlinkError>> {
        let mut results: Vec<Option<Result<(), NetlinkError>>> = vec![None; reqs.len()];
        for (start, end) in chunks(reqs, BATCH_BYTES, BATCH_MESSAGES) {
            let first = self.reserve_seqs(end - start);
            let mut out = Vec::with_capacity(BATCH_BYTES);
            for (i, r) in reqs[start..end].iter().enumerate() {
                encode(
                    &mut out,
                    r.as_ref(),
                    NLM_F_REQUEST | NLM_F_ACK,
                    first + i as u32,
                );
            }
            if let Err(e) = self.send(&out) {
                for slot in &mut results[start..end] {
                    *slot = Some(Err(e.clone()));
                }
                continue;
            }
            let mut pending = end - start;
            while pending > 0 {
                if let Err(e) = self.recv(false) {
                    // Timeout or lost acks (ENOBUFS): the outcome of the rest is unknown.
                    for slot in results[start..end].iter_mut().filter(|s| s.is_none()) {
                        *slot = Some(Err(e.clone()));
                    }
                    break;
                }
                let msgs = match split(&self.buf) {
                    Ok(m) => m,
                    Err(e) => {
                        log::debug!("netlink: batch: {e}");
                        continue;
                    }
                };
                for m in msgs {
                    if m.pid != self.pid || m.msg_type != NLMSG_ERROR {
                        continue;
                    }
                    let Some(i) = m.seq.checked_sub(first).map(|d| d as usize) else {
                        continue;
                    };
                    if i >= end - start || results[start + i].is_some() {
                        continue;
                    }
                    results[start + i] = Some(ack_result(&m));
                    pending -= 1;
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(NetlinkError::Malformed("no ack".into()))))
            .collect()
    }
}

fn setsockopt<T>(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live, initialised `T` for the duration of the call and the
    // length passed is exactly `size_of::<T>()`, so the kernel reads only memory we own. `fd` is
    // the socket owned by the caller's `Socket`, open for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(n: usize) -> Request {
        Request {
            msg_type: 16,
            flags: flags::NLM_F_CREATE,
            payload: vec![7; n],
        }
    }

    #[test]
    fn encode_pads_and_sets_header() {
        let mut buf = Vec::new();
        encode(&mut buf, &req(5), NLM_F_REQUEST | NLM_F_ACK, 42);
        assert_eq!(buf.len(), 24);
        assert_eq!(&buf[0..4], &21u32.to_ne_bytes());
        assert_eq!(&buf[4..6], &16u16.to_ne_bytes());
        assert_eq!(&buf[6..8], &(0x405u16).to_ne_bytes());
        assert_eq!(&buf[8..12], &42u32.to_ne_bytes());
        assert_eq!(&buf[16..21], &[7; 5]);
        assert_eq!(&buf[21..], &[0; 3]);
        let msgs = split(&buf).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].payload, &[7; 5]);
        assert_eq!(msgs[0].seq, 42);
    }

    #[test]
    fn split_rejects_bad_lengths() {
        assert!(split(&[0; 10]).is_err());
        let mut buf = Vec::new();
        encode(&mut buf, &req(4), 0, 1);
        buf[0] = 200;
        assert!(split(&buf).is_err());
        buf[0] = 3;
        assert!(split(&buf).is_err());
    }

    #[test]
    fn split_several() {
        let mut buf = Vec::new();
        encode(&mut buf, &req(1), 0, 1);
        encode(&mut buf, &req(8), 0, 2);
        encode(&mut buf, &req(0), 0, 3);
        let m = split(&buf).unwrap();
        assert_eq!(m.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(m[1].payload.len(), 8);
    }

    /// An error ack as a 6.1 kernel sends it with NETLINK_CAP_ACK and NETLINK_EXT_ACK for
    /// `ip link add ... type ipip` on a kernel without ipip: code -95, capped request header,
    /// then NLMSGERR_ATTR_MSG.
    #[rustfmt::skip]
    #[test]
    fn ack_with_extack() {
        let payload: Vec<u8> = [
            &(-95i32).to_ne_bytes()[..],                        // error
            &[0xb0, 0, 0, 0, 0x10, 0, 0x05, 0x06,               // echoed nlmsghdr (capped)
              0, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x18, 0x00, 0x01, 0x00][..],                      // NLMSGERR_ATTR_MSG, len 24
            b"Unknown device type\0",                           // text + NUL
        ].concat();
        let m = RawMessage { msg_type: NLMSG_ERROR, flags: NLM_F_CAPPED | NLM_F_ACK_TLVS, seq: 1,
                             pid: 1, payload: &payload };
        assert_eq!(ack_result(&m), Err(NetlinkError::Kernel {
            errno: 95, extack: "Unknown device type".into() }));
        let e = ack_result(&m).unwrap_err();
        assert_eq!(e.to_string(), "Operation not supported (os error 95): Unknown device type");
    }

    #[test]
    fn ack_uncapped_skips_echoed_request() {
        // Without CAP_ACK the whole request (here 20 bytes) is echoed before the TLVs.
        let mut payload = (-22i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&20u32.to_ne_bytes());
        payload.extend_from_slice(&[0; 16]);
        payload.extend_from_slice(&[0x08, 0, 0x05, 0, 0x03, 0, 0, 0]); // MISS_TYPE 3
        let m = RawMessage {
            msg_type: NLMSG_ERROR,
            flags: NLM_F_ACK_TLVS,
            seq: 1,
            pid: 1,
            payload: &payload,
        };
        assert_eq!(
            ack_result(&m),
            Err(NetlinkError::Kernel {
                errno: 22,
                extack: "missing attribute 3".into()
            })
        );
    }

    #[test]
    fn ack_zero_and_done() {
        let ok = 0i32.to_ne_bytes();
        let m = RawMessage {
            msg_type: NLMSG_ERROR,
            flags: 0,
            seq: 1,
            pid: 1,
            payload: &ok,
        };
        assert_eq!(ack_result(&m), Ok(()));
        let bad = (-16i32).to_ne_bytes();
        let d = RawMessage {
            msg_type: NLMSG_DONE,
            flags: 0,
            seq: 1,
            pid: 1,
            payload: &bad,
        };
        assert_eq!(ack_result(&d).unwrap_err().errno(), 16);
        let d = RawMessage {
            msg_type: NLMSG_DONE,
            flags: 0,
            seq: 1,
            pid: 1,
            payload: &[],
        };
        assert_eq!(ack_result(&d), Ok(()));
    }

    #[test]
    fn chunking_respects_bytes_and_count() {
        let reqs: Vec<Request> = (0..10).map(|_| req(84)).collect(); // 100 bytes each
        assert_eq!(chunks(&reqs, 1000, 100), vec![(0, 10)]);
        assert_eq!(
            chunks(&reqs, 350, 100),
            vec![(0, 3), (3, 6), (6, 9), (9, 10)]
        );
        assert_eq!(chunks(&reqs, 10_000, 4), vec![(0, 4), (4, 8), (8, 10)]);
        // A request larger than the limit still goes out, alone.
        assert_eq!(chunks(&reqs[..2], 50, 10), vec![(0, 1), (1, 2)]);
        assert_eq!(chunks::<Request>(&[], 50, 10), vec![]);
    }

    /// One message as the kernel sends it: header with `pid` and `seq`, then `payload`.
    fn kmsg(msg_type: u16, flags: u16, seq: u32, pid: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            &Request {
                msg_type,
                flags: 0,
                payload: payload.to_vec(),
            },
            flags,
            seq,
        );
        buf[12..16].copy_from_slice(&pid.to_ne_bytes());
        buf
    }

    const PID: u32 = 77;
    const NEWLINK: u16 = 16;

    /// A scripted dump: attempt `n` receives `attempts[n]`, one datagram after another, through
    /// the same code as the socket (`retry_dump`, `dump_datagram`, `fold_dump`). Returns what the
    /// fold kept (the payloads' first bytes) and how many attempts started.
    fn scripted(attempts: &[Vec<Vec<u8>>]) -> (Result<Vec<u8>, NetlinkError>, usize) {
        let mut n = 0;
        let mut starts = 0;
        let res = fold_dump(
            |parts| {
                retry_dump(NEWLINK, parts, |each| {
                    let seq = 100 + n as u32;
                    let script = &attempts[n.min(attempts.len() - 1)];
                    n += 1;
                    let mut interrupted = false;
                    for d in script {
                        // The script is written for seq 100; later attempts get later numbers
                        // (a datagram that does not split is passed on as it is).
                        let d: Vec<u8> = match split(d) {
                            Ok(msgs) => msgs
                                .iter()
                                .flat_map(|m| {
                                    let s = if m.seq == 100 { seq } else { m.seq };
                                    kmsg(m.msg_type, m.flags, s, m.pid, m.payload)
                                })
                                .collect(),
                            Err(_) => d.clone(),
                        };
                        if dump_datagram(&d, PID, seq, &mut interrupted, each)? {
                            return Ok(interrupted);
                        }
                    }
                    panic!("script without an end");
                })
            },
            || {
                starts += 1;
                Vec::new()
            },
            |acc: &mut Vec<u8>, m| {
                assert_eq!(m.msg_type, NEWLINK);
                acc.push(m.payload[0]);
            },
        );
        (res, starts)
    }

    fn done(seq: u32) -> Vec<u8> {
        kmsg(NLMSG_DONE, NLM_F_MULTI, seq, PID, &0i32.to_ne_bytes())
    }

    /// Messages reach the fold in order, datagram by datagram; replies for another sequence
    /// number or port are skipped; `NLMSG_DONE` ends the dump.
    #[test]
    fn dump_streams_our_messages_in_order() {
        let d1 = [
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[1, 0, 0, 0]),
            kmsg(NEWLINK, NLM_F_MULTI, 99, PID, &[9, 0, 0, 0]),
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID + 1, &[9, 0, 0, 0]),
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[2, 0, 0, 0]),
        ]
        .concat();
        let d2 = [
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[3, 0, 0, 0]),
            done(100),
        ]
        .concat();
        assert_eq!(scripted(&[vec![d1, d2]]), (Ok(vec![1, 2, 3]), 1));
    }

    /// An attempt with `NLM_F_DUMP_INTR` on any part is read to its end, then dropped with its
    /// accumulator; the next attempt's messages are all that is returned.
    #[test]
    fn dump_interrupted_attempt_is_dropped() {
        let intr = vec![
            [
                kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[1, 0, 0, 0]),
                kmsg(
                    NEWLINK,
                    NLM_F_MULTI | NLM_F_DUMP_INTR,
                    100,
                    PID,
                    &[2, 0, 0, 0],
                ),
            ]
            .concat(),
            done(100),
        ];
        let clean = vec![[
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[5, 0, 0, 0]),
            done(100),
        ]
        .concat()];
        assert_eq!(
            scripted(&[intr.clone(), intr.clone(), clean]),
            (Ok(vec![5]), 3)
        );
        // NLM_F_DUMP_INTR on NLMSG_DONE alone counts too.
        let late = vec![[
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[1, 0, 0, 0]),
            kmsg(
                NLMSG_DONE,
                NLM_F_MULTI | NLM_F_DUMP_INTR,
                100,
                PID,
                &0i32.to_ne_bytes(),
            ),
        ]
        .concat()];
        let clean = vec![[
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[6, 0, 0, 0]),
            done(100),
        ]
        .concat()];
        assert_eq!(scripted(&[late, clean]), (Ok(vec![6]), 2));
        // Always interrupted: an error after DUMP_ATTEMPTS attempts.
        assert_eq!(
            scripted(&[intr]),
            (Err(NetlinkError::Interrupted), DUMP_ATTEMPTS)
        );
    }

    /// An error in place of the dump (here EOPNOTSUPP with an extended ack, capped) or in its
    /// `NLMSG_DONE` fails it; an ack of 0 ends it like `NLMSG_DONE`.
    #[test]
    fn dump_errors_and_ack_end() {
        let mut err = (-95i32).to_ne_bytes().to_vec();
        err.extend_from_slice(&kmsg(18, 0x301, 100, 0, &[])[..16]);
        err.extend_from_slice(&[12, 0, 1, 0]);
        err.extend_from_slice(b"nope\0\0\0\0");
        let e = kmsg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 100, PID, &err);
        let (res, starts) = scripted(&[vec![e]]);
        assert_eq!(
            res,
            Err(NetlinkError::Kernel {
                errno: 95,
                extack: "nope".into()
            })
        );
        assert_eq!(starts, 1);
        let bad_done = kmsg(NLMSG_DONE, NLM_F_MULTI, 100, PID, &(-16i32).to_ne_bytes());
        let d = [
            kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[1, 0, 0, 0]),
            bad_done,
        ]
        .concat();
        assert_eq!(scripted(&[vec![d]]).0.unwrap_err().errno(), 16);
        let ack = kmsg(NLMSG_ERROR, 0, 100, PID, &0i32.to_ne_bytes());
        let d = [kmsg(NEWLINK, NLM_F_MULTI, 100, PID, &[4, 0, 0, 0]), ack].concat();
        assert_eq!(scripted(&[vec![d]]), (Ok(vec![4]), 1));
        // A datagram that does not split is an error, not a silent end.
        let mut cut = done(100);
        cut[0] = 200;
        assert!(matches!(
            scripted(&[vec![cut]]).0,
            Err(NetlinkError::Malformed(_))
        ));
    }

    #[test]
    fn transient_errors() {
        assert!(NetlinkError::Io {
            call: "recv",
            errno: libc::EAGAIN
        }
        .is_transient());
        assert!(NetlinkError::Interrupted.is_transient());
        assert!(!NetlinkError::Kernel {
            errno: libc::EPERM,
            extack: String::new()
        }
        .is_transient());
    }
}
