//! The list/watch state machine for one resource type (SPEC K-3, K-4).
//!
//! Core module: pure. It must never do I/O, read the clock (time comes in as `now`), draw
//! randomness from the system (a seed comes in) or log: log lines are returned as data
//! ([`Output::Log`]) for the shell to emit, so tests can assert them.
//!
//! The driver ([`super::driver`]) asks [`WatchMachine::next`] what to do, performs that one
//! request, and reports the outcome through the `list_*` / `watch_*` methods. Results are taken
//! with [`WatchMachine::take_output`].
//!
//! Rules:
//! * the first list uses `limit`/`continue` pagination and no `resourceVersion` (a consistent
//!   read); the last page completes the list: the cache is replaced and [`Update::Replace`] is
//!   emitted;
//! * a relist (after a 410, or the periodic one) asks for `resourceVersion=<last known>` with
//!   `resourceVersionMatch=NotOlderThan` and no `limit` (SPEC P-5): kube-apiserver serves that
//!   from its watch cache, not etcd (a `limit` or a `continue` would send it to etcd), and never
//!   older than what we already saw (`resourceVersion=0` may be older on an HA control plane, so
//!   it is not used). If the server answers 504 "Too large resource version" (its cache lags
//!   behind us, e.g. a freshly restarted replica) or 410, the next try is a consistent read. A
//!   relist after a 410 waits a random 0..`relist_jitter` first, and periodic relists come
//!   0..20 % early, so that thousands of nodes do not relist in the same second after an API
//!   server restart;
//! * then watch from the list's resourceVersion with `allowWatchBookmarks=true` and a slightly
//!   randomised `timeoutSeconds`; events update the cache, bookmarks advance the version;
//! * `ERROR` event with code 410 (inside an HTTP 200 stream), or HTTP 410, means the version
//!   expired: relist at once (with backoff if it keeps happening without progress);
//! * every other failure (transport, timeout, 5xx, 429, a garbage line, a truncated stream) is a
//!   fault: keep the cache as it is, wait a capped, jittered, exponential backoff (at least
//!   `Retry-After` when the server sent one), then watch again from the last good version;
//! * no `Delete` ever comes from a fault: only a `DELETED` event or a completed list removes
//!   objects. A malformed object in a relist that we already knew keeps its last good version;
//! * one warning per fault occurrence: repeats of the same fault while retrying log at debug,
//!   and recovery logs once at info.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use log::Level;

use super::error::KubeError;
use super::types::{decode_event, decode_list, ListPage, WatchEvent};
use super::{resource_name, Resource, Update};

/// Tunables of the state machine (the pure part of [`super::WatchOptions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// Base `timeoutSeconds` of a watch request (randomised ±10 %, at least 1 s).
    pub timeout: Duration,
    /// The per-read timeout is the watch's timeout plus this margin.
    pub read_timeout_margin: Duration,
    /// `limit` per list page.
    pub page_size: u32,
    /// First backoff delay.
    pub backoff_initial: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Largest `Retry-After` honoured (a larger one is cut to this).
    pub retry_after_max: Duration,
    /// Relist after this long even without a 410, at the next watch boundary. Catches an API
    /// server whose version history restarted below ours (it answers such watches with
    /// silence, not 410) and any drift. `None` disables.
    pub relist_interval: Option<Duration>,
    /// Longest accepted watch line; a longer one is treated as a corrupt stream.
    pub max_line: usize,
    /// A relist after a 410 waits a random delay below this (SPEC P-5). 10 s by default: with
    /// 5,000 nodes relisting after an API server restart, about 500 lists a second.
    pub relist_jitter: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            timeout: Duration::from_secs(300),
            read_timeout_margin: Duration::from_secs(30),
            page_size: 500,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            retry_after_max: Duration::from_secs(300),
            relist_interval: Some(Duration::from_secs(30 * 60)),
            max_line: 64 << 20,
            relist_jitter: Duration::from_secs(10),
        }
    }
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// GET this list page (path and query).
    List {
        /// e.g. `/api/v1/nodes?limit=500`.
        path_query: String,
    },
    /// GET this watch (path and query) with this per-read timeout.
    Watch {
        /// e.g. `/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds=297&resourceVersion=202`.
        path_query: String,
        /// Per-read timeout, above the request's `timeoutSeconds`.
        read_timeout: Duration,
    },
    /// Sleep until then (backoff), then ask again.
    Wait {
        /// When to ask again.
        until: Instant,
    },
}

/// Whether the driver should keep reading the watch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Stop reading and drop the stream; the machine has already decided what comes next.
    Stop,
}

/// Something for the shell to do with the results.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<T> {
    /// Hand this to the daemon.
    Update(Update<T>),
    /// Log this line at this level.
    Log(Level, String),
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Completed lists (the first one included).
    pub lists: u64,
    /// Completed lists after the first one.
    pub relists: u64,
    /// Watch requests sent.
    pub watches: u64,
    /// Faults (each failed request or broken stream).
    pub faults: u64,
    /// Watch events applied (objects added, modified, deleted).
    pub events: u64,
    /// Objects skipped because they did not decode.
    pub skipped: u64,
    /// The last fault's description.
    pub last_error: Option<String>,
}

/// Categories of faults, to tell "the same fault again" from "a new fault".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultClass {
    Transport,
    Timeout,
    Tls,
    Http(u16),
    Auth,
    Decode,
    Garbage,
    ErrorEvent(u16),
    ClosedEarly,
    Stopped,
}

