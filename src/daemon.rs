//! The daemon: one event funnel, one thread that owns the kernel sockets.
//!
//! Shell module. Watch threads and the signal thread send [`Event`]s into one channel; the main
//! thread keeps the watch caches, and on every change (coalesced), on the resync timer and on
//! SIGHUP it rebuilds the desired state from the whole cache, reads the kernel, plans and applies
//! (SPEC T-9). A change of peer Nodes alone is planned incrementally: only those peers' objects,
//! against the kernel state kept from the last full pass (SPEC P-3). Nothing here decides what the kernel should hold: [`crate::nodes`] and
//! [`crate::reconcile`] do. SIGTERM/SIGINT stop the loop and leave the data path in place
//! (SPEC O-4).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::apply::{Kernel, KernelError};
use crate::config::Config;
use crate::dsr;
use crate::kube::types::{EndpointSlice, Node, Service};
use crate::kube::{Resource, Update};
use crate::metrics::Metrics;
use crate::model::{Actual, Encap, Family, FouPort, Link, NextHop, Op, Route};
use crate::netlink::ipvs::IpvsKernel;
use crate::nodes::{self, Desired, Diag, Mode, NodeInfo};
use crate::podns::PodsReport;
use crate::reconcile;

/// Everything the main loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// A change to the Node cache.
    Nodes(Update<Node>),
    /// A change to the Service cache (DSR only).
    Services(Update<Service>),
    /// A change to the EndpointSlice cache (DSR only).
    Slices(Update<EndpointSlice>),
    /// SIGTERM or SIGINT: stop, leaving the data path up.
    Stop,
    /// SIGHUP: full resync now.
    Resync,
}

/// The fields of a Node object the overlay uses.
pub fn node_info(n: &Node) -> NodeInfo {
    NodeInfo {
        name: n.metadata.name.clone(),
        // The address types the overlay reads, and any other that holds an IP (the DSR
        // host-network check looks at every node IP); not host or DNS names.
        addresses: n
            .status
            .addresses
            .iter()
            .filter(|a| {
                a.type_ == "InternalIP"
                    || a.type_ == "ExternalIP"
                    || a.address.trim().parse::<IpAddr>().is_ok()
            })
            .map(|a| (a.type_.clone(), a.address.clone()))
            .collect(),
        // Only the annotations the overlay reads: a real Node carries a dozen more.
        annotations: n
            .metadata
            .annotations
            .iter()
            .filter(|(k, _)| *k == nodes::ANN_POD_CIDRS || *k == nodes::ANN_POD_CIDR)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        pod_cidr: (!n.spec.pod_cidr.is_empty()).then(|| n.spec.pod_cidr.clone()),
        pod_cidrs: n.spec.pod_cidrs.clone(),
    }
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Ops planned.
    pub planned: usize,
    /// Ops that failed.
    pub failed: usize,
    /// The one-line summary (SPEC O-6).
    pub summary: String,
    /// The pass was cut short by a stop between two batches (SPEC S-5).
    pub stopped: bool,
}

/// Converges the receiving pods of this node (SPEC D-4); the daemon passes
/// [`crate::podns::reconcile_pods`] over netlink, tests an in-memory one.
pub type PodsFn =
    Box<dyn FnMut(&BTreeMap<std::net::IpAddr, dsr::PodWant>, &dsr::Settings) -> PodsReport + Send>;

/// The DSR side of the shell: IPVS over generic netlink and the pod namespaces.
pub struct DsrShell {
    /// IPVS access.
    pub ipvs: Box<dyn IpvsKernel + Send>,
    /// Pod-side convergence.
    pub pods: PodsFn,
    /// DSR settings derived from the configuration.
    pub settings: dsr::Settings,
}

/// The DSR part of a pass between its stages (see [`dsr::Stage`]).
struct DsrWork {
    /// Pod-side wants of this node's endpoints.
    pods: BTreeMap<std::net::IpAddr, dsr::PodWant>,
    /// IPVS ops and the ownership record.
    ipvs: dsr::IpvsPlan,
    /// Where the record lives.
    record_path: PathBuf,
    /// Who claims each key (the record's origins).
    claims: Vec<(dsr::ServiceKey, String)>,
    /// Failed IPVS ops so far: index into `ipvs.ops` and errno.
    failed: Vec<(usize, i32)>,
}

/// A watch cache keyed like the API (`name` or `namespace/name`), with "listed at least once".
struct Cache<T> {
    items: BTreeMap<String, T>,
    synced: bool,
}

impl<T: Resource> Cache<T> {
    fn new() -> Cache<T> {
        Cache {
            items: BTreeMap::new(),
            synced: false,
        }
    }

    fn apply(&mut self, u: Update<T>) {
        match u {
            Update::Replace(all) => {
                self.items = all.into_iter().map(|o| (o.key(), o)).collect();
                self.synced = true;
            }
            Update::Upsert(o) => {
                self.items.insert(o.key(), o);
            }
            Update::Delete(o) => {
                self.items.remove(&o.key());
            }
        }
    }

    fn values(&self) -> Vec<T> {
        self.items.values().cloned().collect()
    }
}

/// What a full pass leaves for the incremental path (SPEC P-3): the kernel state as it stands
/// after the pass, and what the desired state was computed from.
struct Last {
    /// Links by name (ours and foreign: a foreign link may hold a name we want).
    links: HashMap<String, Link>,
    /// Our routes by (table, destination).
    routes: HashMap<(u32, IpNet), Route>,
    ctx: nodes::Context,
    claims: nodes::Claims,
}

impl Last {
    fn new(actual: Actual, ctx: nodes::Context, claims: nodes::Claims) -> Last {
        Last {
            links: actual
                .links
                .into_iter()
                .map(|l| (l.name.clone(), l))
                .collect(),
            routes: actual
                .routes
                .into_iter()
                .map(|r| ((r.table, r.dst), r))
                .collect(),
            ctx,
            claims,
        }
    }

