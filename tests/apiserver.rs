//! A scriptable stand-in for kube-apiserver, for the kube client tests (std::net, threads,
//! HTTP/1.1 with chunked watch streams), plus a log-capturing logger and an update mirror.
//!
//! It models one collection (e.g. `/api/v1/nodes`) the way kube-apiserver v1.28 behaves in the
//! recordings under tests/data: lists with `limit`/`continue`, a global resourceVersion counter,
//! a watch that replays history after the requested version and then streams new events until
//! `timeoutSeconds`, a 410 ERROR event inside HTTP 200 for versions older than its history (as
//! after a restart), silence for versions newer than it knows, and no bookmarks unless asked.
//!
//! Each test scripts faults per request kind ([`Fault`]); unscripted requests behave normally.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use kr_tunneld::kube::Update;
use serde_json::{json, Value};

/// Which request a scripted fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A list request (no `watch=1`).
    List,
    /// A watch request.
    Watch,
}

/// One scripted misbehaviour, consumed by the next request of its [`Kind`].
#[derive(Debug, Clone)]
pub enum Fault {
    /// Behave normally (lets a script target the second request of a kind).
    Pass,
    /// Answer with this status and a `Status` body (and `Retry-After` when given).
    Status { code: u16, retry_after: Option<u64> },
    /// Reset the connection (RST) without answering.
    Reset,
    /// Watch: send `after` events, then the first half of the next one, then RST.
    ResetMidEvent { after: usize },
    /// Watch: send `after` events, then a chunk header promising more than follows, then FIN.
    TruncatedChunk { after: usize },
    /// Watch: send `after` events, then `line` as a chunk of its own, then carry on.
    GarbageLine { after: usize, line: String },
    /// Watch: status line and headers, then no byte at all until the client goes away.
    Stall,
    /// Write these bytes verbatim (a recorded response: head and chunked body), then FIN.
    Raw(Vec<u8>),
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: Kind,
    pub path_query: String,
    pub authorization: Option<String>,
    pub at: Instant,
}

impl Request {
    /// A query parameter's (percent-decoded) value.
    pub fn param(&self, name: &str) -> Option<String> {
        query_param(&self.path_query, name)
    }
}

