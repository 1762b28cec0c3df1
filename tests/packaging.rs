//! Packaging (SPEC O-2, O-5): the environment file and man page list every option, the unit
//! passes `systemd-analyze verify` and scores well in `systemd-analyze security`, and
//! packaging/build.sh produces a .deb and an .rpm that lint clean, install into a scratch root,
//! upgrade keeping a locally changed conffile, and leave nothing behind when purged.
//!
//! The tools (dpkg-deb, rpmbuild, lintian, rpmlint, systemd-analyze, …) are installed by
//! packaging/install-build-deps.sh when missing and we are root; otherwise the tests that need
//! them print why and return.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Every option of the daemon (SPEC O-1), straight from the flag table that drives parsing and
/// `--help`, so the env file and man page cannot drift from the binary.
fn options() -> Vec<&'static str> {
    kr_tunneld::cli::FLAGS.iter().map(|f| f.name).collect()
}

fn var_name(flag: &str) -> String {
    format!("KR_TUNNELD_{}", flag.to_uppercase().replace('-', "_"))
}

fn top() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(top().join(rel)).unwrap()
}

// --- helpers: scratch directories, commands, tools ---

/// A directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kr-pkg-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{}: {e}", describe(cmd)))
}

/// Runs, asserts success, returns stdout.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Makes sure the tools are there, installing them when root. `Err` says why the test is
/// skipped.
fn tools(needed: &[&str]) -> Result<(), String> {
    // apt-get must not run twice at once.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let missing = || {
        needed
            .iter()
            .copied()
            .filter(|t| !on_path(t))
            .collect::<Vec<_>>()
    };
    if missing().is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "missing {:?} and not root to install them",
            missing()
        ));
    }
    let out = output(Command::new("bash").arg(top().join("packaging/install-build-deps.sh")));
    let still = missing();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing {still:?}; install-build-deps.sh: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