    /// Bring the kept routes and links up to date with `ops`, which all succeeded. Created and
    /// changed links are read back by the caller.
    fn absorb(&mut self, ops: &[Op], scope: &nodes::Scope) {
        for op in ops {
            match op {
                Op::ReplaceRoute(r) => {
                    self.routes.insert((r.table, r.dst), r.clone());
                }
                Op::DeleteRoute(r) => {
                    self.routes.remove(&(r.table, r.dst));
                }
                Op::DeleteTunnel { name, .. } => {
                    self.links.remove(name);
                    // The kernel deletes the routes through it; they are all in scope.
                    for k in &scope.routes {
                        if self
                            .routes
                            .get(k)
                            .is_some_and(|r| matches!(&r.nexthop, NextHop::Dev(d) if d == name))
                        {
                            self.routes.remove(k);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// The daemon state owned by the main thread.
pub struct Daemon<K: Kernel> {
    cfg: Config,
    local: String,
    kernel: K,
    nodes: BTreeMap<String, NodeInfo>,
    synced: bool,
    owned_fou: BTreeSet<FouPort>,
    last_diags: BTreeSet<Diag>,
    last_problems: BTreeSet<String>,
    /// The last pass logged a problem not seen before (else its failures were reported already,
    /// and its summary is not repeated at warning level).
    new_problems: bool,
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    dsr: Option<DsrShell>,
    /// IPVS services owned and IPVS ops planned by the last DSR pass.
    dsr_last: (usize, usize),
    /// The peer table of the last reconcile (what `status` shows), as a [`Desired`] without
    /// objects.
    desired: Desired,
    /// Peers whose Node changed since the last pass.
    changed: BTreeSet<String>,
    /// The next pass must read the whole kernel (first pass, relist, SIGHUP, resync timer, the
    /// local node or DSR input changed, a failure).
    full: bool,
    /// State for the incremental path; `None` forces a full pass.
    last: Option<Last>,
    /// Counters for metrics.
    pub metrics: Metrics,
    out: Box<dyn Write + Send>,
}

impl<K: Kernel> Daemon<K> {
    /// A daemon for node `local` over `kernel`. The FOU ports opened by an earlier run are read
    /// from the state directory.
    pub fn new(cfg: Config, local: String, kernel: K, out: Box<dyn Write + Send>) -> Daemon<K> {
        let owned_fou = read_fou_state(&fou_state_path(&cfg.state_dir));
        Daemon {
            cfg,
            local,
            kernel,
            nodes: BTreeMap::new(),
            synced: false,
            owned_fou,
            last_diags: BTreeSet::new(),
            last_problems: BTreeSet::new(),
            new_problems: false,
            services: Cache::new(),
            slices: Cache::new(),
            dsr: None,
            dsr_last: (0, 0),
            desired: Desired::default(),
            changed: BTreeSet::new(),
            full: true,
            last: None,
            metrics: Metrics::default(),
            out,
        }
    }

    /// Enable the DSR side (with `--enable-dsr`, or to clean up what an earlier run left).
    pub fn with_dsr(mut self, shell: DsrShell) -> Daemon<K> {
        self.dsr = Some(shell);
        self
    }

    /// Apply a Service cache update.
    pub fn on_services(&mut self, u: Update<Service>) {
        self.services.apply(u);
        self.full = true;
    }

    /// Apply an EndpointSlice cache update.
    pub fn on_slices(&mut self, u: Update<EndpointSlice>) {
        self.slices.apply(u);
        self.full = true;
    }

    /// Make the next pass a full one (SIGHUP, the resync timer).
    pub fn request_full(&mut self) {
        self.full = true;
    }

    /// The peer table of the last reconcile.
    pub fn peers(&self) -> &[nodes::Peer] {
        &self.desired.peers
    }

    /// Whether every enabled input has been listed at least once: Nodes, and with DSR enabled
    /// Services and EndpointSlices too. No pass runs before (READY=1, the first full pass and
    /// `--once` mean "converged with every enabled input listed").
    pub fn synced(&self) -> bool {
        self.synced
            && (self.dsr.is_none()
                || !self.cfg.dsr.enabled
                || (self.services.synced && self.slices.synced))
    }

    /// The kernel (for tests).
    pub fn kernel(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Apply a Node cache update; `false` when nothing the overlay uses changed (a Node's status
    /// heartbeats, labels, other annotations), so no pass is needed.
    pub fn on_nodes(&mut self, u: Update<Node>) -> bool {
        let name = match u {
            Update::Replace(all) => {
                self.nodes = all
                    .iter()
                    .map(|n| (n.metadata.name.clone(), node_info(n)))
                    .collect();
                self.synced = true;
                self.full = true;
                return true;
            }
            Update::Upsert(n) => {
                let info = node_info(&n);
                if self.nodes.get(&n.metadata.name) == Some(&info) {
                    return false;
                }
                self.nodes.insert(n.metadata.name.clone(), info);
                n.metadata.name
            }
            Update::Delete(n) => {
                if self.nodes.remove(&n.metadata.name).is_none() {
                    return false;
                }
                n.metadata.name
            }
        };
        if name == self.local {
            self.full = true;
        } else {
            self.changed.insert(name);
        }
        true
    }

    /// Log each problem once per change: a line appears when it first shows up, not on every
    /// resync (SPEC N-4). `scope`: the nodes an incremental pass looked at; the diagnostics of
    /// the others stand, and problems are only added (the next full pass prunes them).
    fn log_new(
        &mut self,
        diags: Vec<Diag>,
        problems: Vec<String>,
        scope: Option<&BTreeSet<String>>,
    ) {
        let mut diags: BTreeSet<Diag> = diags.into_iter().collect();
        self.new_problems = false;
        for d in diags.difference(&self.last_diags) {
            log::warn!("{d}");
        }
        let problems: BTreeSet<String> = problems.into_iter().collect();
        for p in problems.difference(&self.last_problems) {
            log::warn!("{p}");
            self.new_problems = true;
        }
        match scope {
            None => {
                self.last_diags = diags;
                self.last_problems = problems;
            }
            Some(nodes) => {
                self.last_diags.retain(|d| !nodes.contains(&d.node));
                self.last_diags.append(&mut diags);
                self.last_problems.extend(problems);
            }
        }
    }

    /// The incremental pass (see [`Daemon::reconcile`]); `None` when it does not apply and a full
    /// pass must run.
    fn incremental(&mut self, now: Instant) -> Option<Outcome> {
        if self.full || self.changed.is_empty() || self.cfg.dry_run || self.cfg.dsr.enabled {
            return None;
        }
        let mut last = self.last.take()?;
        let changed = std::mem::take(&mut self.changed);
        let cfg = &self.cfg.overlay;
        let mut diags = Vec::new();
        let scope = nodes::update(
            &last.ctx,
            cfg,
            &mut self.desired,
            &mut last.claims,
            changed.iter().map(|n| (n.as_str(), self.nodes.get(n))),
            &mut diags,
        );
        let Some(scope) = scope else {
            log::debug!("a pod CIDR or tunnel name is contested: full pass");
            return None;
        };
        // The kernel objects the planner must see, looked up by key: links holding a name in
        // scope, and routes with a key in scope. After a full pass every owned route is one the
        // peer table names, so the changed peers' keys find all of theirs. A foreign link with
        // the endpoints of a new tunnel is not looked for: the kernel refuses the create
        // (EEXIST), that fails the pass, and the full pass that follows reports the clash.
        let part = Actual {
            links: scope
                .names
                .iter()
                .filter_map(|n| last.links.get(n))
                .cloned()
                .collect(),
            routes: scope
                .routes
                .iter()
                .filter_map(|k| last.routes.get(k))
                .cloned()
                .collect(),
            ..Actual::default()
        };
        let own = cfg.own.clone();
        let plan = reconcile::plan(&scope.want, &part, &own, &BTreeSet::new());
        let mut problems = plan.clashes.clone();
        let failed = if plan.ops.is_empty() {
            Vec::new()
        } else {
            self.kernel.apply(&own, &plan.ops)
        };
        if failed.iter().any(|(_, e)| e.is_not_sent()) {
            return Some(self.cut_short());
        }
        problems.extend(failed.iter().map(|(_, e)| e.to_string()));
        if failed.is_empty() {
            last.absorb(&plan.ops, &scope);
            let names: Vec<&str> = scope.names.iter().map(String::as_str).collect();
            match self.kernel.links_named(&names) {
                Ok(links) => {
                    for n in &scope.names {
                        last.links.remove(n);
                    }
                    for l in links {
                        last.links.insert(l.name.clone(), l);
                    }
                    self.last = Some(last);
                }
                Err(e) => {
                    log::debug!("reading back the changed links failed: {e}; full pass next");
                    self.full = true;
                }
            }
        } else {
            // What the kernel holds now is uncertain: the retry is a full pass.
            self.full = true;
        }
        self.log_new(diags, problems, Some(&changed));
        self.metrics.incremental += 1;
        Some(self.finish(plan.ops.len(), failed.len(), now))
    }

    /// Compute the desired state from the cache and the kernel, plan, and apply (or print, with
    /// `--dry-run`). `Err` only when the kernel could not be read: then nothing was changed.
    ///
    /// When only peers changed since a full pass that left the kernel as planned, only their
    /// objects are planned, against the kernel state that pass saw as updated by what was applied
    /// since (SPEC P-3: one event costs the same at any cluster size). Everything else (and any
    /// doubt: a failure, a contested pod CIDR, DSR) takes the full path: read the whole kernel,
    /// compute everything, plan everything.
    pub fn reconcile(&mut self, now: Instant) -> Result<Outcome, KernelError> {
        if let Some(outcome) = self.incremental(now) {
            return Ok(outcome);
        }
        self.full = true;
        self.last = None;
        let own = self.cfg.overlay.own.clone();
        let actual = self.kernel.read(&own)?;
        let nodes: Vec<&NodeInfo> = self.nodes.values().collect();
        let mut diags = Vec::new();
        let computed = nodes::full(&self.local, &nodes, &actual, &self.cfg.overlay, &mut diags);
        drop(nodes);
        let Some((mut desired, ctx, claims)) = computed else {
            self.log_new(diags, Vec::new(), None);
            return Ok(Outcome {
                summary: "local node unknown; kernel left as it is".into(),
                ..Outcome::default()
            });
        };
        let mut problems = Vec::new();
        let mut work = self.dsr_pass(&actual, &mut desired, &mut problems, false);
        // Pod receivers and real servers before the director rules are added (issue 13).
        let mut errors = 0;
        if let Some(w) = work.as_mut() {
            errors += self.dsr_before_rules(w, &mut problems);
        }
        let mut plan = reconcile::plan(&desired, &actual, &own, &self.owned_fou);
        problems.extend(plan.clashes.iter().cloned());
        let mut failed = Vec::new();
        if self.cfg.dry_run {
            for op in &plan.ops {
                // Best effort: stdout may be closed; the plan is also in the debug log.
                let _ = writeln!(self.out, "would {op}");
                log::debug!("plan: {op}");
            }
        } else if !plan.ops.is_empty() {
            if let Err(e) = self.record_fou_first(&plan.ops) {
                // Opening a port we could not record would leak it (SPEC S-1, R-3).
                problems.push(e);
                plan.ops.retain(|op| !matches!(op, Op::AddFouPort(_)));
            }
            failed = self.kernel.apply(&own, &plan.ops);
            let failed_idx: BTreeSet<usize> = failed.iter().map(|(i, _)| *i).collect();
            self.track_fou(&plan.ops, &failed_idx);
            if failed.iter().any(|(_, e)| e.is_not_sent()) {
                return Ok(self.cut_short());
            }
            for (_, e) in &failed {
                problems.push(e.to_string());
            }
        }
        errors += failed.len();
        // Services deleted only after their director rules are gone.
        if let Some(w) = work {
            errors += self.dsr_after_rules(w, &mut problems);
        }
        self.log_new(diags, problems, None);
        self.changed.clear();
        self.full = false;
        // Keep what the incremental path needs when it can be used: the kernel as it now is
        // (read again if this pass changed it; dropped first, so two copies never coexist).
        let planned = plan.ops.len();
        drop(plan);
        if errors == 0 && !self.cfg.dry_run && !self.cfg.dsr.enabled {
            let actual = if planned == 0 {
                Some(actual)
            } else {
                drop(actual);
                self.kernel.read(&own).ok()
            };
            self.last = actual.map(|actual| Last::new(actual, ctx, claims));
        }
        // Only the peer table is kept (status, summary, the incremental path): the objects follow
        // from it and are recomputed by every full pass (SPEC P-4).
        self.desired = Desired {
            peers: desired.peers,
            ..Desired::default()
        };
        release_free_memory();
        let ops = planned + self.dsr_last.1;
        Ok(self.finish(ops, errors, now))
    }

    /// A pass cut short by a stop (SPEC S-5): what was applied stays and is not a failure;
    /// nothing is kept for the incremental path.
    fn cut_short(&mut self) -> Outcome {
        self.full = true;
        self.last = None;
        Outcome {
            summary: "stopped in the middle of a pass; the next start converges".into(),
            stopped: true,
            ..Outcome::default()
        }
    }

    /// The summary line, metrics and outcome of a pass.
    fn finish(&mut self, ops: usize, errors: usize, now: Instant) -> Outcome {
        let elapsed = now.elapsed();
        let dsr_services = self.dsr_last.0;
        let census = nodes::census(&self.desired.peers);
        let summary = summary(&census, dsr_services, ops, errors, elapsed);
        self.metrics.record(&census, ops, errors, elapsed);
        self.metrics.dsr_services = dsr_services;
        if ops > 0 {
            if errors > 0 && self.new_problems {
                log::warn!("{summary}");
            } else if errors > 0 {
                // The same failures as before, each reported once already (issue 12).
                log::debug!("{summary}");
            } else {
                log::info!("{summary}");
            }
        } else {
            log::debug!("{summary}");
        }
        Outcome {
            planned: ops,
            failed: errors,
            summary,
            stopped: false,
        }
    }

    /// The DSR part of a pass (SPEC D-1…D-5): plan and apply IPVS, add the director rules and
    /// routes to the overlay's desired state (they carry our protocol, so the overlay planner
    /// would otherwise remove them), and return the pod-side wants for after the overlay ops.
    ///
    /// Until Services and EndpointSlices have been listed, the DSR rules and routes in the
    /// kernel are kept as they are: an empty cache proves nothing (SPEC K-4).
    fn dsr_pass(
        &mut self,
        actual: &crate::model::Actual,
        desired: &mut Desired,
        problems: &mut Vec<String>,
        cleanup: bool,
    ) -> Option<DsrWork> {
        let table = self.cfg.dsr.table;
        let keep_as_is = |desired: &mut Desired| {
            desired
                .rules
                .extend(actual.rules.iter().filter(|r| r.table == table).cloned());
            desired
                .routes
                .extend(actual.routes.iter().filter(|r| r.table == table).cloned());
        };
        let shell = self.dsr.as_mut()?;
        let enabled = self.cfg.dsr.enabled && !cleanup;
        if enabled && !(self.services.synced && self.slices.synced) {
            keep_as_is(desired);
            return None;
        }
        let record_path = self.cfg.state_dir.join(dsr::OWNED_FILE);
        let text = std::fs::read_to_string(&record_path).unwrap_or_default();
        let incumbents = dsr::parse_record(&text);
        let owned = incumbents.iter().map(|c| c.0).collect();
        let ipvs = match shell.ipvs.read(&owned) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!(
                    "dsr: reading IPVS failed, DSR state left as it is: {e}"
                ));
                keep_as_is(desired);
                return None;
            }
        };
        let (services, slices) = if enabled {
            (self.services.values(), self.slices.values())
        } else {
            (Vec::new(), Vec::new()) // DSR off: remove what an earlier run made
        };
        let node_ips = if enabled {
            dsr::node_ips(self.nodes.values())
        } else {
            BTreeSet::new()
        };
        let inputs = dsr::Inputs {
            services: &services,
            slices: &slices,
            local_node: &self.local,
            node_ips: &node_ips,
            incumbents: &incumbents,
        };
        let p = dsr::plan(&inputs, &shell.settings, &ipvs, &owned);
        self.dsr_last = (p.ipvs.record.len(), p.ipvs.ops.len());
        problems.extend(p.diags.iter().map(|d| d.to_string()));
        if self.cfg.dry_run {
            for op in &p.ipvs.ops {
                let _ = writeln!(self.out, "would {op}");
            }
        } else if dsr::render_owned(&p.ipvs.record, &p.claims) != text {
            // Record first, so a crash between create and record cannot orphan a service.
            let r = dsr::render_owned(&p.ipvs.record, &p.claims);
            if let Err(e) = write_atomic(&record_path, r.as_bytes()) {
                problems.push(format!(
                    "dsr: cannot write {}: {e}; not changing IPVS",
                    record_path.display()
                ));
                keep_as_is(desired);
                return None;
            }
        }
        desired.rules.extend(p.rules);
        desired.routes.extend(p.routes);
        Some(DsrWork {
            pods: p.pods,
            ipvs: p.ipvs,
            record_path,
            claims: p.claims,
            failed: Vec::new(),
        })
    }

    /// Applies the IPVS ops of one [`dsr::Stage`] (none with `--dry-run`); failures go to
    /// `problems` and are kept for the record.
    fn ipvs_stage(&mut self, w: &mut DsrWork, stage: dsr::Stage, problems: &mut Vec<String>) {
        let Some(shell) = self.dsr.as_mut() else {
            return;
        };
        // dsr::plan groups the ops by stage: this one is a contiguous run.
        let ops = &w.ipvs.ops;
        let start = ops.iter().position(|op| op.stage() == stage);
        let Some(start) = start.filter(|_| !self.cfg.dry_run) else {
            return;
        };
        let n = ops[start..]
            .iter()
            .take_while(|op| op.stage() == stage)
            .count();
        for (i, e) in shell.ipvs.apply(&ops[start..start + n]) {
            problems.push(e.to_string());
            w.failed.push((start + i, e.errno));
        }
    }

    /// Runs the pod side for `w`, logging what it did; returns the number of failed ops.
    fn dsr_pods(&mut self, w: &DsrWork, problems: &mut Vec<String>) -> usize {
        let (Some(shell), false) = (self.dsr.as_mut(), self.cfg.dry_run) else {
            return 0;
        };
        let report = (shell.pods)(&w.pods, &shell.settings);
        let mut errors = 0;
        for (ns, o) in &report.outcomes {
            for a in &o.applied {
                log::info!("pod netns {}: {a}", ns.display());
            }
            for e in &o.failed {
                problems.push(format!("pod netns {}: {e}", ns.display()));
            }
            errors += o.failed.len();
        }
        problems.extend(report.diags.iter().map(|d| d.to_string()));
        errors
    }

    /// The DSR steps before the overlay ops (which add and remove the director rules): IPVS
    /// services and real-server removals, the pod receivers, then new real servers.
    fn dsr_before_rules(&mut self, w: &mut DsrWork, problems: &mut Vec<String>) -> usize {
        self.ipvs_stage(w, dsr::Stage::BeforePods, problems);
        let errors = self.dsr_pods(w, problems);
        self.ipvs_stage(w, dsr::Stage::AfterPods, problems);
        errors
    }

    /// The DSR step after the overlay ops: services deleted, then the ownership record.
    fn dsr_after_rules(&mut self, mut w: DsrWork, problems: &mut Vec<String>) -> usize {
        self.ipvs_stage(&mut w, dsr::Stage::AfterRules, problems);
        if !self.cfg.dry_run && !w.ipvs.ops.is_empty() {
            let after = w.ipvs.record_after(&w.failed);
            if let Err(e) = write_atomic(
                &w.record_path,
                dsr::render_owned(&after, &w.claims).as_bytes(),
            ) {
                problems.push(format!(
                    "dsr: cannot write {}: {e}",
                    w.record_path.display()
                ));
            }
        }
        w.failed.len()
    }

    /// Record the FOU ports `ops` will open before they are opened (SPEC S-1, R-3): a kill -9
    /// between the two then cannot leak a port. `Err` (with the message) when the record cannot
    /// be written: then the ports must not be opened.
    fn record_fou_first(&mut self, ops: &[Op]) -> Result<(), String> {
        let before = self.owned_fou.len();
        for op in ops {
            if let Op::AddFouPort(p) = op {
                self.owned_fou.insert(*p);
            }
        }
        if self.owned_fou.len() == before {
            return Ok(());
        }
        let path = fou_state_path(&self.cfg.state_dir);
        write_fou_state(&path, &self.owned_fou).map_err(|e| {
            format!(
                "cannot record owned FOU ports in {}: {e}; not opening FOU ports",
                path.display()
            )
        })
    }

    /// Remember the FOU ports we opened or closed, in memory and in the state directory, so a
    /// later run closes only ports it opened (they carry no owner mark in the kernel). Ports to
    /// open were recorded before (see [`Daemon::record_fou_first`]); those that failed to open
    /// are dropped from the record again.
    fn track_fou(&mut self, ops: &[Op], failed: &BTreeSet<usize>) {
        let before = self.owned_fou.clone();
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::AddFouPort(p) if failed.contains(&i) => {
                    self.owned_fou.remove(p);
                }
                Op::AddFouPort(p) => {
                    self.owned_fou.insert(*p);
                }
                Op::DelFouPort(p) if !failed.contains(&i) => {
                    self.owned_fou.remove(p);
                }
                _ => {}
            }
        }
        if before != self.owned_fou {
            let path = fou_state_path(&self.cfg.state_dir);
            if let Err(e) = write_fou_state(&path, &self.owned_fou) {
                log::warn!("cannot record owned FOU ports in {}: {e}", path.display());
            }
        }
    }

    /// Remove every object kr-tunneld owns (the `cleanup` command): IPVS services it recorded,
    /// pod receivers, tunnels, routes, rules and FOU ports.
    pub fn cleanup(&mut self) -> Result<Outcome, KernelError> {
        let own = self.cfg.overlay.own.clone();
        let actual = self.kernel.read(&own)?;
        let mut desired = Desired::default();
        let mut problems = Vec::new();
        let mut work = self.dsr_pass(&actual, &mut desired, &mut problems, true);
        if let Some(w) = work.as_mut() {
            self.dsr_before_rules(w, &mut problems);
        }
        let plan = reconcile::plan(&desired, &actual, &own, &self.owned_fou);
        if self.cfg.dry_run {
            for p in &problems {
                log::warn!("{p}");
            }
            for op in &plan.ops {
                let _ = writeln!(self.out, "would {op}");
            }
            return Ok(Outcome {
                planned: plan.ops.len(),
                ..Outcome::default()
            });
        }
        let failed = self.kernel.apply(&own, &plan.ops);
        let failed_idx: BTreeSet<usize> = failed.iter().map(|(i, _)| *i).collect();
        for (_, e) in &failed {
            log::error!("{e}");
        }
        self.track_fou(&plan.ops, &failed_idx);
        if let Some(w) = work {
            self.dsr_after_rules(w, &mut problems);
        }
        for p in &problems {
            log::warn!("{p}");
        }
        Ok(Outcome {
            planned: plan.ops.len(),
            failed: failed.len(),
            summary: format!(
                "cleanup: {} objects removed, {} failures",
                plan.ops.len() - failed.len(),
                failed.len()
            ),
            ..Outcome::default()
        })
    }

    /// Write the peer table for `kr-tunneld status`.
    pub fn write_status(&self) {
        let path = self.cfg.state_dir.join("peers");
        let text = peer_table(&self.desired.peers);
        if let Err(e) = write_atomic(&path, text.as_bytes()) {
            log::debug!("cannot write {}: {e}", path.display());
        }
    }
}

/// Hand the heap pages a full pass freed back to the kernel (glibc keeps them otherwise), so
/// the resident size between passes is what is kept, not the pass's peak (SPEC P-4).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The one-line reconcile summary (SPEC O-6).
pub fn summary(
    c: &nodes::Census,
    dsr_services: usize,
    ops: usize,
    failed: usize,
    took: Duration,
) -> String {
    let mut named: BTreeMap<String, usize> = BTreeMap::new();
    for ((family, encap), n) in &c.tunnels {
        let family = *family;
        let e = match encap {
            Encap::None if family == Family::V4 => "ipip".to_string(),
            Encap::None => "ip6ip6".to_string(),
            Encap::Gue { .. } => format!("gue-{family}"),
            other => other.to_string(),
        };
        *named.entry(e).or_default() += n;
    }
    let tunnels: Vec<String> = named.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "reconciled: peers={} tunnels=[{}] direct={} dsr={} ops={} failed={} took={}ms",
        c.nodes,
        tunnels.join(" "),
        c.direct,
        dsr_services,
        ops,
        failed,
        took.as_millis()
    )
}

/// The peer table as text (SPEC O-6).
pub fn peer_table(peers: &[nodes::Peer]) -> String {
    let mut s = format!(
        "{:<24} {:<6} {:<40} {:<7} {:<10} {}\n",
        "NODE", "FAMILY", "PEER IP", "MODE", "ENCAP", "TUNNEL"
    );
    let mut encap_text = String::new();
    for p in peers {
        encap_text.clear();
        let (mode, tunnel) = match &p.mode {
            Mode::Tunnel { name, encap } => {
                let _ = write!(encap_text, "{encap}");
                ("tunnel", name.as_str())
            }
            Mode::Direct => ("direct", "-"),
            Mode::None => ("none", "-"),
        };
        if encap_text.is_empty() {
            encap_text.push('-');
        }
        let _ = writeln!(
            s,
            "{:<24} {:<6} {:<40} {:<7} {:<10} {}",
            p.node, p.family, p.ip, mode, encap_text, tunnel
        );
    }
    s
}

/// The owned tunnels as the kernel has them, for `kr-tunneld status`.
pub fn kernel_table(actual: &crate::model::Actual, own: &crate::model::Ownership) -> String {
    let mut s = format!(
        "{:<16} {:<7} {:<40} {:<40} {:<10} {:<6} {}\n",
        "TUNNEL", "KIND", "LOCAL", "REMOTE", "ENCAP", "MTU", "STATE"
    );
    for l in actual.links.iter().filter(|l| own.owns_link(l)) {
        let Some(t) = &l.tunnel else { continue };
        let kind = match t.family {
            Family::V4 => "ipip",
            Family::V6 => "ip6tnl",
        };
        s.push_str(&format!(
            "{:<16} {:<7} {:<40} {:<40} {:<10} {:<6} {}\n",
            l.name,
            kind,
            t.local,
            t.remote,
            t.encap.to_string(),
            l.mtu,
            if l.up { "up" } else { "down" }
        ));
    }
    let routes = actual.routes.len();
    let rules = actual.rules.len();
    s.push_str(&format!(
        "owned routes: {routes}, owned rules: {rules}, fou ports: {}\n",
        actual.fou.len()
    ));
    s
}

fn fou_state_path(dir: &Path) -> PathBuf {
    dir.join("fou-ports")
}

/// Record `ports` as opened by kr-tunneld (adoption takes kube-router's over, SPEC B-7), so a
/// later run closes them when nothing wants them.
pub fn record_owned_fou(state_dir: &Path, ports: &[FouPort]) -> std::io::Result<()> {
    let path = fou_state_path(state_dir);
    let mut owned = read_fou_state(&path);
    let before = owned.len();
    owned.extend(ports.iter().copied());
    if owned.len() == before {
        return Ok(());
    }
    write_fou_state(&path, &owned)
}

/// Read `ipv4 5555`-style lines; a missing or garbled file means "none recorded".
fn read_fou_state(path: &Path) -> BTreeSet<FouPort> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|l| {
            let (fam, port) = l.split_once(' ')?;
            let family = match fam {
                "ipv4" => Family::V4,
                "ipv6" => Family::V6,
                _ => return None,
            };
            Some(FouPort {
                family,
                port: port.trim().parse().ok()?,
                gue: true,
            })
        })
        .collect()
}

fn write_fou_state(path: &Path, ports: &BTreeSet<FouPort>) -> std::io::Result<()> {
    let text: String = ports
        .iter()
        .map(|p| format!("{} {}\n", p.family, p.port))
        .collect();
    write_atomic(path, text.as_bytes())
}

pub use crate::statefile::write_atomic;

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT, or `--once` with no failure.
    Clean,
    /// `--once` with failures.
    Failed,
}

