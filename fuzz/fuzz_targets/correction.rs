//! Any bytes as a control-topic record (a correction), applied to the state a
//! scenario left: never a panic, and only retractions or a dead letter out.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    waymark_fuzz_support::correction(data);
});
