//! Any line as a kcat -J archive line, then through the whole core pipeline
//! (in-memory state): never a panic, whatever the envelope or body.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    waymark_fuzz_support::envelope_line(data);
});
