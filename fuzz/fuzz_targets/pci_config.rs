//! cargo fuzz target `pci_config`: see `vmm_fuzz::pci_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::pci_config::run(data));