struct State {
    path: String,
    objects: BTreeMap<String, Value>,
    rv: u64,
    history: Vec<(u64, String, Value)>,
    /// Watches from a version below this get 410 (history lost, e.g. after a restart).
    history_start: u64,
    list_faults: VecDeque<Fault>,
    watch_faults: VecDeque<Fault>,
    requests: Vec<Request>,
    token: Option<String>,
    bookmarks: bool,
    generation: u64,
    listening: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

/// The test API server. Dropping it closes everything.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_of(obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

impl ApiServer {
    /// Serves `path` (e.g. `/api/v1/nodes`) with `objects` at resourceVersion `rv`.
    pub fn start(path: &str, objects: Vec<Value>, rv: u64) -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                path: path.to_string(),
                objects: objects.into_iter().map(|o| (key_of(&o), o)).collect(),
                rv,
                history: Vec::new(),
                history_start: rv,
                list_faults: VecDeque::new(),
                watch_faults: VecDeque::new(),
                requests: Vec::new(),
                token: None,
                bookmarks: false,
                generation: 0,
                listening: true,
                closed: false,
            }),
            cv: Condvar::new(),
        });
        let acceptor = spawn_acceptor(listener, Arc::clone(&shared));
        ApiServer {
            addr,
            shared,
            acceptor: Mutex::new(Some(acceptor)),
        }
    }

    /// Serves the items of a recorded list response (e.g. tests/data/list-nodes.json).
    pub fn from_list(path: &str, list_json: &str) -> ApiServer {
        let v: Value = serde_json::from_str(list_json).unwrap();
        let rv = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let items = v["items"].as_array().unwrap().clone();
        ApiServer::start(path, items, rv)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requires `Authorization: Bearer <token>` (401 otherwise); `None` turns auth off.
    pub fn require_token(&self, token: Option<&str>) {
        lock(&self.shared.state).token = token.map(str::to_string);
    }

    /// Sends a BOOKMARK with the current version when a watch times out.
    pub fn send_bookmarks(&self, on: bool) {
        lock(&self.shared.state).bookmarks = on;
    }

    /// Queues a fault for the next request of `kind`.
    pub fn script(&self, kind: Kind, fault: Fault) {
        let mut st = lock(&self.shared.state);
        match kind {
            Kind::List => st.list_faults.push_back(fault),
            Kind::Watch => st.watch_faults.push_back(fault),
        }
    }

    /// Applies a change (`ADDED`, `MODIFIED`, `DELETED`) at the next resourceVersion and wakes
    /// the watches. The object's `metadata.resourceVersion` is set here.
    pub fn apply(&self, type_: &str, mut obj: Value) -> u64 {
        let mut st = lock(&self.shared.state);
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&obj);
        if type_ == "DELETED" {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, obj.clone());
        }
        st.history.push((rv, type_.to_string(), obj));
        drop(st);
        self.shared.cv.notify_all();
        rv
    }

    /// Applies the events of a recorded watch (one JSON event per line; chunk-size lines of a
    /// `curl --raw` capture are ignored). Bookmarks and errors are skipped.
    pub fn apply_recorded(&self, recording: &str) {
        for line in recording.lines().filter(|l| l.starts_with('{')) {
            let ev: Value = serde_json::from_str(line).unwrap();
            let t = ev["type"].as_str().unwrap();
            if matches!(t, "ADDED" | "MODIFIED" | "DELETED") {
                self.apply(t, ev["object"].clone());
            }
        }
    }

    /// The objects the server holds now, by key.
    pub fn keys(&self) -> Vec<String> {
        lock(&self.shared.state).objects.keys().cloned().collect()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.state).rv
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.state).requests.clone()
    }

    /// Requests of one kind seen so far.
    pub fn requests_of(&self, kind: Kind) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == kind)
            .collect()
    }

    /// Stops listening (new connections are refused) and resets open streams: the server
    /// process is gone.
    pub fn go_down(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.listening = false;
            st.generation += 1;
        }
        self.shared.cv.notify_all();
        // Wake the blocked accept() so that it sees `listening == false` and drops the socket.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = lock(&self.acceptor).take() {
            h.join().unwrap();
        }
    }

    /// Comes back on the same port with the stored objects but a new version history that
    /// starts `jump` versions later: every older version now gets 410, as after a
    /// kube-apiserver restart (recorded in tests/data/watch-nodes-410.raw).
    pub fn come_back(&self, jump: u64) {
        {
            let mut st = lock(&self.shared.state);
            st.rv += jump;
            st.history.clear();
            st.history_start = st.rv;
            st.listening = true;
        }
        let listener = TcpListener::bind(self.addr).unwrap();
        *lock(&self.acceptor) = Some(spawn_acceptor(listener, Arc::clone(&self.shared)));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.cv.notify_all();
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = lock(&self.acceptor).take() {
            let _ = h.join();
        }
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    thread::spawn(move || {
        for conn in listener.incoming() {
            {
                let st = lock(&shared.state);
                if st.closed || !st.listening {
                    return;
                }
            }
            let Ok(conn) = conn else { continue };
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                let _ = serve(conn, &shared);
            });
        }
    })
}

/// Resets a connection: SO_LINGER with a zero timeout makes close() send RST.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (owned by `stream`), and the option value points to a live
    // `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn query_param(path_query: &str, name: &str) -> Option<String> {
    let q = path_query.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

fn status_body(code: u16, message: &str) -> String {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
           "message": message, "reason": reason(code).replace(' ', ""), "code": code})
    .to_string()
}

fn respond(s: &mut TcpStream, code: u16, extra: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{body}",
        reason(code),
        body.len()
    )?;
    s.flush()
}

fn chunk(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(s, "{:x}\r\n", data.len())?;
    s.write_all(data)?;
    s.write_all(b"\r\n")?;
    s.flush()
}

fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path_query = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let kind = if query_param(&path_query, "watch").is_some() {
        Kind::Watch
    } else {
        Kind::List
    };
    let mut s = stream;
    let (fault, token_ok, path_ok, generation) = {
        let mut st = lock(&shared.state);
        if st.closed || !st.listening {
            // Accepted just before going down: the process is gone, so is this connection.
            drop(st);
            reset(s);
            return Ok(());
        }
        st.requests.push(Request {
            kind,
            path_query: path_query.clone(),
            authorization: authorization.clone(),
            at: Instant::now(),
        });
        let fault = match kind {
            Kind::List => st.list_faults.pop_front(),
            Kind::Watch => st.watch_faults.pop_front(),
        };
        let token_ok = match &st.token {
            None => true,
            Some(t) => authorization.as_deref() == Some(&format!("Bearer {t}")),
        };
        let path_ok = path_query.split('?').next() == Some(st.path.as_str());
        // Captured together with the listening check: a go_down() after this point changes
        // the generation and ends the stream.
        (fault, token_ok, path_ok, st.generation)
    };
    match &fault {
        Some(Fault::Status { code, retry_after }) => {
            let extra = retry_after
                .map(|r| format!("Retry-After: {r}\r\n"))
                .unwrap_or_default();
            return respond(
                &mut s,
                *code,
                &extra,
                &status_body(*code, "scripted failure"),
            );
        }
        Some(Fault::Reset) => {
            reset(s);
            return Ok(());
        }
        Some(Fault::Raw(bytes)) => {
            s.write_all(bytes)?;
            return s.flush();
        }
        _ => {}
    }
    if !token_ok {
        return respond(&mut s, 401, "", &status_body(401, "Unauthorized"));
    }
    if !path_ok {
        return respond(
            &mut s,
            404,
            "",
            &status_body(404, "the server could not find the requested resource"),
        );
    }
    match kind {
        Kind::List => serve_list(s, shared, &path_query),
        Kind::Watch => serve_watch(s, shared, &path_query, fault, generation),
    }
}

