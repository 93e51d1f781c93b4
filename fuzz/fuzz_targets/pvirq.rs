//! cargo fuzz target `pvirq`: see `vmm_fuzz::pvirq`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pvirq::run(data));
