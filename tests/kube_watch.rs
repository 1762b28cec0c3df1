//! List+watch against the scripted API server (tests/apiserver.rs): recorded payloads, every
//! fault case of the kube client issue, and stopping. Each test checks that the daemon's view
//! converges to the server's, that nothing is removed because of an error, and that the watch
//! thread logs the fault once (as a warning) however many retries it takes. The large paginated
//! lists run against the stateful fake API server (tests/fakeapi.rs), whose continue tokens
//! behave like kube-apiserver's.

// This whole file is test-only code in the integration-test crate.
#![allow(clippy::tests_outside_test_module)]

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use kr_tunneld::kube::watch::WatchConfig;
use kr_tunneld::kube::{
    spawn_watch, Client, ConnectionSettings, EndpointSlice, Node, Resource, Service, Stop,
    WatchOptions, WatchStats,
};
use log::Level;
use serde_json::{json, Value};

use crate::apiserver::{
    all_messages, capture_logs, eventually, messages, ApiServer, Fault, Kind, Mirror,
};
use crate::fakeapi::{node_json, FakeApi, NODES};

const LIST_NODES: &str = include_str!("data/list-nodes.json");
const WATCH_NODES: &str = include_str!("data/watch-nodes-http11.raw");
const WATCH_410_HEAD: &str = include_str!("data/watch-nodes-410.headers");
const WATCH_410_BODY: &str = include_str!("data/watch-nodes-410.raw");
const LIST_SERVICES: &str = include_str!("data/list-services.json");
const WATCH_SERVICES: &str = include_str!("data/watch-services.jsonl");
const LIST_SLICES: &str = include_str!("data/list-endpointslices.json");
const WATCH_SLICES: &str = include_str!("data/watch-endpointslices.jsonl");
const LIST_410: &str = include_str!("data/list-nodes-exact-compacted-410.txt");

/// Long enough for anything that is supposed to happen; only failures wait this long.
const WAIT: Duration = Duration::from_secs(8);

fn fast() -> WatchConfig {
    WatchConfig {
        timeout: Duration::from_secs(1),
        read_timeout_margin: Duration::from_millis(500),
        page_size: 500,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(250),
        retry_after_max: Duration::from_secs(5),
        relist_interval: None,
        max_line: 1 << 20,
        relist_jitter: Duration::ZERO,
    }
}

fn client(url: &str, token_file: Option<PathBuf>) -> Arc<Client> {
    let s = ConnectionSettings::resolve(None, Some(url), token_file.as_deref(), None, &|_| None)
        .unwrap();
    Arc::new(Client::new(s).unwrap())
}

struct Watch<T> {
    handle: JoinHandle<()>,
    mirror: Mirror<T>,
    stop: Stop,
    stats: Arc<WatchStats>,
}

impl<T: Resource> Watch<T> {
    fn start(client: Arc<Client>, config: WatchConfig) -> Watch<T> {
        capture_logs();
        let stats = Arc::new(WatchStats::default());
        let stop = Stop::new();
        let (mirror, sink) = Mirror::new(T::key);
        let opts = WatchOptions {
            config,
            stats: Arc::clone(&stats),
            seed: Some(42),
        };
        let handle = spawn_watch::<T>(client, opts, sink, stop.clone());
        Watch {
            handle,
            mirror,
            stop,
            stats,
        }
    }

    fn tid(&self) -> ThreadId {
        self.handle.thread().id()
    }

    fn warnings(&self) -> Vec<String> {
        messages(self.tid(), Level::Warn)
    }

    fn infos(&self) -> Vec<String> {
        messages(self.tid(), Level::Info)
    }

    fn synced(&mut self) {
        assert!(
            self.mirror.wait_for(WAIT, |m| m.replaces > 0),
            "no list: {:?}",
            self.warnings()
        );
    }