/// Hooks the loop calls, so that the loop itself can be tested without systemd or metrics.
pub trait Hooks {
    /// After each reconcile that ran (first one: ready), with the counters.
    fn reconciled(&mut self, first: bool, outcome: &Outcome, metrics: &Metrics);
    /// Periodically, from the main loop (watchdog).
    fn alive(&mut self);
    /// When stopping.
    fn stopping(&mut self);
}

/// Longest delay of the status file (`kr-tunneld status`) behind the kernel.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The main loop: wait for events or deadlines, coalesce, reconcile. Returns when told to stop.
pub fn run_loop<K: Kernel>(
    d: &mut Daemon<K>,
    rx: &Receiver<Event>,
    hooks: &mut dyn Hooks,
    alive_every: Option<Duration>,
) -> Exit {
    let resync = d.cfg.resync;
    // After a failure (kernel unreadable, or ops failed), retry sooner than the resync period.
    let retry = Duration::from_secs(10).min(resync);
    let mut next_resync = Instant::now() + resync;
    let mut next_alive = alive_every.map(|e| Instant::now() + e);
    let mut dirty = false;
    let mut first = true;
    let mut status_due: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut deadline = next_resync;
        if let Some(a) = next_alive {
            deadline = deadline.min(a);
        }
        if let Some(s) = status_due {
            deadline = deadline.min(s);
        }
        let ev = match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(ev) => Some(ev),
            Err(RecvTimeoutError::Timeout) => None,
            // Every sender is gone: nothing can change any more.
            Err(RecvTimeoutError::Disconnected) => return Exit::Clean,
        };
        let mut events: Vec<Event> = ev.into_iter().collect();
        // Coalesce a burst: take everything already queued before reconciling once.
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
        for ev in events {
            match ev {
                Event::Nodes(u) => {
                    dirty |= d.on_nodes(u);
                }
                Event::Services(u) => {
                    d.on_services(u);
                    dirty = true;
                }
                Event::Slices(u) => {
                    d.on_slices(u);
                    dirty = true;
                }
                Event::Resync => {
                    log::info!("SIGHUP: full resync");
                    d.request_full();
                    dirty = true;
                }
                Event::Stop => {
                    if status_due.is_some() {
                        d.write_status();
                    }
                    hooks.stopping();
                    return Exit::Clean;
                }
            }
        }
        let now = Instant::now();
        if let Some(a) = next_alive {
            if now >= a {
                hooks.alive();
                next_alive = alive_every.map(|e| now + e);
            }
        }
        if status_due.is_some_and(|s| now >= s) {
            d.write_status();
            status_due = None;
        }
        if now >= next_resync {
            d.request_full();
            dirty = true;
        }
        if !dirty || !d.synced() {
            if now >= next_resync {
                next_resync = now + resync;
            }
            continue;
        }
        dirty = false;
        match d.reconcile(now) {
            Ok(outcome) if outcome.stopped => {
                log::info!("{}", outcome.summary);
                hooks.stopping();
                return Exit::Clean;
            }
            Ok(outcome) => {
                // The status file is rewritten whole (O(peers)): at most once per
                // STATUS_EVERY under churn, the first time right after the first pass.
                if first || d.cfg.once {
                    d.write_status();
                } else {
                    status_due.get_or_insert(now + STATUS_EVERY);
                }
                hooks.reconciled(first, &outcome, &d.metrics);
                first = false;
                next_resync = now + if outcome.failed > 0 { retry } else { resync };
                if d.cfg.once {
                    return if outcome.failed > 0 {
                        Exit::Failed
                    } else {
                        Exit::Clean
                    };
                }
            }
            Err(e) => {
                log::error!("reading kernel state failed, nothing changed: {e}");
                d.metrics.failures += 1;
                next_resync = now + retry;
                if d.cfg.once {
                    return Exit::Failed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::FakeKernel;
    use std::sync::mpsc::channel;

    fn node(name: &str, ip: &str, cidr: &str) -> Node {
        let json = format!(
            r#"{{"metadata":{{"name":"{name}"}},"spec":{{"podCIDR":"{cidr}","podCIDRs":["{cidr}"]}},
               "status":{{"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[derive(Default)]
    struct Recorder {
        ready: usize,
        outcomes: Vec<Outcome>,
        stopping: bool,
    }

    impl Hooks for Recorder {
        fn reconciled(&mut self, first: bool, o: &Outcome, _: &Metrics) {
            if first {
                self.ready += 1;
            }
            self.outcomes.push(o.clone());
        }
        fn alive(&mut self) {}
        fn stopping(&mut self) {
            self.stopping = true;
        }
    }

    fn daemon(args: &[&str]) -> Daemon<FakeKernel> {
        let dir = std::env::temp_dir().join(format!(
            "krt-daemon-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let mut c = crate::testutil::config(args);
        c.state_dir = dir;
        Daemon::new(
            c,
            "a".into(),
            FakeKernel::with(crate::testutil::host(false)),
            Box::new(std::io::sink()),
        )
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }

    #[test]
    fn nothing_happens_before_the_first_list_and_ready_comes_after_it() {
        let mut d = daemon(&["--once"]);
        let (tx, rx) = channel();
        tx.send(Event::Nodes(Update::Upsert(node(
            "b",
            "172.16.0.2",
            "10.1.0.0/24",
        ))))
        .unwrap();
        tx.send(Event::Nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ])))
        .unwrap();
        let mut h = Recorder::default();
        assert_eq!(run_loop(&mut d, &rx, &mut h, None), Exit::Clean);
        assert_eq!(h.ready, 1);
        assert!(
            h.outcomes[0].summary.contains("peers=1 tunnels=[ipip=1]"),
            "{}",
            h.outcomes[0].summary
        );
        assert_eq!(d.kernel().state.links.len(), 3); // eth0, the tunnel to b, the receive tunnel
    }

    #[test]
    fn a_failed_op_is_reported_and_the_rest_applied() {
        let mut d = daemon(&["--once"]);
        d.kernel().fail_prefix = Some("create tunnel ktac100002".into());
        let (tx, rx) = channel();
        tx.send(Event::Nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
            node("c", "172.16.0.3", "10.2.0.0/24"),
        ])))
        .unwrap();
        let mut h = Recorder::default();
        assert_eq!(run_loop(&mut d, &rx, &mut h, None), Exit::Failed);
        assert!(d
            .kernel()
            .state
            .links
            .iter()
            .any(|l| l.name == "ktac100003"));
        assert!(h.outcomes[0].failed >= 1);
    }

    #[test]
    fn stop_leaves_the_kernel_as_it_is() {
        let mut d = daemon(&[]);
        let (tx, rx) = channel();
        tx.send(Event::Nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ])))
        .unwrap();
        tx.send(Event::Stop).unwrap();
        let mut h = Recorder::default();
        assert_eq!(run_loop(&mut d, &rx, &mut h, None), Exit::Clean);
        assert!(h.stopping);
        // The burst (list + stop) was coalesced: stop wins before any reconcile.
        assert_eq!(d.kernel().state.links.len(), 1);
    }

    /// The state a full pass would want, computed from scratch from the daemon's cache.
    fn from_scratch(d: &mut Daemon<FakeKernel>) -> (Desired, reconcile::Plan) {
        let own = d.cfg.overlay.own.clone();
        let actual = d.kernel.read(&own).unwrap();
        let nodes: Vec<NodeInfo> = d.nodes.values().cloned().collect();
        let want =
            nodes::desired(&d.local, &nodes, &actual, &d.cfg.overlay, &mut Vec::new()).unwrap();
        let plan = reconcile::plan(&want, &actual, &own, &d.owned_fou);
        (want, plan)
    }

    #[test]
    fn incremental_passes_end_where_full_passes_would() {
        // Random peer churn over small pools of IPs and pod CIDRs, so that peers move between
        // same-subnet and tunnel, change IP (and so tunnel name), vanish, and sometimes contest
        // a CIDR or an IP. After every pass the kernel must be what a full pass wants (a plan from
        // scratch is empty) and the kept desired state must equal a fresh one.
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut incremental = 0;
        let mut full = 0;
        for args in [
            &[][..],
            &["--overlay-type=full"][..],
            &["--overlay-encap=fou"][..],
        ] {
            let mut d = daemon(args);
            let mut nodes = vec![node("a", "192.168.1.10", "10.200.0.0/24")];
            for i in 0..12 {
                nodes.push(node(
                    &format!("n{i:02}"),
                    &format!("172.16.0.{}", 1 + i),
                    &format!("10.{i}.0.0/24"),
                ));
            }
            d.on_nodes(Update::Replace(nodes));
            d.reconcile(Instant::now()).unwrap();
            let mut fresh = 100;
            for _ in 0..300 {
                for _ in 0..1 + next(3) {
                    fresh += 1;
                    let name = format!("n{:02}", next(14));
                    // Mostly values nobody holds; one time in eight one from a small pool
                    // (another node's, or ours: a contest).
                    let ip = match next(8) {
                        0 => format!("172.16.0.{}", 1 + next(13)),
                        1 | 2 => format!("192.168.1.{}", 10 + next(4)),
                        _ => format!("172.16.{}.{}", fresh / 200, fresh % 200 + 1),
                    };
                    let cidr = match next(8) {
                        0 => format!("10.{}.0.0/24", next(13)),
                        1 => "10.200.0.0/24".to_string(),
                        _ => format!("10.{}.{}.0/24", fresh / 200, fresh % 200),
                    };
                    let u = match next(5) {
                        0 => Update::Delete(node(&name, &ip, &cidr)),
                        _ => Update::Upsert(node(&name, &ip, &cidr)),
                    };
                    d.on_nodes(u);
                }
                let before = d.metrics.incremental;
                let o = d.reconcile(Instant::now()).unwrap();
                assert_eq!(o.failed, 0, "{}", o.summary);
                if d.metrics.incremental > before {
                    incremental += 1;
                } else {
                    full += 1;
                }
                let (want, plan) = from_scratch(&mut d);
                assert!(plan.ops.is_empty(), "{args:?}: left to do: {:?}", plan.ops);
                assert_eq!(d.desired.peers, want.peers, "{args:?}");
            }
            let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
        }
        // Both paths were exercised (the pools make contests common, but not constant).
        assert!(
            incremental > 100 && full > 50,
            "{incremental} incremental, {full} full"
        );
    }

    #[test]
    fn an_unchanged_node_needs_no_pass_and_a_failure_makes_the_next_pass_full() {
        let mut d = daemon(&[]);
        d.on_nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ]));
        d.reconcile(Instant::now()).unwrap();
        assert!(!d.on_nodes(Update::Upsert(node("b", "172.16.0.2", "10.1.0.0/24"))));
        assert!(!d.on_nodes(Update::Delete(node("x", "172.16.0.9", "10.9.0.0/24"))));
        // A failed op: reported, and the state kept for the incremental path is dropped.
        d.kernel().fail_prefix = Some("create tunnel".into());
        assert!(d.on_nodes(Update::Upsert(node("c", "172.16.0.3", "10.2.0.0/24"))));
        let o = d.reconcile(Instant::now()).unwrap();
        assert_eq!((o.planned, o.failed), (3, 1), "{}", o.summary);
        assert_eq!(d.metrics.incremental, 1);
        d.kernel().fail_prefix = None;
        let o = d.reconcile(Instant::now()).unwrap();
        assert_eq!(d.metrics.incremental, 1, "the retry must read the kernel");
        // The tunnel, and its routes again (a new device gets its routes rewritten).
        assert_eq!((o.planned, o.failed), (3, 0), "{}", o.summary);
        // Drift behind our back is not seen by incremental passes, and repaired by the next
        // full one (the resync timer, SIGHUP).
        let gone = nodes::tunnel_name("kt", "172.16.0.2".parse().unwrap());
        d.kernel().state.links.retain(|l| l.name != gone);
        d.on_nodes(Update::Upsert(node("e", "172.16.0.5", "10.4.0.0/24")));
        d.reconcile(Instant::now()).unwrap();
        assert_eq!(d.metrics.incremental, 2);
        assert!(!from_scratch(&mut d).1.ops.is_empty());
        d.request_full();
        let o = d.reconcile(Instant::now()).unwrap();
        assert_eq!(o.planned, 3, "{}", o.summary);
        assert!(from_scratch(&mut d).1.ops.is_empty());
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }

    #[test]
    fn deleting_a_node_removes_its_tunnel_and_fou_ports_are_tracked() {
        let mut d = daemon(&[]);
        d.on_nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ]));
        d.reconcile(Instant::now()).unwrap();
        assert_eq!(read_fou_state(&fou_state_path(&d.cfg.state_dir)).len(), 1);
        d.on_nodes(Update::Delete(node("b", "172.16.0.2", "10.1.0.0/24")));
        let o = d.reconcile(Instant::now()).unwrap();
        assert_eq!(o.planned, 1);
        assert_eq!(d.kernel().state.links.len(), 2);
        // cleanup closes the FOU port we recorded, and removes the rule.
        let o = d.cleanup().unwrap();
        assert_eq!(o.failed, 0);
        assert!(d.kernel().state.fou.is_empty() && d.kernel().state.rules.is_empty());
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }

    #[test]
    fn unknown_local_node_changes_nothing() {
        let mut d = daemon(&[]);
        d.on_nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ]));
        d.reconcile(Instant::now()).unwrap();
        d.on_nodes(Update::Delete(node("a", "192.168.1.10", "10.0.0.0/24")));
        let o = d.reconcile(Instant::now()).unwrap();
        assert_eq!(o.planned, 0);
        assert_eq!(d.kernel().state.links.len(), 3);
    }

    /// SPEC S-4: a local Node that is present but has no usable address (a cloud controller
    /// re-initialising it) is a missing local Node: the kernel stays as it is, one warning.
    #[test]
    fn local_node_without_addresses_changes_nothing() {
        let mut d = daemon(&["--overlay-encap=fou"]);
        d.on_nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ]));
        d.reconcile(Instant::now()).unwrap();
        let before = d.kernel().state.clone();
        for bare in [
            r#"{"metadata":{"name":"a"},"spec":{"podCIDR":"10.0.0.0/24"},"status":{"addresses":[]}}"#,
            r#"{"metadata":{"name":"a"},"spec":{"podCIDR":"10.0.0.0/24"},
                "status":{"addresses":[{"type":"Hostname","address":"a"},
                                       {"type":"InternalIP","address":"not-an-ip"}]}}"#,
        ] {
            d.on_nodes(Update::Upsert(serde_json::from_str(bare).unwrap()));
            let o = d.reconcile(Instant::now()).unwrap();
            assert_eq!(o.planned, 0, "{bare}: {}", o.summary);
            assert_eq!(d.kernel().state, before, "{bare}");
        }
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }

    /// A kernel that notes what the FOU record says when a FOU port is opened.
    struct RecordSpy {
        inner: FakeKernel,
        record: PathBuf,
        seen: Vec<String>,
    }

    impl Kernel for RecordSpy {
        fn read(&mut self, own: &crate::model::Ownership) -> Result<Actual, KernelError> {
            self.inner.read(own)
        }
        fn apply(
            &mut self,
            own: &crate::model::Ownership,
            ops: &[Op],
        ) -> Vec<(usize, KernelError)> {
            if ops.iter().any(|o| matches!(o, Op::AddFouPort(_))) {
                self.seen
                    .push(std::fs::read_to_string(&self.record).unwrap_or_default());
            }
            self.inner.apply(own, ops)
        }
        fn links_named(&mut self, names: &[&str]) -> Result<Vec<Link>, KernelError> {
            self.inner.links_named(names)
        }
    }

    /// SPEC S-1, R-3: a FOU port is in the record before it is opened, so a kill -9 between
    /// the two cannot leak it; a port that could not be opened leaves the record again.
    #[test]
    fn fou_port_is_recorded_before_it_is_opened() {
        let mut c = crate::testutil::config(&["--overlay-encap=fou"]);
        c.state_dir = std::env::temp_dir().join(format!(
            "krt-daemon-fourec-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let record = fou_state_path(&c.state_dir);
        let spy = RecordSpy {
            inner: FakeKernel::with(crate::testutil::host(false)),
            record: record.clone(),
            seen: Vec::new(),
        };
        let mut d = Daemon::new(c, "a".into(), spy, Box::new(std::io::sink()));
        d.on_nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("b", "172.16.0.2", "10.1.0.0/24"),
        ]));
        d.reconcile(Instant::now()).unwrap();
        assert_eq!(d.kernel().seen, ["ipv4 5555\n"]);
        assert_eq!(d.kernel().inner.state.fou.len(), 1);
        // A port the kernel refuses to open is not kept in the record.
        d.cfg.overlay.port = 6000;
        d.kernel().inner.fail_prefix = Some("add fou port ipv4 6000".into());
        d.request_full();
        d.reconcile(Instant::now()).unwrap();
        assert_eq!(d.kernel().seen[1], "ipv4 5555\nipv4 6000\n");
        // 5555 is closed (no longer wanted), 6000 never opened: neither stays recorded.
        assert!(d.kernel().inner.state.fou.is_empty());
        assert_eq!(std::fs::read_to_string(&record).unwrap(), "");
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }

    /// An IPVS fake the test can still look at after handing it to the daemon.
    struct SharedIpvs(std::sync::Arc<std::sync::Mutex<crate::netlink::ipvs::FakeIpvs>>);

    impl IpvsKernel for SharedIpvs {
        fn read(
            &mut self,
            owned: &BTreeSet<dsr::ServiceKey>,
        ) -> Result<dsr::IpvsState, KernelError> {
            self.0.lock().unwrap().read(owned)
        }
        fn apply(&mut self, ops: &[dsr::IpvsOp]) -> Vec<(usize, KernelError)> {
            self.0.lock().unwrap().apply(ops)
        }
    }

    /// A kernel, an IPVS and a pod side that write one shared timeline (issue 13: order).
    type Timeline = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

    struct TimedKernel(FakeKernel, Timeline);

    impl Kernel for TimedKernel {
        fn read(&mut self, own: &crate::model::Ownership) -> Result<Actual, KernelError> {
            self.0.read(own)
        }
        fn apply(
            &mut self,
            own: &crate::model::Ownership,
            ops: &[Op],
        ) -> Vec<(usize, KernelError)> {
            let mut t = self.1.lock().unwrap();
            t.extend(ops.iter().map(|o| format!("kernel {o}")));
            self.0.apply(own, ops)
        }
        fn links_named(&mut self, names: &[&str]) -> Result<Vec<Link>, KernelError> {
            self.0.links_named(names)
        }
    }

    struct TimedIpvs(crate::netlink::ipvs::FakeIpvs, Timeline);

    impl IpvsKernel for TimedIpvs {
        fn read(
            &mut self,
            owned: &BTreeSet<dsr::ServiceKey>,
        ) -> Result<dsr::IpvsState, KernelError> {
            self.0.read(owned)
        }
        fn apply(&mut self, ops: &[dsr::IpvsOp]) -> Vec<(usize, KernelError)> {
            let mut t = self.1.lock().unwrap();
            t.extend(ops.iter().map(|o| format!("ipvs {o}")));
            self.0.apply(ops)
        }
    }

    /// Issue 13, order of changes: receivers before real servers, real servers before the
    /// director rule; real servers removed before their receivers; the director rule removed
    /// before the IPVS service.
    #[test]
    fn dsr_changes_are_applied_in_an_order_that_never_black_holes() {
        let t: Timeline = Default::default();
        let mut c = crate::testutil::config(&[
            "--enable-dsr",
            "--service-external-ip-range=203.0.113.0/24",
        ]);
        c.state_dir = std::env::temp_dir().join(format!("krt-order-{}", rand_suffix()));
        let settings = dsr::Settings::from_config(&c);
        let kernel = TimedKernel(FakeKernel::with(crate::testutil::host(false)), t.clone());
        let tp = t.clone();
        let mut d =
            Daemon::new(c, "a".into(), kernel, Box::new(std::io::sink())).with_dsr(DsrShell {
                ipvs: Box::new(TimedIpvs(Default::default(), t.clone())),
                pods: Box::new(move |wants, _| {
                    let ips: Vec<String> = wants.keys().map(|i| i.to_string()).collect();
                    tp.lock().unwrap().push(format!("pods [{}]", ips.join(",")));
                    PodsReport::default()
                }),
                settings,
            });
        let svc = |dsr: bool| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "default", "annotations":
                    if dsr { serde_json::json!({"kube-router.io/service.dsr": "tunnel"}) }
                    else { serde_json::json!({}) }},
                "spec": {"externalIPs": ["203.0.113.10"],
                         "ports": [{"protocol": "TCP", "port": 80}]}
            }))
            .unwrap()
        };
        let slice = |ips: &[&str]| -> EndpointSlice {
            let eps: Vec<serde_json::Value> = ips
                .iter()
                .map(|ip| {
                    serde_json::json!({"addresses": [ip], "nodeName": "a",
                                             "conditions": {"ready": true}})
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "addressType": "IPv4", "endpoints": eps,
                "ports": [{"protocol": "TCP", "port": 80}]
            }))
            .unwrap()
        };
        let pos = |t: &Timeline, what: &str| -> usize {
            let t = t.lock().unwrap();
            t.iter()
                .position(|l| l.starts_with(what))
                .unwrap_or_else(|| panic!("no {what:?} in {t:#?}"))
        };
        d.on_nodes(Update::Replace(vec![node(
            "a",
            "192.168.1.10",
            "10.0.0.0/24",
        )]));
        d.on_services(Update::Replace(vec![svc(true)]));
        d.on_slices(Update::Replace(vec![slice(&["10.0.0.5"])]));
        d.reconcile(Instant::now()).unwrap();
        let (add_svc, pods, add_dest, add_rule) = (
            pos(&t, "ipvs add ipvs service"),
            pos(&t, "pods [10.0.0.5]"),
            pos(&t, "ipvs add ipvs real server"),
            pos(&t, "kernel add rule"),
        );
        let show = t.lock().unwrap().join("\n");
        assert!(
            add_svc < pods && pods < add_dest && add_dest < add_rule,
            "{show}"
        );

        // The endpoint moves: the old real server goes before its receiver, the new one comes
        // after its receiver.
        t.lock().unwrap().clear();
        d.on_slices(Update::Replace(vec![slice(&["10.0.0.6"])]));
        d.reconcile(Instant::now()).unwrap();
        let show = t.lock().unwrap().join("\n");
        let (del_dest, pods, add_dest) = (
            pos(&t, "ipvs delete ipvs real server"),
            pos(&t, "pods [10.0.0.6]"),
            pos(&t, "ipvs add ipvs real server"),
        );
        assert!(del_dest < pods && pods < add_dest, "{show}");

        // Annotation removed: the director rule goes before the service.
        t.lock().unwrap().clear();
        d.on_services(Update::Replace(vec![svc(false)]));
        d.reconcile(Instant::now()).unwrap();
        let show = t.lock().unwrap().join("\n");
        assert!(
            pos(&t, "kernel delete rule") < pos(&t, "ipvs delete ipvs service"),
            "{show}"
        );
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }

    fn items<T: serde::de::DeserializeOwned>(json: &str) -> Vec<T> {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| serde_json::from_value(i.clone()).unwrap())
            .collect()
    }

    /// Issue 13 item 1: with `--enable-dsr`, the first pass (READY, `--once`) waits until Nodes,
    /// Services and EndpointSlices have all been listed, whatever order the lists arrive in.
    #[test]
    fn with_dsr_the_first_pass_waits_for_every_enabled_list() {
        let mut d = daemon(&[
            "--once",
            "--enable-dsr",
            "--service-external-ip-range=203.0.113.0/24",
        ]);
        let ipvs = std::sync::Arc::new(std::sync::Mutex::new(
            crate::netlink::ipvs::FakeIpvs::default(),
        ));
        let settings = dsr::Settings::from_config(&d.cfg);
        d = d.with_dsr(DsrShell {
            ipvs: Box::new(SharedIpvs(ipvs.clone())),
            pods: Box::new(|_, _| PodsReport::default()),
            settings,
        });
        let services: Vec<Service> = items(include_str!("../tests/data/list-services.json"));
        let slices: Vec<EndpointSlice> =
            items(include_str!("../tests/data/list-endpointslices.json"));
        let (tx, rx) = channel();
        let nodes = vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("node1", "172.16.0.2", "10.244.1.0/24"),
        ];
        // Nodes and Services arrive first; EndpointSlices come later (another watch thread).
        tx.send(Event::Nodes(Update::Replace(nodes))).unwrap();
        tx.send(Event::Services(Update::Replace(services))).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            tx.send(Event::Slices(Update::Replace(slices))).unwrap();
        });
        let mut h = Recorder::default();
        assert_eq!(run_loop(&mut d, &rx, &mut h, None), Exit::Clean);
        late.join().unwrap();
        assert_eq!(h.outcomes.len(), 1);
        assert!(
            h.outcomes[0].summary.contains(" dsr=2 "),
            "the --once pass ran before every list: {}",
            h.outcomes[0].summary
        );
        assert_eq!(ipvs.lock().unwrap().state.services.len(), 2);
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }

    #[test]
    fn dsr_follows_annotated_services_and_keeps_its_rules_until_listed() {
        // The recorded slices are managed by `manual-test`.
        let mut d = daemon(&[
            "--enable-dsr",
            "--service-external-ip-range=203.0.113.0/24",
            "--dsr-endpointslice-managers=manual-test",
        ]);
        let ipvs = std::sync::Arc::new(std::sync::Mutex::new(
            crate::netlink::ipvs::FakeIpvs::default(),
        ));
        let settings = dsr::Settings::from_config(&d.cfg);
        d = d.with_dsr(DsrShell {
            ipvs: Box::new(SharedIpvs(ipvs.clone())),
            pods: Box::new(|_, _| PodsReport::default()),
            settings,
        });
        // A DSR rule left by an earlier run: kept while Services are not listed yet (K-4).
        let old_rule = crate::model::Rule {
            family: Family::V4,
            priority: 32000,
            src: None,
            dst: Some("203.0.113.50/32".parse().unwrap()),
            ipproto: Some(6),
            dport: Some(80),
            table: 78,
            protocol: 157,
        };
        d.kernel().state.rules.push(old_rule.clone());
        d.on_nodes(Update::Replace(vec![
            node("a", "192.168.1.10", "10.0.0.0/24"),
            node("node1", "172.16.0.2", "10.244.1.0/24"),
            node("node2", "172.16.0.3", "10.244.2.0/24"),
        ]));
        d.reconcile(Instant::now()).unwrap();
        assert!(
            d.kernel().state.rules.contains(&old_rule),
            "DSR rule removed before Services were listed"
        );
        assert!(ipvs.lock().unwrap().log.is_empty());

        // Listed: the recorded payloads have one annotated Service with two external IPs and
        // an EndpointSlice with one ready and one serving endpoint.
        let services: Vec<Service> = items(include_str!("../tests/data/list-services.json"));
        let slices: Vec<EndpointSlice> =
            items(include_str!("../tests/data/list-endpointslices.json"));
        d.on_services(Update::Replace(services.clone()));
        d.on_slices(Update::Replace(slices));
        let o = d.reconcile(Instant::now()).unwrap();
        assert_eq!(o.failed, 0, "{o:?}");
        assert!(o.summary.contains(" dsr=2 "), "{}", o.summary);
        assert!(d.metrics.render().contains("kr_tunneld_dsr_services 2\n"));
        let state = ipvs.lock().unwrap().state.clone();
        assert_eq!(state.services.len(), 2, "{state:?}");
        assert!(state.dests.values().all(|v| v.len() == 2), "{state:?}");
        let dsr_rules = d
            .kernel()
            .state
            .rules
            .iter()
            .filter(|r| r.table == 78)
            .count();
        assert_eq!(dsr_rules, 2);
        assert!(d
            .kernel()
            .state
            .routes
            .iter()
            .any(|r| r.table == 78 && r.kind == crate::model::RouteKind::Local));
        // Converged: a second pass changes nothing.
        let before = ipvs.lock().unwrap().log.len();
        assert_eq!(d.reconcile(Instant::now()).unwrap().planned, 0);
        assert_eq!(ipvs.lock().unwrap().log.len(), before);

        // Annotation removed: IPVS services, director rules and the table-78 route go.
        let mut web = services
            .into_iter()
            .find(|s| s.metadata.name == "web")
            .unwrap();
        web.metadata.annotations.clear();
        d.on_services(Update::Upsert(web));
        d.reconcile(Instant::now()).unwrap();
        assert!(ipvs.lock().unwrap().state.services.is_empty());
        assert!(d.kernel().state.rules.iter().all(|r| r.table != 78));
        assert!(d.kernel().state.routes.iter().all(|r| r.table != 78));
        let _ = std::fs::remove_dir_all(&d.cfg.state_dir);
    }
}
