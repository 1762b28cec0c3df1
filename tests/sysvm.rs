//! Through real systemd, as an operator runs it: Debian 12 with systemd as PID 1 (the image of
//! tests/vm/build-rootfs.sh), the .deb of packaging/build.sh installed with dpkg, configured
//! through /etc/default/kr-tunneld, driven with systemctl and read with journalctl, against the
//! fake API server (tests/fakeapi.rs, in this process). Kernel state is checked with iproute2.
//!
//! `#[ignore]`d; run with `bash tests/run-kernel-tests.sh --systemd` (all of them run in one VM
//! boot, one at a time, in name order, each leaving the unit stopped and the kernel clean).
//! Outside that VM they fail at once (see [`rig`]).

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::fakeapi::{node_json, FakeApi};

const UNIT: &str = "kr-tunneld.service";
const ENV_FILE: &str = "/etc/default/kr-tunneld";
/// The local node's name and underlay address (a dummy link, the VM has no NIC).
const LOCAL: &str = "krt-vm";
const LOCAL_IP: &str = "192.168.1.1";

/// What the installation found, recorded once (dpkg -i runs before the first test).
struct Install {
    /// `fou` was loaded before dpkg -i (then the postinst check below proves nothing).
    fou_before: bool,
    /// `fou` is loaded after dpkg -i (postinst loaded the modules-load.d list).
    fou_after: bool,
    /// dpkg's output.
    dpkg_out: String,
}

/// `bash -c CMD`: (exit code, stdout + stderr).
fn sh(cmd: &str) -> (i32, String) {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("bash -c {cmd}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `bash -c CMD`, which must succeed; its output.
fn ok(cmd: &str) -> String {
    let (rc, out) = sh(cmd);
    assert_eq!(rc, 0, "`{cmd}` failed ({rc}): {out}");
    out
}

fn fou_loaded() -> bool {
    std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("fou "))
}

/// The rig: systemd is PID 1, the package is installed (once), the underlay link exists.
fn rig() -> &'static Install {
    static INSTALL: OnceLock<Install> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        assert!(
            pid1.trim() == "systemd" && Path::new("/run/systemd/system").is_dir(),
            "not under systemd (PID 1 is {pid1:?}): run `bash tests/run-kernel-tests.sh --systemd`"
        );
        let deb = std::env::var("KRT_DEB").expect("KRT_DEB (the .deb to install) is not set");
        let fou_before = fou_loaded();
        let dpkg_out = ok(&format!("dpkg -i {deb} 2>&1"));
        let fou_after = fou_loaded();
        ok(&format!(
            "ip link add krt0 type dummy && ip addr add {LOCAL_IP}/24 dev krt0 && ip link set krt0 up"
        ));
        Install {
            fou_before,
            fou_after,
            dpkg_out,
        }
    })
}

/// Write the environment file: the API server at `port` on loopback, plus `extra` lines.
fn configure(port: u16, extra: &[&str]) {
    let mut text = format!(
        "KR_TUNNELD_MASTER=http://127.0.0.1:{port}\nKR_TUNNELD_HOSTNAME_OVERRIDE={LOCAL}\n"
    );
    for l in extra {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(ENV_FILE, text).unwrap();
}

/// A local node and one peer outside the local subnet (so a tunnel to it).
fn api_with_nodes() -> FakeApi {
    let api = FakeApi::start("127.0.0.1:0");
    api.put_node(node_json(LOCAL, &[LOCAL_IP], &["10.244.1.0/24"]));
    api.put_node(node_json("peer1", &["192.168.2.2"], &["10.244.2.0/24"]));
    api
}

/// `systemctl show -p NAME --value`.
fn prop(name: &str) -> String {
    ok(&format!("systemctl show -p {name} --value {UNIT}"))
        .trim()
        .to_string()
}

/// Poll `cond` every 200 ms for up to `limit` (a liveness guard, not a timing assert).
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "gave up waiting for {what} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The journal of the unit's last run (its invocation ID; `--after-cursor` combined with `-u` and
/// `-p` loses entries on systemd 252).
fn journal(args: &str) -> String {
    let id = prop("InvocationID");
    ok(&format!(
        "journalctl --no-pager -q -o cat _SYSTEMD_INVOCATION_ID={id} {args}"
    ))
}

/// Stop the unit, remove everything kr-tunneld made, forget failures: the next test starts clean.
fn reset() {
    sh(&format!(
        "systemctl stop {UNIT}; systemctl reset-failed {UNIT}"
    ));
    sh("kr-tunneld cleanup");
    // What cleanup could not find (no records): the next test must start clean anyway.
    sh("ip fou del port 5555 2>/dev/null; ip link del group 19284 2>/dev/null");
    sh("rm -rf /etc/systemd/system/kr-tunneld.service.d; systemctl daemon-reload");
}

/// `ip fou show`; empty when the fou module is not loaded (the command fails then).
fn fou_ports() -> String {
    sh("ip fou show 2>/dev/null").1
}

/// Tunnels to peers in kr-tunneld's link group (19284), by name (not the receive tunnels
/// ktrx4/ktrx6).
fn tunnels() -> Vec<String> {
    ok("ip -o link show group 19284")
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| !n.starts_with("ktrx"))
        .collect()
}

