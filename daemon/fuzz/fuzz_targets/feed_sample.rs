//! A message on an MQTT feed topic, as any device on the site may publish it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ternd::fuzzing::feed_sample(data));