    /// Stops the watch and returns how long the thread took to end.
    fn finish(self) -> Duration {
        let t = Instant::now();
        self.stop.trigger();
        self.handle.join().unwrap();
        t.elapsed()
    }
}

fn node(name: &str, ip: &str) -> Value {
    json!({"kind":"Node","apiVersion":"v1",
           "metadata":{"name":name,"labels":{"kubernetes.io/hostname":name}},
           "spec":{"podCIDR":"10.244.9.0/24","podCIDRs":["10.244.9.0/24"]},
           "status":{"addresses":[{"type":"InternalIP","address":ip}]}})
}

fn nodes_server(names: &[&str]) -> ApiServer {
    let objs = names
        .iter()
        .enumerate()
        .map(|(i, n)| node(n, &format!("192.0.2.{}", i + 1)))
        .collect();
    ApiServer::start(Node::PATH, objs, 100)
}

fn ip_of(n: &Node) -> &str {
    n.status
        .addresses
        .first()
        .map(|a| a.address.as_str())
        .unwrap_or("")
}

#[test]
fn recorded_nodes_paginated_list_then_watch() {
    let server = ApiServer::from_list(Node::PATH, LIST_NODES);
    let mut w = Watch::<Node>::start(
        client(&server.url(), None),
        WatchConfig {
            page_size: 1,
            ..fast()
        },
    );
    w.synced();
    assert_eq!(w.mirror.keys(), ["node1", "node2"]);
    assert_eq!(w.mirror.replaces, 1);
    let lists = server.requests_of(Kind::List);
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert_eq!(lists[0].param("limit").as_deref(), Some("1"));
    assert_eq!(lists[0].param("continue"), None);
    assert_eq!(lists[1].param("continue").as_deref(), Some("offset:1"));

    // The recorded watch: MODIFIED node1 (label test=a, not kept), MODIFIED node2 (addresses cut to
    // one), ADDED node3, DELETED node3.
    server.apply_recorded(WATCH_NODES);
    assert!(w.mirror.wait_for(WAIT, |m| m.removed == ["node3"]));
    assert_eq!(w.mirror.keys(), ["node1", "node2"]);
    // The stand-in numbers the replayed events 203…206: node1's change is the first.
    assert_eq!(w.mirror.objects["node1"].resource_version(), "203");
    assert_eq!(w.mirror.objects["node2"].status.addresses.len(), 2);
    let watch = &server.requests_of(Kind::Watch)[0];
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(watch.param("timeoutSeconds").as_deref(), Some("1"));
    assert_eq!(watch.param("resourceVersion").as_deref(), Some("202"));
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    assert!(w.stats.synced());
    assert_eq!(w.stats.events(), 4);
    w.finish();
}

#[test]
fn quiet_watch_without_bookmarks_rewatches_silently() {
    let server = nodes_server(&["a", "b"]);
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    // Each watch ends after timeoutSeconds=1 with no event and no bookmark: that is normal.
    assert!(eventually(WAIT, || server.requests_of(Kind::Watch).len() >= 3));
    for r in server.requests_of(Kind::Watch) {
        assert_eq!(r.param("resourceVersion").as_deref(), Some("100"));
    }
    assert_eq!(server.requests_of(Kind::List).len(), 1, "no relist");
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    // With bookmarks the version advances.
    server.send_bookmarks(true);
    server.apply("MODIFIED", node("a", "192.0.2.50"));
    assert!(eventually(WAIT, || server
        .requests_of(Kind::Watch)
        .iter()
        .any(|r| r.param("resourceVersion").as_deref() == Some("101"))));
    w.finish();
}

