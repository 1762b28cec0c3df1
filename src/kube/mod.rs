//! Kubernetes API access: connection settings, typed objects and the list+watch loop.

pub mod client;
pub mod kubeconfig;
pub mod types;
pub mod watch;
