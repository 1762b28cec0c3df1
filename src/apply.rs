//! apply (to be written)
