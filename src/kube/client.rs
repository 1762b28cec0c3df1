//! The HTTP side of the API client: [`Client`] (ureq agent, TLS material, bearer token).
//!
//! Shell module: one HTTP request per call, then the caller decides. It must never decide
//! about cache contents or retries (the [`super::watch`] core does), and it must never print a
//! token: `Debug` is hand-written and redacts it, and no log line includes a header.
//!
//! Credentials (SPEC K-2):
//! * TLS is always verified. The CA comes from the settings; without one, https uses the system's
//!   CA bundle ([`SYSTEM_CA_BUNDLES`], still verified; no bundle is an error, never a skip).
//!   There is no switch to turn verification off.
//! * The token file, CA, client certificate and key files are `stat`ed before every request
//!   and re-read when their mtime, size or inode changed (bound service-account tokens rotate
//!   hourly through an atomic symlink swap; kubelet rotates its client certificate by
//!   repointing `kubelet-client-current.pem`). The token is also re-read every
//!   [`ClientOptions::token_reread`] regardless. A 401 forces one more re-read, and the request
//!   is retried once if the token changed.
//! * A failed re-read keeps the last good material (a half-written file is not fatal) and
//!   logs one warning.
//!
//! Each watch thread gets its own [`Connection`] (its own ureq agent and connection pool), so
//! stopping one watch ([`Connection::shutdown`], ureq's `Agent::shutdown`) interrupts its
//! blocked read at once without disturbing the others.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use serde::de::DeserializeOwned;
use ureq::http::{Response, Uri};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{Connector, NextTimeout, RustlsConnector};
use ureq::{Agent, Body};

use super::error::{KubeError, Secret};
use super::settings::{ConnectionSettings, Material, TokenSource};
use super::tcp::KeepAliveConnector;
use super::types::{decode_list_from, ListPage, Status, READ_BUFFER};
use super::Resource;

/// Tunables of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect plus TLS handshake limit, and the DNS resolution limit (5 s by default).
    /// ureq's `Agent::shutdown` interrupts a TLS handshake but not a TCP connect or a DNS
    /// lookup in progress, so this also bounds how long a stop can take while the server's
    /// address is black-holed. It is not shorter by default because remote sites (k3s edge
    /// nodes) can need more than a second or two for TCP plus TLS; lower it if a strict stop
    /// deadline matters more.
    pub connect_timeout: Duration,
    /// Per-read timeout of non-watch requests (lists, [`Client::get_json`]).
    pub read_timeout: Duration,
    /// Largest response body accepted (one list page; it is decoded as it arrives, not held).
    pub max_body: u64,
    /// Re-read the token file at least this often, even if it looks unchanged.
    pub token_reread: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            max_body: 256 << 20,
            token_reread: Duration::from_secs(60),
        }
    }
}

