//! sd_notify(3) written by hand: tells systemd when the daemon is ready, what it is doing, that it is
//! still alive (watchdog) and that it is stopping (SPEC O-2).
//!
//! Shell module. The protocol is one datagram per notification, `KEY=VALUE` lines, sent to the
//! `AF_UNIX` socket named in `NOTIFY_SOCKET` (a path, or an abstract name written with a leading
//! `@`). There is no reply and no retry: a lost notification is at worst a restart by the watchdog.
//! With `NotifyAccess=main` in the unit, systemd only accepts datagrams from the main process; the
//! kernel reports the thread group id as the sender, so any thread of the daemon may send.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset (run by hand, in a container, in
//! tests), and nothing here may panic or end the daemon: a failed notification is logged and the
//! daemon carries on. The parsers ([`parse_notify_socket`], [`parse_watchdog_interval`]) are pure
//! and take the environment values as parameters.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Why a notification could not be sent, or `NOTIFY_SOCKET` could not be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is set but empty.
    Empty,
    /// `NOTIFY_SOCKET` names something other than an absolute path or an `@` abstract name
    /// (for example `vsock:…`, which systemd supports for VMs but a node daemon never gets).
    Unsupported(String),
    /// The name is not a valid `AF_UNIX` address (too long, or contains a NUL byte).
    Address(String, io::Error),
    /// Creating the sending socket failed.
    Socket(io::Error),
    /// `sendto(2)` failed (the listener is gone, or its buffer is full).
    Send(io::Error),
    /// The kernel accepted only part of the datagram.
    Short { sent: usize, len: usize },
}

impl fmt::Display for NotifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyError::Empty => write!(f, "notify socket: NOTIFY_SOCKET is empty"),
            NotifyError::Unsupported(s) => {
                write!(
                    f,
                    "notify socket {s:?}: not a path or an abstract socket name"
                )
            }
            NotifyError::Address(s, e) => write!(f, "notify socket {s:?}: {e}"),
            NotifyError::Socket(e) => write!(f, "notify socket: create: {e}"),
            NotifyError::Send(e) => write!(f, "notify socket: send: {e}"),
            NotifyError::Short { sent, len } => {
                write!(
                    f,
                    "notify socket: send: short write ({sent} of {len} bytes)"
                )
            }
        }
    }
}

impl std::error::Error for NotifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotifyError::Address(_, e) | NotifyError::Socket(e) | NotifyError::Send(e) => Some(e),
            _ => None,
        }
    }
}

impl NotifyError {
    /// Whether sending again later may succeed. Only a send can fail transiently (`EAGAIN` on a
    /// full listener queue, `ENOBUFS`); a bad `NOTIFY_SOCKET` stays bad.
    pub fn is_transient(&self) -> bool {
        matches!(self, NotifyError::Send(_) | NotifyError::Short { .. })
    }
}

/// The address systemd listens on, as parsed from `NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A filesystem socket, e.g. `/run/systemd/notify`.
    Path(std::path::PathBuf),
    /// An abstract socket; the name is given without the leading `@` (systemd writes `@` for the
    /// NUL byte that starts an abstract `sun_path`).
    Abstract(Vec<u8>),
}

/// Parses a `NOTIFY_SOCKET` value. Pure.
///
/// Accepted: an absolute path, or `@name` for an abstract socket (what systemd ≥ 243 hands to
/// services in containers and what `systemd-run` may use). Anything else is refused rather than
/// guessed at, as sd_notify(3) does.
pub fn parse_notify_socket(value: &OsStr) -> Result<NotifyAddr, NotifyError> {
    let bytes = value.as_bytes();
    match bytes.first() {
        None => Err(NotifyError::Empty),
        Some(b'@') => Ok(NotifyAddr::Abstract(bytes[1..].to_vec())),
        Some(b'/') => Ok(NotifyAddr::Path(value.into())),
        Some(_) => Err(NotifyError::Unsupported(
            value.to_string_lossy().into_owned(),
        )),
    }
}