macro_rules! require_tools {
    ($($t:expr),+) => {
        if let Err(why) = tools(&[$($t),+]) {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

// --- environment file, man page, rpmlint configuration (no tools needed) ---

#[test]
fn env_file_lists_every_option_commented() {
    let env = read("packaging/kr-tunneld.env");
    for line in env.lines() {
        assert!(
            line.is_empty() || line.starts_with('#'),
            "active setting in env file: {line:?}"
        );
    }
    for flag in options() {
        let var = var_name(flag);
        let n = env
            .lines()
            .filter(|l| l.starts_with(&format!("#{var}=")))
            .count();
        assert_eq!(n, 1, "{var} must appear once as a commented assignment");
        let described = [" ", ":"]
            .iter()
            .any(|end| env.contains(&format!("# --{flag}{end}")));
        assert!(described, "--{flag} has no description");
    }
    // No variable the daemon does not know.
    for line in env.lines().filter(|l| l.starts_with("#KR_TUNNELD_")) {
        let var = line[1..].split('=').next().unwrap();
        assert!(
            options().iter().any(|f| var_name(f) == var),
            "unknown variable {var}"
        );
    }
}

#[test]
fn man_page_documents_every_option() {
    let man = read("packaging/kr-tunneld.8");
    for flag in options() {
        let roff_flag = format!("\\-\\-{}", flag.replace('-', "\\-"));
        assert!(man.contains(&roff_flag), "man page lacks {roff_flag}");
        assert!(
            man.contains(&format!("Variable: {}.", var_name(flag))),
            "man page lacks {flag}'s variable"
        );
    }
}

#[test]
fn rpmlint_licences_match_licence_texts() {
    let toml = read("packaging/rpm/rpmlint.toml");
    let start = toml.find("ValidLicenses = [").unwrap();
    let end = start + toml[start..].find(']').unwrap();
    let valid: BTreeSet<String> = toml[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    let mut texts: BTreeSet<String> = fs::read_dir(top().join("packaging/licenses"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README")
        .collect();
    texts.insert("Apache-2.0".into());
    assert_eq!(valid, texts);
}

// --- the systemd unit ---

/// Runs `systemd-analyze verify` on `unit` with `exe` as /usr/sbin/kr-tunneld, in a scratch root
/// that also holds the host's targets and kill(1) (verify checks that every command exists).
/// Returns stderr; verify exits 0 even for bad values, so stderr is the verdict.
fn verify_unit(unit: &Path, exe: &Path) -> String {
    let root = Scratch::new("verify");
    let sysdir = root.join("usr/lib/systemd/system");
    fs::create_dir_all(&sysdir).unwrap();
    fs::create_dir_all(root.join("usr/sbin")).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy(unit, sysdir.join("kr-tunneld.service")).unwrap();
    fs::copy(exe, root.join("usr/sbin/kr-tunneld")).unwrap();
    let kill = ["/bin/kill", "/usr/bin/kill"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    fs::copy(kill, root.join("bin/kill")).unwrap();
    for dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if Path::new(&name).extension() == Some(OsStr::new("target")) {
                let _ = fs::copy(entry.path(), sysdir.join(&name));
            }
        }
    }
    let out = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.display()))
            .arg("kr-tunneld.service"),
    );
    let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() && stderr.is_empty() {
        stderr = format!("exit {}", out.status);
    }
    stderr
}

#[test]
fn unit_verifies_and_is_hardened() {
    require_tools!("systemd-analyze");
    let unit = top().join("systemd/kr-tunneld.service");
    let exe = Path::new(env!("CARGO_BIN_EXE_kr-tunneld"));
    assert_eq!(verify_unit(&unit, exe), "", "systemd-analyze verify");

    // The check can fail: a bad value is reported (on stderr only).
    let bad = Scratch::new("bad-unit");
    let bad_unit = bad.join("kr-tunneld.service");
    fs::write(
        &bad_unit,
        read("systemd/kr-tunneld.service").replace("Type=notify", "Type=notifyy"),
    )
    .unwrap();
    assert!(verify_unit(&bad_unit, exe).contains("notifyy"));

    let text = read("systemd/kr-tunneld.service");
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/usr/sbin/kr-tunneld",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "WatchdogSec=60s",
        "TimeoutStopSec=10s",
        "EnvironmentFile=-/etc/default/kr-tunneld",
        "EnvironmentFile=-/etc/sysconfig/kr-tunneld",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictNamespaces=yes",
        "RestrictAddressFamilies=AF_NETLINK AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(text.lines().any(|l| l == line), "unit lacks {line}");
    }

    // Issue 13: the default unit holds only what the overlay needs (exposure <= 2.5).
    let stdout = security(&[unit.as_os_str()]);
    let score = exposure(&stdout);
    println!("systemd-analyze security --offline: exposure {score}");
    assert!(score <= 2.5, "exposure {score} > 2.5");
    for cap in ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"] {
        assert!(
            stdout.contains(&format!("✓ CapabilityBoundingSet=~{cap} ")),
            "{cap} in the default unit"
        );
    }

    // With the shipped DSR drop-in: the two capabilities and setns into network namespaces.
    let root = Scratch::new("dsr-dropin");
    let (sys, dropins) = (
        root.join("usr/lib/systemd/system"),
        root.join("etc/systemd/system/kr-tunneld.service.d"),
    );
    fs::create_dir_all(&sys).unwrap();
    fs::create_dir_all(&dropins).unwrap();
    fs::copy(&unit, sys.join("kr-tunneld.service")).unwrap();
    fs::copy(top().join("systemd/dsr.conf"), dropins.join("dsr.conf")).unwrap();
    let root_arg = format!("--root={}", root.display());
    let stdout = security(&[OsStr::new(&root_arg), OsStr::new("kr-tunneld.service")]);
    println!("with the DSR drop-in: exposure {}", exposure(&stdout));
    for what in [
        "CapabilityBoundingSet=~CAP_SYS_ADMIN ",
        "CapabilityBoundingSet=~CAP_SYS_PTRACE ",
        "RestrictNamespaces=~net ",
    ] {
        assert!(
            stdout.contains(&format!("✗ {what}")),
            "drop-in lacks {what}"
        );
    }
    assert!(stdout.contains("✓ RestrictNamespaces=~user "));
}

