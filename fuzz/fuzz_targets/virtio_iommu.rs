//! cargo fuzz target `virtio_iommu`: see `vmm_fuzz::virtio_iommu`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_iommu::run(data));
