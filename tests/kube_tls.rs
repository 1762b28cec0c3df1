//! TLS of the kube client against a real `openssl s_server` (handshake, CA, client
//! certificate, tls-server-name, failing closed). A test CA, server and client certificates are
//! generated at test time with the `openssl` CLI; without it the tests print a note and pass.
//! The watch protocol itself is tested over plain HTTP in kube_watch.rs.

// This whole file is test-only code in the integration-test crate.
#![allow(clippy::tests_outside_test_module)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kr_tunneld::kube::watch::WatchConfig;
use kr_tunneld::kube::{
    spawn_watch, Client, ConnectionSettings, KubeError, Node, Resource, Stop, WatchOptions,
    WatchStats,
};
use log::Level;
use serde_json::Value;

use crate::apiserver::{capture_logs, eventually, messages, Mirror};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates (once per test run) a CA, a second unrelated CA, a server certificate for
/// 127.0.0.1 and kubernetes.default.svc, and a kubelet-style client certificate whose
/// certificate and key share one file (like kubelet-client-current.pem).
fn pki() -> Option<&'static Pki> {
    static PKI: OnceLock<Option<Pki>> = OnceLock::new();
    PKI.get_or_init(|| {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("note: openssl not found, skipping the TLS tests");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("kr-kube-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("www")).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN={ca}"),
            );
            args.extend([
                "-keyout",
                &key,
                "-out",
                &crt,
                "-subj",
                &subj,
                "-days",
                "2",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&dir, &args);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc\n\
             extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("client.ext"),
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n",
        )
        .unwrap();
        for (name, subj) in [
            ("server", "/CN=kube-apiserver"),
            ("client", "/O=system:nodes/CN=system:node:node1"),
        ] {
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", subj]);
            openssl(&dir, &args);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        let mut combined = std::fs::read(dir.join("client.crt")).unwrap();
        combined.extend(std::fs::read(dir.join("client.key")).unwrap());
        std::fs::write(dir.join("kubelet-client-current.pem"), combined).unwrap();
        std::fs::write(
            dir.join("www/version"),
            r#"{"major":"1","minor":"28","gitVersion":"v1.28.7"}"#,
        )
        .unwrap();
        Some(Pki { dir })
    })
    .as_ref()
}

/// `openssl s_server -WWW` serving files from the PKI's www directory.
struct SServer {
    child: Child,
    port: u16,
}

