//! Errors of the Kubernetes API client, and [`Secret`], the token holder that never prints.
//!
//! Core module: plain data and formatting. It must never log, and nothing in it may print a
//! token: `Display` and `Debug` of every type here are safe to log.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A bearer token (or any other credential string).
///
/// `Debug` prints only its length, and there is no `Display`: the only way to the text is
/// [`Secret::expose`], which is called where the `Authorization` header is built.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential. Surrounding whitespace (a trailing newline in a token file) is removed.
    pub fn new(text: &str) -> Secret {
        Secret(text.trim().to_string())
    }

    /// The credential itself. Call it only to build a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the credential is empty (an empty token file).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

/// Everything that can go wrong talking to the API server or preparing to.
///
/// `Display` is lowercase, unpunctuated and names the object (a file, a URL path, a kubeconfig).
#[derive(Debug)]
#[non_exhaustive]
pub enum KubeError {
    /// The connection settings are unusable (missing server, unsupported kubeconfig feature,
    /// `insecure-skip-tls-verify`, a malformed URL). Fatal: fix the configuration.
    Config(String),
    /// A kubeconfig could not be parsed or lacks what is needed.
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file named by the settings (token, CA, client certificate or key) could not be read.
    ReadFile {
        /// What the file was for: "token", "ca", "client certificate", "client key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// PEM material (CA, client certificate or key) could not be parsed.
    Pem {
        /// What the material was for and where it came from.
        what: String,
        /// The parser's complaint.
        reason: String,
    },
    /// TLS failed: the server's certificate was not trusted (wrong CA, wrong name), or the server
    /// rejected our client certificate. Never retried into success by itself; fails closed.
    Tls {
        /// The server URL.
        server: String,
        /// The TLS library's message, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
    },
    /// The server could not be reached or the connection broke (refused, reset, DNS, EOF).
    Transport {
        /// What was being done, e.g. `get /api/v1/nodes`.
        op: String,
        /// The I/O or protocol error text.
        reason: String,
    },
    /// A connect or read timeout.
    Timeout {
        /// What was being done.
        op: String,
        /// Which timeout fired.
        reason: String,
    },
    /// The server answered with an HTTP error status (or an `ERROR` event carrying one).
    Status {
        /// What was being done.
        op: String,
        /// HTTP status code (e.g. 401, 410, 429, 500).
        code: u16,
        /// The `Status.message` from the body when there was one, else the reason phrase.
        message: String,
        /// `Retry-After` (or `Status.details.retryAfterSeconds`), when given.
        retry_after: Option<Duration>,
    },
    /// A response body was not the JSON we expected.
    Decode {
        /// What was being decoded.
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The client was shut down (a [`crate::kube::Stop`] was triggered).
    Stopped,
}

impl KubeError {
    /// True when retrying later may succeed without anyone changing the configuration:
    /// transport failures, timeouts, HTTP 5xx, 429, 408 and 410 (which means "relist").
    /// Configuration, TLS verification, 401/403/404 and decode errors are not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            KubeError::Transport { .. } | KubeError::Timeout { .. } => true,
            KubeError::Status { code, .. } => matches!(code, 408 | 410 | 429 | 500..=599),
            KubeError::Config(_)
            | KubeError::Kubeconfig { .. }
            | KubeError::ReadFile { .. }
            | KubeError::Pem { .. }
            | KubeError::Tls { .. }
            | KubeError::Decode { .. }
            | KubeError::Stopped => false,
        }
    }

    /// The HTTP status code, for [`KubeError::Status`].
    pub fn status_code(&self) -> Option<u16> {
        match self {
            KubeError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for KubeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KubeError::Config(msg) => write!(f, "connection settings: {msg}"),
            KubeError::Kubeconfig { path, reason } => {
                write!(f, "kubeconfig {}: {reason}", path.display())
            }
            KubeError::ReadFile { what, path, source } => {
                write!(f, "read {what} file {}: {source}", path.display())
            }
            KubeError::Pem { what, reason } => write!(f, "parse {what}: {reason}"),
            KubeError::Tls { server, reason } => write!(
                f,
                "tls with {server} failed (certificate not trusted or rejected; check the ca and \
                 client certificate): {reason}"
            ),
            KubeError::Transport { op, reason } => write!(f, "{op}: {reason}"),
            KubeError::Timeout { op, reason } => write!(f, "{op}: timeout: {reason}"),
            KubeError::Status {
                op, code, message, ..
            } => {
                write!(f, "{op}: http {code}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            KubeError::Decode { what, reason } => write!(f, "decode {what}: {reason}"),
            KubeError::Stopped => f.write_str("client stopped"),
        }
    }
}

impl std::error::Error for KubeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KubeError::ReadFile { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("eyJhbGciOiJSUzI1NiJ9.very-secret\n");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("very-secret"), "{dbg}");
        assert!(dbg.contains("redacted"));
        assert_eq!(s.expose(), "eyJhbGciOiJSUzI1NiJ9.very-secret");
    }

    #[test]
    fn transient_classification() {
        let st = |code| KubeError::Status {
            op: "list nodes".into(),
            code,
            message: String::new(),
            retry_after: None,
        };
        assert!(st(500).is_transient());
        assert!(st(503).is_transient());
        assert!(st(429).is_transient());
        assert!(st(410).is_transient());
        assert!(!st(401).is_transient());
        assert!(!st(403).is_transient());
        assert!(!KubeError::Tls {
            server: "https://x".into(),
            reason: "invalid peer certificate: UnknownIssuer".into()
        }
        .is_transient());
        assert_eq!(st(404).to_string(), "list nodes: http 404");
    }
}
