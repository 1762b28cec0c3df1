//! kube::client (to be written)
