//! A small stateful Kubernetes API server for end-to-end tests and the demo: it holds Node
//! objects, answers LIST with a resourceVersion and streams WATCH events (chunked HTTP/1.1, one
//! JSON event per line, as kube-apiserver does), so the real daemon can run against it. Tests
//! mutate nodes and take the server "down" (connections refused with 503, open watches cut) to
//! simulate an outage. It serves Nodes, Services and EndpointSlices; other paths are empty.

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

fn query(path: &str, key: &str) -> Option<String> {
    let (_, q) = path.split_once('?')?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
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
        if lock(m).down {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":503}"#;
            write!(w, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
            return Ok(());
        }
        let base = path.split('?').next().unwrap_or("");
        let coll: Option<&'static str> = [NODES, SERVICES, SLICES].into_iter().find(|c| *c == base);
        let watch = matches!(query(&path, "watch").as_deref(), Some("true") | Some("1"));
        if !watch {
            let s = lock(m);
            let items: Vec<Value> = coll
                .and_then(|c| s.objects.get(c))
                .map(|o| o.values().cloned().collect())
                .unwrap_or_default();
            let body = json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}).to_string();
            drop(s);
            write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
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
