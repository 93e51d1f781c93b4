//! cargo fuzz target `remap_unit`: see `vmm_fuzz::remap_unit`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::remap_unit::run(data));
