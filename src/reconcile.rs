//! reconcile (to be written)
