//! The real-kernel test rig: helpers for privileged kernel tests, and
//! self-checks that prove the environment they run in.
//!
//! Kernel tests are `#[ignore]`d (plain `cargo test` needs no root) and run by
//! `tests/run-kernel-tests.sh`, as root, one at a time (`--test-threads=1`),
//! either directly on a host whose kernel has the modules or inside the QEMU
//! guest of `tests/vm/`.  Every kernel test works in a network namespace of its
//! own, made with [`in_new_netns`], so tests never touch the host's (or the
//! guest's initial) namespace and leave nothing behind.
//!
//! Each exec of a dynamically linked program costs about 0.2–0.5 s in the TCG
//! guest: a test that needs many kernel queries should talk netlink from the
//! test process; [`ip`] / [`ip_json`] are for setup and spot checks.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `f` on a new thread that first moves into a fresh network namespace
/// (`unshare(CLONE_NEWNET)`), and returns its result.
///
/// Only that thread is in the new namespace: netlink sockets it opens, and
/// child processes it spawns (they inherit the calling thread's namespace),
/// see the new namespace; the rest of the process does not.  The namespace
/// starts with only `lo` (down) plus the fallback devices of loaded tunnel
/// modules (`tunl0`, `ip6tnl0`, ...); it disappears when the thread ends and
/// nothing else holds it.  A panic in `f` is re-raised in the caller, so an
/// assertion inside fails the test as usual.
///
/// Needs CAP_SYS_ADMIN (root).
pub fn in_new_netns<F, R>(f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            // SAFETY: unshare(2) takes a flag word and touches no memory of
            // ours.  CLONE_NEWNET affects only the calling thread (this fresh
            // scoped thread, which ends when `f` returns), which is allowed in
            // a multi-threaded process, unlike CLONE_NEWNS or CLONE_NEWUSER.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET) failed: {} (kernel tests need root)",
                std::io::Error::last_os_error()
            );
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `ip ARGS...` in the calling thread's network namespace, panics with its
/// stderr unless it succeeds, and returns its stdout.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `ip -j ARGS...` (JSON output) in the calling thread's network
/// namespace and returns the parsed output; `Value::Null` when `ip` printed
/// nothing (commands that change state).  Panics unless `ip` succeeds.
///
/// Example: `ip_json(&["-d", "link", "show", "dev", "t"])[0]["linkinfo"]["info_kind"]`.
pub fn ip_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("ip", &full);
    if out.trim().is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("`ip {}` printed invalid JSON ({e}): {out}", full.join(" ")))
}

/// Runs `program ARGS...`, panics with its stderr unless it exits 0, and returns
/// its stdout.  Children inherit the calling thread's network namespace.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).expect("output is not UTF-8")
}

/// The kr-tunneld binary under test: `$KR_TUNNELD_BIN` (set by
/// tests/run-kernel-tests.sh), else the one Cargo built for these tests.
pub fn kr_tunneld_bin() -> PathBuf {
    std::env::var_os("KR_TUNNELD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kr-tunneld")))
}

/// True if the kernel has `module` loaded or built in.
fn module_present(module: &str) -> bool {
    // Loaded modules are in /proc/modules; built-in ones with parameters or a
    // version show up in /sys/module only.
    let loaded = std::fs::read_to_string("/proc/modules")
        .map(|s| s.lines().any(|l| l.split(' ').next() == Some(module)))
        .unwrap_or(false);
    loaded || Path::new("/sys/module").join(module).exists()
}

/// The rig's self-checks (`rig::checks::*`): when one fails, the environment,
/// not kr-tunneld, is broken.  (`#[cfg(test)]` keeps clippy's
/// tests_outside_test_module lint quiet, as for every test module here.)
#[cfg(test)]
mod checks {
    use super::*;

    #[test]
    #[ignore = "kernel rig check: run by tests/run-kernel-tests.sh"]
    fn runs_as_root() {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "kernel tests must run as root");
    }

    #[test]
    #[ignore = "kernel rig check: run by tests/run-kernel-tests.sh"]
    fn kernel_has_tunnel_and_ipvs_modules() {
        let missing: Vec<&str> = [
            "ipip",
            "ip6_tunnel",
            "tunnel4",
            "tunnel6",
            "fou",
            "fou6",
            "ip_vs",
        ]
        .into_iter()
        .filter(|m| !module_present(m))
        .collect();
        assert!(missing.is_empty(), "kernel modules missing: {missing:?}");
    }

    #[test]
    #[ignore = "kernel rig check: run by tests/run-kernel-tests.sh"]
    fn ipip_link_in_a_fresh_netns() {
        let (kind, remote) = in_new_netns(|| {
            ip(&[
                "link",
                "add",
                "krtest",
                "type",
                "ipip",
                "local",
                "192.0.2.2",
                "remote",
                "192.0.2.1",
            ]);
            let link = ip_json(&["-d", "link", "show", "dev", "krtest"]);
            (
                link[0]["linkinfo"]["info_kind"].as_str().map(String::from),
                link[0]["linkinfo"]["info_data"]["remote"]
                    .as_str()
                    .map(String::from),
            )
        });
        assert_eq!(kind.as_deref(), Some("ipip"));
        assert_eq!(remote.as_deref(), Some("192.0.2.1"));
        // The link lived in the thread's namespace only, not in ours.
        let here = ip_json(&["link", "show"]);
        let names: Vec<&str> = here
            .as_array()
            .expect("ip -j link show prints an array")
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .collect();
        assert!(
            !names.contains(&"krtest"),
            "krtest leaked out of its netns: {names:?}"
        );
    }

    #[test]
    #[ignore = "kernel rig check: run by tests/run-kernel-tests.sh"]
    fn gue_port_and_ipvs_service_in_a_fresh_netns() {
        in_new_netns(|| {
            ip(&["fou", "add", "port", "5555", "gue"]);
            ip(&["-6", "fou", "add", "port", "5555", "gue"]);
            assert!(ip(&["fou", "show"]).contains("5555"));
            run("ipvsadm", &["-A", "-t", "198.51.100.10:80", "-s", "rr"]);
            let services = run("ipvsadm", &["-Ln"]);
            assert!(
                services.contains("198.51.100.10:80"),
                "ipvsadm -Ln: {services}"
            );
        });
    }

    #[test]
    #[ignore = "kernel rig check: run by tests/run-kernel-tests.sh"]
    fn kr_tunneld_bin_is_set() {
        let bin = std::env::var_os("KR_TUNNELD_BIN").expect("KR_TUNNELD_BIN is not set");
        let meta = std::fs::metadata(&bin).unwrap_or_else(|e| panic!("{bin:?}: {e}"));
        use std::os::unix::fs::PermissionsExt;
        assert!(
            meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            "{bin:?} is not executable"
        );
        assert_eq!(kr_tunneld_bin(), PathBuf::from(bin));
    }
}
