//! nodes (to be written)