/// `systemd-analyze security --offline=true ARGS` output.
fn security(args: &[&OsStr]) -> String {
    let out = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The overall exposure score in `security` output.
fn exposure(stdout: &str) -> f64 {
    stdout
        .lines()
        .find_map(|l| l.split("kr-tunneld.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{stdout}"))
}

#[test]
fn man_page_renders_without_warnings() {
    require_tools!("man");
    let out = output(
        Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(top().join("packaging/kr-tunneld.8"))
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8"),
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

// --- the packages ---

const DEB_FILES: &[&str] = &[
    "etc/default/kr-tunneld",
    "usr/lib/modules-load.d/kr-tunneld.conf",
    "usr/lib/systemd/system/kr-tunneld.service",
    "usr/sbin/kr-tunneld",
    "usr/share/doc/kr-tunneld/README.md",
    "usr/share/doc/kr-tunneld/changelog.Debian.gz",
    "usr/share/doc/kr-tunneld/copyright",
    "usr/share/doc/kr-tunneld/kubeconfig.example",
    "usr/share/doc/kr-tunneld/rbac.yaml",
    "usr/share/lintian/overrides/kr-tunneld",
    "usr/share/kr-tunneld/dsr.conf",
    "usr/share/man/man8/kr-tunneld.8.gz",
];

const RPM_FILES: &[&str] = &[
    "/etc/sysconfig/kr-tunneld",
    "/usr/lib/modules-load.d/kr-tunneld.conf",
    "/usr/lib/systemd/system/kr-tunneld.service",
    "/usr/sbin/kr-tunneld",
    "/usr/share/doc/kr-tunneld",
    "/usr/share/doc/kr-tunneld/README.md",
    "/usr/share/doc/kr-tunneld/kubeconfig.example",
    "/usr/share/doc/kr-tunneld/rbac.yaml",
    "/usr/share/kr-tunneld",
    "/usr/share/kr-tunneld/dsr.conf",
    "/usr/share/licenses/kr-tunneld",
    "/usr/share/licenses/kr-tunneld/LICENSE",
    "/usr/share/licenses/kr-tunneld/LICENSE.dependencies",
    "/usr/share/man/man8/kr-tunneld.8.gz",
];

/// The target directory this test binary was built in (…/target/debug/deps/tests-…).
fn target_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_kr-tunneld"));
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn build(args: &[&OsStr]) {
    ok(Command::new("bash")
        .arg(top().join("packaging/build.sh"))
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(top()));
}

fn only_file(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

/// Non-directory entries under `root`, relative, skipping the package managers' databases.
fn files_under(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if ["var/lib/dpkg", "var/lib/rpm", "root/.rpmdb"]
                .iter()
                .any(|db| rel.starts_with(db))
            {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                out.insert(rel);
            }
        }
    }
    out
}

fn dpkg(root: &Path) -> Command {
    let mut cmd = Command::new("dpkg");
    // Chrootless: the maintainer scripts run here with DPKG_ROOT set (the scratch root has no
    // shell); libc6 and friends are not in the scratch root's database. --path-include undoes
    // the path-exclude lines of slim container images (/usr/share/man, /usr/share/doc).
    cmd.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        "--force-depends",
        "--path-include=/*",
    ]);
    cmd
}

fn dpkg_root(tag: &str) -> Scratch {
    let root = Scratch::new(tag);
    fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    root
}