#[test]
fn connection_reset_mid_event() {
    let server = nodes_server(&["a", "b"]);
    server.script(Kind::Watch, Fault::ResetMidEvent { after: 1 });
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    server.apply("MODIFIED", node("a", "198.51.100.1"));
    server.apply("MODIFIED", node("b", "198.51.100.2"));
    assert!(w.mirror.wait_for(WAIT, |m| {
        m.objects.get("b").map(ip_of) == Some("198.51.100.2")
    }));
    assert_eq!(ip_of(&w.mirror.objects["a"]), "198.51.100.1");
    assert!(w.mirror.removed.is_empty());
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].starts_with("watch nodes: "), "{warns:?}");
    assert!(warns[0].contains("reset"), "{warns:?}");
    assert!(
        warns[0].contains("watching from resourceVersion 101"),
        "{warns:?}"
    );
    // Resumed from the last complete event, not relisted.
    assert_eq!(server.requests_of(Kind::List).len(), 1);
    w.finish();
}

#[test]
fn truncated_chunk() {
    let server = nodes_server(&["a"]);
    server.script(Kind::Watch, Fault::TruncatedChunk { after: 0 });
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    server.apply("ADDED", node("c", "198.51.100.3"));
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.contains_key("c")));
    assert!(w.mirror.removed.is_empty());
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].contains("watching from resourceVersion 100"),
        "{warns:?}"
    );
    w.finish();
}

#[test]
fn garbage_line_between_good_events() {
    let server = nodes_server(&["a"]);
    server.script(
        Kind::Watch,
        Fault::GarbageLine {
            after: 1,
            line: "<html><body>502 Bad Gateway</body></html>".into(),
        },
    );
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    server.apply("ADDED", node("b", "198.51.100.2"));
    server.apply("ADDED", node("c", "198.51.100.3"));
    server.apply("DELETED", node("a", "192.0.2.1"));
    assert!(w.mirror.wait_for(WAIT, |m| m.keys() == ["b", "c"]));
    assert_eq!(w.mirror.removed, ["a"], "only the real deletion");
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("502 Bad Gateway"), "{warns:?}");
    // The stream after the garbage is not trusted: resumed from the last good version.
    let watches = server.requests_of(Kind::Watch);
    assert_eq!(watches[1].param("resourceVersion").as_deref(), Some("101"));
    w.finish();
}

#[test]
fn http_500_repeated_warns_once() {
    let server = nodes_server(&["a", "b"]);
    for _ in 0..3 {
        server.script(
            Kind::List,
            Fault::Status {
                code: 500,
                retry_after: None,
            },
        );
    }
    server.script(
        Kind::Watch,
        Fault::Status {
            code: 500,
            retry_after: None,
        },
    );
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(server.requests_of(Kind::List).len(), 4);
    server.apply("MODIFIED", node("a", "198.51.100.9"));
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.get("a").map(ip_of)
        == Some("198.51.100.9")));
    assert!(w.mirror.removed.is_empty());
    let warns = w.warnings();
    // One for the list outage (three failures), one for the later watch failure.
    assert_eq!(warns.len(), 2, "{warns:?}");
    assert!(warns[0].starts_with("list nodes: http 500"), "{warns:?}");
    assert!(warns[1].starts_with("watch nodes: http 500"), "{warns:?}");
    assert!(w.infos().iter().any(|m| m.contains("working again")));
    assert_eq!(w.stats.faults(), 4);
    assert!(w.stats.last_error().unwrap().contains("500"));
    w.finish();
}

#[test]
fn too_many_requests_honours_retry_after() {
    let server = nodes_server(&["a"]);
    server.script(
        Kind::Watch,
        Fault::Status {
            code: 429,
            retry_after: Some(1),
        },
    );
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    assert!(eventually(WAIT, || server.requests_of(Kind::Watch).len() >= 2));
    let watches = server.requests_of(Kind::Watch);
    let gap = watches[1].at - watches[0].at;
    // The backoff alone would be ~50 ms; Retry-After: 1 stretches it.
    assert!(gap >= Duration::from_millis(950), "{gap:?}");
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("http 429"), "{warns:?}");
    assert!(warns[0].ends_with("in 1.0s"), "{warns:?}");
    w.finish();
}