/// Identity of a file's content as far as `stat` can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    size: u64,
    ino: u64,
    dev: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // metadata() follows symlinks: a swapped `..data` link shows up as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        mtime: m.modified().ok(),
        size: m.len(),
        ino: m.ino(),
        dev: m.dev(),
    })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, KubeError> {
    std::fs::read(path).map_err(|source| KubeError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_token(path: &Path) -> Result<Secret, KubeError> {
    let bytes = read_file("token", path)?;
    let text = String::from_utf8(bytes).map_err(|_| KubeError::Pem {
        what: format!("token file {}", path.display()),
        reason: "not utf-8".into(),
    })?;
    let token = Secret::new(&text);
    if token.is_empty() {
        return Err(KubeError::Pem {
            what: format!("token file {}", path.display()),
            reason: "empty".into(),
        });
    }
    Ok(token)
}

fn material_bytes(what: &'static str, m: &Material) -> Result<(Vec<u8>, String), KubeError> {
    match m {
        Material::File(p) => Ok((read_file(what, p)?, format!("{what} {}", p.display()))),
        Material::Inline(b) => Ok((b.clone(), format!("{what} (inline data)"))),
    }
}

/// The distributions' CA bundles, tried in order when https has no CA of its own: Debian and
/// Ubuntu, Fedora/RHEL, openSUSE, Alpine and others.
pub const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The first of `paths` that exists, as CA material. An error names every path tried: with no
/// CA there is nothing to verify against, and verification is never skipped.
pub fn system_ca(paths: &[&str]) -> Result<Material, KubeError> {
    paths
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.is_file())
        .map(|p| Material::File(p.to_path_buf()))
        .ok_or_else(|| KubeError::Pem {
            what: "the system CA bundle".into(),
            reason: format!(
                "none of {} exists; give the API server's CA (kubeconfig certificate-authority, \
                 or ca.crt beside the service-account token) or install ca-certificates",
                paths.join(", ")
            ),
        })
}

/// Builds the TLS configuration from the settings' CA (else, for https, the system's CA
/// bundle) and client certificate.
fn build_tls(s: &ConnectionSettings) -> Result<TlsConfig, KubeError> {
    let mut b = TlsConfig::builder();
    let system;
    let ca = match &s.ca {
        Some(ca) => Some(ca),
        None if s.server.starts_with("https://") => {
            system = system_ca(&SYSTEM_CA_BUNDLES)?;
            Some(&system)
        }
        None => None,
    };
    if let Some(ca) = ca {
        let (pem, name) = material_bytes("ca", ca)?;
        let mut certs: Vec<Certificate<'static>> = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(KubeError::Pem {
                        what: name,
                        reason: e.to_string(),
                    })
                }
            }
        }
        if certs.is_empty() {
            return Err(KubeError::Pem {
                what: name,
                reason: "no certificate found".into(),
            });
        }
        b = b.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let (Some(cert), Some(key)) = (&s.client_certificate, &s.client_key) {
        let (pem, name) = material_bytes("client certificate", cert)?;
        let chain: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if chain.is_empty() {
            return Err(KubeError::Pem {
                what: name,
                reason: "no certificate found".into(),
            });
        }
        let (kpem, kname) = material_bytes("client key", key)?;
        let key = PrivateKey::from_pem(&kpem).map_err(|e| KubeError::Pem {
            what: kname,
            reason: e.to_string(),
        })?;
        b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(b.build())
}

