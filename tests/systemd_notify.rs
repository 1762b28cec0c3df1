//! sd_notify (SPEC O-2): a datagram socket stands in for systemd's NOTIFY_SOCKET, on a path and
//! as an abstract name, and receives what `Notifier` sends. `from_env` and
//! `watchdog_interval` are checked in a child process (this test binary re-run with the
//! variables set), so no test changes the environment of the others.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kr_tunneld::systemd::{Notifier, NotifyError};

/// A listening socket that plays systemd, and the NOTIFY_SOCKET value naming it.
struct Listener {
    sock: UnixDatagram,
    value: String,
    path: Option<PathBuf>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    fn path(tag: &str) -> Listener {
        let path =
            std::env::temp_dir().join(format!("kr-notify-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        let value = path.to_str().unwrap().to_owned();
        Listener::ready(sock, value, Some(path))
    }

    fn abstract_(tag: &str) -> Listener {
        let name = format!("kr-tunneld/test/notify/{tag}/{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Listener::ready(sock, format!("@{name}"), None)
    }

    fn ready(sock: UnixDatagram, value: String, path: Option<PathBuf>) -> Listener {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Listener { sock, value, path }
    }

    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("no notification within 10 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn notifier(&self) -> Notifier {
        Notifier::new(OsStr::new(&self.value)).unwrap()
    }
}

/// Every typed message, in the order a daemon sends them.
fn check_messages(l: &Listener) {
    let n = l.notifier();
    assert!(n.is_enabled());
    n.status("connecting to https://192.0.2.10:6443");
    assert_eq!(l.recv(), "STATUS=connecting to https://192.0.2.10:6443");
    n.extend_timeout(Duration::from_secs(30));
    assert_eq!(l.recv(), "EXTEND_TIMEOUT_USEC=30000000");
    n.ready("watching 3 nodes");
    assert_eq!(l.recv(), "READY=1\nSTATUS=watching 3 nodes");
    n.watchdog();
    assert_eq!(l.recv(), "WATCHDOG=1");
    n.status("two\nlines");
    assert_eq!(l.recv(), "STATUS=two lines");
    n.stopping();
    assert_eq!(l.recv(), "STOPPING=1\nSTATUS=stopping");
    n.send("RELOADING=1").unwrap();
    assert_eq!(l.recv(), "RELOADING=1");
}

#[test]
fn path_socket_receives_every_message() {
    check_messages(&Listener::path("path"));
}

#[test]
fn abstract_socket_receives_every_message() {
    check_messages(&Listener::abstract_("abstract"));
}

/// One notifier shared by threads (the watchdog thread and the main loop).
#[test]
fn notifier_is_shared_between_threads() {
    let l = Listener::abstract_("threads");
    let n = l.notifier();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| n.watchdog());
        }
    });
    for _ in 0..4 {
        assert_eq!(l.recv(), "WATCHDOG=1");
    }
}

/// Nobody listens: send reports the error, the typed methods log it and return.
#[test]
fn missing_listener_is_an_error_not_a_panic() {
    let gone = Listener::path("gone");
    let n = gone.notifier();
    drop(gone); // socket file removed
    let err = n.send("READY=1").unwrap_err();
    assert!(matches!(err, NotifyError::Send(_)), "{err}");
    assert!(
        err.to_string().starts_with("notify socket: send: "),
        "{err}"
    );
    n.ready("x");
    n.watchdog();

    let n = Notifier::new(OsStr::new("@kr-tunneld/test/nobody-listens")).unwrap();
    assert!(n.send("WATCHDOG=1").is_err());
}

// --- from the environment, in a child process ---

const CHILD: &str = "KR_TUNNELD_TEST_NOTIFY_CHILD";

/// Child side: only acts when re-run by `env_notifier_and_watchdog_interval`.
#[test]
fn child_notifies_from_env() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let n = Notifier::from_env();
    n.ready(&format!("{}", n.is_enabled()));
    n.status(&format!("{:?}", kr_tunneld::systemd::watchdog_interval()));
}

fn run_child(envs: &[(&str, &str)]) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "systemd_notify::child_notifies_from_env",
        "--test-threads=1",
    ]);
    cmd.env(CHILD, "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC");
    cmd.env_remove("WATCHDOG_PID");
    cmd.envs(envs.iter().copied());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn env_notifier_and_watchdog_interval() {
    let l = Listener::abstract_("env");
    run_child(&[("NOTIFY_SOCKET", &l.value), ("WATCHDOG_USEC", "60000000")]);
    assert_eq!(l.recv(), "READY=1\nSTATUS=true");
    assert_eq!(l.recv(), "STATUS=Some(30s)");

    // WATCHDOG_PID names another process (pid 1 is never this test): no watchdog for us.
    run_child(&[
        ("NOTIFY_SOCKET", &l.value),
        ("WATCHDOG_USEC", "60000000"),
        ("WATCHDOG_PID", "1"),
    ]);
    assert_eq!(l.recv(), "READY=1\nSTATUS=true");
    assert_eq!(l.recv(), "STATUS=None");

    let p = Listener::path("env");
    run_child(&[("NOTIFY_SOCKET", &p.value)]);
    assert_eq!(p.recv(), "READY=1\nSTATUS=true");
    assert_eq!(p.recv(), "STATUS=None");

    // Without NOTIFY_SOCKET nothing is sent (and nothing fails).
    run_child(&[]);
    p.sock.set_nonblocking(true).unwrap();
    assert!(p.sock.recv(&mut [0u8; 64]).is_err());
}
