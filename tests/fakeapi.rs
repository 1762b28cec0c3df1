//! A small stateful Kubernetes API server for end-to-end tests and the demo: it holds Node
//! objects, answers LIST with a resourceVersion and streams WATCH events (chunked HTTP/1.1, one
//! JSON event per line, as kube-apiserver does), so the real daemon can run against it. Tests
//! mutate nodes and take the server "down" (connections refused with 503, open watches cut) to
//! simulate an outage. It serves Nodes, Services and EndpointSlices; other paths are empty.
//!
//! Lists are paginated as kube-apiserver v1.28 paginates a consistent list read from etcd:
//! `limit=N` returns at most N objects in key order, and when more follow, `metadata.continue`
//! (an opaque token) and `metadata.remainingItemCount`. Every page of one list is served from
//! the snapshot the first page was read at (the token carries its resourceVersion and the last
//! key, base64url JSON `{"v":"meta.k8s.io/v1","rv":R,"start":"<key>\0"}` like the real one), so a
//! change made between pages shows up in the next watch, not in the list. After [`FakeApi::compact`]
//! (what etcd compaction does to a token's revision) an older token answers HTTP 410 with a
//! `Status` of reason `Expired` and a fresh "inconsistent" token (rv -1) in `metadata.continue`;
//! a token that does not decode answers 400, as the real server does.
//!
//! The watch cache (SPEC P-5), as kube-apiserver's cacher decides: a list with
//! `resourceVersion=0` is served from the cache whatever its `limit` (whole, one reply, as
//! servers before ListFromCacheSnapshot do); `resourceVersion=X` without `limit` (NotOlderThan)
//! is served from the cache if it is at X or later, else 504 "Too large resource version" (the
//! recorded reply; the real one comes after waiting 3 s); with a `limit` it goes to etcd. The
//! cache can be made to lag ([`FakeApi::freeze_cache`]), as a freshly restarted or partitioned
//! replica's does. [`FakeApi::expire_watches`] is an API server restart: open watches are cut and
//! a watch from an older version gets HTTP 200 with one ERROR 410 Expired event.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Collection path of Nodes.
pub const NODES: &str = "/api/v1/nodes";
/// Collection path of Services (all namespaces).
pub const SERVICES: &str = "/api/v1/services";
/// Collection path of EndpointSlices (all namespaces).
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";

#[derive(Default)]
struct State {
    rv: u64,
    /// Objects per collection path, by `namespace/name` (or `name`).
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// (resourceVersion, collection, type, object) of every change, oldest first.
    events: Vec<(u64, &'static str, &'static str, Value)>,
    down: bool,
    /// Bumped when the server goes down, so open watches end.
    epoch: u64,
    /// Continue tokens of a snapshot older than this are expired (410), as after an etcd
    /// compaction. The watch history is kept (kube-apiserver watches from its watch cache).
    compacted: u64,
    /// Compact right after serving the next list page (tests of an expiry between pages).
    compact_after_page: bool,
    /// Path and query of every request, oldest first.
    requests: Vec<String>,
    /// The watch cache's version when it lags (`None`: up to date).
    cache_at: Option<u64>,
    /// Lists served from the watch cache.
    cache_reads: u64,
    /// Watches from a version below this get 410 Expired.
    expired_below: u64,
}