/// ifindex of a link.
fn ifindex(name: &str) -> String {
    ok(&format!("cat /sys/class/net/{name}/ifindex"))
        .trim()
        .to_string()
}

/// SPEC O-5 / issue 12: the postinst loads /usr/lib/modules-load.d/kr-tunneld.conf (fou has no
/// generic netlink alias on 6.1, so nothing else loads it before the next boot), and the first
/// run after installation logs no failure.
#[test]
#[ignore]
fn sysvm_install_loads_modules_first_run_clean() {
    let install = rig();
    reset();
    assert!(
        !install.fou_before,
        "fou was loaded before the package was installed: the check proves nothing"
    );
    assert!(
        install.fou_after,
        "dpkg -i did not load the fou module (postinst should load \
         /usr/lib/modules-load.d/kr-tunneld.conf); dpkg said:\n{}",
        install.dpkg_out
    );
    let api = api_with_nodes();
    configure(
        api.addr.port(),
        &[
            "KR_TUNNELD_OVERLAY_ENCAP=fou",
            "KR_TUNNELD_RESYNC_PERIOD=2s",
        ],
    );
    ok(&format!("timeout 120 systemctl start {UNIT}"));
    wait_for("port 5555 gue", Duration::from_secs(60), || {
        fou_ports().contains("port 5555 gue")
    });
    // A few resyncs: a failure would be retried (and logged) on each.
    std::thread::sleep(Duration::from_secs(5));
    let warnings = journal("-p warning");
    reset();
    assert!(
        warnings.trim().is_empty(),
        "the first run after installation logged problems:\n{warnings}"
    );
}

/// SPEC S-1 through the unit: restart keeps the ownership records and the kernel state, and
/// `systemctl stop; kr-tunneld cleanup` then removes everything (no FOU port left open).
#[test]
#[ignore]
fn sysvm_restart_keeps_state_then_cleanup_removes_all() {
    rig();
    reset();
    let api = api_with_nodes();
    configure(api.addr.port(), &["KR_TUNNELD_OVERLAY_ENCAP=fou"]);
    ok(&format!("timeout 120 systemctl start {UNIT}"));
    wait_for(
        "port 5555 gue and one tunnel",
        Duration::from_secs(60),
        || fou_ports().contains("port 5555 gue") && tunnels().len() == 1,
    );
    let tunnel = tunnels().remove(0);
    let index = ifindex(&tunnel);
    let records_before = ok("ls /run/kr-tunneld/");
    assert!(
        records_before.contains("fou"),
        "no FOU record: {records_before}"
    );

    ok(&format!("timeout 120 systemctl restart {UNIT}"));
    // One more full pass after the restart (SIGHUP), then look.
    ok(&format!("systemctl reload {UNIT}"));
    std::thread::sleep(Duration::from_secs(3));
    let records_after = sh("ls /run/kr-tunneld/").1;
    assert_eq!(
        ifindex(&tunnel),
        index,
        "the tunnel {tunnel} was re-created by the restart"
    );
    assert!(fou_ports().contains("port 5555 gue"));

    ok(&format!("systemctl stop {UNIT}"));
    let records_stopped = sh("ls /run/kr-tunneld/").1;
    let cleanup = ok("kr-tunneld cleanup 2>&1");
    let left_fou = fou_ports();
    let left_links = tunnels();
    let left_rules = sh("ip rule show | grep -E 'lookup (77|78)'").1;
    let left_routes = ok("ip route show table all proto 157");
    reset();
    assert_eq!(
        records_after, records_before,
        "the ownership records did not survive the restart"
    );
    assert!(
        left_fou.trim().is_empty() && left_links.is_empty(),
        "after stop + cleanup: FOU ports {left_fou:?}, tunnels {left_links:?}\n\
         records before the restart:\n{records_before}\nafter:\n{records_after}\n\
         after stop:\n{records_stopped}\ncleanup said:\n{cleanup}"
    );
    assert!(
        left_rules.trim().is_empty() && left_routes.trim().is_empty(),
        "after stop + cleanup: rules {left_rules:?}, routes {left_routes:?}"
    );
}

