//! Kubernetes API access: connection settings, typed objects and the list+watch loop
//! (SPEC K-1…K-5).
//!
//! Layout, core first:
//!
//! * [`types`] (core): the decoded objects ([`Node`], [`Service`], [`EndpointSlice`]) and the
//!   lenient list/event decoders;
//! * [`kubeconfig`] (core): a kubeconfig YAML text to the one context we use;
//! * [`watch`] (core): the pure list/watch state machine: bytes and status codes in, cache
//!   updates and "list now / watch now / wait until" out;
//! * [`settings`] (shell, files only): [`ConnectionSettings::resolve`];
//! * [`client`] (shell): [`Client`], one HTTP request per call, credentials re-read on change;
//! * [`tcp`] (shell): the client's TCP transport, with keepalive (SPEC S-5);
//! * [`driver`] (shell): [`spawn_watch`], the thread that feeds the state machine.
//!
//! The daemon sees only [`Update`]s: a [`Update::Replace`] after every successful (re)list, then
//! [`Update::Upsert`]/[`Update::Delete`] per watch event. No error ever produces a `Delete`
//! (SPEC K-4): while the API server is unreachable the last known state stands.

pub mod client;
pub mod driver;
pub mod error;
pub mod kubeconfig;
pub mod settings;
pub mod tcp;
pub mod types;
pub mod watch;

use serde::de::DeserializeOwned;

pub use client::{Client, ClientOptions};
pub use driver::{spawn_watch, Stop, WatchOptions, WatchStats};
pub use error::{KubeError, Secret};
pub use settings::ConnectionSettings;
pub use types::{EndpointSlice, Node, Service};
pub use watch::WatchConfig;

/// A change to the daemon's view of one resource type.
#[derive(Debug, Clone, PartialEq)]
pub enum Update<T> {
    /// A successful (re)list: the complete set. Objects not in it are gone.
    Replace(Vec<T>),
    /// An object was added or changed.
    Upsert(T),
    /// An object was deleted; this is the last known version of it.
    Delete(T),
}

/// A Kubernetes resource type that can be listed and watched.
pub trait Resource: DeserializeOwned + Clone + Send + 'static {
    /// Collection path, e.g. `/api/v1/nodes` (all namespaces for namespaced types).
    const PATH: &'static str;
    /// The object kind, e.g. `Node`.
    const KIND: &'static str;
    /// Cache key: `name` for cluster-scoped, `namespace/name` for namespaced objects; empty
    /// when the object has no name.
    fn key(&self) -> String;
    /// `metadata.resourceVersion`.
    fn resource_version(&self) -> &str;
}

/// The resource's plural name for log lines (`nodes`, `services`, `endpointslices`): the last
/// segment of [`Resource::PATH`].
pub fn resource_name<T: Resource>() -> &'static str {
    T::PATH.rsplit('/').next().unwrap_or(T::PATH)
}
