//! cargo fuzz target `virtio_pci`: see `vmm_fuzz::virtio_pci`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_pci::run(data));
