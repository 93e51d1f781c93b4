//! cargo fuzz target `ioapic`: see `vmm_fuzz::ioapic`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::ioapic::run(data));