impl SServer {
    fn start(pki: &Pki, require_client_cert: bool) -> SServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(pki.path("server.crt"))
            .arg("-key")
            .arg(pki.path("server.key"));
        if require_client_cert {
            cmd.arg("-CAfile").arg(pki.path("ca.crt")).args([
                "-Verify",
                "1",
                "-verify_return_error",
            ]);
        }
        let child = cmd
            .current_dir(pki.path("www"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = SServer { child, port };
        assert!(
            eventually(Duration::from_secs(5), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "s_server did not start"
        );
        server
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client_with_ca(url: &str, ca: Option<&Path>) -> Result<Client, KubeError> {
    let s = ConnectionSettings::resolve(None, Some(url), None, ca, &|_| None)?;
    Client::new(s)
}

#[test]
fn verified_with_the_right_ca_and_fails_closed_with_a_wrong_one() {
    let Some(pki) = pki() else { return };
    let server = SServer::start(pki, false);

    let good = client_with_ca(&server.url(), Some(&pki.path("ca.crt"))).unwrap();
    let v: Value = good.get_json("/version").unwrap();
    assert_eq!(v["gitVersion"], "v1.28.7");

    let wrong = client_with_ca(&server.url(), Some(&pki.path("other-ca.crt"))).unwrap();
    let err = wrong.get_json::<Value>("/version").unwrap_err();
    eprintln!("wrong ca: {err}");
    assert!(matches!(err, KubeError::Tls { .. }), "{err:?}");
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("tls with {} failed", server.url())),
        "{msg}"
    );
    assert!(msg.contains("UnknownIssuer"), "{msg}");

    // No CA configured: the system bundle is used, and it does not know our CA either. Without
    // a system bundle the client is refused at construction, naming the paths tried.
    match kr_tunneld::kube::client::system_ca(&kr_tunneld::kube::client::SYSTEM_CA_BUNDLES) {
        Ok(_) => {
            let none = client_with_ca(&server.url(), None).unwrap();
            assert!(matches!(
                none.get_json::<Value>("/version"),
                Err(KubeError::Tls { .. })
            ));
        }
        Err(_) => {
            let err = client_with_ca(&server.url(), None).unwrap_err().to_string();
            assert!(err.contains("/etc/ssl/certs/ca-certificates.crt"), "{err}");
        }
    }
}

/// https without a CA and no system bundle: a clear error naming every path tried; with one, the
/// first that exists is used.
#[test]
fn system_ca_bundle_is_found_or_named_in_the_error() {
    use kr_tunneld::kube::client::system_ca;
    let dir = std::env::temp_dir().join(format!("kr-sysca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.crt");
    let b = dir.join("b.crt");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let err = system_ca(&[a_s, b_s]).unwrap_err().to_string();
    assert!(err.contains(a_s) && err.contains(b_s), "{err}");
    assert!(err.contains("install ca-certificates"), "{err}");
    std::fs::write(&b, "x").unwrap();
    assert_eq!(
        system_ca(&[a_s, b_s]).unwrap(),
        kr_tunneld::kube::settings::Material::File(b.clone())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kubelet_conf_with_client_certificate_paths() {
    let Some(pki) = pki() else { return };
    let server = SServer::start(pki, true);
    let conf = pki.path(&format!("kubelet-{}.conf", server.port));
    std::fs::write(
        &conf,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority: ca.crt\n    \
             server: {}\n  name: kubernetes\ncontexts:\n- context:\n    cluster: kubernetes\n    \
             user: system:node:node1\n  name: system:node:node1@kubernetes\n\
             current-context: system:node:node1@kubernetes\npreferences: {{}}\nusers:\n\
             - name: system:node:node1\n  user:\n    client-certificate: {pem}\n    client-key: {pem}\n",
            server.url(),
            pem = pki.path("kubelet-client-current.pem").display()
        ),
    )
    .unwrap();
    let s = ConnectionSettings::resolve(Some(&conf), None, None, None, &|_| None).unwrap();
    let c = Client::new(s).unwrap();
    let v: Value = c.get_json("/version").unwrap();
    assert_eq!(v["major"], "1");

    // Without the client certificate the server refuses us: a clear tls error.
    let anon = client_with_ca(&server.url(), Some(&pki.path("ca.crt"))).unwrap();
    let err = anon.get_json::<Value>("/version").unwrap_err();
    eprintln!("no client certificate: {err}");
    assert!(matches!(err, KubeError::Tls { .. }), "{err:?}");
}

#[test]
fn tls_server_name_is_what_gets_verified() {
    let Some(pki) = pki() else { return };
    let server = SServer::start(pki, false);
    let conf = |name: &str| {
        let path = pki.path(&format!("sni-{name}-{}.conf", server.port));
        std::fs::write(
            &path,
            format!(
                "clusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\n    \
                 tls-server-name: {name}\ncontexts:\n- name: x\n  context: {{cluster: c}}\n\
                 current-context: x\n",
                server.url(),
                pki.path("ca.crt").display()
            ),
        )
        .unwrap();
        let s = ConnectionSettings::resolve(Some(&path), None, None, None, &|_| None).unwrap();
        Client::new(s).unwrap()
    };
    // The URL says 127.0.0.1; the certificate is checked against kubernetes.default.svc.
    let v: Value = conf("kubernetes.default.svc").get_json("/version").unwrap();
    assert_eq!(v["major"], "1");
    let err = conf("wrong.example")
        .get_json::<Value>("/version")
        .unwrap_err();
    assert!(matches!(err, KubeError::Tls { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("not valid for name \"wrong.example\""),
        "{err}"
    );
}

#[test]
fn watch_with_a_wrong_ca_warns_once_and_delivers_nothing() {
    let Some(pki) = pki() else { return };
    capture_logs();
    let server = SServer::start(pki, false);
    let c = Arc::new(client_with_ca(&server.url(), Some(&pki.path("other-ca.crt"))).unwrap());
    let stats = Arc::new(WatchStats::default());
    let stop = Stop::new();
    let (mut mirror, sink) = Mirror::new(Node::key);
    let opts = WatchOptions {
        config: WatchConfig {
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            ..WatchConfig::default()
        },
        stats: Arc::clone(&stats),
        seed: Some(1),
    };
    let h = spawn_watch::<Node>(c, opts, sink, stop.clone());
    let tid = h.thread().id();
    assert!(eventually(Duration::from_secs(8), || stats.faults() >= 3));
    let t = Instant::now();
    stop.trigger();
    h.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    mirror.drain();
    assert_eq!(
        mirror.updates, 0,
        "no update, in particular no empty Replace"
    );
    assert!(!stats.synced());
    let warns = messages(tid, Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].starts_with("list nodes: tls with https://127.0.0.1:"),
        "{warns:?}"
    );
    assert!(stats.last_error().unwrap().contains("UnknownIssuer"));
}
