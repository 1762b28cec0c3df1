//! Where the API server is and how to authenticate: [`ConnectionSettings::resolve`] (SPEC K-1).
//!
//! Shell module, but a narrow one: the only side effect is reading the kubeconfig file; the
//! environment is read through the accessor passed in, so tests run without touching the
//! process environment. It never logs and never reads token, CA or key files (the
//! [`super::Client`] does that, and re-reads them when they change).
//!
//! Precedence (the order, with explicit flags never ignored):
//! 1. `--kubeconfig` when given;
//! 2. otherwise the in-cluster service account when `KUBERNETES_SERVICE_HOST` and
//!    `KUBERNETES_SERVICE_PORT` are set;
//! 3. otherwise `--master`.
//!
//! Then `--master`, `--token-file` and `--ca-file`, when given, override the server, token and
//! CA of whichever source was chosen (kube-router's `--master` overrides the kubeconfig's server
//! the same way).

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::{KubeError, Secret};
use super::kubeconfig;

/// Service-account directory mounted into pods.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// PEM material: a file (re-read when it changes) or inline bytes (from `*-data`).
#[derive(Clone, PartialEq, Eq)]
pub enum Material {
    /// A PEM file.
    File(PathBuf),
    /// PEM bytes (base64-decoded `*-data`).
    Inline(Vec<u8>),
}

impl fmt::Debug for Material {
    // Inline material may be a private key: show only its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Material::File(p) => write!(f, "File({})", p.display()),
            Material::Inline(b) => write!(f, "Inline(<{} bytes>)", b.len()),
        }
    }
}

/// How the bearer token is obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token (client certificate or anonymous).
    None,
    /// A token given inline (kubeconfig `token`). Redacted in `Debug`.
    Inline(Secret),
    /// A token file, re-read when it changes (bound service-account tokens rotate hourly).
    File(PathBuf),
}

/// Everything needed to build a [`super::Client`]. `Debug` never shows a token or key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Base URL, e.g. `https://10.96.0.1:443`, without a trailing slash. Plain `http://` only
    /// when written so.
    pub server: String,
    /// CA bundle to verify the server with. `None` for https means the system's CA bundle
    /// (`/etc/ssl/certs/ca-certificates.crt` and the like): still verified.
    pub ca: Option<Material>,
    /// Name to verify the server certificate against instead of the URL's host.
    pub tls_server_name: Option<String>,
    /// Client certificate chain (with [`Self::client_key`]).
    pub client_certificate: Option<Material>,
    /// Client private key.
    pub client_key: Option<Material>,
    /// Bearer token.
    pub token: TokenSource,
    /// Where these settings came from, for the start-up log line.
    pub origin: String,
}