/// Files whose change means the TLS configuration must be rebuilt.
fn tls_files(s: &ConnectionSettings) -> Vec<PathBuf> {
    [&s.ca, &s.client_certificate, &s.client_key]
        .into_iter()
        .filter_map(|m| match m {
            Some(Material::File(p)) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// The current credentials and what they were read from.
struct Creds {
    token: Option<Secret>,
    token_stamp: Option<Stamp>,
    token_read_at: Instant,
    token_failing: bool,
    tls: TlsConfig,
    tls_stamps: Vec<(PathBuf, Option<Stamp>)>,
    tls_generation: u64,
    tls_failing: bool,
}

/// Resolves every connection to the real server address while the URL carries the
/// `tls-server-name`, so rustls verifies the certificate against that name.
#[derive(Debug)]
struct PinnedResolver {
    real: Uri,
    inner: DefaultResolver,
}

impl Resolver for PinnedResolver {
    fn resolve(
        &self,
        _uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        // This agent only ever talks to our one server.
        self.inner.resolve(&self.real, config, timeout)
    }
}

/// One ureq agent slot. Each watch thread owns one; [`Client`] has one for `get_json`.
///
/// After [`Connection::shutdown`] every request through it fails with [`KubeError::Stopped`].
#[derive(Default)]
pub struct Connection {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    agent: Option<(Agent, u64)>,
    stopped: bool,
}

impl Connection {
    /// A new, unconnected slot.
    pub fn new() -> Connection {
        Connection::default()
    }

    /// Interrupts any request in flight on this connection (a blocked watch read returns at
    /// once) and refuses new ones. Idempotent.
    pub fn shutdown(&self) {
        let mut slot = lock(&self.slot);
        slot.stopped = true;
        if let Some((agent, _)) = slot.agent.take() {
            agent.shutdown();
        }
    }

    /// True after [`Connection::shutdown`].
    pub fn is_shut_down(&self) -> bool {
        lock(&self.slot).stopped
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("stopped", &self.is_shut_down())
            .finish()
    }
}

/// Locks a mutex, recovering the data if a holder panicked (the guarded data here stays
/// consistent: every update is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A Kubernetes API client: server URL, TLS material and token, shared by all watch threads
/// (`Arc<Client>`). `Debug` redacts the token.
pub struct Client {
    settings: ConnectionSettings,
    /// URL prefix for requests; its host is the `tls-server-name` when one is set.
    base: String,
    /// The real server, resolved instead of `base`'s host when `tls-server-name` is set.
    pinned: Option<Uri>,
    options: ClientOptions,
    creds: Mutex<Creds>,
    main: Connection,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `settings` Debug is already redacting (Secret, Material); list it field by field
        // anyway so that a future field cannot slip a credential in unnoticed.
        let token = match &self.settings.token {
            TokenSource::None => "none".to_string(),
            TokenSource::Inline(_) => "inline <redacted>".to_string(),
            TokenSource::File(p) => format!("file {} <redacted>", p.display()),
        };
        f.debug_struct("Client")
            .field("server", &self.settings.server)
            .field("origin", &self.settings.origin)
            .field("ca", &self.settings.ca)
            .field("tls_server_name", &self.settings.tls_server_name)
            .field("client_certificate", &self.settings.client_certificate)
            .field(
                "client_key",
                &self.settings.client_key.as_ref().map(|_| "<redacted>"),
            )
            .field("token", &token)
            .finish()
    }
}

/// A response whose status has not been judged yet.
pub type HttpResponse = Response<Body>;

impl Client {
    /// Builds a client with default [`ClientOptions`]. Reads the token and TLS files now, so a
    /// missing or malformed file is reported at start-up.
    pub fn new(settings: ConnectionSettings) -> Result<Client, KubeError> {
        Client::with_options(settings, ClientOptions::default())
    }

    /// Builds a client with explicit options.
    pub fn with_options(
        settings: ConnectionSettings,
        options: ClientOptions,
    ) -> Result<Client, KubeError> {
        let uri: Uri = settings
            .server
            .parse()
            .map_err(|e| KubeError::Config(format!("server {:?}: {e}", settings.server)))?;
        let https = uri.scheme_str() == Some("https");
        let (base, pinned) = match (&settings.tls_server_name, https) {
            (Some(name), true) => {
                let authority = uri
                    .authority()
                    .ok_or_else(|| KubeError::Config(format!("server {:?}", settings.server)))?;
                let port = authority.port_u16().unwrap_or(443);
                let path = uri.path().trim_end_matches('/');
                (format!("https://{name}:{port}{path}"), Some(uri.clone()))
            }
            _ => (settings.server.clone(), None),
        };
        let (token, token_stamp) = match &settings.token {
            TokenSource::None => (None, None),
            TokenSource::Inline(t) => (Some(t.clone()), None),
            TokenSource::File(p) => (Some(read_token(p)?), stamp(p)),
        };
        if !https && token.is_some() {
            warn!(
                "api server {} is plain http: the bearer token is sent unencrypted",
                settings.server
            );
        }
        let tls_stamps = tls_files(&settings)
            .into_iter()
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect();
        let tls = build_tls(&settings)?;
        Ok(Client {
            base,
            pinned,
            options,
            creds: Mutex::new(Creds {
                token,
                token_stamp,
                token_read_at: Instant::now(),
                token_failing: false,
                tls,
                tls_stamps,
                tls_generation: 0,
                tls_failing: false,
            }),
            main: Connection::new(),
            settings,
        })
    }

    /// The server URL.
    pub fn server(&self) -> &str {
        &self.settings.server
    }

    /// The settings this client was built from.
    pub fn settings(&self) -> &ConnectionSettings {
        &self.settings
    }

    /// The options this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// GETs `path` (e.g. `/version`, `/api/v1/nodes/node1`) and decodes the JSON body.
    /// Non-2xx answers become [`KubeError::Status`] with the server's message.
    pub fn get_json<D: DeserializeOwned>(&self, path: &str) -> Result<D, KubeError> {
        let op = format!("get {path}");
        let resp = self.get(&self.main, path, None)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(status_error(&op, resp));
        }
        let body = read_body(&op, resp, self.options.max_body)?;
        serde_json::from_slice(&body).map_err(|e| KubeError::Decode {
            what: format!("response to {op}"),
            reason: e.to_string(),
        })
    }

    /// Interrupts and refuses requests made through [`Client::get_json`]. Watch threads have
    /// their own connections and are stopped through their [`super::Stop`].
    pub fn shutdown(&self) {
        self.main.shutdown();
    }

    /// Sends `GET <server><path_query>` through `conn` with the current token. On 401 the token
    /// is re-read and, if it changed, the request is sent once more. `read_timeout` overrides
    /// the per-read timeout (watches need one above their `timeoutSeconds`).
    pub fn get(
        &self,
        conn: &Connection,
        path_query: &str,
        read_timeout: Option<Duration>,
    ) -> Result<HttpResponse, KubeError> {
        let op = format!("get {}", path_query.split('?').next().unwrap_or(path_query));
        self.refresh(false);
        let resp = self.send(conn, path_query, read_timeout, &op)?;
        if resp.status().as_u16() == 401 && matches!(self.settings.token, TokenSource::File(_)) {
            if self.refresh(true) {
                info!("{op}: 401 unauthorized, retrying once with the re-read token");
                return self.send(conn, path_query, read_timeout, &op);
            }
            debug!("{op}: 401 unauthorized and the token file is unchanged");
        }
        Ok(resp)
    }

    fn send(
        &self,
        conn: &Connection,
        path_query: &str,
        read_timeout: Option<Duration>,
        op: &str,
    ) -> Result<HttpResponse, KubeError> {
        let agent = self.agent(conn)?;
        let token = lock(&self.creds).token.clone();
        let url = format!("{}{path_query}", self.base);
        let mut req = agent.get(&url).header("Accept", "application/json");
        if let Some(t) = &token {
            req = req.header("Authorization", format!("Bearer {}", t.expose()));
        }
        let result = match read_timeout {
            Some(t) => req.config().timeout_per_read(Some(t)).build().call(),
            None => req.call(),
        };
        result.map_err(|e| {
            if conn.is_shut_down() {
                KubeError::Stopped
            } else {
                map_ureq_error(op, &self.settings.server, e)
            }
        })
    }

    /// The connection's agent, (re)built when the TLS material changed.
    fn agent(&self, conn: &Connection) -> Result<Agent, KubeError> {
        let (tls, generation) = {
            let c = lock(&self.creds);
            (c.tls.clone(), c.tls_generation)
        };
        let mut slot = lock(&conn.slot);
        if slot.stopped {
            return Err(KubeError::Stopped);
        }
        match &slot.agent {
            Some((agent, g)) if *g == generation => Ok(agent.clone()),
            _ => {
                let config = Agent::config_builder()
                    .tls_config(tls)
                    .timeout_connect(Some(self.options.connect_timeout))
                    .timeout_resolve(Some(self.options.connect_timeout))
                    .timeout_per_read(Some(self.options.read_timeout))
                    .http_status_as_error(false)
                    // Never follow a redirect with our token, and ignore *_PROXY variables:
                    // the API server is reached directly (a proxy would need proxy-url,
                    // which is refused).
                    .max_redirects(0)
                    .max_redirects_will_error(false)
                    .proxy(None)
                    .user_agent(concat!("kr-tunneld/", env!("CARGO_PKG_VERSION")))
                    .build();
                // TCP with keepalive (a dead watch is noticed within a minute, SPEC S-5),
                // then TLS.
                let connector = KeepAliveConnector.chain(RustlsConnector::default());
                let agent = match &self.pinned {
                    Some(real) => Agent::with_parts(
                        config,
                        connector,
                        PinnedResolver {
                            real: real.clone(),
                            inner: DefaultResolver::default(),
                        },
                    ),
                    None => Agent::with_parts(config, connector, DefaultResolver::default()),
                };
                // The old agent, if any, is dropped here; a request still running on a clone
                // of it finishes with the old material.
                slot.agent = Some((agent.clone(), generation));
                Ok(agent)
            }
        }
    }

    /// Re-reads changed credential files. Returns true when the token changed. `force` re-reads
    /// the token even if its file looks unchanged (after a 401).
    fn refresh(&self, force: bool) -> bool {
        let mut c = lock(&self.creds);
        let mut token_changed = false;
        if let TokenSource::File(path) = &self.settings.token {
            let st = stamp(path);
            if force
                || st != c.token_stamp
                || c.token_read_at.elapsed() >= self.options.token_reread
            {
                match read_token(path) {
                    Ok(t) => {
                        token_changed = c.token.as_ref() != Some(&t);
                        if token_changed {
                            debug!("re-read token file {}: token changed", path.display());
                        }
                        if c.token_failing {
                            info!("token file {} readable again", path.display());
                        }
                        c.token = Some(t);
                        c.token_stamp = st;
                        c.token_read_at = Instant::now();
                        c.token_failing = false;
                    }
                    Err(e) => {
                        if !c.token_failing {
                            warn!("{e}; keeping the previous token");
                        }
                        c.token_failing = true;
                    }
                }
            }
        }
        let changed = c.tls_stamps.iter().any(|(p, old)| stamp(p) != *old);
        if changed {
            match build_tls(&self.settings) {
                Ok(tls) => {
                    info!("tls material changed on disk, reloaded");
                    c.tls = tls;
                    c.tls_generation += 1;
                    c.tls_failing = false;
                    for (p, s) in c.tls_stamps.iter_mut() {
                        *s = stamp(p);
                    }
                }
                Err(e) => {
                    if !c.tls_failing {
                        warn!("{e}; keeping the previous tls material");
                    }
                    c.tls_failing = true;
                }
            }
        }
        token_changed
    }
}

/// Parses `Retry-After` (delta-seconds only; HTTP-dates are ignored, as kube-apiserver sends
/// seconds).
pub fn retry_after(resp: &HttpResponse) -> Option<Duration> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Turns a non-2xx response into [`KubeError::Status`], reading at most 64 KiB of its body
/// for the `Status` message and `retryAfterSeconds`.
pub fn status_error(op: &str, resp: HttpResponse) -> KubeError {
    let code = resp.status().as_u16();
    let header_delay = retry_after(&resp);
    let reason = resp
        .status()
        .canonical_reason()
        .unwrap_or("")
        .to_lowercase();
    let body = read_body(op, resp, 64 << 10).unwrap_or_default();
    let status = Status::from_body(&body);
    let message = status
        .as_ref()
        .map(|s| s.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or(reason);
    let body_delay = status
        .and_then(|s| s.details.retry_after_seconds)
        .map(|s| Duration::from_secs(s.into()));
    KubeError::Status {
        op: op.to_string(),
        code,
        message,
        retry_after: header_delay.or(body_delay),
    }
}

/// Reads a whole response body, at most `limit` bytes.
pub fn read_body(op: &str, resp: HttpResponse, limit: u64) -> Result<Vec<u8>, KubeError> {
    let mut out = Vec::new();
    resp.into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| map_io_error(op, "", e))?;
    if out.len() as u64 > limit {
        return Err(KubeError::Decode {
            what: format!("response to {op}"),
            reason: format!("body larger than {limit} bytes"),
        });
    }
    Ok(out)
}

/// The error a [`Capped`] reader returns past its limit.
#[derive(Debug)]
struct BodyTooLarge;

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("body too large")
    }
}