#[test]
fn gone_410_in_stream_relists_and_drops_vanished() {
    let server = ApiServer::from_list(Node::PATH, LIST_NODES);
    // The recorded kube-apiserver answer to a watch from an expired version: HTTP 200, one
    // ERROR event with code 410, end of stream.
    let raw = format!("{WATCH_410_HEAD}{WATCH_410_BODY}").into_bytes();
    server.script(Kind::Watch, Fault::Raw(raw));
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    // node2 goes away while we are (about to be) told our version expired.
    server.apply("DELETED", json!({"metadata":{"name":"node2"}}));
    assert!(w.mirror.wait_for(WAIT, |m| m.replaces == 2));
    assert_eq!(w.mirror.keys(), ["node1"]);
    assert_eq!(
        w.mirror.removed,
        ["node2"],
        "removed by the relist, not by the error"
    );
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    let infos = w.infos();
    assert!(
        infos
            .iter()
            .any(|m| m.contains("resourceVersion 202 expired")),
        "{infos:?}"
    );
    assert_eq!(w.stats.relists(), 1);
    w.finish();
}

#[test]
fn gone_410_on_list() {
    // (a) The continue token expired between pages: the list restarts at once.
    let server = nodes_server(&["a", "b", "c"]);
    server.script(Kind::List, Fault::Pass);
    server.script(
        Kind::List,
        Fault::Status {
            code: 410,
            retry_after: None,
        },
    );
    let mut w = Watch::<Node>::start(
        client(&server.url(), None),
        WatchConfig {
            page_size: 2,
            ..fast()
        },
    );
    w.synced();
    assert_eq!(w.mirror.keys(), ["a", "b", "c"]);
    let lists = server.requests_of(Kind::List);
    assert_eq!(lists.len(), 4, "{lists:?}");
    assert_eq!(
        lists[2].param("continue"),
        None,
        "restarted from the first page"
    );
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    assert!(w
        .infos()
        .iter()
        .any(|m| m.contains("continue token expired")));
    w.finish();

    // (b) A first page answered with the recorded HTTP 410 Status: backoff, list again.
    let server = nodes_server(&["a"]);
    let body = LIST_410.split("\n\n").nth(1).unwrap().trim();
    let raw = format!(
        "HTTP/1.1 410 Gone\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    server.script(Kind::List, Fault::Raw(raw.into_bytes()));
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(w.mirror.keys(), ["a"]);
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].contains("http 410: The resourceVersion for the provided list is too old"),
        "{warns:?}"
    );
    w.finish();
}

/// SPEC S-4: a 200 whose body is a `Status` (a proxy or an aggregation layer answering for the
/// API server) is an error: no empty list replaces the cache, the list is retried, one warning.
#[test]
fn list_answered_200_with_a_status_is_an_error_not_an_empty_list() {
    let server = nodes_server(&["a", "b"]);
    for body in [
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"no endpoints available","code":503}"#,
        r#"{"metadata":{},"error":"upstream connect error"}"#,
    ] {
        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        server.script(Kind::List, Fault::Raw(raw.into_bytes()));
    }
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(
        w.mirror.replaces, 1,
        "only the real list replaced the cache"
    );
    assert_eq!(w.mirror.keys(), ["a", "b"]);
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("expected a NodeList"), "{warns:?}");
    w.finish();
}

#[test]
fn list_cut_mid_body_is_a_transport_fault_and_relists() {
    // The list body is decoded as it arrives: a cut in the middle of it must still be a
    // transport fault (retried), not a decode error, and nothing half-read is applied.
    let server = nodes_server(&["a", "b"]);
    let body = LIST_NODES.as_bytes();
    let mut raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body[..body.len() / 2]);
    server.script(Kind::List, Fault::Raw(raw));
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(w.mirror.replaces, 1);
    assert_eq!(w.mirror.keys(), ["a", "b"]);
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0]
            .starts_with("list nodes: connection reset or closed by the server in mid-response"),
        "{warns:?}"
    );
    w.finish();
}

