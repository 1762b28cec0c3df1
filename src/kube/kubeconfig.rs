//! Kubeconfig YAML (as kubelet, kubeadm and k3s write it) to the one context kr-tunneld uses.
//!
//! Core module: a pure function of the file's text and its directory. It must never read files,
//! the environment or the clock, and never log; [`super::settings`] reads the file and any files
//! it names.
//!
//! What is understood (the kubeconfig v1 field names): `current-context`; `contexts[].context`
//! `{cluster, user}`; `clusters[].cluster` `{server, certificate-authority,
//! certificate-authority-data, tls-server-name, insecure-skip-tls-verify}`; `users[].user`
//! `{token, tokenFile, client-certificate, client-certificate-data, client-key,
//! client-key-data}`. Relative paths are relative to the kubeconfig's directory, as kubectl does.
//! Where kubectl lets `*-data` override the path form, so do we; `tokenFile` beats `token`
//! (client-go does the same: the file can rotate).
//!
//! Refused, with an error naming the field (decisions, see the module tests):
//! * `insecure-skip-tls-verify: true`: TLS is always verified (SPEC K-2); set
//!   `certificate-authority` instead.
//! * `exec`, `auth-provider`, `username`/`password`: credential plugins and basic auth are out
//!   of scope; a node daemon uses a token, a token file or a client certificate.
//! * `proxy-url`: not supported; refusing is safer than silently connecting directly.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use yaml_rust2::{Yaml, YamlLoader};

use super::error::Secret;
use super::settings::Material;

/// The selected context of a kubeconfig, with paths made absolute and `*-data` decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubeconfig {
    /// The context used (`current-context`, or the only context).
    pub context: String,
    /// The cluster's name.
    pub cluster: String,
    /// `cluster.server`.
    pub server: String,
    /// `certificate-authority-data` or `certificate-authority`.
    pub certificate_authority: Option<Material>,
    /// `tls-server-name`: the name to verify the server certificate against.
    pub tls_server_name: Option<String>,
    /// The user's name (empty when the context names none).
    pub user: String,
    /// Inline `token`, when there is no `tokenFile`.
    pub token: Option<Secret>,
    /// `tokenFile`.
    pub token_file: Option<PathBuf>,
    /// `client-certificate-data` or `client-certificate`.
    pub client_certificate: Option<Material>,
    /// `client-key-data` or `client-key`.
    pub client_key: Option<Material>,
}

/// Looks up `name` in a kubeconfig list (`clusters`, `contexts`, `users`) and returns the inner
/// mapping under `inner` (`cluster`, `context`, `user`).
fn named<'a>(doc: &'a Yaml, list: &str, inner: &str, name: &str) -> Option<&'a Yaml> {
    doc[list]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .map(|e| &e[inner])
}