impl std::error::Error for BodyTooLarge {}

/// A reader that fails with [`BodyTooLarge`] once more than `limit` bytes came through.
struct Capped<R> {
    inner: R,
    seen: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > self.limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, BodyTooLarge));
        }
        Ok(n)
    }
}

/// Reads and decodes a 2xx list response as it arrives ([`decode_list_from`] over the body
/// reader): the page is never held whole, only a read buffer and one object at a time. A body
/// over `limit` bytes, a transport error or a timeout mid-body fail as [`read_body`] would;
/// a body that is not a list fails with [`KubeError::Decode`] (`what`: "`op` response").
pub fn read_list<T: Resource>(
    op: &str,
    resp: HttpResponse,
    limit: u64,
) -> Result<ListPage<T>, KubeError> {
    let mut body = Capped {
        inner: resp.into_body().into_reader(),
        seen: 0,
        limit,
    };
    decode_list_from(&mut body, READ_BUFFER).map_err(|e| {
        if !e.is_io() {
            return KubeError::Decode {
                what: format!("{op} response"),
                reason: e.to_string(),
            };
        }
        // serde_json hands back the reader's own error.
        let io = io::Error::from(e);
        if io.get_ref().is_some_and(|i| i.is::<BodyTooLarge>()) {
            KubeError::Decode {
                what: format!("response to {op}"),
                reason: format!("body larger than {limit} bytes"),
            }
        } else {
            map_io_error(op, "", io)
        }
    })
}

