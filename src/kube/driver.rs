//! The watch thread: [`spawn_watch`] runs one [`WatchMachine`] against the API server, and
//! [`Stop`] ends it.
//!
//! Shell module: it performs the requests the machine asks for, feeds it the outcomes, hands
//! updates to the sink and emits the machine's log lines. It must never decide anything the
//! machine decides (what to request, when to retry, what to delete), and it must never report
//! an error caused by its own shutdown: after a stop, outcomes are discarded, not fed.
//!
//! Stopping: [`Stop::trigger`] wakes a backoff sleep at once and shuts down the watch's own
//! ureq agent ([`Connection::shutdown`] → `Agent::shutdown`), which makes a read blocked on a
//! silent stream return immediately (measured: under a millisecond). Only a TCP connect or DNS
//! lookup in progress is not interruptible; it is bounded by
//! [`super::client::ClientOptions::connect_timeout`] (5 s by default). The watch threads own no
//! state that needs flushing, so a daemon with a hard deadline may exit without joining them.

use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::debug;

use super::client::{map_io_error, read_list, status_error, Client, Connection};
use super::watch::{Counters, Flow, Next, Output, WatchConfig, WatchMachine};
use super::{resource_name, Resource, Update};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is a flag and a list of hooks; a panicking holder leaves it usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct StopState {
    triggered: bool,
    next_id: u64,
    hooks: Vec<(u64, Hook)>,
}

#[derive(Default)]
struct StopInner {
    state: Mutex<StopState>,
    cv: Condvar,
}

/// A cloneable stop handle: trigger it once (on SIGTERM) and every watch spawned with a clone
/// of it ends within about a second, its blocked read interrupted.
///
/// [`Stop::trigger`] takes locks and closes sockets: call it from a normal thread (e.g. a
/// `signal_hook::iterator::Signals` loop), not from inside a signal handler.
#[derive(Clone, Default)]
pub struct Stop(Arc<StopInner>);

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Stop {
    /// A fresh, untriggered handle.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Requests the stop: wakes sleepers and interrupts blocked requests. Idempotent.
    pub fn trigger(&self) {
        let hooks = {
            let mut st = lock(&self.0.state);
            st.triggered = true;
            std::mem::take(&mut st.hooks)
        };
        self.0.cv.notify_all();
        for (_, hook) in hooks {
            hook();
        }
    }

    /// True once [`Stop::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        lock(&self.0.state).triggered
    }

    /// Sleeps up to `d`; returns early (true) when the stop is triggered.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = lock(&self.0.state);
        while !st.triggered {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .0
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        true
    }

    /// Runs `hook` on trigger (at once if already triggered). Returns an id for
    /// [`Stop::remove_hook`], or `None` if it already ran.
    fn on_trigger(&self, hook: Hook) -> Option<u64> {
        let mut st = lock(&self.0.state);
        if st.triggered {
            drop(st);
            hook();
            return None;
        }
        st.next_id += 1;
        let id = st.next_id;
        st.hooks.push((id, hook));
        Some(id)
    }

    fn remove_hook(&self, id: u64) {
        lock(&self.0.state).hooks.retain(|(i, _)| *i != id);
    }
}

/// Watch statistics for metrics, updated by the watch thread after every step.
#[derive(Debug, Default)]
pub struct WatchStats {
    lists: AtomicU64,
    relists: AtomicU64,
    watches: AtomicU64,
    faults: AtomicU64,
    events: AtomicU64,
    skipped: AtomicU64,
    synced: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// When the API server last answered (a list page, a watch opened, watch data).
    contact: Mutex<Option<Instant>>,
    /// Watch streams open now.
    streams: AtomicU64,
}

impl WatchStats {
    /// Completed lists, the first included.
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::Relaxed)
    }
    /// Completed lists after the first (410s, periodic relists).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }
    /// Watch requests sent (each reconnect is one).
    pub fn restarts(&self) -> u64 {
        self.watches.load(Ordering::Relaxed)
    }
    /// Failed requests and broken streams.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }
    /// Watch events applied.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    /// Objects skipped because they did not decode.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
    /// True once the first list completed (the daemon's cache is complete).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
    /// When the API server last answered: a list, a watch opened, data on a watch (SPEC S-8).
    pub fn contact(&self) -> Option<Instant> {
        *lock(&self.contact)
    }
    /// Watch streams open now (kept alive by TCP keepalive, SPEC S-5).
    pub fn open_streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }
    pub(crate) fn touch(&self) {
        *lock(&self.contact) = Some(Instant::now());
    }
    /// The last fault, e.g. `watch nodes: Connection reset by peer (os error 104)`.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn update(&self, c: &Counters, synced: bool) {
        self.lists.store(c.lists, Ordering::Relaxed);
        self.relists.store(c.relists, Ordering::Relaxed);
        self.watches.store(c.watches, Ordering::Relaxed);
        self.faults.store(c.faults, Ordering::Relaxed);
        self.events.store(c.events, Ordering::Relaxed);
        self.skipped.store(c.skipped, Ordering::Relaxed);
        self.synced.store(synced, Ordering::Relaxed);
        let mut last = lock(&self.last_error);
        if *last != c.last_error {
            last.clone_from(&c.last_error);
        }
    }
}

/// Options of one watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Timeouts, page size, backoff; see [`WatchConfig`] (defaults: 300 s watches, 500 per
    /// page, 0.5 s → 30 s backoff, relist every 30 min).
    pub config: WatchConfig,
    /// Where the thread publishes its statistics; keep a clone for metrics.
    pub stats: Arc<WatchStats>,
    /// Jitter seed; `None` derives one from the clock and process id.
    pub seed: Option<u64>,
}