/// The server handle; dropping it stops accepting.
pub struct FakeApi {
    inner: Arc<(Mutex<State>, Condvar)>,
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

/// A Node object as kubelet and the node IPAM controller would leave it.
pub fn node_json(name: &str, ips: &[&str], cidrs: &[&str]) -> Value {
    let addresses: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .chain(std::iter::once(
            json!({"type": "Hostname", "address": name}),
        ))
        .collect();
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidrs.first().copied().unwrap_or(""), "podCIDRs": cidrs},
        "status": {"addresses": addresses}
    })
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeApi {
    /// Listen on `bind` (e.g. `127.0.0.1:0`).
    pub fn start(bind: &str) -> FakeApi {
        let listener = TcpListener::bind(bind).expect("bind fake API server");
        let addr = listener.local_addr().expect("local addr");
        let inner: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (i2, s2) = (inner.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(c) = conn else { continue };
                let i3 = i2.clone();
                std::thread::spawn(move || {
                    let _ = serve(c, &i3);
                });
            }
        });
        FakeApi { inner, addr, stop }
    }

    /// Add or replace an object of a collection ([`NODES`], [`SERVICES`], [`SLICES`]).
    pub fn put(&self, path: &'static str, mut obj: Value) {
        let (m, cv) = &*self.inner;
        let mut s = lock(m);
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let k = key(&obj);
        let coll = s.objects.entry(path).or_default();
        let ty = if coll.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        coll.insert(k, obj.clone());
        let rv = s.rv;
        s.events.push((rv, path, ty, obj));
        cv.notify_all();
    }

    /// Delete an object by `namespace/name` (or `name`).
    pub fn delete(&self, path: &'static str, key: &str) {
        let (m, cv) = &*self.inner;
        let mut s = lock(m);
        if let Some(mut obj) = s.objects.entry(path).or_default().remove(key) {
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let rv = s.rv;
            s.events.push((rv, path, "DELETED", obj));
        }
        cv.notify_all();
    }

    /// Add or replace a node.
    pub fn put_node(&self, node: Value) {
        self.put(NODES, node);
    }

    /// Delete a node.
    pub fn delete_node(&self, name: &str) {
        self.delete(NODES, name);
    }

    /// What etcd compaction does to pagination: every continue token issued so far expires, so
    /// the next page of a list in progress answers 410 Expired. (The compaction itself is a
    /// write, as kube-apiserver's compaction-key update is: the resourceVersion moves on.)
    pub fn compact(&self) {
        let (m, _) = &*self.inner;
        let mut s = lock(m);
        s.rv += 1;
        s.compacted = s.rv;
    }

    /// [`FakeApi::compact`] right after the next list page is served, so that a client's next
    /// page request finds its token expired.
    pub fn compact_after_next_page(&self) {
        lock(&self.inner.0).compact_after_page = true;
    }

    /// The objects of a collection now, in key order.
    pub fn objects(&self, path: &'static str) -> Vec<Value> {
        let s = lock(&self.inner.0);
        s.objects
            .get(path)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The watch cache stops at the current version (lists from it are stale) until
    /// `freeze_cache(false)`.
    pub fn freeze_cache(&self, frozen: bool) {
        let mut s = lock(&self.inner.0);
        s.cache_at = frozen.then_some(s.rv);
    }

    /// Lists served from the watch cache so far.
    pub fn cache_reads(&self) -> u64 {
        lock(&self.inner.0).cache_reads
    }

    /// An API server restart as clients see it: open watches are cut, and watches from any
    /// version seen so far answer 410 Expired (the new cache starts at a later version).
    pub fn expire_watches(&self) {
        let (m, cv) = &*self.inner;
        let mut s = lock(m);
        s.rv += 1;
        s.expired_below = s.rv;
        s.epoch += 1;
        cv.notify_all();
    }

    /// Path and query of every request served so far, oldest first.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner.0).requests.clone()
    }

    /// While down, requests get 503 and open watches are cut. Changes made while down are
    /// seen after it comes back (through the watch or a relist).
    pub fn set_down(&self, down: bool) {
        let (m, cv) = &*self.inner;
        let mut s = lock(m);
        s.down = down;
        s.epoch += 1;
        cv.notify_all();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set_down(true);
        // Unblock accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// `namespace/name`, or `name` for cluster-scoped objects.
fn key(obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

/// A query parameter's value, percent-decoded.
fn query(path: &str, key: &str) -> Option<String> {
    let (_, q) = path.split_once('?')?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (a space, as Go's `url.ParseQuery` reads it).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(x) = u8::from_str_radix(hex, 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

const TOKEN_VERSION: &str = "meta.k8s.io/v1";

/// A continue token as kube-apiserver encodes it: base64url (no padding) of
/// `{"v":"meta.k8s.io/v1","rv":<snapshot>,"start":"<last key>\0"}`.
fn encode_continue(rv: i64, last_key: &str) -> String {
    use base64::Engine as _;
    let json = json!({"v": TOKEN_VERSION, "rv": rv, "start": format!("{last_key}\0")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

/// (snapshot resourceVersion, first key to return), or the reason the token is invalid.
fn decode_continue(token: &str) -> Result<(i64, String), String> {
    use base64::Engine as _;
    let invalid = |e: &dyn std::fmt::Display| format!("continue key is not valid: {e}");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|e| invalid(&e))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|e| invalid(&e))?;
    if v["v"] != TOKEN_VERSION {
        return Err(format!(
            "continue key is not valid: server does not recognize this encoded version {}",
            v["v"]
        ));
    }
    let rv = v["rv"].as_i64().unwrap_or(0);
    if rv == 0 {
        return Err(
            "continue key is not valid: incorrect encoded start resourceVersion \
                    (version meta.k8s.io/v1)"
                .into(),
        );
    }
    match v["start"].as_str() {
        Some(start) if !start.is_empty() => Ok((rv, start.to_string())),
        _ => Err(
            "continue key is not valid: encoded start key empty (version meta.k8s.io/v1)".into(),
        ),
    }
}

/// A `Status` failure body, as kube-apiserver writes it.
fn status_body(code: u16, reason: &str, message: &str, meta: Value) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": meta, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

/// The collection as it was at resourceVersion `at`, replayed from the change history.
fn snapshot<'a>(s: &'a State, coll: &str, at: u64) -> BTreeMap<String, &'a Value> {
    let mut out = BTreeMap::new();
    for (rv, c, ty, obj) in &s.events {
        if *rv > at {
            break;
        }
        if *c != coll {
            continue;
        }
        if *ty == "DELETED" {
            out.remove(&key(obj));
        } else {
            out.insert(key(obj), obj);
        }
    }
    out
}

/// Answers a list request: (status line, body).
fn list(s: &mut State, coll: Option<&'static str>, path: &str) -> (&'static str, String) {
    let mut limit = query(path, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let token = query(path, "continue").filter(|c| !c.is_empty());
    let rv = query(path, "resourceVersion").filter(|v| !v.is_empty());
    let (at, start) = match (token, rv) {
        (None, Some(rv)) if rv == "0" || limit == usize::MAX => {
            // The cacher serves it; it ignores `limit`.
            let cache = s.cache_at.unwrap_or(s.rv);
            if rv.parse::<u64>().unwrap_or(u64::MAX) > cache {
                let msg = format!("Timeout: Too large resource version: {rv}, current: {cache}");
                let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": msg, "reason": "Timeout",
                    "details": {"causes": [{"reason": "ResourceVersionTooLarge",
                    "message": "Too large resource version"}], "retryAfterSeconds": 1},
                    "code": 504});
                return ("504 Gateway Timeout", body.to_string());
            }
            s.cache_reads += 1;
            limit = usize::MAX;
            (cache, String::new())
        }
        (None, _) => (s.rv, String::new()),
        (Some(token), rv) => {
            if rv.is_some_and(|v| v != "0") {
                let msg = "specifying resource version is not allowed when using continue";
                return (
                    "400 Bad Request",
                    status_body(400, "BadRequest", msg, json!({})),
                );
            }
            let (rv, start) = match decode_continue(&token) {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("invalid continue token: {e}");
                    return (
                        "400 Bad Request",
                        status_body(400, "BadRequest", &msg, json!({})),
                    );
                }
            };
            if rv > 0 && (rv as u64) < s.compacted {
                // etcd3 store's handleCompactedErrorForPaging: 410 with a token that continues
                // at the latest version (an inconsistent list).
                let last = start.strip_suffix('\0').unwrap_or(&start);
                let msg = "The provided continue parameter is too old to display a consistent \
                           list result. You can start a new list without the continue parameter, \
                           or use the continue token in this response to retrieve the remainder \
                           of the results. Continuing with the provided token results in an \
                           inconsistent list - objects that were created, modified, or deleted \
                           between the time the first chunk was returned and now may show up in \
                           the list.";
                let meta = json!({"continue": encode_continue(-1, last)});
                return ("410 Gone", status_body(410, "Expired", msg, meta));
            }
            // rv -1: continue at the latest version.
            (if rv < 0 { s.rv } else { rv as u64 }, start)
        }
    };
    let all = coll.map(|c| snapshot(s, c, at)).unwrap_or_default();
    let mut rest = all.range(start..);
    let items: Vec<&Value> = rest.by_ref().take(limit).map(|(_, v)| *v).collect();
    let remaining = rest.count();
    let mut meta = json!({"resourceVersion": at.to_string()});
    if remaining > 0 {
        let last = items.last().map(|v| key(v)).unwrap_or_default();
        meta["continue"] = json!(encode_continue(at as i64, &last));
        meta["remainingItemCount"] = json!(remaining);
    }
    let body = json!({"kind": "List", "apiVersion": "v1", "metadata": meta, "items": items});
    ("200 OK", body.to_string())
}

fn serve(c: TcpStream, inner: &Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
    let mut reader = BufReader::new(c.try_clone()?);
    let mut w = c;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let (m, cv) = &**inner;
        lock(m).requests.push(path.clone());
        if lock(m).down {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":503}"#;
            write!(w, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
            return Ok(());
        }
        let base = path.split('?').next().unwrap_or("");
        let coll: Option<&'static str> = [NODES, SERVICES, SLICES].into_iter().find(|c| *c == base);
        let watch = matches!(query(&path, "watch").as_deref(), Some("true") | Some("1"));
        if !watch {
            let mut s = lock(m);
            let (status, body) = list(&mut s, coll, &path);
            if std::mem::take(&mut s.compact_after_page) {
                s.rv += 1;
                s.compacted = s.rv;
            }
            drop(s);
            write!(w, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
            continue;
        }
        write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        w.flush()?;
        let mut from: u64 = query(&path, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query(&path, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60u64);
        let end = Instant::now() + Duration::from_secs(timeout);
        let mut s = lock(m);
        let epoch = s.epoch;
        if from > 0 && from < s.expired_below {
            let ev = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", s.expired_below)}});
            let data = format!("{ev}\n");
            write!(w, "{:x}\r\n{data}\r\n0\r\n\r\n", data.len())?;
            return Ok(());
        }
        loop {
            if s.down || s.epoch != epoch {
                // Cut the stream without the terminating chunk, as a dying server would.
                return Ok(());
            }
            let pending: Vec<(u64, String)> = s
                .events
                .iter()
                .filter(|(rv, c, _, _)| *rv > from && Some(*c) == coll)
                .map(|(rv, _, ty, obj)| (*rv, json!({"type": ty, "object": obj}).to_string()))
                .collect();
            if let Some((rv, _)) = pending.last() {
                from = *rv;
            }
            drop(s);
            for (_, ev) in pending {
                let data = format!("{ev}\n");
                write!(w, "{:x}\r\n{data}\r\n", data.len())?;
            }
            w.flush()?;
            let now = Instant::now();
            if now >= end {
                write!(w, "0\r\n\r\n")?;
                w.flush()?;
                return Ok(());
            }
            s = lock(m);
            let wait = (end - now).min(Duration::from_millis(500));
            s = cv
                .wait_timeout(s, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// One GET on a fresh connection: (status code, JSON body).
    fn get(api: &FakeApi, path: &str) -> (u16, Value) {
        let mut c = TcpStream::connect(api.addr).expect("connect");
        write!(c, "GET {path} HTTP/1.1\r\nHost: fake\r\n\r\n").expect("send");
        let mut r = BufReader::new(c);
        let mut line = String::new();
        r.read_line(&mut line).expect("status line");
        let code = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).expect("header");
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.strip_prefix("Content-Length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).expect("body");
        (
            code.expect("code"),
            serde_json::from_slice(&body).expect("json"),
        )
    }

    fn names(list: &Value) -> Vec<String> {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(key)
            .collect()
    }

    fn token_json(token: &Value) -> Value {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.as_str().expect("token"))
            .expect("base64url");
        serde_json::from_slice(&raw).expect("json token")
    }

    fn with_nodes(names: &[String]) -> FakeApi {
        let api = FakeApi::start("127.0.0.1:0");
        for n in names {
            api.put_node(node_json(n, &["192.0.2.1"], &["10.244.1.0/24"]));
        }
        api
    }

    #[test]
    fn lists_come_in_pages_with_opaque_tokens() {
        let all: Vec<String> = (0..1201).map(|i| format!("n{i:04}")).collect();
        let api = with_nodes(&all);
        let (code, p1) = get(&api, "/api/v1/nodes?limit=500");
        assert_eq!(code, 200);
        assert_eq!(names(&p1), all[..500]);
        assert_eq!(p1["metadata"]["resourceVersion"], "1201");
        assert_eq!(p1["metadata"]["remainingItemCount"], 701);
        assert_eq!(
            token_json(&p1["metadata"]["continue"]),
            json!({"v": "meta.k8s.io/v1", "rv": 1201, "start": "n0499\0"})
        );
        let next = |page: &Value| {
            let t = page["metadata"]["continue"].as_str().expect("continue");
            get(&api, &format!("/api/v1/nodes?limit=500&continue={t}"))
        };
        let (_, p2) = next(&p1);
        assert_eq!(names(&p2), all[500..1000]);
        assert_eq!(p2["metadata"]["remainingItemCount"], 201);
        let (_, p3) = next(&p2);
        assert_eq!(names(&p3), all[1000..]);
        assert_eq!(p3["metadata"]["resourceVersion"], "1201");
        assert!(p3["metadata"].get("continue").is_none());
        assert!(p3["metadata"].get("remainingItemCount").is_none());
        // No limit: everything at once.
        let (_, whole) = get(&api, "/api/v1/nodes");
        assert_eq!(names(&whole), all);
    }

    #[test]
    fn later_pages_come_from_the_first_pages_snapshot() {
        let api = with_nodes(&["a".into(), "b".into(), "c".into(), "d".into()]);
        let (_, p1) = get(&api, "/api/v1/nodes?limit=2");
        assert_eq!(names(&p1), ["a", "b"]);
        api.put_node(node_json("bb", &["192.0.2.2"], &[]));
        api.put_node(node_json("c", &["192.0.2.3"], &[]));
        api.delete_node("d");
        let t = p1["metadata"]["continue"].as_str().expect("continue");
        let (code, p2) = get(&api, &format!("/api/v1/nodes?limit=2&continue={t}"));
        assert_eq!(code, 200);
        assert_eq!(names(&p2), ["c", "d"], "as of the first page");
        assert_eq!(p2["items"][0]["metadata"]["resourceVersion"], "3");
        assert_eq!(p2["metadata"]["resourceVersion"], "4");
        let (_, now) = get(&api, "/api/v1/nodes");
        assert_eq!(names(&now), ["a", "b", "bb", "c"]);
        assert_eq!(now["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn expired_and_invalid_tokens() {
        let api = with_nodes(&["a".into(), "b".into(), "c".into()]);
        let (_, p1) = get(&api, "/api/v1/nodes?limit=1");
        let t = p1["metadata"]["continue"]
            .as_str()
            .expect("continue")
            .to_string();
        api.compact();
        let (code, st) = get(&api, &format!("/api/v1/nodes?limit=1&continue={t}"));
        assert_eq!(code, 410);
        assert_eq!(st["kind"], "Status");
        assert_eq!(st["reason"], "Expired");
        assert_eq!(st["code"], 410);
        assert!(st["message"]
            .as_str()
            .expect("message")
            .starts_with("The provided continue parameter is too old"));
        // The fresh token continues after the same key at the latest version.
        let fresh = &st["metadata"]["continue"];
        assert_eq!(token_json(fresh)["rv"], -1);
        let t2 = fresh.as_str().expect("token");
        let (code, rest) = get(&api, &format!("/api/v1/nodes?continue={t2}"));
        assert_eq!(code, 200);
        assert_eq!(names(&rest), ["b", "c"]);
        assert_eq!(rest["metadata"]["resourceVersion"], "4");

        for bad in [
            "garbage!",
            "e30",
            "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MCwic3RhcnQiOiJhIn0",
        ] {
            let (code, st) = get(&api, &format!("/api/v1/nodes?limit=1&continue={bad}"));
            assert_eq!(code, 400, "{bad}");
            assert_eq!(st["reason"], "BadRequest");
            assert!(st["message"]
                .as_str()
                .expect("message")
                .starts_with("invalid continue token: continue key is not valid"));
        }
        let (_, p1) = get(&api, "/api/v1/nodes?limit=1");
        let t = p1["metadata"]["continue"].as_str().expect("continue");
        let (code, _) = get(
            &api,
            &format!("/api/v1/nodes?continue={t}&resourceVersion=4"),
        );
        assert_eq!(code, 400);

        // Compaction right after a page: its own token is already stale.
        api.compact_after_next_page();
        let (_, p1) = get(&api, "/api/v1/nodes?limit=1");
        let t = p1["metadata"]["continue"].as_str().expect("continue");
        assert_eq!(get(&api, &format!("/api/v1/nodes?continue={t}")).0, 410);
        let (_, p1) = get(&api, "/api/v1/nodes?limit=1");
        let t = p1["metadata"]["continue"].as_str().expect("continue");
        assert_eq!(get(&api, &format!("/api/v1/nodes?continue={t}")).0, 200);
        assert!(api
            .requests()
            .iter()
            .all(|r| r.starts_with("/api/v1/nodes")));
    }

    #[test]
    fn watch_cache_semantics() {
        let all: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
        let api = with_nodes(&all);
        api.freeze_cache(true); // cache at 5
        api.delete_node("n0"); // rv 6
                               // resourceVersion=0: from the (stale) cache, whole, whatever the limit.
        let (code, l) = get(&api, "/api/v1/nodes?resourceVersion=0&limit=2");
        assert_eq!(code, 200);
        assert_eq!(names(&l).len(), 5, "stale cache still has n0");
        assert_eq!(l["metadata"]["resourceVersion"], "5");
        assert!(l["metadata"]["continue"].is_null());
        // NotOlderThan above the cache: 504 Too large resource version.
        let (code, st) = get(
            &api,
            "/api/v1/nodes?resourceVersionMatch=NotOlderThan&resourceVersion=6",
        );
        assert_eq!(code, 504);
        assert_eq!(
            st["details"]["causes"][0]["reason"],
            "ResourceVersionTooLarge"
        );
        // With a limit it goes to etcd: current and paginated.
        let (code, l) = get(&api, "/api/v1/nodes?resourceVersion=6&limit=2");
        assert_eq!(code, 200);
        assert_eq!(names(&l), ["n1", "n2"]);
        assert_eq!(api.cache_reads(), 1);
        api.freeze_cache(false);
        let (_, l) = get(
            &api,
            "/api/v1/nodes?resourceVersionMatch=NotOlderThan&resourceVersion=6",
        );
        assert_eq!(names(&l), ["n1", "n2", "n3", "n4"]);
        assert_eq!(api.cache_reads(), 2);
    }
}
