//! kr-tunneld: args → logging → signals → kernel and API client → main loop → exit code.
//!
//! Shell. Exit codes: 0 clean stop, 1 fatal runtime error, 2 usage or configuration error (the
//! unit sets `RestartPreventExitStatus=2`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kr_tunneld::apply::Kernel;
use kr_tunneld::cli::{self, Command, Parsed};
use kr_tunneld::config::Config;
use kr_tunneld::daemon::{self, Daemon, DsrShell, Event, Exit, Hooks, Outcome};
use kr_tunneld::health::Health;
use kr_tunneld::kube::{
    self, Client, ConnectionSettings, EndpointSlice, Node, Service, Stop, WatchOptions, WatchStats,
};
use kr_tunneld::netlink::ipvs::IpvsSocket;
use kr_tunneld::netlink::kernel::NetlinkKernel;
use kr_tunneld::systemd::{self, Notifier};
use kr_tunneld::{bgp, dsr, podns};
use kr_tunneld::{logging, metrics};

/// Exit code for usage and configuration errors.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let args = match cli::parse(std::env::args_os().skip(1), &env) {
        Ok(Parsed::Help) => {
            print!("{}", cli::help());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("{}", cli::version());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Args(a)) => a,
        Err(e) => {
            logging::early_error(&format!("{e}\ntry 'kr-tunneld --help'"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cfg = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            logging::early_error(&e.to_string());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(cfg.log_level);
    if cfg.command != Command::Status {
        // SPEC S-1: the records decide what gets deleted; refuse a directory others control.
        if let Err(e) = kr_tunneld::statefile::check_state_dir(&cfg.state_dir) {
            log::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    match cfg.command {
        Command::Run => run(cfg),
        Command::Cleanup => cleanup(cfg),
        Command::Status => status(cfg),
        Command::Adopt => {
            let ok = open_kernel().is_some_and(|mut k| adopt_kube_router(&cfg, &mut k));
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// SPEC N-1: `--hostname-override`, else `NODE_NAME`, else the host name; logged.
fn local_node_name(cfg: &Config) -> Option<String> {
    if let Some(n) = &cfg.hostname_override {
        log::info!("node name {n} (from --hostname-override)");
        return Some(n.clone());
    }
    if let Some(n) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        log::info!("node name {n} (from NODE_NAME)");
        return Some(n);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let host = host.trim().to_string();
    log::info!("node name {host} (from the host name)");
    (!host.is_empty()).then_some(host)
}

fn open_kernel() -> Option<NetlinkKernel> {
    match NetlinkKernel::open() {
        Ok(k) => Some(k),
        Err(e) => {
            log::error!("cannot open netlink sockets: {e}");
            None
        }
    }
}

/// The DSR shell over netlink, when DSR is on or an earlier run left DSR state to remove.
fn dsr_shell(cfg: &Config, cleanup: bool) -> Option<DsrShell> {
    let leftovers = [
        dsr::OWNED_FILE,
        podns::ACCEPT_LOCAL_FILE,
        podns::POD_FOU_FILE,
    ]
    .iter()
    .any(|f| {
        std::fs::metadata(cfg.state_dir.join(f))
            .map(|m| m.len() > 0)
            .unwrap_or(false)
    });
    if !(cfg.dsr.enabled || leftovers || cleanup) {
        return None;
    }
    let ipvs = match IpvsSocket::open() {
        Ok(s) => s,
        Err(e) => {
            if cfg.dsr.enabled {
                log::error!(
                    "dsr: cannot open the IPVS generic netlink family (is ip_vs loaded?): {e}"
                );
            } else {
                log::debug!("dsr: no IPVS: {e}");
            }
            return None;
        }
    };
    let group = cfg.overlay.own.link_group;
    let state_dir = cfg.state_dir.clone();
    let pods: daemon::PodsFn = Box::new(move |wants, settings| {
        let mut r = podns::reconcile_pods(
            wants,
            settings,
            || podns::NetlinkPod::open(group),
            std::path::Path::new("/run/netns"),
            std::path::Path::new("/proc"),
            &state_dir.join(podns::POD_FOU_FILE),
        );
        // The node side: accept_local where local DSR pods' replies come in (issue 13).
        let node = podns::node_accept_local(wants, &state_dir);
        r.diags.extend(node.diags.iter().cloned());
        r.outcomes.push(("(node)".into(), node));
        r
    });
    Some(DsrShell {
        ipvs: Box::new(ipvs),
        pods,
        settings: dsr::Settings::from_config(cfg),
    })
}

/// How long the start waits for the first full reconcile before READY=1 is sent anyway (SPEC
/// S-5): with the API server unreachable (at boot, an outage) `systemctl start`, dpkg's
/// try-restart and the boot itself must not wait for it. Well inside the unit's start timeout
/// (systemd's default, 90 s). The kernel state is kept as it is meanwhile; STATUS says why.
const READY_WAIT: Duration = Duration::from_secs(20);

/// READY=1 at the first full reconcile or after [`READY_WAIT`], whichever comes first; the flag
/// is held while sending so the two senders never interleave.
fn ready_after_wait(notifier: Arc<Notifier>, ready: Arc<Mutex<bool>>, server: String) {
    std::thread::spawn(move || {
        std::thread::sleep(READY_WAIT);
        let mut done = ready.lock().unwrap_or_else(|p| p.into_inner());
        if !*done {
            *done = true;
            log::warn!(
                "no full reconcile {}s after start: start-up reported done to systemd; \
                 waiting for the API server {server}, kernel state kept as it is",
                READY_WAIT.as_secs()
            );
            notifier.ready(&waiting_status(&server));
        }
    });
}

fn waiting_status(server: &str) -> String {
    format!("waiting for the API server {server} (no full reconcile yet); kernel state kept")
}

struct MainHooks {
    notifier: Arc<Notifier>,
    /// READY=1 was sent (by the first reconcile or [`ready_after_wait`]).
    ready: Arc<Mutex<bool>>,
    /// A full reconcile has been done.
    reconciled: bool,
    server: String,
    page: Arc<Mutex<String>>,
    metrics_file: Option<std::path::PathBuf>,
    stats: Arc<WatchStats>,
    watchdog: bool,
    health: Arc<Health>,
    bgp: Option<Arc<Mutex<String>>>,
}

impl MainHooks {
    fn publish(&self, m: &metrics::Metrics) {
        let mut m = m.clone();
        m.watch_restarts = self.stats.restarts();
        m.relists = self.stats.relists();
        let mut text = m.render();
        if let Some(b) = &self.bgp {
            text.push_str(&bgp::speaker::lock(b));
        }
        if let Some(path) = &self.metrics_file {
            if let Err(e) = daemon::write_atomic(path, text.as_bytes()) {
                log::warn!("cannot write metrics to {}: {e}", path.display());
            }
        }
        match self.page.lock() {
            Ok(mut p) => *p = text,
            Err(p) => *p.into_inner() = text,
        }
    }
}

impl Hooks for MainHooks {
    fn reconciled(&mut self, first: bool, outcome: &Outcome, m: &metrics::Metrics) {
        self.health.beat();
        if first {
            self.health.set_ready();
        }
        self.publish(m);
        if first {
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            self.notifier.ready(&outcome.summary);
            *ready = true;
            self.reconciled = true;
        } else {
            self.notifier.status(&outcome.summary);
        }
    }

    fn alive(&mut self) {
        self.health.beat();
        if self.watchdog {
            self.notifier.watchdog();
        }
        if !self.reconciled {
            self.notifier.status(&waiting_status(&self.server));
        }
    }

    fn stopping(&mut self) {
        self.notifier.stopping();
    }
}

/// One malloc arena for every thread (glibc): the watch threads decode lists while the main
/// thread plans, and with an arena each, memory one frees cannot serve the other, so peak RSS is
/// the sum of both peaks instead of the larger (SPEC P-4). Allocation here is not contended.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) with a documented parameter, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn run(cfg: Config) -> ExitCode {
    one_malloc_arena();
    if cfg.dsr.enabled && !cfg.dry_run {
        let missing = podns::missing_dsr_capabilities();
        if !missing.is_empty() {
            log::error!(
                "--enable-dsr needs {}: install /usr/share/kr-tunneld/dsr.conf in /etc/systemd/system/kr-tunneld.service.d/ and restart (README, DSR), or turn DSR off",
                missing.join(" and ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let Some(local) = local_node_name(&cfg) else {
        log::error!("cannot determine this node's name: set --hostname-override or NODE_NAME");
        return ExitCode::from(EXIT_USAGE);
    };
    let env = |k: &str| std::env::var(k).ok();
    let settings = match ConnectionSettings::resolve(
        cfg.kubeconfig.as_deref(),
        cfg.master.as_deref(),
        cfg.token_file.as_deref(),
        cfg.ca_file.as_deref(),
        &env,
    ) {
        Ok(s) => s,
        Err(e) => {
            log::error!("kubernetes connection settings: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let client = match Client::new(settings) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            log::error!("kubernetes client: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    log::info!(
        "kr-tunneld {} starting: node {local}, API {}",
        env!("CARGO_PKG_VERSION"),
        client.server()
    );
    let Some(mut kernel) = open_kernel() else {
        return ExitCode::FAILURE;
    };
    // Set by SIGTERM/SIGINT: a pass in progress stops between two netlink batches (SPEC S-5).
    let halt = Arc::new(AtomicBool::new(false));
    kernel.stop_on(halt.clone());

    let mut kernel = kernel;
    if cfg.adopt_kube_router {
        // Before the first pass, so that pass finds the objects already ours (SPEC B-7).
        adopt_kube_router(&cfg, &mut kernel);
    }

    let (tx, rx) = channel();
    let stop = Stop::new();
    let stats = Arc::new(WatchStats::default());
    let opts = WatchOptions {
        stats: stats.clone(),
        ..WatchOptions::default()
    };
    let node_tx = tx.clone();
    let bgp_feed = bgp::speaker::Feed::default();
    let node_bgp = cfg.bgp.enabled.then(|| bgp_feed.clone());
    kube::spawn_watch::<Node>(
        client.clone(),
        opts.clone(),
        move |u| {
            if let Some(f) = &node_bgp {
                f.nodes(&u);
            }
            // The receiver only goes away when the main loop has ended.
            let _ = node_tx.send(Event::Nodes(u));
        },
        stop.clone(),
    );
    if cfg.dsr.enabled {
        let svc_tx = tx.clone();
        let send = move |u| {
            let _ = svc_tx.send(Event::Services(u));
        };
        kube::spawn_watch::<Service>(client.clone(), opts.clone(), send, stop.clone());
        let eps_tx = tx.clone();
        let send = move |u| {
            let _ = eps_tx.send(Event::Slices(u));
        };
        kube::spawn_watch::<EndpointSlice>(client.clone(), opts, send, stop.clone());
    }
    let dsr_shell = dsr_shell(&cfg, false);
    if cfg.dsr.enabled && dsr_shell.is_none() {
        return ExitCode::FAILURE;
    }

    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]);
    match signals {
        Ok(mut signals) => {
            let sig_tx = tx.clone();
            let sig_stop = stop.clone();
            let sig_halt = halt.clone();
            std::thread::spawn(move || {
                for s in signals.forever() {
                    let ev = if s == signal_hook::consts::SIGHUP {
                        Event::Resync
                    } else {
                        // Unblock the watch threads at once; the main loop exits on Stop.
                        sig_halt.store(true, Ordering::Relaxed);
                        sig_stop.trigger();
                        Event::Stop
                    };
                    if sig_tx.send(ev).is_err() {
                        break;
                    }
                }
            });
        }
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop(tx);

    let watchdog = systemd::watchdog_interval();
    let alive_every = watchdog.unwrap_or(Duration::from_secs(30));
    // SPEC S-8: /healthz fails after three missed wake-ups of the main loop, /readyz also
    // without an answer from the API server for a resync period.
    let health = Arc::new(Health::new(3 * alive_every, cfg.resync, stats.clone()));
    let page = Arc::new(Mutex::new(String::new()));
    let listeners = [
        (cfg.metrics_addr, Some(page.clone()), "metrics"),
        (cfg.health_addr, None, "health probes"),
    ];
    for (addr, page, what) in listeners {
        let Some(addr) = addr else { continue };
        if let Err(e) = metrics::serve(addr, page, Some(health.clone())) {
            log::error!("cannot serve {what} on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let speaker = if cfg.bgp.enabled {
        match bgp::speaker::Speaker::start(&cfg, local.clone(), &bgp_feed, page.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("bgp: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let notifier = Arc::new(Notifier::from_env());
    let ready = Arc::new(Mutex::new(false));
    let server = client.server().to_string();
    ready_after_wait(notifier.clone(), ready.clone(), server.clone());
    let mut hooks = MainHooks {
        notifier,
        ready,
        reconciled: false,
        server,
        page,
        metrics_file: cfg.metrics_file.clone(),
        stats,
        watchdog: watchdog.is_some(),
        health,
        bgp: speaker.as_ref().map(|s| s.metrics_page()),
    };
    let out: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
    let mut d = Daemon::new(cfg, local, kernel, out);
    if let Some(shell) = dsr_shell {
        d = d.with_dsr(shell);
    }
    let exit = daemon::run_loop(&mut d, &rx, &mut hooks, Some(alive_every));
    stop.trigger();
    if let Some(s) = speaker {
        s.stop();
    }
    log::info!("stopped; tunnels, routes and rules stay in place");
    match exit {
        Exit::Clean => ExitCode::SUCCESS,
        Exit::Failed => ExitCode::FAILURE,
    }
}

/// SPEC B-7: replace what kube-router left on this node by our own objects, without a gap (the
/// plan and its order: [`kr_tunneld::adopt`]). False if reading failed or any op failed.
fn adopt_kube_router(cfg: &Config, kernel: &mut NetlinkKernel) -> bool {
    use kr_tunneld::adopt::{self, Leftovers, KUBE_ROUTER_PROTOCOL, KUBE_ROUTER_TABLE};
    let ov = &cfg.overlay;
    let read = |k: &mut NetlinkKernel| -> Result<_, kr_tunneld::apply::KernelError> {
        let actual = k.read(&ov.own)?;
        let mut routes = k.routes(KUBE_ROUTER_PROTOCOL, &actual.links)?;
        // Table-77 routes carry the netlink default protocol, boot (3); the rule none (0).
        let boot = k.routes(libc::RTPROT_BOOT, &actual.links)?;
        routes.extend(boot.into_iter().filter(|r| r.table == KUBE_ROUTER_TABLE));
        let rules = k.rules(libc::RTPROT_UNSPEC)?;
        Ok((actual, Leftovers { routes, rules }))
    };
    let (actual, left) = match read(kernel) {
        Ok(x) => x,
        Err(e) => {
            log::error!("adopt: reading kernel state failed: {e}");
            return false;
        }
    };
    let rx = adopt::receivers(&actual, ov);
    if cfg.dry_run {
        rx.iter().for_each(|op| println!("would {op}"));
    } else {
        for (_, e) in kernel.apply(&ov.own, &rx) {
            log::warn!("adopt: {e}");
        }
    }
    let mut bound = Vec::new();
    for b in adopt::binds(&actual, ov) {
        if cfg.dry_run {
            println!("would bind tunnel {} to ifindex {}", b.have.name, b.oif);
            bound.push(b.index);
            continue;
        }
        match kernel.bind_tunnel(b.index, &b.have, b.oif) {
            Ok(()) => {
                bound.push(b.index);
            }
            Err(e) => log::warn!("adopt: {e}; it is replaced delete-first"),
        }
    }
    let plan = adopt::plan(&actual, &left, ov, &bound);
    for n in &plan.notes {
        log::warn!("adopt: {n}");
    }
    if cfg.dry_run {
        for op in &plan.ops {
            println!("would {op}");
        }
        return true;
    }
    let failed = kernel.apply(&ov.own, &plan.ops);
    for (i, op) in plan.ops.iter().enumerate() {
        match failed.iter().find(|(j, _)| *j == i) {
            Some((_, e)) => log::error!("adopt: {e}"),
            None => log::info!("adopt: {op}"),
        }
    }
    if let Err(e) = daemon::record_owned_fou(&cfg.state_dir, &plan.fou) {
        log::error!("adopt: cannot record the FOU ports as ours: {e}");
    }
    log::info!(
        "adopt: kube-router's state taken over ({} ops, {} tunnels bound first, {} FOU ports, {} failures)",
        plan.ops.len(),
        bound.len(),
        plan.fou.len(),
        failed.len()
    );
    failed.is_empty()
}

fn cleanup(cfg: Config) -> ExitCode {
    let Some(kernel) = open_kernel() else {
        return ExitCode::FAILURE;
    };
    let mut d = Daemon::new(cfg, String::new(), kernel, Box::new(std::io::stdout()));
    match d.cleanup() {
        Ok(o) => {
            log::info!("{}", o.summary);
            if o.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            log::error!("cleanup: reading kernel state failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(cfg: Config) -> ExitCode {
    let Some(mut kernel) = open_kernel() else {
        return ExitCode::FAILURE;
    };
    let own = cfg.overlay.own.clone();
    let actual = match kernel.read(&own) {
        Ok(a) => a,
        Err(e) => {
            log::error!("reading kernel state: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", daemon::kernel_table(&actual, &own));
    match std::fs::read_to_string(cfg.state_dir.join("peers")) {
        Ok(t) => print!(
            "\nlast reconcile ({}):\n{t}",
            cfg.state_dir.join("peers").display()
        ),
        Err(_) => println!(
            "\nno peer table in {} (daemon not running?)",
            cfg.state_dir.display()
        ),
    }
    if let Ok(t) = std::fs::read_to_string(cfg.state_dir.join("bgp")) {
        print!("\n{t}");
    }
    ExitCode::SUCCESS
}