#[test]
fn stalled_stream_hits_read_timeout() {
    let server = nodes_server(&["a"]);
    server.script(Kind::Watch, Fault::Stall);
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    server.apply("ADDED", node("b", "198.51.100.2"));
    // Read timeout = timeoutSeconds (1 s) + margin (0.5 s); then the watch resumes.
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.contains_key("b")));
    assert!(w.mirror.removed.is_empty());
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("timeout"), "{warns:?}");
    assert!(
        warns[0].contains("watching from resourceVersion 100"),
        "{warns:?}"
    );
    w.finish();
}

#[test]
fn server_restart_with_new_resource_version_history() {
    let server = nodes_server(&["a", "b", "c"]);
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    server.go_down();
    // While it is down, etcd changes behind our back: c is deleted, a modified.
    server.apply("DELETED", node("c", "192.0.2.3"));
    server.apply("MODIFIED", node("a", "198.51.100.1"));
    // Several reconnects fail (refused)...
    assert!(eventually(WAIT, || w.stats.faults() >= 3));
    w.mirror.drain();
    assert_eq!(
        w.mirror.keys(),
        ["a", "b", "c"],
        "nothing deleted while down"
    );
    assert!(w.mirror.removed.is_empty());
    // ...then the server is back with a history that starts far later: our version is
    // expired (410 in the stream) and the relist brings the truth, deletion included.
    server.come_back(1000);
    assert!(w.mirror.wait_for(WAIT, |m| m.keys() == ["a", "b"]));
    assert_eq!(ip_of(&w.mirror.objects["a"]), "198.51.100.1");
    assert_eq!(w.mirror.removed, ["c"]);
    let warns = w.warnings();
    assert_eq!(
        warns.len(),
        1,
        "one warning for the whole outage: {warns:?}"
    );
    let infos = w.infos();
    assert!(infos.iter().any(|m| m.contains("expired")), "{infos:?}");
    assert!(
        infos.iter().any(|m| m.contains("working again")),
        "{infos:?}"
    );
    // And it keeps watching the new history.
    server.apply("ADDED", node("d", "198.51.100.4"));
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.contains_key("d")));
    w.finish();
}

