//! A fleet command's payload, as it arrives on `tern/<device>/cmd/<name>`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ternd::fuzzing::command(data));
