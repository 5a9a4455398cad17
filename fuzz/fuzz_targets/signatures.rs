//! Any bytes as a webhook request to every signature scheme of `waymark ingest`:
//! the header parsers never panic and no forged signature is accepted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    waymark_fuzz_support::signatures(data);
});