/// A scalar as text: strings as they are; numbers and booleans as YAML wrote them.
fn text(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A non-empty scalar.
fn field(y: &Yaml, key: &str) -> Option<String> {
    text(&y[key]).filter(|s| !s.trim().is_empty())
}

fn truthy(y: &Yaml) -> bool {
    match y {
        Yaml::Boolean(b) => *b,
        Yaml::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// `<key>-data` (base64) if present, else `<key>` (a path, relative to `base`).
fn material(y: &Yaml, key: &str, base: &Path) -> Result<Option<Material>, String> {
    let data_key = format!("{key}-data");
    if let Some(data) = field(y, &data_key) {
        // Base64 in kubeconfigs is standard-alphabet and padded; tolerate line breaks that
        // hand-edited files sometimes have.
        let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| format!("{data_key} is not valid base64: {e}"))?;
        return Ok(Some(Material::Inline(bytes)));
    }
    Ok(field(y, key).map(|p| Material::File(base.join(p))))
}

/// Parses a kubeconfig. `base_dir` is the directory of the file, for relative paths.
///
/// The error text does not name the file; the caller adds it.
pub fn parse(text_in: &str, base_dir: &Path) -> Result<Kubeconfig, String> {
    let docs = YamlLoader::load_from_str(text_in).map_err(|e| format!("not valid yaml: {e}"))?;
    let doc = docs.first().ok_or("empty file")?;
    if !doc.is_hash() {
        return Err("not a kubeconfig (top level is not a mapping)".into());
    }

    let context = match field(doc, "current-context") {
        Some(c) => c,
        None => {
            // kubectl would fail here; a file with exactly one context is unambiguous, so we
            // use it (kubeadm and k3s files always set current-context anyway).
            let all: Vec<String> = doc["contexts"]
                .as_vec()
                .map(|v| v.iter().filter_map(|c| field(c, "name")).collect())
                .unwrap_or_default();
            match all.as_slice() {
                [only] => only.clone(),
                [] => return Err("no current-context and no contexts".into()),
                _ => return Err("no current-context and more than one context".into()),
            }
        }
    };
    let ctx = named(doc, "contexts", "context", &context)
        .ok_or_else(|| format!("context {context:?} not found"))?;
    let cluster =
        field(ctx, "cluster").ok_or_else(|| format!("context {context:?} names no cluster"))?;
    let c = named(doc, "clusters", "cluster", &cluster)
        .ok_or_else(|| format!("cluster {cluster:?} not found"))?;

    let server = field(c, "server").ok_or_else(|| format!("cluster {cluster:?} has no server"))?;
    if truthy(&c["insecure-skip-tls-verify"]) {
        return Err(format!(
            "cluster {cluster:?} sets insecure-skip-tls-verify: refused, kr-tunneld always \
             verifies tls (set certificate-authority or certificate-authority-data)"
        ));
    }
    if field(c, "proxy-url").is_some() {
        return Err(format!(
            "cluster {cluster:?} sets proxy-url, which is not supported"
        ));
    }
    let certificate_authority = material(c, "certificate-authority", base_dir)
        .map_err(|e| format!("cluster {cluster:?}: {e}"))?;
    let tls_server_name = field(c, "tls-server-name");

    let user = field(ctx, "user").unwrap_or_default();
    let mut out = Kubeconfig {
        context,
        cluster,
        server,
        certificate_authority,
        tls_server_name,
        user: user.clone(),
        token: None,
        token_file: None,
        client_certificate: None,
        client_key: None,
    };
    if user.is_empty() {
        return Ok(out);
    }
    let u = named(doc, "users", "user", &user).ok_or_else(|| format!("user {user:?} not found"))?;
    for unsupported in ["exec", "auth-provider", "username", "password"] {
        if !u[unsupported].is_badvalue() && !u[unsupported].is_null() {
            return Err(format!(
                "user {user:?} uses {unsupported}, which is not supported (use token, tokenFile \
                 or client-certificate)"
            ));
        }
    }
    out.token_file = field(u, "tokenFile").map(|p| base_dir.join(p));
    if out.token_file.is_none() {
        out.token = field(u, "token").map(|t| Secret::new(&t));
    }
    out.client_certificate =
        material(u, "client-certificate", base_dir).map_err(|e| format!("user {user:?}: {e}"))?;
    out.client_key =
        material(u, "client-key", base_dir).map_err(|e| format!("user {user:?}: {e}"))?;
    if out.client_certificate.is_some() != out.client_key.is_some() {
        return Err(format!(
            "user {user:?} has a client certificate without a key or a key without a certificate"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /etc/kubernetes/kubelet.conf as kubeadm 1.28 writes it after TLS bootstrap: CA inline,
    /// client certificate and key as paths to the rotating kubelet-client-current.pem.
    const KUBELET_CONF: &str = "\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUMKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=
    server: https://192.168.100.10:6443
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: system:node:node1
  name: system:node:node1@kubernetes
current-context: system:node:node1@kubernetes
kind: Config
preferences: {}
users:
- name: system:node:node1
  user:
    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem
    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem
";

    /// kubeadm's /etc/kubernetes/admin.conf: everything inline (`*-data`).
    const ADMIN_CONF: &str = "\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0EtUEVN
    server: https://cp.example.internal:6443
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: kubernetes-admin
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
kind: Config
preferences: {}
users:
- name: kubernetes-admin
  user:
    client-certificate-data: Q0VSVC1QRU0=
    client-key-data: S0VZLVBFTQ==
";

    /// k3s's /etc/rancher/k3s/k3s.yaml: cluster, context and user all named `default`.
    const K3S_YAML: &str = "\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0EtUEVN
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: Q0VSVC1QRU0=
    client-key-data: S0VZLVBFTQ==
";

    #[test]
    fn kubelet_conf_with_certificate_paths() {
        let k = parse(KUBELET_CONF, Path::new("/etc/kubernetes")).unwrap();
        assert_eq!(k.context, "system:node:node1@kubernetes");
        assert_eq!(k.server, "https://192.168.100.10:6443");
        match &k.certificate_authority {
            Some(Material::Inline(pem)) => {
                assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----"))
            }
            other => panic!("{other:?}"),
        }
        let pem = PathBuf::from("/var/lib/kubelet/pki/kubelet-client-current.pem");
        assert_eq!(k.client_certificate, Some(Material::File(pem.clone())));
        assert_eq!(k.client_key, Some(Material::File(pem)));
        assert_eq!(k.token, None);
        assert_eq!(k.tls_server_name, None);
    }

    #[test]
    fn kubeadm_admin_conf_with_inline_data() {
        let k = parse(ADMIN_CONF, Path::new("/etc/kubernetes")).unwrap();
        assert_eq!(k.user, "kubernetes-admin");
        assert_eq!(k.server, "https://cp.example.internal:6443");
        assert_eq!(
            k.certificate_authority,
            Some(Material::Inline(b"CA-PEM".to_vec()))
        );
        assert_eq!(
            k.client_certificate,
            Some(Material::Inline(b"CERT-PEM".to_vec()))
        );
        assert_eq!(k.client_key, Some(Material::Inline(b"KEY-PEM".to_vec())));
    }

    #[test]
    fn k3s_yaml() {
        let k = parse(K3S_YAML, Path::new("/etc/rancher/k3s")).unwrap();
        assert_eq!(k.context, "default");
        assert_eq!(k.cluster, "default");
        assert_eq!(k.server, "https://127.0.0.1:6443");
        assert_eq!(k.client_key, Some(Material::Inline(b"KEY-PEM".to_vec())));
    }

    #[test]
    fn token_file_relative_path_and_tls_server_name() {
        let y = "\
clusters:
- name: c
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority: pki/ca.crt
    tls-server-name: kubernetes.default.svc
users:
- name: u
  user:
    token: inline-token
    tokenFile: tokens/node.token
contexts:
- name: only
  context: {cluster: c, user: u}
";
        // No current-context: the only context is used.
        let k = parse(y, Path::new("/etc/kr")).unwrap();
        assert_eq!(k.context, "only");
        assert_eq!(
            k.certificate_authority,
            Some(Material::File("/etc/kr/pki/ca.crt".into()))
        );
        assert_eq!(k.tls_server_name.as_deref(), Some("kubernetes.default.svc"));
        assert_eq!(
            k.token_file,
            Some(PathBuf::from("/etc/kr/tokens/node.token"))
        );
        assert_eq!(k.token, None, "tokenFile wins over token");
        // The token never shows in Debug.
        let y2 = y.replace("    tokenFile: tokens/node.token\n", "");
        let k2 = parse(&y2, Path::new("/etc/kr")).unwrap();
        assert_eq!(k2.token.as_ref().map(Secret::expose), Some("inline-token"));
        assert!(!format!("{k2:?}").contains("inline-token"));
    }

    #[test]
    fn current_context_selects_among_several() {
        let y = ADMIN_CONF.replace(
            "contexts:\n",
            "contexts:\n- name: first\n  context: {cluster: nowhere, user: nobody}\n",
        );
        let k = parse(&y, Path::new("/")).unwrap();
        assert_eq!(k.context, "kubernetes-admin@kubernetes");
        assert_eq!(k.user, "kubernetes-admin");
        let y = y.replace("current-context: kubernetes-admin@kubernetes\n", "");
        let e = parse(&y, Path::new("/")).unwrap_err();
        assert!(e.contains("more than one context"), "{e}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let insecure = K3S_YAML.replace(
            "    server: https://127.0.0.1:6443\n",
            "    server: https://127.0.0.1:6443\n    insecure-skip-tls-verify: true\n",
        );
        let e = parse(&insecure, Path::new("/")).unwrap_err();
        assert!(e.contains("insecure-skip-tls-verify"), "{e}");
        assert!(e.contains("always verifies tls"), "{e}");

        let exec = K3S_YAML.replace(
            "    client-certificate-data: Q0VSVC1QRU0=\n    client-key-data: S0VZLVBFTQ==\n",
            "    exec:\n      command: aws\n",
        );
        assert!(parse(&exec, Path::new("/")).unwrap_err().contains("exec"));

        let nokey = K3S_YAML.replace("    client-key-data: S0VZLVBFTQ==\n", "");
        assert!(parse(&nokey, Path::new("/"))
            .unwrap_err()
            .contains("without a key"));

        let badb64 = K3S_YAML.replace("Q0EtUEVN", "not*base64");
        assert!(parse(&badb64, Path::new("/"))
            .unwrap_err()
            .contains("base64"));

        let wrong_ctx = K3S_YAML.replace("current-context: default", "current-context: prod");
        assert!(parse(&wrong_ctx, Path::new("/"))
            .unwrap_err()
            .contains("\"prod\" not found"));

        let noserver = K3S_YAML.replace("    server: https://127.0.0.1:6443\n", "");
        assert!(parse(&noserver, Path::new("/"))
            .unwrap_err()
            .contains("no server"));

        assert!(parse("", Path::new("/")).is_err());
        assert!(parse("- a\n- b\n", Path::new("/")).is_err());
        assert!(parse("key: [unclosed", Path::new("/")).is_err());
    }

    #[test]
    fn insecure_false_is_fine() {
        let y = K3S_YAML.replace(
            "    server: https://127.0.0.1:6443\n",
            "    server: https://127.0.0.1:6443\n    insecure-skip-tls-verify: false\n",
        );
        assert!(parse(&y, Path::new("/")).is_ok());
    }
}