fn serve_list(mut s: TcpStream, shared: &Shared, path_query: &str) -> std::io::Result<()> {
    let limit: usize = query_param(path_query, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let offset: usize = query_param(path_query, "continue")
        .and_then(|c| c.strip_prefix("offset:").and_then(|o| o.parse().ok()))
        .unwrap_or(0);
    let body = {
        let st = lock(&shared.state);
        let all: Vec<&Value> = st.objects.values().collect();
        let end = offset.saturating_add(limit).min(all.len());
        let items: Vec<Value> = all[offset.min(all.len())..end]
            .iter()
            .map(|v| (*v).clone())
            .collect();
        let mut meta = json!({"resourceVersion": st.rv.to_string()});
        if end < all.len() {
            meta["continue"] = json!(format!("offset:{end}"));
        }
        json!({"kind":"List","apiVersion":"v1","metadata": meta, "items": items}).to_string()
    };
    respond(&mut s, 200, "", &body)
}

fn serve_watch(
    mut s: TcpStream,
    shared: &Shared,
    path_query: &str,
    fault: Option<Fault>,
    generation: u64,
) -> std::io::Result<()> {
    let from: u64 = query_param(path_query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        query_param(path_query, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let started = Instant::now();
    write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    )?;
    s.flush()?;
    {
        let st = lock(&shared.state);
        if st.generation != generation {
            drop(st);
            reset(s);
            return Ok(());
        }
        if from < st.history_start {
            drop(st);
            // As kube-apiserver after a restart: HTTP 200, one ERROR event, end of stream.
            let err = json!({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1",
                "metadata":{},"status":"Failure",
                "message": format!("too old resource version: {from} ({})", from + 1),
                "reason":"Expired","code":410}});
            chunk(&mut s, format!("{err}\n").as_bytes())?;
            return chunk(&mut s, b"");
        }
    }
    if let Some(Fault::Stall) = fault {
        // Nothing until the client hangs up (or the test ends).
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut b = [0u8; 1];
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            match s.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Ok(()),
            }
            let st = lock(&shared.state);
            if st.closed || st.generation != generation {
                return Ok(());
            }
        }
        return Ok(());
    }
    let mut last = from;
    let mut sent = 0usize;
    let mut fault = fault;
    loop {
        let (events, gone, rv, bookmarks) = {
            let st = lock(&shared.state);
            let events: Vec<(u64, String, Value)> = st
                .history
                .iter()
                .filter(|(rv, ..)| *rv > last)
                .cloned()
                .collect();
            (
                events,
                st.closed || st.generation != generation,
                st.rv,
                st.bookmarks,
            )
        };
        if gone {
            reset(s);
            return Ok(());
        }
        for (rv, type_, obj) in events {
            let line = format!("{}\n", json!({"type": type_, "object": obj}));
            match &fault {
                Some(Fault::ResetMidEvent { after }) if *after == sent => {
                    let half = &line.as_bytes()[..line.len() / 2];
                    write!(s, "{:x}\r\n", line.len())?;
                    s.write_all(half)?;
                    s.flush()?;
                    thread::sleep(Duration::from_millis(20));
                    reset(s);
                    return Ok(());
                }
                Some(Fault::TruncatedChunk { after }) if *after == sent => {
                    let part = &line.as_bytes()[..line.len() / 3];
                    write!(s, "{:x}\r\n", line.len())?;
                    s.write_all(part)?;
                    s.flush()?;
                    // FIN, not RST: the body just stops inside a chunk.
                    return Ok(());
                }
                Some(Fault::GarbageLine {
                    after,
                    line: garbage,
                }) if *after == sent => {
                    chunk(&mut s, format!("{garbage}\n").as_bytes())?;
                    fault = None;
                }
                _ => {}
            }
            chunk(&mut s, line.as_bytes())?;
            sent += 1;
            last = rv;
        }
        let now = Instant::now();
        if now >= started + timeout {
            if bookmarks {
                let bm = json!({"type":"BOOKMARK","object":{"kind":"Node","apiVersion":"v1",
                    "metadata":{"resourceVersion": rv.to_string(),"creationTimestamp":null}}});
                chunk(&mut s, format!("{bm}\n").as_bytes())?;
            }
            return chunk(&mut s, b"");
        }
        let wait = (started + timeout - now).min(Duration::from_millis(100));
        let st = lock(&shared.state);
        let _ = shared.cv.wait_timeout(st, wait);
    }
}