#[test]
fn expired_token_then_rotated_token_file() {
    let dir = std::env::temp_dir().join(format!("kr-kube-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "one-5ecret\n").unwrap();
    let server = nodes_server(&["a"]);
    server.require_token(Some("one-5ecret"));
    let mut w = Watch::<Node>::start(client(&server.url(), Some(token.clone())), fast());
    w.synced();

    // The token expires (server side). The file is not rotated yet: 401s, one warning.
    server.require_token(Some("two-5ecret"));
    assert!(eventually(WAIT, || w.stats.faults() >= 3));
    let warns = w.warnings();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("http 401"), "{warns:?}");
    // The kubelet rotates the file: picked up on the next attempt.
    std::fs::write(&token, "two-5ecret\n").unwrap();
    server.apply("ADDED", node("b", "198.51.100.2"));
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.contains_key("b")));
    assert!(w.mirror.removed.is_empty());
    assert_eq!(w.warnings().len(), 1);
    let last = server.requests().last().unwrap().authorization.clone();
    assert_eq!(last.as_deref(), Some("Bearer two-5ecret"));

    // A rotation that stat() cannot see (same inode, size and mtime): the 401 forces a
    // re-read and one retry, which succeeds without a warning.
    let faults = w.stats.faults();
    let mtime = std::fs::metadata(&token).unwrap().modified().unwrap();
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&token)
            .unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(b"333-5ecret\n").unwrap();
        f.set_modified(mtime).unwrap();
    }
    server.require_token(Some("333-5ecret"));
    // The open stream stays authenticated (as on a real API server); the next watch request
    // (after timeoutSeconds=1) meets the new token.
    assert!(eventually(WAIT, || server.requests().iter().any(|r| {
        r.authorization.as_deref() == Some("Bearer 333-5ecret")
    })));
    server.apply("ADDED", node("c", "198.51.100.3"));
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.contains_key("c")));
    assert_eq!(w.stats.faults(), faults, "the retry succeeded");
    assert!(w
        .infos()
        .iter()
        .any(|m| m.contains("401 unauthorized, retrying once")));
    assert_eq!(w.warnings().len(), 1);
    w.finish();
    // No token ever reached a log line (ours or ureq's), from any thread.
    for m in all_messages() {
        assert!(!m.contains("5ecret"), "token in log: {m}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_objects_are_skipped_with_a_warning_naming_them() {
    let bad = json!({"metadata":{"name":"bad1"},"spec":{"podCIDRs":"10.0.0.0/24"}});
    let server = ApiServer::start(Node::PATH, vec![node("a", "192.0.2.1"), bad], 100);
    let mut w = Watch::<Node>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(w.mirror.keys(), ["a"], "the list is not aborted");
    // A later event makes "a" malformed: skipped, the last good version stays.
    server.apply(
        "MODIFIED",
        json!({"metadata":{"name":"a"},"status":{"addresses":"oops"}}),
    );
    server.apply("ADDED", node("b", "198.51.100.2"));
    assert!(w.mirror.wait_for(WAIT, |m| m.objects.contains_key("b")));
    assert_eq!(ip_of(&w.mirror.objects["a"]), "192.0.2.1");
    let warns = w.warnings();
    assert_eq!(warns.len(), 2, "{warns:?}");
    assert!(
        warns[0].starts_with("list nodes: skipping bad1"),
        "{warns:?}"
    );
    assert!(
        warns[1].starts_with("watch nodes: skipping a (MODIFIED"),
        "{warns:?}"
    );
    assert_eq!(w.stats.skipped(), 2);
    w.finish();
}

#[test]
fn services_and_endpointslices_from_recordings() {
    let server = ApiServer::from_list(Service::PATH, LIST_SERVICES);
    let mut w = Watch::<Service>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(w.mirror.keys(), ["default/kubernetes", "default/web"]);
    server.apply_recorded(WATCH_SERVICES);
    assert!(w.mirror.wait_for(WAIT, |m| m.updates >= 3));
    let web = &w.mirror.objects["default/web"];
    assert_eq!(web.spec.external_ips, ["203.0.113.50", "203.0.113.51"]);
    assert_eq!(
        web.metadata.annotations["kube-router.io/service.dsr"],
        "tunnel"
    );
    w.finish();

    let server = ApiServer::from_list(EndpointSlice::PATH, LIST_SLICES);
    let mut w = Watch::<EndpointSlice>::start(client(&server.url(), None), fast());
    w.synced();
    assert_eq!(w.mirror.keys(), ["default/web-abc12"]);
    server.apply_recorded(WATCH_SLICES);
    assert!(w.mirror.wait_for(WAIT, |m| m.updates >= 3));
    let s = &w.mirror.objects["default/web-abc12"];
    assert_eq!(s.service_name(), Some("web"));
    assert!(!s.endpoints[1].conditions.is_ready());
    assert!(s.endpoints[1].conditions.is_serving());
    assert!(server.requests()[0]
        .path_query
        .starts_with("/apis/discovery.k8s.io/v1/endpointslices?"));
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    w.finish();
}

#[test]
fn stop_interrupts_a_blocked_watch_within_two_seconds() {
    let server = nodes_server(&["a"]);
    server.script(Kind::Watch, Fault::Stall);
    // Production timeouts: without the interrupt, the read would block for 5+ minutes.
    let config = WatchConfig {
        relist_interval: None,
        ..WatchConfig::default()
    };
    let mut w = Watch::<Node>::start(client(&server.url(), None), config);
    w.synced();
    assert!(eventually(WAIT, || server.requests_of(Kind::Watch).len() == 1));
    std::thread::sleep(Duration::from_millis(200));
    let tid = w.tid();
    let took = w.finish();
    eprintln!("stop of a blocked watch took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        messages(tid, Level::Warn).is_empty(),
        "a stop is not a fault"
    );
}

#[test]
fn stop_interrupts_backoff() {
    let server = nodes_server(&["a"]);
    let url = server.url();
    drop(server); // connection refused from now on
    let config = WatchConfig {
        backoff_initial: Duration::from_secs(30),
        backoff_max: Duration::from_secs(30),
        ..fast()
    };
    let w = Watch::<Node>::start(client(&url, None), config);
    assert!(eventually(WAIT, || w.stats.faults() >= 1));
    let took = w.finish();
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A fake API server with `local` and `peers` more nodes (as the P-4 benchmark has them).
fn fake_nodes(peers: u32) -> FakeApi {
    let api = FakeApi::start("127.0.0.1:0");
    api.put_node(node_json("local", &["10.0.0.1"], &["10.244.0.0/24"]));
    for i in 0..peers {
        let ip = format!("172.16.{}.{}", i >> 8, i & 255);
        let cidr = format!("10.{}.{}.0/24", 1 + (i >> 8), i & 255);
        api.put_node(node_json(&format!("p{i:05}"), &[&ip], &[&cidr]));
    }
    api
}

/// The nodes the fake server holds, decoded as the watch decodes them.
fn expected_nodes(api: &FakeApi) -> std::collections::BTreeMap<String, Node> {
    api.objects(NODES)
        .into_iter()
        .map(|v| {
            let n: Node = serde_json::from_value(v).unwrap();
            (n.key(), n)
        })
        .collect()
}

fn list_requests(api: &FakeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| !r.contains("watch="))
        .collect()
}

#[test]
fn five_thousand_nodes_arrive_in_pages_and_are_reassembled_exactly() {
    let api = fake_nodes(5000);
    let mut w = Watch::<Node>::start(client(&format!("http://{}", api.addr), None), fast());
    w.synced();
    assert_eq!(w.mirror.replaces, 1, "one Replace for the whole list");
    assert_eq!(w.mirror.objects.len(), 5001);
    assert!(
        w.mirror.objects == expected_nodes(&api),
        "decoded nodes differ"
    );
    let lists = list_requests(&api);
    assert_eq!(lists.len(), 11, "5,001 nodes in pages of 500: {lists:?}");
    assert_eq!(lists[0], "/api/v1/nodes?limit=500");
    assert!(lists[1..]
        .iter()
        .all(|r| r.starts_with("/api/v1/nodes?limit=500&continue=")));
    let watch = api
        .requests()
        .into_iter()
        .find(|r| r.contains("watch="))
        .unwrap();
    assert!(watch.ends_with("&resourceVersion=5001"), "{watch}");
    // The watch goes on from there.
    api.put_node(node_json("p05000", &["172.16.99.1"], &["10.99.0.0/24"]));
    api.delete_node("p00000");
    assert!(w.mirror.wait_for(WAIT, |m| m.removed == ["p00000"]
        && m.objects.contains_key("p05000")));
    assert!(w.mirror.objects == expected_nodes(&api));
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    w.finish();
}

#[test]
fn expired_continue_token_restarts_the_list_and_nothing_is_lost() {
    let api = fake_nodes(1200);
    api.compact_after_next_page();
    let mut w = Watch::<Node>::start(client(&format!("http://{}", api.addr), None), fast());
    w.synced();
    assert_eq!(w.mirror.replaces, 1);
    assert!(w.mirror.objects == expected_nodes(&api));
    // Page 1, page 2 answered 410 Expired, then the whole list again: three pages.
    let lists = list_requests(&api);
    assert_eq!(lists.len(), 5, "{lists:?}");
    assert_eq!(
        lists[2], "/api/v1/nodes?limit=500",
        "restarted from the first page"
    );
    assert!(w
        .infos()
        .iter()
        .any(|m| m.contains("continue token expired (410)")));
    assert!(w.warnings().is_empty(), "{:?}", w.warnings());
    w.finish();
}

/// `getsockopt(fd, level, name)` as an int.
fn sockopt(fd: i32, level: libc::c_int, name: libc::c_int) -> i32 {
    let mut v: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live locals the kernel writes at most `len` bytes into.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}

/// The fds of this process whose TCP peer is `peer` (the client's side of its connections).
fn sockets_to(peer: std::net::SocketAddr) -> Vec<i32> {
    let std::net::SocketAddr::V4(peer) = peer else {
        panic!("IPv4 only")
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").expect("fds").flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: an all-zero sockaddr_in is valid; getpeername writes at most `len` bytes.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: as above; a fd that is not a socket just fails.
        let rc =
            unsafe { libc::getpeername(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
        if rc == 0
            && i32::from(sa.sin_family) == libc::AF_INET
            && u16::from_be(sa.sin_port) == peer.port()
            && u32::from_be(sa.sin_addr.s_addr) == u32::from(*peer.ip())
        {
            out.push(fd);
        }
    }
    out
}

/// SPEC S-5: the API client's connections have TCP keepalive on, with timers that notice a
/// half-open watch within a minute (idle + count × interval), not after timeoutSeconds + 30 s.
#[test]
fn api_connections_have_tcp_keepalive() {
    let api = fake_nodes(3);
    let mut w = Watch::<Node>::start(client(&format!("http://{}", api.addr), None), fast());
    w.synced();
    let fds = sockets_to(api.addr);
    assert!(!fds.is_empty(), "no connection to the API server");
    for fd in fds {
        assert_eq!(
            sockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            1,
            "fd {fd}"
        );
        let idle = sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE);
        let intvl = sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL);
        let cnt = sockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT);
        assert!(
            idle + cnt * intvl <= 60,
            "fd {fd}: {idle} + {cnt} × {intvl} s"
        );
    }
    w.finish();
}