/// One test, since building takes a while: build, inspect, lint, install, upgrade, remove.
#[test]
fn packages_build_lint_install_upgrade_purge() {
    require_tools!(
        "dpkg-deb",
        "dpkg-shlibdeps",
        "rpmbuild",
        "rpm",
        "lintian",
        "rpmlint",
        "systemd-analyze",
        "jq",
        "objcopy"
    );
    let out1 = Scratch::new("out1");
    build(&["--out".as_ref(), out1.as_os_str()]);
    let deb = only_file(&out1, "_amd64.deb");
    let rpm = only_file(&out1, ".x86_64.rpm");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb.file_name().unwrap().to_string_lossy(),
        format!("kr-tunneld_{version}-1_amd64.deb")
    );
    assert_eq!(
        rpm.file_name().unwrap().to_string_lossy(),
        format!("kr-tunneld-{version}-1.x86_64.rpm")
    );
    println!(
        "deb {} bytes, rpm {} bytes",
        fs::metadata(&deb).unwrap().len(),
        fs::metadata(&rpm).unwrap().len()
    );

    // Reproducible: packaging the same binary again gives the same bytes.
    let binary = target_dir().join("release/kr-tunneld");
    let out2 = Scratch::new("out2");
    build(&[
        "--binary".as_ref(),
        binary.as_os_str(),
        "--out".as_ref(),
        out2.as_os_str(),
    ]);
    assert!(
        fs::read(&deb).unwrap() == fs::read(only_file(&out2, ".deb")).unwrap(),
        ".deb differs"
    );
    assert!(
        fs::read(&rpm).unwrap() == fs::read(only_file(&out2, ".rpm")).unwrap(),
        ".rpm differs"
    );

    // .deb contents and control data.
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[1], "root/root", "{line}");
        let path = f[5].trim_start_matches("./");
        match f[0] {
            "drwxr-xr-x" => {}
            "-rwxr-xr-x" => assert_eq!(path, "usr/sbin/kr-tunneld", "{line}"),
            "-rw-r--r--" => {}
            _ => panic!("unexpected mode: {line}"),
        }
        if !f[0].starts_with('d') {
            files.insert(path.to_owned());
        }
    }
    assert_eq!(files, DEB_FILES.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        ok(Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles")),
        "/etc/default/kr-tunneld\n"
    );
    let depends = ok(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    assert!(depends.contains("libc6 (>= "), "Depends: {depends}");

    // lintian: no error and no warning.
    let out = output(
        Command::new("lintian")
            .args(["--fail-on", "error,warning"])
            .arg(&deb),
    );
    let tags = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lintian:\n{tags}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !tags
            .lines()
            .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian:\n{tags}"
    );

    // .rpm contents, config files, rpmlint.
    let list = ok(Command::new("rpm").arg("-qlp").arg(&rpm));
    assert_eq!(list.lines().collect::<Vec<_>>(), RPM_FILES);
    assert_eq!(
        ok(Command::new("rpm").arg("-qcp").arg(&rpm)),
        "/etc/sysconfig/kr-tunneld\n"
    );
    let scripts = ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    for s in ["postinstall", "preuninstall", "postuninstall"] {
        assert!(
            scripts.contains(&format!("{s} scriptlet")),
            "no {s} scriptlet"
        );
    }
    let out = output(
        Command::new("rpmlint")
            .arg("-c")
            .arg(top().join("packaging/rpm/rpmlint.toml"))
            .arg(&rpm),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains(" 0 errors"),
        "rpmlint:\n{report}"
    );
    println!("rpmlint: {}", report.lines().last().unwrap_or(""));

    // A second release with a changed environment file, for the upgrades.
    let env2 = out2.join("env2");
    fs::write(
        &env2,
        read("packaging/kr-tunneld.env") + "# changed in release 2\n",
    )
    .unwrap();
    let out3 = Scratch::new("out3");
    build(&[
        "--binary".as_ref(),
        binary.as_os_str(),
        "--release".as_ref(),
        "2".as_ref(),
        "--env-file".as_ref(),
        env2.as_os_str(),
        "--out".as_ref(),
        out3.as_os_str(),
    ]);
    let deb2 = only_file(&out3, "-2_amd64.deb");
    let rpm2 = only_file(&out3, "-2.x86_64.rpm");

    deb_install_upgrade_purge(&deb, &deb2, &env2);
    deb_upgrade_replaces_unmodified_conffile(&deb, &deb2, &env2);
    rpm_install_upgrade_erase(&rpm, &rpm2);
}