/// Sends sd_notify messages to systemd, or does nothing when not run by systemd.
///
/// Cheap to share between threads (`&Notifier` is enough: sending takes `&self`), so a watchdog
/// thread and the main loop can use the same one.
#[derive(Debug)]
pub struct Notifier {
    /// `None`: `NOTIFY_SOCKET` was unset (or unusable); every method is a no-op.
    target: Option<(SocketAddr, UnixDatagram)>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Builds a notifier from the environment's `NOTIFY_SOCKET`. Unset → disabled. A value that
    /// cannot be used is logged as a warning and also gives a disabled notifier: the daemon works
    /// without notifications, and systemd will say that readiness never came.
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::disabled();
        };
        match Notifier::new(&value) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("{e}; systemd notifications are off");
                Notifier::disabled()
            }
        }
    }

    /// Builds a notifier for one `NOTIFY_SOCKET` value (see [`parse_notify_socket`]) and opens an
    /// unbound datagram socket to send from.
    pub fn new(notify_socket: &OsStr) -> Result<Notifier, NotifyError> {
        let addr = match parse_notify_socket(notify_socket)? {
            NotifyAddr::Path(p) => SocketAddr::from_pathname(&p),
            NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
        .map_err(|e| NotifyError::Address(notify_socket.to_string_lossy().into_owned(), e))?;
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some((addr, sock)),
        })
    }

    /// Whether notifications are sent at all (`NOTIFY_SOCKET` was set and usable).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one raw notification (`KEY=VALUE` lines separated by `\n`) as a single datagram.
    /// `Ok(())` without sending when disabled.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let Some((addr, sock)) = &self.target else {
            return Ok(());
        };
        let sent = sock
            .send_to_addr(state.as_bytes(), addr)
            .map_err(NotifyError::Send)?;
        if sent != state.len() {
            return Err(NotifyError::Short {
                sent,
                len: state.len(),
            });
        }
        Ok(())
    }

    /// `READY=1` with a `STATUS=` line: start-up is complete (SPEC O-2: after the first full
    /// reconcile). systemd then runs units ordered after this one.
    pub fn ready(&self, status: &str) {
        self.send_logged(&format!("READY=1\nSTATUS={}", status_value(status)));
    }

    /// `STATUS=`: free text shown by `systemctl status`. Newlines are replaced by spaces, since
    /// each line of a notification is a separate assignment.
    pub fn status(&self, text: &str) {
        self.send_logged(&format!("STATUS={}", status_value(text)));
    }

    /// `WATCHDOG=1`: the daemon is alive. Send at the interval from [`watchdog_interval`], and only
    /// while the main loop is making progress — a ping from a thread that no longer checks the
    /// main loop hides a hang from systemd.
    pub fn watchdog(&self) {
        self.send_logged("WATCHDOG=1");
    }

    /// `STOPPING=1`: shutdown has begun (SIGTERM/SIGINT).
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1\nSTATUS=stopping");
    }

    /// `EXTEND_TIMEOUT_USEC=`: asks systemd for `by` more time before it gives up on the current
    /// start-up or shutdown (TimeoutStartSec=, TimeoutStopSec=), e.g. while the API server is not
    /// reachable yet and READY=1 must wait for the first full reconcile.
    pub fn extend_timeout(&self, by: Duration) {
        self.send_logged(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
    }

    /// Sends and logs a failure at warn; used by the typed methods so callers need not handle
    /// errors that they could not act on anyway.
    fn send_logged(&self, state: &str) {
        if let Err(e) = self.send(state) {
            log::warn!("{e}");
        }
    }
}

/// A `STATUS=` value on one line.
fn status_value(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// The watchdog ping interval from the environment (`WATCHDOG_USEC`, `WATCHDOG_PID`), half the
/// timeout systemd enforces, as sd_watchdog_enabled(3) recommends. `None`: no watchdog for this
/// process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var_os("WATCHDOG_USEC")?;
    let pid = std::env::var_os("WATCHDOG_PID");
    parse_watchdog_interval(
        usec.to_str().unwrap_or(""),
        pid.as_deref().map(|p| p.to_str().unwrap_or("")),
        std::process::id(),
    )
}

/// Parses `WATCHDOG_USEC` and `WATCHDOG_PID` for the process `own_pid` and returns half the
/// watchdog timeout. Pure.
///
/// `None` when the value is not a positive integer, or when `WATCHDOG_PID` is set and names
/// another process (systemd sets it so that children inheriting the environment do not ping
/// on the service's behalf; a malformed PID is treated the same way).
pub fn parse_watchdog_interval(
    watchdog_usec: &str,
    watchdog_pid: Option<&str>,
    own_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = watchdog_pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    let usec: u64 = watchdog_usec.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_path() {
        assert_eq!(
            parse_notify_socket(OsStr::new("/run/systemd/notify")).unwrap(),
            NotifyAddr::Path("/run/systemd/notify".into())
        );
    }

    #[test]
    fn notify_socket_abstract() {
        assert_eq!(
            parse_notify_socket(OsStr::new("@/org/freedesktop/systemd1/notify/123")).unwrap(),
            NotifyAddr::Abstract(b"/org/freedesktop/systemd1/notify/123".to_vec())
        );
    }

    #[test]
    fn notify_socket_refused() {
        assert!(matches!(
            parse_notify_socket(OsStr::new("")),
            Err(NotifyError::Empty)
        ));
        assert!(matches!(
            parse_notify_socket(OsStr::new("relative/sock")),
            Err(NotifyError::Unsupported(_))
        ));
        assert!(matches!(
            parse_notify_socket(OsStr::new("vsock:2:1234")),
            Err(NotifyError::Unsupported(_))
        ));
    }

    #[test]
    fn notify_socket_path_too_long() {
        let long = format!("/{}", "x".repeat(200));
        let err = Notifier::new(OsStr::new(&long)).unwrap_err();
        assert!(matches!(err, NotifyError::Address(..)), "{err}");
        assert!(!err.is_transient());
    }

    #[test]
    fn disabled_notifier_sends_nothing() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        assert!(n.send("READY=1").is_ok());
        n.ready("x");
        n.status("x");
        n.watchdog();
        n.stopping();
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(status_value("a\nb\r\nc"), "a b  c");
    }

    #[test]
    fn watchdog_half_interval() {
        assert_eq!(
            parse_watchdog_interval("60000000", None, 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog_interval("60000000", Some("42"), 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_watchdog_interval("3", None, 1),
            Some(Duration::from_micros(1))
        );
    }

    #[test]
    fn watchdog_other_pid() {
        assert_eq!(parse_watchdog_interval("60000000", Some("41"), 42), None);
        assert_eq!(parse_watchdog_interval("60000000", Some("x"), 42), None);
        assert_eq!(parse_watchdog_interval("60000000", Some(""), 42), None);
    }

    #[test]
    fn watchdog_bad_usec() {
        assert_eq!(parse_watchdog_interval("0", None, 42), None);
        assert_eq!(parse_watchdog_interval("", None, 42), None);
        assert_eq!(parse_watchdog_interval("-5", None, 42), None);
        assert_eq!(parse_watchdog_interval("60s", None, 42), None);
        assert_eq!(
            parse_watchdog_interval("99999999999999999999999", None, 42),
            None
        );
    }
}