/// SPEC P-5: after an API server restart (410 on the watch) the relist is served from the
/// watch cache and never goes back in time: a lagging cache answers 504, and then (only then)
/// the relist reads from etcd.
#[test]
fn relist_after_410_is_served_from_the_watch_cache_never_older() {
    let api = fake_nodes(3);
    let mut w = Watch::<Node>::start(client(&format!("http://{}", api.addr), None), fast());
    w.synced();
    api.expire_watches();
    assert!(w.mirror.wait_for(WAIT, |m| m.replaces == 2));
    let lists = list_requests(&api);
    assert_eq!(
        lists[1], "/api/v1/nodes?resourceVersionMatch=NotOlderThan&resourceVersion=4",
        "{lists:?}"
    );
    assert_eq!(api.cache_reads(), 1);
    assert!(w.mirror.objects == expected_nodes(&api));

    // A replica whose cache lags: p00000 is deleted after it stopped.
    api.freeze_cache(true);
    api.delete_node("p00000");
    assert!(w.mirror.wait_for(WAIT, |m| m.removed == ["p00000"]));
    api.expire_watches();
    assert!(w.mirror.wait_for(WAIT, |m| m.replaces == 3));
    let lists = list_requests(&api);
    assert_eq!(lists.len(), 4, "{lists:?}");
    assert!(
        lists[2].ends_with("NotOlderThan&resourceVersion=6"),
        "{lists:?}"
    );
    assert_eq!(
        lists[3], "/api/v1/nodes?limit=500",
        "504, then a consistent read"
    );
    assert_eq!(api.cache_reads(), 1);
    assert!(
        !w.mirror.objects.contains_key("p00000"),
        "no step back in time"
    );
    assert!(w.mirror.objects == expected_nodes(&api));
    w.finish();
}
