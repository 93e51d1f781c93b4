//! cargo fuzz target `msix`: see `vmm_fuzz::msix`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::msix::run(data));
