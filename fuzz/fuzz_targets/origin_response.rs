//! Fuzz target: `xds_relay::fuzzing::origin_response` (see that function for the input format and invariants).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xds_relay::fuzzing::origin_response(data));
