//! kube::kubeconfig (to be written)