/// SPEC S-5: with the API server unreachable, `systemctl start` returns (within the unit's start
/// timeout): the unit is active, STATUS says what it waits for, the kernel state is kept; once
/// the API server answers, the daemon converges.
#[test]
#[ignore]
fn sysvm_start_returns_with_the_api_down() {
    rig();
    reset();
    // Kernel state from an earlier run, to be kept while the API is down.
    let api = api_with_nodes();
    let port = api.addr.port();
    configure(port, &["KR_TUNNELD_OVERLAY_ENCAP=fou"]);
    ok(&format!("timeout 120 systemctl start {UNIT}"));
    wait_for("one tunnel", Duration::from_secs(60), || {
        tunnels().len() == 1
    });
    ok(&format!("systemctl stop {UNIT}"));
    drop(api);
    let tunnels_before = tunnels();

    // Nothing listens on the port now: connection refused, as at boot before the API server.
    let t = Instant::now();
    let (rc, out) = sh(&format!("timeout 200 systemctl start {UNIT}"));
    let took = t.elapsed();
    println!("sysvm: systemctl start with the API down returned after {took:.1?} (exit {rc})");
    let active = prop("ActiveState");
    let status = prop("StatusText");
    let timeout = prop("TimeoutStartUSec");
    let tunnels_after = tunnels();
    let fou = fou_ports();
    let log = journal("-n 30");
    reset();
    assert_eq!(
        rc, 0,
        "systemctl start did not return success ({took:?}, TimeoutStartSec {timeout}): {out}\n{log}"
    );
    assert_eq!(active, "active", "status {status:?}");
    assert!(
        status.contains("waiting for the API server"),
        "STATUS does not say what it waits for: {status:?}"
    );
    assert_eq!(
        tunnels_after, tunnels_before,
        "the kernel state was not kept"
    );
    assert!(fou.contains("port 5555 gue"), "the FOU port was not kept");
}

/// SPEC O-3: a configuration error is logged at priority err, so `journalctl -p warning` shows
/// it, and systemd does not restart a unit that exits 2.
#[test]
#[ignore]
fn sysvm_config_error_is_visible_at_priority_err() {
    rig();
    reset();
    configure(1, &["KR_TUNNELD_OVERLAY_TYPE=bogus"]);
    let (rc, _) = sh(&format!("timeout 120 systemctl start {UNIT}"));
    assert_ne!(rc, 0, "the unit started with a bad configuration");
    wait_for("the unit to fail", Duration::from_secs(30), || {
        prop("ActiveState") == "failed"
    });
    let status = prop("ExecMainStatus");
    assert_eq!(status, "2", "exit status");
    // journald reads the stream on its own time: poll (on failure, show everything).
    let seen = std::panic::catch_unwind(|| {
        wait_for("the error at priority err", Duration::from_secs(20), || {
            journal("-p err").contains("invalid value 'bogus'")
        })
    });
    let all = journal("-o verbose");
    reset();
    assert!(
        seen.is_ok(),
        "journalctl -p err does not show the configuration error; all:\n{all}"
    );
}

/// Issue 12: a module missing after all (unloaded by hand): the error says what to do, names the
/// errno once, and is logged once, not on every pass.
#[test]
#[ignore]
fn sysvm_missing_module_is_reported_once_with_what_to_do() {
    rig();
    reset();
    ok("modprobe -r fou6 fou");
    let api = api_with_nodes();
    configure(
        api.addr.port(),
        &[
            "KR_TUNNELD_OVERLAY_ENCAP=fou",
            "KR_TUNNELD_RESYNC_PERIOD=1s",
        ],
    );
    ok(&format!("timeout 120 systemctl start {UNIT}"));
    // Failed passes are retried every resync period (1 s): let several run.
    std::thread::sleep(Duration::from_secs(8));
    let log = journal("");
    let warnings = journal("-p warning");
    reset();
    ok("modprobe -a fou fou6");
    let fou_lines: Vec<&str> = log.lines().filter(|l| l.contains("add fou port")).collect();
    assert_eq!(
        fou_lines.len(),
        1,
        "logged {} times:\n{log}",
        fou_lines.len()
    );
    assert!(
        fou_lines[0].contains("modprobe fou") && fou_lines[0].matches("(os error 2)").count() == 1,
        "{}",
        fou_lines[0]
    );
    let summaries = warnings.matches("failed=").count();
    assert!(
        summaries <= 1,
        "the same failures summarised {summaries} times at warning level:\n{warnings}"
    );
}
