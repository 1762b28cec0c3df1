//! dsr (to be written)