/// Starts a thread that lists and watches `T` and calls `sink` with every [`Update`], until
/// `stop` is triggered. The first update is a [`Update::Replace`] once the first list
/// completes; while the API server is unreachable no update is sent at all.
///
/// # Panics
/// Only if the OS cannot create a thread (as [`std::thread::spawn`]).
pub fn spawn_watch<T: Resource>(
    client: Arc<Client>,
    opts: WatchOptions,
    mut sink: impl FnMut(Update<T>) + Send + 'static,
    stop: Stop,
) -> JoinHandle<()> {
    std::thread::spawn(move || run::<T>(&client, &opts, &mut sink, &stop))
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

fn run<T: Resource>(
    client: &Client,
    opts: &WatchOptions,
    sink: &mut dyn FnMut(Update<T>),
    stop: &Stop,
) {
    let name = resource_name::<T>();
    let conn = Arc::new(Connection::new());
    let hook_conn = Arc::clone(&conn);
    let hook = stop.on_trigger(Box::new(move || hook_conn.shutdown()));
    let mut m = WatchMachine::<T>::new(opts.config.clone(), opts.seed.unwrap_or_else(seed));
    debug!("watch {name}: starting against {}", client.server());
    let max_body = client.options().max_body;
    let mut buf = vec![0u8; 64 << 10];

    while !stop.is_triggered() {
        let now = Instant::now();
        match m.next(now) {
            Next::Wait { until } => {
                stop.wait_timeout(until.saturating_duration_since(now));
            }
            Next::List { path_query } => {
                let op = format!("list {name}");
                let outcome = client.get(&conn, &path_query, None).and_then(|resp| {
                    if resp.status().is_success() {
                        read_list::<T>(&op, resp, max_body)
                    } else {
                        Err(status_error(&op, resp))
                    }
                });
                if stop.is_triggered() {
                    break;
                }
                match outcome {
                    Ok(page) => {
                        opts.stats.touch();
                        m.list_decoded(page, Instant::now());
                    }
                    Err(e) => m.list_failed(&e, Instant::now()),
                }
            }
            Next::Watch {
                path_query,
                read_timeout,
            } => {
                let op = format!("watch {name}");
                let resp = match client.get(&conn, &path_query, Some(read_timeout)) {
                    Ok(resp) if resp.status().as_u16() == 200 => resp,
                    Ok(resp) => {
                        let e = status_error(&op, resp);
                        if !stop.is_triggered() {
                            m.watch_failed(&e, Instant::now());
                        }
                        publish(&mut m, sink, opts);
                        continue;
                    }
                    Err(e) => {
                        if !stop.is_triggered() {
                            m.watch_failed(&e, Instant::now());
                        }
                        publish(&mut m, sink, opts);
                        continue;
                    }
                };
                debug!(
                    "watch {name}: connected, from resourceVersion {}",
                    m.resource_version()
                );
                m.watch_opened(Instant::now());
                opts.stats.touch();
                opts.stats.streams.fetch_add(1, Ordering::Relaxed);
                let mut body = resp.into_body().into_reader();
                loop {
                    match body.read(&mut buf) {
                        Ok(0) => {
                            m.watch_ended(None, Instant::now());
                            break;
                        }
                        Ok(n) => {
                            opts.stats.touch();
                            let flow = m.watch_data(&buf[..n], Instant::now());
                            publish(&mut m, sink, opts);
                            if flow == Flow::Stop {
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            if !stop.is_triggered() {
                                let e = map_io_error(&op, client.server(), e);
                                m.watch_ended(Some(&e), Instant::now());
                            }
                            break;
                        }
                    }
                }
                opts.stats.streams.fetch_sub(1, Ordering::Relaxed);
            }
        }
        publish(&mut m, sink, opts);
    }
    if let Some(id) = hook {
        stop.remove_hook(id);
    }
    debug!("watch {name}: stopped");
}

/// Hands the machine's output to the sink and the logger, and refreshes the statistics.
fn publish<T: Resource>(
    m: &mut WatchMachine<T>,
    sink: &mut dyn FnMut(Update<T>),
    opts: &WatchOptions,
) {
    // Statistics first, so that whoever reacts to an update sees counters that include it.
    opts.stats.update(m.counters(), m.synced());
    for out in m.take_output() {
        match out {
            Output::Update(u) => sink(u),
            Output::Log(level, msg) => log::log!(level, "{msg}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_wakes_sleeper_and_runs_hooks_once() {
        let stop = Stop::new();
        let ran = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&ran);
        let id = stop.on_trigger(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(id.is_some());
        let s2 = stop.clone();
        let t = std::thread::spawn(move || s2.wait_timeout(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(50));
        stop.trigger();
        stop.trigger();
        assert!(t.join().unwrap());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // A hook registered after the trigger runs at once.
        let r = Arc::clone(&ran);
        assert!(stop
            .on_trigger(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }))
            .is_none());
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert!(!Stop::new().wait_timeout(Duration::from_millis(1)));
    }

    #[test]
    fn removed_hook_does_not_run() {
        let stop = Stop::new();
        let ran = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&ran);
        let id = stop.on_trigger(Box::new(move || r.store(true, Ordering::SeqCst)));
        stop.remove_hook(id.unwrap());
        stop.trigger();
        assert!(!ran.load(Ordering::SeqCst));
    }
}
