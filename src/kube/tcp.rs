//! The API client's TCP transport: ureq's plain TCP connection plus TCP keepalive (SPEC S-5).
//!
//! Shell module. A watch is a long GET whose answer may stay silent for minutes; when the server
//! or a middlebox vanishes without a FIN or RST (a half-open connection), only the read timeout
//! (the watch's `timeoutSeconds` + 30 s) would notice. With `SO_KEEPALIVE` and the timers below,
//! the kernel probes an idle connection after [`IDLE`] and gives up after [`COUNT`] unanswered
//! probes [`INTERVAL`] apart: a dead peer is noticed within 35 s and the blocked read fails.
//!
//! ureq 3 has no keepalive option and does not export its `TcpTransport`, so this is a small
//! copy of it (connect, timeouts per read and write, the pooled-connection probe), chained
//! before ureq's rustls connector as in ureq's `DefaultConnector` (without its proxy
//! connectors: the client never uses a proxy).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};
use ureq::{Error, Timeout};

/// Idle time before the first probe.
pub const IDLE: u32 = 15;
/// Time between probes.
pub const INTERVAL: u32 = 5;
/// Unanswered probes before the connection is dropped.
pub const COUNT: u32 = 4;

/// Opens TCP connections with keepalive on (see the module notes).
#[derive(Debug, Default)]
pub struct KeepAliveConnector;

/// A TCP connection with keepalive on.
pub struct KeepAliveTransport {
    /// Shared (weakly) with the agent's shutdown handle, so `Agent::shutdown` can interrupt a
    /// blocked read from another thread.
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
}

impl std::fmt::Debug for KeepAliveTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAliveTransport")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

fn setsockopt(s: &TcpStream, level: libc::c_int, name: libc::c_int, v: u32) -> io::Result<()> {
    let v = v as libc::c_int;
    // SAFETY: `v` is a live c_int for the duration of the call and the length passed is its
    // size, so the kernel reads only that; the fd belongs to `s`, open for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Turns keepalive on with our timers.
pub fn keepalive(s: &TcpStream) -> io::Result<()> {
    setsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, IDLE)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, INTERVAL)?;
    setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, COUNT)
}

/// ureq's mapping of a socket error: a timeout is its own error with the reason it stands for.
fn io_err(e: io::Error, reason: Timeout) -> Error {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout(reason),
        _ => Error::Io(e),
    }
}

impl Connector<()> for KeepAliveConnector {
    type Out = KeepAliveTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Self::Out>, Error> {
        let limit = details.timeout.not_zero().map(|t| *t);
        let mut last = None;
        let mut stream = None;
        for addr in details.addrs.iter() {
            let res = match limit {
                Some(t) => TcpStream::connect_timeout(addr, t),
                None => TcpStream::connect(addr),
            };
            match res {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(io_err(e, Timeout::Connect)),
            }
        }
        let Some(stream) = stream else {
            return Err(last.unwrap_or_else(|| {
                Error::Io(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "no address to connect to",
                ))
            }));
        };
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        keepalive(&stream)?;
        let stream = Arc::new(stream);
        let handle: Weak<dyn ShutdownHandle> = Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>;
        (details.register_shutdown)(handle)?;
        let c = details.config;
        Ok(Some(KeepAliveTransport {
            stream,
            buffers: LazyBuffers::new(c.input_buffer_size(), c.output_buffer_size()),
        }))
    }
}

impl Transport for KeepAliveTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let t = timeout.for_write();
        if t.after.is_zero() {
            return Err(Error::Timeout(t.reason));
        }
        self.stream.set_write_timeout(t.not_zero().map(|d| *d))?;
        let out = &self.buffers.output()[..amount];
        (&*self.stream)
            .write_all(out)
            .map_err(|e| io_err(e, t.reason))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let t = timeout.for_read();
        if t.after.is_zero() {
            return Err(Error::Timeout(t.reason));
        }
        self.stream.set_read_timeout(t.not_zero().map(|d| *d))?;
        let input = self.buffers.input_append_buf();
        let n = loop {
            match (&*self.stream).read(input) {
                // A signal (SIGHUP, SIGTERM reach the process): read again; SO_RCVTIMEO still
                // bounds the wait.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| io_err(e, t.reason))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// A pooled connection is reusable when nothing is waiting on it and it is not closed (as
    /// ureq's own probe: a non-blocking read that must find nothing).
    fn is_open(&mut self) -> bool {
        let s = &*self.stream;
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let open = matches!((&*s).read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        open && s.set_nonblocking(false).is_ok()
    }
}