/// Classifies an I/O error from a body read (which may wrap a ureq timeout).
pub fn map_io_error(op: &str, server: &str, e: io::Error) -> KubeError {
    if e.get_ref()
        .and_then(|i| i.downcast_ref::<ureq::Error>())
        .is_some()
    {
        // The downcast just succeeded; into_inner + downcast cannot fail.
        if let Some(inner) = e.into_inner() {
            if let Ok(u) = inner.downcast::<ureq::Error>() {
                return map_ureq_error(op, server, *u);
            }
        }
        return KubeError::Transport {
            op: op.to_string(),
            reason: "i/o error".into(),
        };
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        // ureq reports a reset (ECONNRESET) and a FIN in the middle of a body alike, as
        // UnexpectedEof "Peer disconnected".
        return KubeError::Transport {
            op: op.to_string(),
            reason: "connection reset or closed by the server in mid-response".into(),
        };
    }
    classify(op, server, e.to_string())
}

/// Classifies a ureq error.
pub fn map_ureq_error(op: &str, server: &str, e: ureq::Error) -> KubeError {
    match e {
        ureq::Error::Timeout(t) => KubeError::Timeout {
            op: op.to_string(),
            reason: t.to_string(),
        },
        ureq::Error::Io(io) => map_io_error(op, server, io),
        ureq::Error::HostNotFound => KubeError::Transport {
            op: op.to_string(),
            reason: "host not found".into(),
        },
        other => classify(op, server, other.to_string()),
    }
}