// ---------------------------------------------------------------------------------------------
// Log capture

/// A captured log record.
#[derive(Debug, Clone)]
pub struct Record {
    pub thread: ThreadId,
    pub level: log::Level,
    pub message: String,
}

struct Capture(Mutex<Vec<Record>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let rec = Record {
            thread: thread::current().id(),
            level: r.level(),
            message: r.args().to_string(),
        };
        if std::env::var_os("KUBE_TEST_LOG").is_some() {
            eprintln!("{:?} {:5} {}", rec.thread, rec.level, rec.message);
        }
        lock(&self.0).push(rec);
    }
    fn flush(&self) {}
}

static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();

/// Installs the capturing logger (once per test binary).
pub fn capture_logs() {
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        let _ = log::set_logger(c);
        log::set_max_level(log::LevelFilter::Debug);
        c
    });
}

/// Records logged by one thread (a watch thread: `handle.thread().id()`).
pub fn logs_of(thread: ThreadId) -> Vec<Record> {
    CAPTURE
        .get()
        .map(|c| {
            lock(&c.0)
                .iter()
                .filter(|r| r.thread == thread)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Every message captured so far, from any thread.
pub fn all_messages() -> Vec<String> {
    CAPTURE
        .get()
        .map(|c| lock(&c.0).iter().map(|r| r.message.clone()).collect())
        .unwrap_or_default()
}

/// Messages at `level` logged by `thread`.
pub fn messages(thread: ThreadId, level: log::Level) -> Vec<String> {
    logs_of(thread)
        .into_iter()
        .filter(|r| r.level == level)
        .map(|r| r.message)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Update mirror

/// The daemon's view, rebuilt from [`Update`]s, with a record of every removal and why.
pub struct Mirror<T> {
    rx: std::sync::mpsc::Receiver<Update<T>>,
    key: fn(&T) -> String,
    pub objects: BTreeMap<String, T>,
    pub replaces: usize,
    /// Keys removed, by a `Delete` or by a `Replace` that lacked them.
    pub removed: Vec<String>,
    pub updates: usize,
}

impl<T: Clone> Mirror<T> {
    /// A mirror and the sink to hand to `spawn_watch`.
    pub fn new(key: fn(&T) -> String) -> (Mirror<T>, impl FnMut(Update<T>) + Send + 'static)
    where
        T: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = move |u| {
            let _ = tx.send(u);
        };
        (
            Mirror {
                rx,
                key,
                objects: BTreeMap::new(),
                replaces: 0,
                removed: Vec::new(),
                updates: 0,
            },
            sink,
        )
    }

    fn apply(&mut self, u: Update<T>) {
        self.updates += 1;
        match u {
            Update::Replace(all) => {
                self.replaces += 1;
                let fresh: BTreeMap<String, T> =
                    all.into_iter().map(|o| ((self.key)(&o), o)).collect();
                for k in self.objects.keys() {
                    if !fresh.contains_key(k) {
                        self.removed.push(k.clone());
                    }
                }
                self.objects = fresh;
            }
            Update::Upsert(o) => {
                self.objects.insert((self.key)(&o), o);
            }
            Update::Delete(o) => {
                let k = (self.key)(&o);
                self.objects.remove(&k);
                self.removed.push(k);
            }
        }
    }

    /// Applies whatever arrived, without waiting.
    pub fn drain(&mut self) {
        while let Ok(u) = self.rx.try_recv() {
            self.apply(u);
        }
    }

    /// Applies updates until `cond` holds; false after `timeout`.
    pub fn wait_for(&mut self, timeout: Duration, cond: impl Fn(&Mirror<T>) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        self.drain();
        while !cond(self) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(u) => self.apply(u),
                Err(_) => return cond(self),
            }
        }
        true
    }

    /// The keys held now.
    pub fn keys(&self) -> Vec<String> {
        self.objects.keys().cloned().collect()
    }
}

/// Waits until `cond` holds (polling); false after `timeout`.
pub fn eventually(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}
