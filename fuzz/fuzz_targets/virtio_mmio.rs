//! cargo fuzz target `virtio_mmio`: see `vmm_fuzz::virtio_mmio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_mmio::run(data));