fn class_of(e: &KubeError) -> FaultClass {
    match e {
        KubeError::Transport { .. } => FaultClass::Transport,
        KubeError::Timeout { .. } => FaultClass::Timeout,
        KubeError::Tls { .. } => FaultClass::Tls,
        KubeError::Status { code: 401, .. } => FaultClass::Auth,
        KubeError::Status { code, .. } => FaultClass::Http(*code),
        KubeError::Stopped => FaultClass::Stopped,
        _ => FaultClass::Decode,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Ready to send a list request (first page, or the page after `continue_token`).
    NeedList,
    /// A list request is in flight.
    Listing,
    /// Ready to send a watch request from `rv`.
    NeedWatch,
    /// A watch request is in flight (`opened` once HTTP 200 arrived).
    Watching {
        started: Instant,
        opened: bool,
        lines: u64,
    },
    /// Backing off; afterwards list (`relist`) or watch.
    Waiting { until: Instant, relist: bool },
}

/// The list/watch state machine for resource type `T`. See the module docs.
pub struct WatchMachine<T: Resource> {
    cfg: WatchConfig,
    rng: u64,
    phase: Phase,
    cache: BTreeMap<String, T>,
    /// Version to watch from (from the last list, event or bookmark).
    rv: String,
    /// A relist's lower bound (`NotOlderThan`); empty: a consistent read.
    relist_from: String,
    /// This list's period: the interval less a random 0..20 %.
    relist_every: Option<Duration>,
    /// Pages of a list in progress.
    pending: BTreeMap<String, T>,
    pending_skipped: Vec<String>,
    continue_token: String,
    line: Vec<u8>,
    listed_at: Option<Instant>,
    /// Consecutive failures (for the backoff exponent).
    failures: u32,
    /// The fault being retried, for one warning per occurrence.
    fault: Option<FaultClass>,
    fault_since: Option<Instant>,
    /// 410s in a row without an event in between.
    expirations: u32,
    counters: Counters,
    out: Vec<Output<T>>,
}

impl<T: Resource> WatchMachine<T> {
    /// A machine with an empty cache; the first [`WatchMachine::next`] asks for a list.
    /// `seed` drives the jitter (any value; use something per-process in production).
    pub fn new(cfg: WatchConfig, seed: u64) -> Self {
        WatchMachine {
            cfg,
            // xorshift must not start at 0.
            rng: seed | 1,
            phase: Phase::NeedList,
            cache: BTreeMap::new(),
            rv: String::new(),
            relist_from: String::new(),
            relist_every: None,
            pending: BTreeMap::new(),
            pending_skipped: Vec::new(),
            continue_token: String::new(),
            line: Vec::new(),
            listed_at: None,
            failures: 0,
            fault: None,
            fault_since: None,
            expirations: 0,
            counters: Counters::default(),
            out: Vec::new(),
        }
    }

    /// The current cache, by key.
    pub fn cache(&self) -> &BTreeMap<String, T> {
        &self.cache
    }

    /// The resourceVersion the next watch starts from (empty before the first list).
    pub fn resource_version(&self) -> &str {
        &self.rv
    }

    /// True once a list has completed.
    pub fn synced(&self) -> bool {
        self.counters.lists > 0
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Takes the updates and log lines produced so far.
    pub fn take_output(&mut self) -> Vec<Output<T>> {
        std::mem::take(&mut self.out)
    }

    /// What to do next. Calling it while a request is in flight is a driver bug; it then
    /// abandons that request and starts over from the same version.
    pub fn next(&mut self, now: Instant) -> Next {
        if let Phase::Waiting { until, relist } = self.phase {
            if now < until {
                return Next::Wait { until };
            }
            self.phase = if relist {
                Phase::NeedList
            } else {
                Phase::NeedWatch
            };
        }
        if matches!(self.phase, Phase::NeedWatch | Phase::Watching { .. }) && self.relist_due(now) {
            self.log(
                Level::Debug,
                format!("{}: periodic relist", self.what_watch()),
            );
            self.start_relist();
        }
        match self.phase {
            Phase::NeedList | Phase::Listing => {
                self.phase = Phase::Listing;
                let mut q = format!("{}?", T::PATH);
                if self.continue_token.is_empty() && !self.relist_from.is_empty() {
                    q.push_str("resourceVersionMatch=NotOlderThan&resourceVersion=");
                    percent_encode(&mut q, &self.relist_from);
                    return Next::List { path_query: q };
                }
                let _ = write!(q, "limit={}", self.cfg.page_size);
                if !self.continue_token.is_empty() {
                    q.push_str("&continue=");
                    percent_encode(&mut q, &self.continue_token);
                }
                Next::List { path_query: q }
            }
            _ => {
                let base = self.cfg.timeout.as_secs().max(1);
                // ±10 %, so that watches of many nodes do not reconnect in lockstep.
                let spread = base / 10;
                let secs = base - spread + self.rand_below(2 * spread + 1);
                let mut q = format!(
                    "{}?watch=1&allowWatchBookmarks=true&timeoutSeconds={secs}&resourceVersion=",
                    T::PATH
                );
                percent_encode(&mut q, &self.rv);
                self.phase = Phase::Watching {
                    started: now,
                    opened: false,
                    lines: 0,
                };
                self.line.clear();
                self.counters.watches += 1;
                Next::Watch {
                    path_query: q,
                    read_timeout: Duration::from_secs(secs) + self.cfg.read_timeout_margin,
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // list

    /// A 2xx list page arrived with this body.
    pub fn list_page(&mut self, body: &[u8], now: Instant) {
        if self.phase != Phase::Listing {
            return;
        }
        match decode_list::<T>(body) {
            Ok(page) => self.list_decoded(page, now),
            Err(e) => {
                let err = KubeError::Decode {
                    what: format!("{} response", self.what_list()),
                    reason: e,
                };
                self.list_failed(&err, now);
            }
        }
    }

    /// A 2xx list page arrived and was decoded (by the shell, as the body arrived: see
    /// [`super::client::read_list`]). A body that is not a list is a [`Self::list_failed`].
    pub fn list_decoded(&mut self, page: ListPage<T>, now: Instant) {
        if self.phase != Phase::Listing {
            return;
        }
        for s in page.skipped {
            self.counters.skipped += 1;
            self.log(
                Level::Warn,
                format!(
                    "{}: skipping {} (does not decode): {}",
                    self.what_list(),
                    s.name(),
                    s.reason
                ),
            );
            if !s.key.is_empty() {
                self.pending_skipped.push(s.key);
            }
        }
        for obj in page.items {
            self.pending.insert(obj.key(), obj);
        }
        if !page.continue_token.is_empty() {
            self.continue_token = page.continue_token;
            self.phase = Phase::NeedList;
            return;
        }
        // The list is complete: it is the server's truth.
        // Rebuilt in one pass: the keys arrive in ascending order, and inserted one by one
        // that way they leave every B-tree node about half full; `append` into a non-empty
        // map builds the merged tree bottom-up, with full nodes. The cache holds every object
        // of the cluster: for 5,001 Nodes this saves about 0.7 MB. (It is also the cheapest
        // way in code: `collect` from a Vec would pack as well, but sorts, 10 KB more.)
        let mut fresh = BTreeMap::new();
        let mut pending = std::mem::take(&mut self.pending);
        if let Some((k, v)) = pending.pop_first() {
            fresh.insert(k, v);
            fresh.append(&mut pending);
        }
        for key in std::mem::take(&mut self.pending_skipped) {
            // An object we knew that now fails to decode keeps its last good version: a
            // decode problem is not evidence that it is gone (SPEC K-4).
            if let Some(old) = self.cache.get(&key) {
                fresh.entry(key).or_insert_with(|| old.clone());
            }
        }
        let removed = self
            .cache
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .count();
        let first = self.counters.lists == 0;
        self.cache = fresh;
        self.rv = page.resource_version;
        self.continue_token.clear();
        self.relist_from.clear();
        self.listed_at = Some(now);
        self.relist_every = self.cfg.relist_interval.map(|d| {
            d.saturating_sub(Duration::from_millis(
                self.rand_below(d.as_millis() as u64 / 5),
            ))
        });
        self.counters.lists += 1;
        if !first {
            self.counters.relists += 1;
        }
        self.recovered(now);
        self.log(
            if first { Level::Info } else { Level::Debug },
            format!(
                "{}: {} objects at resourceVersion {}{}",
                self.what_list(),
                self.cache.len(),
                self.rv,
                if removed > 0 {
                    format!(", {removed} gone since the previous list")
                } else {
                    String::new()
                }
            ),
        );
        // The Replace is a second full copy next to the cache, and it has to be: the cache
        // keeps whole objects because a known object that fails to decode in the next relist
        // goes into that Replace as its last good version, and an undecodable DELETED event
        // is answered with the cached object (SPEC K-4, R-1).
        let all = self.cache.values().cloned().collect();
        self.out.push(Output::Update(Update::Replace(all)));
        self.phase = Phase::NeedWatch;
    }

    /// A list request failed: transport error, timeout or non-2xx status.
    pub fn list_failed(&mut self, err: &KubeError, now: Instant) {
        if self.phase != Phase::Listing {
            return;
        }
        let paginating = !self.continue_token.is_empty();
        if matches!(err.status_code(), Some(504 | 410)) && !self.relist_from.is_empty() {
            // The cache is behind the version we know (504 "Too large resource version"), or
            // the version is refused: read from etcd instead.
            self.relist_from.clear();
        }
        self.pending.clear();
        self.pending_skipped.clear();
        self.continue_token.clear();
        if err.status_code() == Some(410) && paginating && self.failures == 0 {
            // The continue token expired between pages: start the list again, now.
            self.log(
                Level::Info,
                format!(
                    "{}: continue token expired (410), listing again from the start",
                    self.what_list()
                ),
            );
            self.failures += 1;
            self.phase = Phase::NeedList;
            return;
        }
        let what = self.what_list();
        self.fault(class_of(err), &what, err, true, now);
    }

    // -----------------------------------------------------------------------------------------
    // watch

    /// The watch request was answered with HTTP 200; events follow.
    pub fn watch_opened(&mut self, _now: Instant) {
        if let Phase::Watching { opened, .. } = &mut self.phase {
            *opened = true;
        }
    }

    /// The watch request failed before a stream opened (transport error or non-200 status).
    pub fn watch_failed(&mut self, err: &KubeError, now: Instant) {
        if !matches!(self.phase, Phase::Watching { .. }) {
            return;
        }
        if err.status_code() == Some(410) {
            return self.expired(err.to_string(), now);
        }
        let what = self.what_watch();
        self.fault(class_of(err), &what, err, false, now);
    }

    /// Bytes of the watch body. Returns [`Flow::Stop`] when the stream must be abandoned (410,
    /// an ERROR event, a garbage line); the machine has then already decided what is next.
    pub fn watch_data(&mut self, bytes: &[u8], now: Instant) -> Flow {
        if !matches!(self.phase, Phase::Watching { .. }) {
            return Flow::Stop;
        }
        self.line.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(pos) = self.line[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line = std::mem::take(&mut self.line);
            let flow = self.watch_line(trim(&line[start..end]), now);
            self.line = line;
            start = end + 1;
            if flow == Flow::Stop {
                self.line.clear();
                return Flow::Stop;
            }
        }
        self.line.drain(..start);
        if self.line.len() > self.cfg.max_line {
            self.line.clear();
            let err = KubeError::Decode {
                what: "watch stream".into(),
                reason: format!("line longer than {} bytes", self.cfg.max_line),
            };
            let what = self.what_watch();
            self.fault(FaultClass::Garbage, &what, &err, false, now);
            return Flow::Stop;
        }
        Flow::Continue
    }

    /// The watch body ended: `None` for a clean end of stream (the server's `timeoutSeconds`
    /// elapsed), `Some(err)` for a broken one (reset, truncated chunk, read timeout).
    pub fn watch_ended(&mut self, err: Option<&KubeError>, now: Instant) {
        let Phase::Watching { started, lines, .. } = self.phase else {
            return;
        };
        let partial = !trim(&self.line).is_empty();
        self.line.clear();
        match err {
            Some(e) => {
                // A watch that ran at least as long as the backoff cap was healthy: its cut is
                // a first failure, not one more in a row (else a quiet cluster's idle watches,
                // cut now and then by proxies, would ratchet the delay up to the cap).
                if now.saturating_duration_since(started) >= self.cfg.backoff_max {
                    self.recovered(now);
                }
                let what = self.what_watch();
                self.fault(class_of(e), &what, e, false, now);
            }
            None if partial => {
                // EOF in the middle of an event: the stream was cut, not finished.
                let e = KubeError::Transport {
                    op: self.what_watch(),
                    reason: "stream ended inside an event".into(),
                };
                let what = self.what_watch();
                self.fault(FaultClass::Transport, &what, &e, false, now);
            }
            None if lines == 0
                && now.saturating_duration_since(started) < Duration::from_secs(1) =>
            {
                // A server (or proxy) that closes every watch at once would make us spin;
                // client-go calls this a "very short watch" and backs off too.
                let e = KubeError::Transport {
                    op: self.what_watch(),
                    reason: "closed immediately without events".into(),
                };
                let what = self.what_watch();
                self.fault(FaultClass::ClosedEarly, &what, &e, false, now);
            }
            None => {
                if lines > 0 {
                    self.recovered(now);
                }
                self.log(
                    Level::Debug,
                    format!(
                        "{}: stream ended after {lines} events, watching again from \
                         resourceVersion {}",
                        self.what_watch(),
                        self.rv
                    ),
                );
                self.phase = Phase::NeedWatch;
            }
        }
    }

    fn watch_line(&mut self, line: &[u8], now: Instant) -> Flow {
        if line.is_empty() {
            return Flow::Continue;
        }
        if let Phase::Watching { lines, .. } = &mut self.phase {
            *lines += 1;
        }
        let ev = match decode_event::<T>(line) {
            Ok(ev) => ev,
            Err(e) => {
                let err = KubeError::Decode {
                    what: format!("watch line {:?}", snippet(line)),
                    reason: e,
                };
                let what = self.what_watch();
                self.fault(FaultClass::Garbage, &what, &err, false, now);
                return Flow::Stop;
            }
        };
        match ev {
            WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
                self.progress(now);
                self.advance(obj.resource_version());
                self.counters.events += 1;
                self.cache.insert(obj.key(), obj.clone());
                self.out.push(Output::Update(Update::Upsert(obj)));
            }
            WatchEvent::Deleted(obj) => {
                self.progress(now);
                self.advance(obj.resource_version());
                self.counters.events += 1;
                if self.cache.remove(&obj.key()).is_some() {
                    self.out.push(Output::Update(Update::Delete(obj)));
                }
            }
            WatchEvent::Bookmark(rv) => {
                self.progress(now);
                self.advance(&rv);
            }
            WatchEvent::Skipped { type_, skipped } => {
                self.progress(now);
                self.advance(&skipped.resource_version);
                self.counters.skipped += 1;
                self.log(
                    Level::Warn,
                    format!(
                        "{}: skipping {} ({type_}, does not decode): {}",
                        self.what_watch(),
                        skipped.name(),
                        skipped.reason
                    ),
                );
                // The server says it is gone: that is truth, not an error.
                if type_ == "DELETED" {
                    if let Some(old) = self.cache.remove(&skipped.key) {
                        self.out.push(Output::Update(Update::Delete(old)));
                    }
                }
            }
            WatchEvent::Error(status) if status.code == 410 => {
                self.expired(
                    format!("410 {} in stream: {}", status.reason, status.message),
                    now,
                );
                return Flow::Stop;
            }
            WatchEvent::Error(status) => {
                let err = KubeError::Status {
                    op: "error event".into(),
                    code: status.code,
                    message: status.message,
                    retry_after: status
                        .details
                        .retry_after_seconds
                        .map(|s| Duration::from_secs(s.into())),
                };
                let what = self.what_watch();
                self.fault(FaultClass::ErrorEvent(status.code), &what, &err, false, now);
                return Flow::Stop;
            }
            WatchEvent::Unknown(type_) => {
                self.log(
                    Level::Debug,
                    format!("{}: ignoring event type {type_:?}", self.what_watch()),
                );
            }
        }
        Flow::Continue
    }

    // -----------------------------------------------------------------------------------------
    // helpers

    fn what_list(&self) -> String {
        format!("list {}", resource_name::<T>())
    }

    fn what_watch(&self) -> String {
        format!("watch {}", resource_name::<T>())
    }

    fn log(&mut self, level: Level, msg: String) {
        self.out.push(Output::Log(level, msg));
    }

    fn advance(&mut self, rv: &str) {
        if !rv.is_empty() {
            self.rv = rv.to_string();
        }
    }

    fn relist_due(&self, now: Instant) -> bool {
        match (self.relist_every, self.listed_at) {
            (Some(every), Some(at)) => now.saturating_duration_since(at) >= every,
            _ => false,
        }
    }

    fn start_relist(&mut self) {
        if !self.rv.is_empty() {
            self.relist_from = std::mem::take(&mut self.rv);
        }
        self.continue_token.clear();
        self.pending.clear();
        self.pending_skipped.clear();
        self.phase = Phase::NeedList;
    }

    /// A watch event arrived: the stream works.
    fn progress(&mut self, now: Instant) {
        self.expirations = 0;
        self.recovered(now);
    }

    /// The resourceVersion expired: relist now, or after a backoff if it keeps happening
    /// without any event in between.
    fn expired(&mut self, detail: String, now: Instant) {
        self.expirations += 1;
        let old = self.rv.clone();
        if self.expirations == 1 {
            self.log(
                Level::Info,
                format!(
                    "{}: resourceVersion {old} expired ({detail}), relisting",
                    self.what_watch()
                ),
            );
            self.start_relist();
            let jitter = self.cfg.relist_jitter.as_millis() as u64;
            if jitter > 0 {
                let until = now + Duration::from_millis(self.rand_below(jitter));
                self.phase = Phase::Waiting {
                    until,
                    relist: true,
                };
            }
        } else {
            self.start_relist();
            let err = KubeError::Status {
                op: "watch".into(),
                code: 410,
                message: detail,
                retry_after: None,
            };
            let what = self.what_watch();
            self.fault(FaultClass::Http(410), &what, &err, true, now);
        }
    }

    /// Records a fault and schedules the retry. `relist`: retry with a list (else a watch from
    /// the current version).
    fn fault(
        &mut self,
        class: FaultClass,
        what: &str,
        err: &KubeError,
        relist: bool,
        now: Instant,
    ) {
        self.failures = self.failures.saturating_add(1);
        self.counters.faults += 1;
        self.counters.last_error = Some(format!("{what}: {err}"));
        let mut delay = self.backoff();
        if let KubeError::Status {
            retry_after: Some(ra),
            ..
        } = err
        {
            delay = delay.max((*ra).min(self.cfg.retry_after_max));
        }
        let relist = relist || self.rv.is_empty();
        let then = if relist {
            "relisting".to_string()
        } else {
            format!("watching from resourceVersion {}", self.rv)
        };
        // The error's Display starts with its own op; avoid "watch nodes: get /api/v1/nodes: …".
        let detail = match err {
            KubeError::Transport { reason, .. } => reason.clone(),
            KubeError::Timeout { reason, .. } => format!("timeout ({reason})"),
            KubeError::Status { code, message, .. } => {
                if message.is_empty() {
                    format!("http {code}")
                } else {
                    format!("http {code}: {message}")
                }
            }
            other => other.to_string(),
        };
        let msg = format!("{what}: {detail}; {then} in {}", fmt_duration(delay));
        if self.fault == Some(class) {
            self.log(Level::Debug, format!("{msg} (attempt {})", self.failures));
        } else {
            self.log(Level::Warn, msg);
            self.fault = Some(class);
            self.fault_since.get_or_insert(now);
        }
        self.line.clear();
        self.phase = Phase::Waiting {
            until: now + delay,
            relist,
        };
    }

    /// A request succeeded: reset the backoff and log the recovery once.
    fn recovered(&mut self, now: Instant) {
        if self.fault.take().is_some() {
            let since = self
                .fault_since
                .take()
                .map(|t| format!(" after {}", fmt_duration(now.saturating_duration_since(t))))
                .unwrap_or_default();
            self.log(
                Level::Info,
                format!(
                    "{}: working again{since} ({} failed attempts)",
                    self.what_watch(),
                    self.failures
                ),
            );
        }
        self.fault_since = None;
        self.failures = 0;
    }

    /// Capped exponential backoff with ±20 % jitter.
    fn backoff(&mut self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(20);
        let base = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.cfg.backoff_max);
        // A factor in [0.8, 1.2).
        let permille = 800 + self.rand_below(400);
        let jittered = base.saturating_mul(permille as u32) / 1000;
        jittered.min(self.cfg.backoff_max)
    }

    /// xorshift64*: deterministic per seed; quality is irrelevant for jitter.
    fn rand_below(&mut self, n: u64) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Strips `\r`, spaces and tabs at both ends.
fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// The first 60 characters of a line, for a log message.
fn snippet(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    let mut out: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        out.push('…');
    }
    out
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn percent_encode(out: &mut String, v: &str) {
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// `1.2s`, `250ms`, `30s`.
pub fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::types::Node;

    const LIST_NODES: &str = include_str!("../../tests/data/list-nodes.json");
    const WATCH_NODES: &str = include_str!("../../tests/data/watch-nodes-http11.raw");
    const WATCH_410: &str = include_str!("../../tests/data/watch-nodes-410.raw");

    fn cfg() -> WatchConfig {
        WatchConfig {
            timeout: Duration::from_secs(100),
            relist_interval: None,
            relist_jitter: Duration::ZERO,
            ..WatchConfig::default()
        }
    }

    fn json_lines(raw: &str) -> String {
        raw.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn node_list(rv: &str, names: &[&str]) -> String {
        let items: Vec<String> = names
            .iter()
            .map(|n| format!(r#"{{"metadata":{{"name":"{n}","resourceVersion":"{rv}"}}}}"#))
            .collect();
        format!(
            r#"{{"kind":"NodeList","metadata":{{"resourceVersion":"{rv}"}},"items":[{}]}}"#,
            items.join(",")
        )
    }

    fn ev(type_: &str, name: &str, rv: &str) -> String {
        format!(
            r#"{{"type":"{type_}","object":{{"metadata":{{"name":"{name}","resourceVersion":"{rv}"}}}}}}"#
        ) + "\n"
    }

    fn keys(m: &WatchMachine<Node>) -> Vec<String> {
        m.cache().keys().cloned().collect()
    }

    fn updates(out: &[Output<Node>]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Update(Update::Replace(v)) => Some(format!(
                    "replace[{}]",
                    v.iter().map(|n| n.key()).collect::<Vec<_>>().join(",")
                )),
                Output::Update(Update::Upsert(n)) => Some(format!("upsert {}", n.key())),
                Output::Update(Update::Delete(n)) => Some(format!("delete {}", n.key())),
                Output::Log(..) => None,
            })
            .collect()
    }

    fn logs(out: &[Output<Node>], level: Level) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Log(l, m) if *l == level => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    /// A machine that has listed `names` at `rv` and opened a watch.
    fn listed(names: &[&str], rv: &str, now: Instant) -> WatchMachine<Node> {
        let mut m = WatchMachine::<Node>::new(cfg(), 7);
        assert!(matches!(m.next(now), Next::List { .. }));
        m.list_page(node_list(rv, names).as_bytes(), now);
        m.take_output();
        assert!(matches!(m.next(now), Next::Watch { .. }));
        m.watch_opened(now);
        m
    }

    #[test]
    fn list_then_watch_recorded_stream() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 1);
        assert_eq!(
            m.next(t0),
            Next::List {
                path_query: "/api/v1/nodes?limit=500".into()
            }
        );
        m.list_page(LIST_NODES.as_bytes(), t0);
        let out = m.take_output();
        assert_eq!(updates(&out), ["replace[node1,node2]"]);
        assert_eq!(m.resource_version(), "202");
        match m.next(t0) {
            Next::Watch {
                path_query,
                read_timeout,
            } => {
                assert!(path_query
                    .starts_with("/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds="));
                assert!(path_query.ends_with("&resourceVersion=202"), "{path_query}");
                let secs: u64 = path_query
                    .split("timeoutSeconds=")
                    .nth(1)
                    .unwrap()
                    .split('&')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((90..=110).contains(&secs), "{secs}");
                assert_eq!(read_timeout, Duration::from_secs(secs + 30));
            }
            other => panic!("{other:?}"),
        }
        m.watch_opened(t0);
        // Feed the recorded stream in awkward pieces: 7 bytes at a time.
        let stream = json_lines(WATCH_NODES);
        for chunk in stream.as_bytes().chunks(7) {
            assert_eq!(m.watch_data(chunk, t0), Flow::Continue);
        }
        let out = m.take_output();
        assert_eq!(
            updates(&out),
            [
                "upsert node1",
                "upsert node2",
                "upsert node3",
                "delete node3"
            ]
        );
        assert_eq!(m.resource_version(), "210");
        assert_eq!(keys(&m), ["node1", "node2"]);
        assert_eq!(m.cache()["node2"].status.addresses.len(), 2);
        m.watch_ended(None, t0 + Duration::from_secs(100));
        assert!(
            matches!(m.next(t0), Next::Watch { path_query, .. } if path_query.ends_with("resourceVersion=210"))
        );
        assert_eq!(m.counters().events, 4);
        assert_eq!(m.counters().faults, 0);
    }

    #[test]
    fn pagination_accumulates_pages() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 1);
        m.next(t0);
        let page1 = node_list("50", &["a", "b"]).replace(
            r#""resourceVersion":"50"},"items""#,
            r#""resourceVersion":"50","continue":"tok/+="},"items""#,
        );
        m.list_page(page1.as_bytes(), t0);
        assert!(
            updates(&m.take_output()).is_empty(),
            "no replace before the last page"
        );
        assert_eq!(
            m.next(t0),
            Next::List {
                path_query: "/api/v1/nodes?limit=500&continue=tok%2F%2B%3D".into()
            }
        );
        m.list_page(node_list("50", &["c"]).as_bytes(), t0);
        assert_eq!(updates(&m.take_output()), ["replace[a,b,c]"]);
    }

    #[test]
    fn duplicate_key_across_pages_keeps_the_last() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 1);
        m.next(t0);
        let page1 = node_list("50", &["a", "b"]).replace(
            r#""resourceVersion":"50"},"items""#,
            r#""resourceVersion":"50","continue":"t"},"items""#,
        );
        m.list_page(page1.as_bytes(), t0);
        m.next(t0);
        m.list_page(node_list("51", &["a"]).as_bytes(), t0);
        assert_eq!(updates(&m.take_output()), ["replace[a,b]"]);
        assert_eq!(m.cache()["a"].resource_version(), "51");
        assert_eq!(m.cache()["b"].resource_version(), "50");
    }

    #[test]
    fn expired_continue_token_restarts_list() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 1);
        m.next(t0);
        let page1 = node_list("50", &["a"]).replace(
            r#""resourceVersion":"50"},"#,
            r#""resourceVersion":"50","continue":"x"},"#,
        );
        m.list_page(page1.as_bytes(), t0);
        m.next(t0);
        let gone = KubeError::Status {
            op: "get /api/v1/nodes".into(),
            code: 410,
            message: "The provided continue parameter is too old".into(),
            retry_after: None,
        };
        m.list_failed(&gone, t0);
        let out = m.take_output();
        assert_eq!(logs(&out, Level::Info).len(), 1);
        assert!(logs(&out, Level::Warn).is_empty());
        // Immediately, from the first page.
        assert_eq!(
            m.next(t0),
            Next::List {
                path_query: "/api/v1/nodes?limit=500".into()
            }
        );
        m.list_page(node_list("60", &["b"]).as_bytes(), t0);
        assert_eq!(updates(&m.take_output()), ["replace[b]"]);
    }

    #[test]
    fn error_410_in_stream_relists_and_relist_deletes_vanished() {
        let t0 = Instant::now();
        let mut m = listed(&["node1", "node2"], "202", t0);
        let flow = m.watch_data(json_lines(WATCH_410).as_bytes(), t0);
        assert_eq!(flow, Flow::Stop);
        let out = m.take_output();
        assert!(updates(&out).is_empty(), "no deletion from a 410");
        let info = logs(&out, Level::Info);
        assert_eq!(info.len(), 1);
        assert!(info[0].contains("resourceVersion 202 expired"), "{info:?}");
        assert_eq!(keys(&m), ["node1", "node2"]);
        // SPEC P-5: the relist is served from the watch cache, never older than what we saw.
        assert_eq!(
            m.next(t0),
            Next::List {
                path_query: "/api/v1/nodes?resourceVersionMatch=NotOlderThan&resourceVersion=202"
                    .into()
            }
        );
        m.list_page(node_list("300", &["node2", "node4"]).as_bytes(), t0);
        let out = m.take_output();
        assert_eq!(updates(&out), ["replace[node2,node4]"]);
        assert_eq!(keys(&m), ["node2", "node4"]);
        assert_eq!(m.counters().relists, 1);
    }

    #[test]
    fn relist_is_jittered_and_falls_back_to_a_consistent_read() {
        let t0 = Instant::now();
        let jitter = Duration::from_secs(10);
        let mut waits = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let mut m = listed(&["a"], "5", t0);
            m.cfg.relist_jitter = jitter;
            m.rng = seed * 7919 + 1;
            m.watch_data(json_lines(WATCH_410).as_bytes(), t0);
            let Next::Wait { until } = m.next(t0) else {
                panic!("a relist after 410 waits first")
            };
            assert!(until - t0 < jitter);
            waits.insert(until - t0);
            let Next::List { path_query } = m.next(until) else {
                panic!()
            };
            assert!(path_query.ends_with("NotOlderThan&resourceVersion=5"));
            // The server's cache lags behind version 5: 504, then a consistent read.
            let too_large = KubeError::Status {
                op: "get".into(),
                code: 504,
                message: "Timeout: Too large resource version: 5, current: 3".into(),
                retry_after: Some(Duration::from_secs(1)),
            };
            m.list_failed(&too_large, until);
            let Next::Wait { until: u2 } = m.next(until) else {
                panic!()
            };
            assert_eq!(
                m.next(u2),
                Next::List {
                    path_query: "/api/v1/nodes?limit=500".into()
                }
            );
        }
        assert!(waits.len() >= 15, "spread: {waits:?}");
    }

    #[test]
    fn http_410_on_watch_relists() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let gone = KubeError::Status {
            op: "get /api/v1/nodes".into(),
            code: 410,
            message: "too old".into(),
            retry_after: None,
        };
        m.watch_failed(&gone, t0);
        assert!(matches!(m.next(t0), Next::List { .. }));
    }

    #[test]
    fn repeated_410_without_progress_backs_off() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let err410 = br#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old"}}
