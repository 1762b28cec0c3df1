#![no_main]
//! The socket layer's framing of kernel datagrams: `split` (nlmsghdr walk) and `ack_result`
//! (errno and extended-ack TLVs) on every message, as `NlSocket::request`, `dump` and `batch`
//! run them on each received datagram. Both are crate-private, so the module is compiled in
//! here by path.

#[path = "../../../src/netlink/socket.rs"]
#[allow(dead_code, unused_imports)]
mod socket;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(msgs) = socket::split(data) {
        for m in &msgs {
            let r = socket::ack_result(m);
            if let Err(e) = &r {
                std::hint::black_box((e.to_string(), e.errno(), e.message(), e.is_transient()));
            }
        }
    }
});
