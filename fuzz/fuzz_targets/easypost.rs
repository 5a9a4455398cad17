//! Any bytes as a easypost webhook body: normalize must return events or a dead-letter
//! reason, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    waymark_fuzz_support::normalize("easypost", data);
});
