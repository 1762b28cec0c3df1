//! The real binary without root-only kernel features: flags and variables, exit codes, a dry run
//! against the fake API server with a stand-in NOTIFY_SOCKET (READY=1 only after the first
//! reconcile, WATCHDOG=1, STOPPING=1 on SIGTERM and a stop within 2 s), and no token in any log
//! line even at trace level (SPEC O-1, O-2, O-3, O-4, O-7, K-2).

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::fakeapi::{node_json, FakeApi};
use crate::rig::kr_tunneld_bin;

fn kr(args: &[&str]) -> std::process::Output {
    Command::new(kr_tunneld_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kr-tunneld")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_and_version_exit_0() {
        let h = kr(&["--help"]);
        assert!(h.status.success());
        let text = String::from_utf8_lossy(&h.stdout);
        for f in kr_tunneld::cli::FLAGS {
            assert!(
                text.contains(&format!("--{}", f.name)),
                "--help lacks --{}",
                f.name
            );
        }
        let v = kr(&["--version"]);
        assert!(v.status.success());
        let v = String::from_utf8_lossy(&v.stdout).into_owned();
        assert!(
            v.starts_with("kr-tunneld 0.") && v.contains("(commit "),
            "{v}"
        );
        // Built from a git checkout (as CI and the packages are): the commit is known.
        if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.git")).exists() {
            assert!(!v.contains("commit unknown"), "{v}");
        }
    }

    /// Issue 13: `--enable-dsr` without CAP_SYS_ADMIN and CAP_SYS_PTRACE stops at start, exit 2,
    /// with one line that says what to do (as root: the two are dropped from the bounding set
    /// with setpriv; as another user they are missing anyway).
    #[test]
    fn enable_dsr_without_its_capabilities_exits_2_at_start() {
        let args = [
            "--enable-dsr",
            "--master=http://127.0.0.1:9",
            "--hostname-override=a",
            "--service-external-ip-range=203.0.113.0/24",
        ];
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let o = if root {
            Command::new("setpriv")
                .args(["--bounding-set=-sys_admin,-sys_ptrace", "--"])
                .arg(kr_tunneld_bin())
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .expect("setpriv")
        } else {
            kr(&args)
        };
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        assert!(
            e.contains("CAP_SYS_ADMIN and CAP_SYS_PTRACE") && e.contains("dsr.conf"),
            "{e}"
        );
    }

    #[test]
    fn bad_flags_and_variables_exit_2_naming_them() {
        let o = kr(&["--overlay-encap", "vxlan"]);
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("'vxlan'") && e.contains("--overlay-encap"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        let o = Command::new(kr_tunneld_bin())
            .env("KR_TUNNELD_OVERLAY_ENCAP_PORT", "80")
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("KR_TUNNELD_OVERLAY_ENCAP_PORT") && e.contains("'80'"),
            "{e}"
        );
        let o = kr(&["--no-such-flag"]);
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("--no-such-flag"));
    }

    /// SPEC S-1: a state directory others can write (or not owned by root) is refused before
    /// anything else, with one error naming it and exit code 2, by `run` and by `cleanup`
    /// (whose deletions its records decide).
    #[test]
    fn unsafe_state_dir_is_refused_with_exit_2() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("krt-cli-statedir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let d = dir.display().to_string();
        for cmd in [
            &["--hostname-override", "a", "--master", "http://127.0.0.1:1"][..],
            &["cleanup"],
        ] {
            let mut args = cmd.to_vec();
            args.extend(["--state-dir", d.as_str()]);
            let o = kr(&args);
            let e = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{cmd:?}: {e}");
            let errs: Vec<&str> = e
                .lines()
                .filter(|l| l.contains("state directory"))
                .collect();
            assert_eq!(errs.len(), 1, "{e}");
            assert!(errs[0].contains(&d), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Collects notify datagrams until `want` is seen or the deadline passes.
    fn wait_notify(sock: &UnixDatagram, seen: &mut Vec<String>, want: &str, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if seen.last().is_some_and(|m| m.contains(want)) {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn dry_run_is_ready_after_the_first_reconcile_and_stops_on_sigterm() {
        let api = FakeApi::start("127.0.0.1:0");
        let dir = std::env::temp_dir().join(format!("krt-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let sock_path = dir.join("notify");
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let token = dir.join("token");
        std::fs::write(&token, "s3cr3t-t0ken-value\n").expect("token");
        // The API is down at first: no READY until a list succeeds.
        api.set_down(true);
        let mut child = Command::new(kr_tunneld_bin())
            .args(["--dry-run", "--hostname-override", "a", "--master"])
            .arg(format!("http://{}", api.addr))
            .arg("--token-file")
            .arg(&token)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "400000")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // WATCHDOG_PID is not set, so the watchdog applies to us (the main pid).
        let mut seen = Vec::new();
        assert!(
            wait_notify(&sock, &mut seen, "WATCHDOG=1", 10),
            "no watchdog ping: {seen:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(wait_notify(&sock, &mut seen, "WATCHDOG=1", 5));
        assert!(
            !seen.iter().any(|m| m.contains("READY=1")),
            "READY before any list: {seen:?}"
        );
        api.put_node(node_json("a", &["192.0.2.10"], &["10.244.0.0/24"]));
        api.put_node(node_json("b", &["198.51.100.11"], &["10.244.1.0/24"]));
        api.set_down(false);
        assert!(
            wait_notify(&sock, &mut seen, "READY=1", 30),
            "no READY: {seen:?}"
        );
        let ready = seen.last().cloned().unwrap_or_default();
        assert!(ready.contains("STATUS=reconciled: peers=1"), "{ready}");
        let t = Instant::now();
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        let status = child.wait().expect("wait");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            t.elapsed()
        );
        assert!(status.success(), "{status}");
        assert!(wait_notify(&sock, &mut seen, "STOPPING=1", 2), "{seen:?}");
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read");
        // The plan for a peer outside our subnet: a tunnel and its routes; nothing applied.
        assert!(out.contains("would create tunnel ktc633640b"), "{out}");
        assert!(
            out.contains("would replace route 10.244.1.0/24 dev ktc633640b"),
            "{out}"
        );
        assert!(
            err.contains("TRACE") || err.contains("DEBUG"),
            "no verbose logs: {err}"
        );
        let leaks: Vec<&str> = err.lines().filter(|l| l.contains("s3cr3t")).collect();
        assert!(leaks.is_empty(), "token in the logs: {leaks:?}");
        assert!(!out.contains("s3cr3t"), "token on stdout");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn free_port() -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    /// One HTTP request: the status line and the body.
    fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        use std::io::Write;
        let Ok(mut c) = std::net::TcpStream::connect(addr) else {
            return ("connection refused".into(), String::new());
        };
        // In pieces, as a client may send it.
        for piece in ["GET ", path, " HTTP/1.1\r\n", "Host: x\r\n\r\n"] {
            let _ = c.write_all(piece.as_bytes());
        }
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        let (head, body) = s.split_once("\r\n\r\n").unwrap_or((&s, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// Polls `path` until its status line contains `want`.
    fn wait_status(
        addr: std::net::SocketAddr,
        path: &str,
        want: &str,
        secs: u64,
    ) -> (String, String) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = get(addr, path);
            if r.0.contains(want) || Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SPEC S-8: `/healthz` and `/readyz` over HTTP on `--health-addr` and on `--metrics-addr`:
    /// healthy from the start, ready only after the first reconcile, and not ready again once
    /// the API server has not answered for a resync period.
    #[test]
    fn health_and_readiness_over_http() {
        let api = FakeApi::start("127.0.0.1:0");
        api.set_down(true);
        let dir = std::env::temp_dir().join(format!("krt-cli-health-{}", std::process::id()));
        let (health, metrics) = (free_port(), free_port());
        let mut child = Command::new(kr_tunneld_bin())
            .args(["--dry-run", "--hostname-override", "a", "--master"])
            .arg(format!("http://{}", api.addr))
            .args(["--resync-period", "3s"])
            .arg("--health-addr")
            .arg(health.to_string())
            .env("KR_TUNNELD_METRICS_ADDR", metrics.to_string())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let live = wait_status(health, "/healthz", "200", 10);
        assert_eq!(live, ("HTTP/1.0 200 OK".into(), "ok\n".into()));
        let r = get(health, "/readyz");
        assert_eq!(
            r,
            (
                "HTTP/1.0 503 Service Unavailable".into(),
                "waiting for the first reconcile\n".into()
            )
        );
        // The health listener serves nothing else; the metrics listener serves the probes too.
        assert!(
            get(health, "/metrics").0.contains("404"),
            "{:?}",
            get(health, "/metrics")
        );
        assert!(get(metrics, "/readyz").0.contains("503"));

        api.put_node(node_json("a", &["192.0.2.10"], &["10.244.0.0/24"]));
        api.set_down(false);
        let r = wait_status(health, "/readyz", "200", 30);
        assert_eq!(r, ("HTTP/1.0 200 OK".into(), "ok\n".into()));
        assert!(get(metrics, "/readyz?verbose").0.contains("200"));
        assert!(get(metrics, "/metrics")
            .1
            .contains("kr_tunneld_reconciles_total"));

        // The API server goes away (open watches cut, requests refused): not ready once it has
        // not answered for a resync period, while the daemon stays healthy.
        api.set_down(true);
        let r = wait_status(health, "/readyz", "503", 30);
        assert!(r.1.starts_with("API server not reached for "), "{r:?}");
        assert!(get(health, "/healthz").0.contains("200"));
        api.set_down(false);
        assert!(wait_status(health, "/readyz", "200", 30).0.contains("200"));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