/// TLS verification failures are told apart by rustls' messages (rustls types are not part of
/// our dependency set): "invalid peer certificate: …" when the server is not trusted,
/// "received fatal alert: …" when the server refused us.
fn classify(op: &str, server: &str, msg: String) -> KubeError {
    let tls = msg.contains("invalid peer certificate")
        || msg.contains("received fatal alert")
        || msg.contains("certificate")
        || msg.starts_with("rustls");
    if tls {
        KubeError::Tls {
            server: server.to_string(),
            reason: msg,
        }
    } else {
        KubeError::Transport {
            op: op.to_string(),
            reason: msg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(token: TokenSource) -> ConnectionSettings {
        ConnectionSettings {
            server: "http://127.0.0.1:1".into(),
            ca: None,
            tls_server_name: None,
            client_certificate: None,
            client_key: Some(Material::Inline(b"KEY".to_vec())),
            token,
            origin: "test".into(),
        }
    }

    #[test]
    fn debug_redacts_inline_token_and_key() {
        let mut s = settings(TokenSource::Inline(Secret::new("sup3r-s3cret-t0ken")));
        s.client_key = None;
        let c = Client::new(s).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sup3r-s3cret-t0ken"), "{dbg}");
        assert!(dbg.contains("inline <redacted>"), "{dbg}");
        assert!(dbg.contains("http://127.0.0.1:1"), "{dbg}");
    }

    #[test]
    fn token_file_is_read_and_redacted() {
        let dir = std::env::temp_dir().join(format!("kr-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "file-t0ken-value\n").unwrap();
        let mut s = settings(TokenSource::File(path.clone()));
        s.client_key = None;
        let c = Client::new(s).unwrap();
        assert!(!format!("{c:?}").contains("file-t0ken-value"));
        assert_eq!(
            lock(&c.creds).token.as_ref().map(Secret::expose),
            Some("file-t0ken-value")
        );
        // Unchanged file: no change reported. Rewritten: picked up.
        assert!(!c.refresh(false));
        std::fs::write(&path, "rotated-t0ken-value-longer\n").unwrap();
        assert!(c.refresh(false));
        assert!(!c.refresh(true));
        // A broken re-read keeps the previous token.
        std::fs::remove_file(&path).unwrap();
        assert!(!c.refresh(true));
        assert_eq!(
            lock(&c.creds).token.as_ref().map(Secret::expose),
            Some("rotated-t0ken-value-longer")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_bad_material_fails_at_start() {
        let e = Client::new(settings(TokenSource::File("/nonexistent/token".into()))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("read token file /nonexistent/token"),
            "{e}"
        );
        let mut s = settings(TokenSource::None);
        s.client_key = None;
        s.ca = Some(Material::Inline(b"not a pem".to_vec()));
        let e = Client::new(s).unwrap_err();
        assert!(e.to_string().contains("ca (inline data)"), "{e}");
    }

    #[test]
    fn stopped_connection_refuses_requests() {
        let mut s = settings(TokenSource::None);
        s.client_key = None;
        let c = Client::new(s).unwrap();
        let conn = Connection::new();
        conn.shutdown();
        assert!(matches!(
            c.get(&conn, "/version", None),
            Err(KubeError::Stopped)
        ));
        c.shutdown();
        assert!(matches!(
            c.get_json::<serde_json::Value>("/version"),
            Err(KubeError::Stopped)
        ));
    }

    /// A response whose body comes from `r`.
    fn response(r: impl Read + Send + Sync + 'static) -> HttpResponse {
        Response::builder()
            .status(200)
            .body(Body::builder().reader(r))
            .unwrap()
    }

    /// Hands out `data` `step` bytes per read, then fails with `err` (or ends).
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        err: Option<io::ErrorKind>,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len() - self.at);
            if n == 0 {
                return match self.err {
                    Some(kind) => Err(io::Error::new(kind, "cut")),
                    None => Ok(0),
                };
            }
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn trickle(data: &[u8], step: usize, err: Option<io::ErrorKind>) -> Trickle {
        Trickle {
            data: data.to_vec(),
            at: 0,
            step,
            err,
        }
    }

    #[test]
    fn list_is_decoded_as_it_arrives_like_a_whole_body() {
        use crate::kube::types::{decode_list, Node};
        let recorded = include_bytes!("../../tests/data/list-nodes.json");
        let malformed =
            br#"{"kind":"NodeList","metadata":{"resourceVersion":"9","continue":"abc"},"items":[
            {"metadata":{"name":"good","resourceVersion":"5"}},
            {"metadata":{"name":"bad","resourceVersion":"6"},"spec":{"podCIDRs":"10.0.0.0/24"}},
            {"metadata":{"resourceVersion":"7"}}, 42,
            {"metadata":{"name":"good2","annotations":{"kube-router.io/pod-cidr":"10.0.0.0/24"}}}
        ]}"#;
        for body in [&recorded[..], &malformed[..]] {
            let whole = decode_list::<Node>(body).unwrap();
            for step in [1, 7, 4096] {
                let page =
                    read_list::<Node>("list nodes", response(trickle(body, step, None)), 1 << 20)
                        .unwrap();
                assert_eq!(page, whole, "step {step}");
            }
        }
    }

    #[test]
    fn list_read_failures_are_classified_as_before() {
        use crate::kube::types::Node;
        let body = include_bytes!("../../tests/data/list-nodes.json");
        // Not a list: a decode error naming the list, as WatchMachine::list_page reports it.
        let e = read_list::<Node>("list nodes", response(&b"<html>"[..]), 1 << 20).unwrap_err();
        assert!(
            matches!(&e, KubeError::Decode { what, .. } if what == "list nodes response"),
            "{e:?}"
        );
        let e = read_list::<Node>(
            "list nodes",
            response(&br#"{"kind":"NodeList","items":[]}"#[..]),
            1 << 20,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no metadata in list"), "{e}");
        // Trailing garbage after the list.
        let mut extra = body.to_vec();
        extra.extend_from_slice(b" x");
        let e = read_list::<Node>("list nodes", response(std::io::Cursor::new(extra)), 1 << 20)
            .unwrap_err();
        assert!(matches!(e, KubeError::Decode { .. }), "{e:?}");
        // Over the limit: refused, whatever the content.
        let e = read_list::<Node>("list nodes", response(&body[..]), 1000).unwrap_err();
        assert!(
            matches!(&e, KubeError::Decode { what, reason }
                if what == "response to list nodes" && reason == "body larger than 1000 bytes"),
            "{e:?}"
        );
        // Cut mid-body: a transport error, not a decode error.
        let half = &body[..body.len() / 2];
        for kind in [io::ErrorKind::UnexpectedEof, io::ErrorKind::ConnectionReset] {
            let e = read_list::<Node>(
                "list nodes",
                response(trickle(half, 100, Some(kind))),
                1 << 20,
            )
            .unwrap_err();
            assert!(matches!(e, KubeError::Transport { .. }), "{kind:?}: {e:?}");
        }
    }

    #[test]
    fn tls_classification() {
        assert!(matches!(
            classify(
                "get /",
                "https://x",
                "invalid peer certificate: UnknownIssuer".into()
            ),
            KubeError::Tls { .. }
        ));
        assert!(matches!(
            classify(
                "get /",
                "https://x",
                "Connection refused (os error 111)".into()
            ),
            KubeError::Transport { .. }
        ));
    }
}
