//! cargo fuzz target `virtio_blk`: see `vmm_fuzz::virtio_blk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_blk::run(data));