"#;
        m.watch_data(err410, t0);
        assert!(matches!(m.next(t0), Next::List { .. }));
        m.list_page(node_list("6", &["a"]).as_bytes(), t0);
        assert!(matches!(m.next(t0), Next::Watch { .. }));
        m.watch_opened(t0);
        m.watch_data(err410, t0);
        assert!(
            matches!(m.next(t0), Next::Wait { .. }),
            "second 410 in a row waits"
        );
    }

    #[test]
    fn transport_fault_keeps_cache_and_warns_once() {
        let t0 = Instant::now();
        let mut m = listed(&["a", "b"], "5", t0);
        m.watch_data(ev("MODIFIED", "a", "6").as_bytes(), t0);
        m.watch_data(
            br#"{"type":"MODIFIED","object":{"metadata":{"name":"b","#,
            t0,
        );
        let reset = KubeError::Transport {
            op: "get /api/v1/nodes".into(),
            reason: "Connection reset by peer (os error 104)".into(),
        };
        m.watch_ended(Some(&reset), t0);
        let out = m.take_output();
        assert_eq!(
            updates(&out),
            ["upsert a"],
            "the partial event is never applied"
        );
        let warns = logs(&out, Level::Warn);
        assert_eq!(warns.len(), 1);
        assert!(
            warns[0].starts_with("watch nodes: Connection reset by peer (os error 104); watching from resourceVersion 6 in "),
            "{warns:?}"
        );
        assert_eq!(keys(&m), ["a", "b"]);

        // The server stays down: three more failures, no more warnings, growing delays.
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..3 {
            let Next::Wait { until } = m.next(now) else {
                panic!("expected a wait")
            };
            delays.push(until - now);
            now = until;
            assert!(
                matches!(m.next(now), Next::Watch { path_query, .. } if path_query.ends_with("=6"))
            );
            let refused = KubeError::Transport {
                op: "get /api/v1/nodes".into(),
                reason: "Connection refused (os error 111)".into(),
            };
            m.watch_failed(&refused, now);
        }
        let out = m.take_output();
        assert_eq!(logs(&out, Level::Warn).len(), 0, "{out:?}");
        assert_eq!(logs(&out, Level::Debug).len(), 3);
        assert_eq!(
            keys(&m),
            ["a", "b"],
            "nothing deleted while the server is down"
        );
        assert!(delays[0] >= Duration::from_millis(400) && delays[0] <= Duration::from_millis(600));
        assert!(delays[1] > delays[0]);

        // Back: one info line on the first event.
        let Next::Wait { until } = m.next(now) else {
            panic!()
        };
        m.next(until);
        m.watch_opened(until);
        m.watch_data(ev("ADDED", "c", "7").as_bytes(), until);
        let out = m.take_output();
        assert_eq!(updates(&out), ["upsert c"]);
        let info = logs(&out, Level::Info);
        assert_eq!(info.len(), 1);
        assert!(info[0].contains("working again"), "{info:?}");
    }

    #[test]
    fn backoff_grows_to_cap_with_jitter() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 99);
        let mut now = t0;
        let mut last = Duration::ZERO;
        for i in 0..12 {
            assert!(matches!(m.next(now), Next::List { .. }));
            m.list_failed(
                &KubeError::Status {
                    op: "get".into(),
                    code: 500,
                    message: String::new(),
                    retry_after: None,
                },
                now,
            );
            let Next::Wait { until } = m.next(now) else {
                panic!()
            };
            last = until - now;
            assert!(last <= Duration::from_secs(30), "attempt {i}: {last:?}");
            now = until;
        }
        assert!(last >= Duration::from_secs(24), "{last:?}");
        let out = m.take_output();
        assert_eq!(logs(&out, Level::Warn).len(), 1);
    }

    #[test]
    fn retry_after_is_honoured() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 3);
        m.next(t0);
        m.list_failed(
            &KubeError::Status {
                op: "get".into(),
                code: 429,
                message: "too many requests".into(),
                retry_after: Some(Duration::from_secs(7)),
            },
            t0,
        );
        assert_eq!(
            m.next(t0),
            Next::Wait {
                until: t0 + Duration::from_secs(7)
            }
        );
        let out = m.take_output();
        assert!(logs(&out, Level::Warn)[0].contains("http 429: too many requests"));
        assert!(logs(&out, Level::Warn)[0].ends_with("relisting in 7.0s"));
    }

    #[test]
    fn garbage_line_stops_stream_and_rewatches_from_last_good_version() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let data = format!(
            "{}<html>proxy error</html>\n{}",
            ev("ADDED", "b", "6"),
            ev("ADDED", "c", "7")
        );
        assert_eq!(m.watch_data(data.as_bytes(), t0), Flow::Stop);
        let out = m.take_output();
        assert_eq!(updates(&out), ["upsert b"]);
        let warns = logs(&out, Level::Warn);
        assert_eq!(warns.len(), 1);
        assert!(warns[0].contains("<html>proxy error</html>"), "{warns:?}");
        let Next::Wait { until } = m.next(t0) else {
            panic!()
        };
        assert!(
            matches!(m.next(until), Next::Watch { path_query, .. } if path_query.ends_with("=6"))
        );
    }

    #[test]
    fn malformed_object_in_event_is_skipped_and_stream_continues() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let bad = r#"{"type":"MODIFIED","object":{"metadata":{"name":"a","resourceVersion":"6"},"spec":{"podCIDRs":7}}}"#;
        let data = format!("{bad}\n{}", ev("ADDED", "b", "7"));
        assert_eq!(m.watch_data(data.as_bytes(), t0), Flow::Continue);
        let out = m.take_output();
        assert_eq!(updates(&out), ["upsert b"]);
        let warns = logs(&out, Level::Warn);
        assert_eq!(warns.len(), 1);
        assert!(
            warns[0].starts_with("watch nodes: skipping a (MODIFIED"),
            "{warns:?}"
        );
        assert_eq!(keys(&m), ["a", "b"], "the old version of a is kept");
        assert_eq!(m.resource_version(), "7");
        // A malformed DELETED still deletes: the server said so.
        let bad_del = r#"{"type":"DELETED","object":{"metadata":{"name":"a","resourceVersion":"8"},"spec":"x"}}"#;
        m.watch_data(format!("{bad_del}\n").as_bytes(), t0);
        assert_eq!(updates(&m.take_output()), ["delete a"]);
    }

    #[test]
    fn malformed_known_object_survives_relist() {
        let t0 = Instant::now();
        let mut m = listed(&["a", "b"], "5", t0);
        m.watch_failed(
            &KubeError::Status {
                op: "w".into(),
                code: 410,
                message: String::new(),
                retry_after: None,
            },
            t0,
        );
        m.next(t0);
        let body = r#"{"kind":"NodeList","metadata":{"resourceVersion":"9"},"items":[{"metadata":{"name":"a","resourceVersion":"9"},"spec":{"podCIDRs":"x"}},{"metadata":{"name":"z","resourceVersion":"9"},"spec":{"podCIDRs":"x"}}]}"#;
        m.list_page(body.as_bytes(), t0);
        let out = m.take_output();
        assert_eq!(
            updates(&out),
            ["replace[a]"],
            "a kept (known), b gone, z never known"
        );
        assert_eq!(logs(&out, Level::Warn).len(), 2);
    }

    #[test]
    fn truncated_stream_and_clean_end() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        m.watch_data(br#"{"type":"ADDED","object":{"meta"#, t0);
        m.watch_ended(None, t0 + Duration::from_secs(2));
        let out = m.take_output();
        assert!(updates(&out).is_empty());
        assert!(logs(&out, Level::Warn)[0].contains("stream ended inside an event"));
        assert!(matches!(m.next(t0), Next::Wait { .. }));

        // A clean end after a normal watch: watch again at once, no warning.
        let mut m = listed(&["a"], "5", t0);
        m.watch_ended(None, t0 + Duration::from_secs(100));
        let out = m.take_output();
        assert!(logs(&out, Level::Warn).is_empty());
        assert!(matches!(m.next(t0), Next::Watch { .. }));

        // A watch that closes at once, empty, is backed off.
        let mut m = listed(&["a"], "5", t0);
        m.watch_ended(None, t0);
        assert!(matches!(m.next(t0), Next::Wait { .. }));
    }

    #[test]
    fn read_timeout_rewatches_without_relist() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let stalled = KubeError::Timeout {
            op: "get /api/v1/nodes".into(),
            reason: "timeout: per read".into(),
        };
        m.watch_ended(Some(&stalled), t0);
        let out = m.take_output();
        assert!(logs(&out, Level::Warn)[0].contains("timeout"), "{out:?}");
        let Next::Wait { until } = m.next(t0) else {
            panic!()
        };
        assert!(matches!(m.next(until), Next::Watch { .. }));
        assert_eq!(keys(&m), ["a"]);
    }

    #[test]
    fn periodic_relist_at_watch_boundary() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(
            WatchConfig {
                relist_interval: Some(Duration::from_secs(600)),
                ..cfg()
            },
            5,
        );
        m.next(t0);
        m.list_page(node_list("5", &["a"]).as_bytes(), t0);
        assert!(matches!(m.next(t0), Next::Watch { .. }));
        m.watch_opened(t0);
        let later = t0 + Duration::from_secs(601);
        m.watch_ended(None, later);
        assert!(matches!(m.next(later), Next::List { .. }));
    }

    #[test]
    fn bookmark_advances_version_without_updates() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let bm =
            br#"{"type":"BOOKMARK","object":{"kind":"Node","metadata":{"resourceVersion":"99"}}}