impl ConnectionSettings {
    /// Resolves the settings from the flags and the environment (see the module docs for the
    /// precedence). Reads only the kubeconfig file.
    pub fn resolve(
        kubeconfig: Option<&Path>,
        master: Option<&str>,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnectionSettings, KubeError> {
        let env_nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let mut s = if let Some(path) = kubeconfig {
            let text = std::fs::read_to_string(path).map_err(|source| KubeError::ReadFile {
                what: "kubeconfig",
                path: path.to_path_buf(),
                source,
            })?;
            let base = path.parent().unwrap_or(Path::new("/"));
            let k = kubeconfig::parse(&text, base).map_err(|reason| KubeError::Kubeconfig {
                path: path.to_path_buf(),
                reason,
            })?;
            ConnectionSettings {
                server: k.server,
                ca: k.certificate_authority,
                tls_server_name: k.tls_server_name,
                client_certificate: k.client_certificate,
                client_key: k.client_key,
                token: match (k.token_file, k.token) {
                    (Some(f), _) => TokenSource::File(f),
                    (None, Some(t)) => TokenSource::Inline(t),
                    (None, None) => TokenSource::None,
                },
                origin: format!("kubeconfig {} (context {})", path.display(), k.context),
            }
        } else if let (Some(host), Some(port)) = (
            env_nonempty("KUBERNETES_SERVICE_HOST"),
            env_nonempty("KUBERNETES_SERVICE_PORT"),
        ) {
            let host = host.trim();
            // An IPv6 service host must be bracketed in a URL (client-go does the same).
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            let dir = Path::new(SERVICE_ACCOUNT_DIR);
            ConnectionSettings {
                server: format!("https://{host}:{}", port.trim()),
                ca: Some(Material::File(dir.join("ca.crt"))),
                tls_server_name: None,
                client_certificate: None,
                client_key: None,
                token: TokenSource::File(dir.join("token")),
                origin: "in-cluster service account".to_string(),
            }
        } else if let Some(m) = master {
            ConnectionSettings {
                server: m.to_string(),
                ca: None,
                tls_server_name: None,
                client_certificate: None,
                client_key: None,
                token: TokenSource::None,
                origin: "--master".to_string(),
            }
        } else {
            return Err(KubeError::Config(
                "no api server: give --kubeconfig or --master, or run in a pod \
                 (KUBERNETES_SERVICE_HOST)"
                    .into(),
            ));
        };

        if let Some(m) = master {
            if s.origin != "--master" {
                s.origin.push_str(", server from --master");
            }
            s.server = m.to_string();
        }
        if let Some(t) = token_file {
            s.token = TokenSource::File(t.to_path_buf());
            s.origin.push_str(", token from --token-file");
        }
        if let Some(c) = ca_file {
            s.ca = Some(Material::File(c.to_path_buf()));
            s.origin.push_str(", ca from --ca-file");
        }
        s.server = validate_server(&s.server)?;
        Ok(s)
    }
}

/// Checks the scheme and host of a server URL and drops a trailing slash.
fn validate_server(server: &str) -> Result<String, KubeError> {
    let server = server.trim().trim_end_matches('/');
    let rest = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .ok_or_else(|| {
            KubeError::Config(format!(
                "server {server:?} must start with https:// (or http:// for plain http)"
            ))
        })?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(KubeError::Config(format!(
            "server {server:?} has no host (or has credentials in the url)"
        )));
    }
    Ok(server.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn in_cluster() {
        let e = env(&[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]);
        let s = ConnectionSettings::resolve(None, None, None, None, &e).unwrap();
        assert_eq!(s.server, "https://10.96.0.1:443");
        assert_eq!(
            s.token,
            TokenSource::File(PathBuf::from(format!("{SERVICE_ACCOUNT_DIR}/token")))
        );
        assert_eq!(
            s.ca,
            Some(Material::File(PathBuf::from(format!(
                "{SERVICE_ACCOUNT_DIR}/ca.crt"
            ))))
        );
        let e6 = env(&[
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]);
        let s = ConnectionSettings::resolve(None, None, None, None, &e6).unwrap();
        assert_eq!(s.server, "https://[fd00::1]:443");
    }

    #[test]
    fn master_with_token_and_ca_files() {
        let s = ConnectionSettings::resolve(
            None,
            Some("https://api.example:6443/"),
            Some(Path::new("/etc/kr/token")),
            Some(Path::new("/etc/kr/ca.crt")),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(s.server, "https://api.example:6443");
        assert_eq!(s.token, TokenSource::File("/etc/kr/token".into()));
        assert_eq!(s.ca, Some(Material::File("/etc/kr/ca.crt".into())));
    }

    #[test]
    fn explicit_flags_override_in_cluster() {
        let e = env(&[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]);
        let s = ConnectionSettings::resolve(None, Some("http://127.0.0.1:8080"), None, None, &e)
            .unwrap();
        assert_eq!(s.server, "http://127.0.0.1:8080");
        assert!(s.origin.contains("in-cluster") && s.origin.contains("--master"));
    }

    #[test]
    fn nothing_configured_or_bad_url() {
        let e = ConnectionSettings::resolve(None, None, None, None, &env(&[])).unwrap_err();
        assert!(e.to_string().contains("no api server"), "{e}");
        for bad in [
            "10.0.0.1:6443",
            "ftp://x",
            "https://",
            "https://user:pw@host",
        ] {
            let r = ConnectionSettings::resolve(None, Some(bad), None, None, &env(&[]));
            assert!(matches!(r, Err(KubeError::Config(_))), "{bad}: {r:?}");
        }
    }

    #[test]
    fn kubeconfig_file_and_override() {
        let dir = std::env::temp_dir().join(format!("kr-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubelet.conf");
        std::fs::write(
            &path,
            "clusters:\n- name: c\n  cluster: {server: 'https://1.2.3.4:6443', certificate-authority: ca.crt}\n\
             users:\n- name: u\n  user: {token: s3cr3t-t0ken}\n\
             contexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        )
        .unwrap();
        let s = ConnectionSettings::resolve(Some(&path), None, None, None, &env(&[])).unwrap();
        assert_eq!(s.server, "https://1.2.3.4:6443");
        assert_eq!(s.ca, Some(Material::File(dir.join("ca.crt"))));
        assert!(matches!(s.token, TokenSource::Inline(_)));
        assert!(
            !format!("{s:?}").contains("s3cr3t"),
            "token leaked into Debug"
        );
        let s = ConnectionSettings::resolve(
            Some(&path),
            Some("https://5.6.7.8:6443"),
            Some(Path::new("/t")),
            None,
            &env(&[]),
        )
        .unwrap();
        assert_eq!(s.server, "https://5.6.7.8:6443");
        assert_eq!(s.token, TokenSource::File("/t".into()));
        let missing =
            ConnectionSettings::resolve(Some(&dir.join("nope.conf")), None, None, None, &env(&[]))
                .unwrap_err();
        assert!(
            missing.to_string().starts_with("read kubeconfig file"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn inline_key_material_is_not_printed() {
        let m = Material::Inline(b"-----BEGIN PRIVATE KEY-----secret".to_vec());
        assert_eq!(format!("{m:?}"), "Inline(<33 bytes>)");
    }
}
