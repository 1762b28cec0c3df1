//! BGP: a minimal iBGP speaker so that a kr-tunneld node can join a kube-router cluster
//! (SPEC section 9, B-1…B-8; `reference/kube-router-bgp.md`).
//!
//! * [`codec`] (core): the messages, golden-tested against GoBGP's bytes and fuzzed;
//! * [`session`] (core): one peer's RFC 4271 state machine, events in, actions out, time passed
//!   in as `now`; peer selection from Nodes as kube-router does it;
//! * [`speaker`] (shell): blocking TCP sockets, one reader thread per connection, one thread
//!   that owns every session and the timers, fed through a channel.
//!
//! The speaker announces this node's pod CIDRs and nothing else. What peers announce is kept
//! for `kr-tunneld status` and metrics only: tunnels and routes still come from Node objects.

pub mod codec;
pub mod session;
