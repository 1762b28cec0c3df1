//! kube::types (to be written)
