//! kube::watch (to be written)