fn deb_install_upgrade_purge(deb: &Path, deb2: &Path, env2: &Path) {
    let root = dpkg_root("deb");
    ok(dpkg(&root).arg("-i").arg(deb));
    let installed = files_under(&root);
    for f in DEB_FILES {
        assert!(installed.contains(*f), "{f} not installed");
    }
    // Enabled by deb-systemd-helper (no systemd running: symlink only, nothing started).
    let wants = root.join("etc/systemd/system/multi-user.target.wants/kr-tunneld.service");
    assert_eq!(
        fs::read_link(&wants).unwrap(),
        Path::new("/usr/lib/systemd/system/kr-tunneld.service")
    );
    // The installed unit with the installed binary verifies cleanly.
    let unit = root.join("usr/lib/systemd/system/kr-tunneld.service");
    assert_eq!(
        verify_unit(&unit, &root.join("usr/sbin/kr-tunneld")),
        "",
        "installed unit"
    );

    // A local change survives the upgrade with --force-confold; the new one is set aside.
    let conf = root.join("etc/default/kr-tunneld");
    let local = fs::read_to_string(&conf).unwrap() + "KR_TUNNELD_OVERLAY_ENCAP=fou\n";
    fs::write(&conf, &local).unwrap();
    ok(dpkg(&root).arg("--force-confold").arg("-i").arg(deb2));
    assert_eq!(fs::read_to_string(&conf).unwrap(), local);
    assert_eq!(
        fs::read(root.join("etc/default/kr-tunneld.dpkg-dist")).unwrap(),
        fs::read(env2).unwrap()
    );
    let admindir = root.join("var/lib/dpkg");
    let status = ok(Command::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args(["-W", "-f", "${Version} ${Status}", "kr-tunneld"]));
    assert_eq!(
        status,
        format!("{}-2 install ok installed", env!("CARGO_PKG_VERSION"))
    );

    // Remove keeps the conffile (and masks the unit); purge leaves no file at all.
    ok(dpkg(&root).args(["-r", "kr-tunneld"]));
    let left = files_under(&root);
    assert!(left.contains("etc/default/kr-tunneld"), "{left:?}");
    assert!(!left.contains("usr/sbin/kr-tunneld"), "{left:?}");
    ok(dpkg(&root).args(["-P", "kr-tunneld"]));
    let left = files_under(&root);
    assert!(left.is_empty(), "left after purge: {left:?}");
}

fn deb_upgrade_replaces_unmodified_conffile(deb: &Path, deb2: &Path, env2: &Path) {
    let root = dpkg_root("deb-unmodified");
    ok(dpkg(&root).arg("-i").arg(deb));
    ok(dpkg(&root).arg("-i").arg(deb2));
    assert_eq!(
        fs::read(root.join("etc/default/kr-tunneld")).unwrap(),
        fs::read(env2).unwrap()
    );
    ok(dpkg(&root).args(["-P", "kr-tunneld"]));
    assert!(files_under(&root).is_empty());
}

fn rpm_install_upgrade_erase(rpm: &Path, rpm2: &Path) {
    // Scriptlets would run chrooted into a root without a shell; their text is checked above.
    let root = Scratch::new("rpm");
    let rpm_cmd = || {
        let mut cmd = Command::new("rpm");
        cmd.arg("--root").arg(&*root);
        cmd
    };
    ok(rpm_cmd().arg("--initdb"));
    ok(rpm_cmd().args(["-i", "--nodeps", "--noscripts"]).arg(rpm));
    ok(rpm_cmd().args(["-V", "--nodeps", "kr-tunneld"]));
    for f in RPM_FILES {
        assert!(
            root.join(f.trim_start_matches('/')).exists(),
            "{f} not installed"
        );
    }

    // %config(noreplace): a local change survives the upgrade, the new file is .rpmnew.
    let conf = root.join("etc/sysconfig/kr-tunneld");
    let local = fs::read_to_string(&conf).unwrap() + "KR_TUNNELD_OVERLAY_ENCAP=fou\n";
    fs::write(&conf, &local).unwrap();
    ok(rpm_cmd().args(["-U", "--nodeps", "--noscripts"]).arg(rpm2));
    assert_eq!(fs::read_to_string(&conf).unwrap(), local);
    assert!(root.join("etc/sysconfig/kr-tunneld.rpmnew").exists());
    let q = ok(rpm_cmd().args(["-q", "kr-tunneld"]));
    assert_eq!(
        q.trim(),
        format!("kr-tunneld-{}-2.x86_64", env!("CARGO_PKG_VERSION"))
    );

    // Erase: only the administrator's files stay (.rpmsave of the changed config, .rpmnew).
    ok(rpm_cmd().args(["-e", "--nodeps", "--noscripts", "kr-tunneld"]));
    let left = files_under(&root);
    let expected: BTreeSet<String> = [
        "etc/sysconfig/kr-tunneld.rpmnew",
        "etc/sysconfig/kr-tunneld.rpmsave",
    ]
    .map(String::from)
    .into();
    assert_eq!(left, expected);
}
