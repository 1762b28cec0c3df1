#![no_main]
// Body: kr_tunneld_fuzz::bgp (tests/fuzz/targets.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| kr_tunneld_fuzz::bgp(data));