"#;
        m.watch_data(bm, t0);
        assert!(updates(&m.take_output()).is_empty());
        assert_eq!(m.resource_version(), "99");
    }

    #[test]
    fn other_error_event_backs_off_and_keeps_version() {
        let t0 = Instant::now();
        let mut m = listed(&["a"], "5", t0);
        let e = br#"{"type":"ERROR","object":{"kind":"Status","code":500,"message":"etcd leader changed"}}
"#;
        assert_eq!(m.watch_data(e, t0), Flow::Stop);
        let out = m.take_output();
        assert!(logs(&out, Level::Warn)[0].contains("etcd leader changed"));
        let Next::Wait { until } = m.next(t0) else {
            panic!()
        };
        assert!(
            matches!(m.next(until), Next::Watch { path_query, .. } if path_query.ends_with("=5"))
        );
    }

    #[test]
    fn misuse_is_ignored_not_a_panic() {
        let t0 = Instant::now();
        let mut m = WatchMachine::<Node>::new(cfg(), 0);
        assert_eq!(m.watch_data(b"{}\n", t0), Flow::Stop);
        m.watch_ended(None, t0);
        m.list_page(b"{}", t0);
        assert!(m.take_output().is_empty());
        assert!(matches!(m.next(t0), Next::List { .. }));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // R-1: whatever the stream holds, the machine answers with a decision, not a panic.
        let t0 = Instant::now();
        let base = json_lines(WATCH_NODES).into_bytes();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..300 {
            let mut m = listed(&["node1"], "5", t0);
            let mut data = base.clone();
            for _ in 0..(round % 20 + 1) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng as usize) % data.len();
                data[i] = (rng >> 32) as u8;
            }
            for chunk in data.chunks(1 + round % 97) {
                if m.watch_data(chunk, t0) == Flow::Stop {
                    break;
                }
            }
            m.watch_ended(None, t0 + Duration::from_secs(100));
            m.take_output();
            assert!(!matches!(m.next(t0), Next::List { .. }) || m.resource_version().is_empty());
        }
        let mut m = WatchMachine::<Node>::new(cfg(), 1);
        m.next(t0);
        m.list_page(&[0xff, b'{', b'[', 0], t0);
        assert!(matches!(m.next(t0), Next::Wait { .. }));
    }

    #[test]
    fn helpers() {
        assert_eq!(trim(b" \r\n{x}\r\n"), b"{x}");
        assert_eq!(trim(b"\r"), b"");
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        let mut s = String::new();
        percent_encode(&mut s, "eyJ2 Ijo=/+");
        assert_eq!(s, "eyJ2%20Ijo%3D%2F%2B");
    }
}
