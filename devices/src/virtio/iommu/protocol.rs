// SPDX-License-Identifier: Apache-2.0

//! virtio-iommu wire format (virtio 1.2 §5.13, spec source `device-types/iommu/description.tex`;
//! Linux `include/uapi/linux/virtio_iommu.h`). Names are the spec's, in Rust case, so grepping
//! the spec finds the code.
//!
//! Requests are framed as a device-readable part that starts with [`VirtioIommuReqHead`] and a
//! device-writable part that ends with [`VirtioIommuReqTail`]. The `VirtioIommuReq*` structs
//! below are the request *bodies*: what follows the head in the readable part. Every field is
//! little-endian ([`Le16`], [`Le32`], [`Le64`]).

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// Feature: `input_range` in the configuration is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// Feature: `domain_range` in the configuration is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// Feature: MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Feature (legacy): unattached endpoints are in bypass mode. Superseded by BYPASS_CONFIG.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// Feature: the PROBE request is available.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// Feature: the `VIRTIO_IOMMU_MAP_F_MMIO` flag is available.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// Feature: the `bypass` configuration field and `VIRTIO_IOMMU_ATTACH_F_BYPASS` are available.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// Request type: attach an endpoint to a domain (creating the domain).
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// Request type: detach an endpoint from a domain.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// Request type: map an IOVA range in a domain.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// Request type: unmap an IOVA range in a domain.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// Request type: ask for an endpoint's properties.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// Status: success.
pub const VIRTIO_IOMMU_S_OK: u8 = 0;
/// Status: virtio communication error.
pub const VIRTIO_IOMMU_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_IOMMU_S_UNSUPP: u8 = 2;
/// Status: internal device error.
pub const VIRTIO_IOMMU_S_DEVERR: u8 = 3;
/// Status: invalid parameters.
pub const VIRTIO_IOMMU_S_INVAL: u8 = 4;
/// Status: out-of-range parameters.
pub const VIRTIO_IOMMU_S_RANGE: u8 = 5;
/// Status: entry not found.
pub const VIRTIO_IOMMU_S_NOENT: u8 = 6;
/// Status: bad address.
pub const VIRTIO_IOMMU_S_FAULT: u8 = 7;
/// Status: insufficient resources.
pub const VIRTIO_IOMMU_S_NOMEM: u8 = 8;

/// MAP flag: endpoints may read the range.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: endpoints may write the range.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the range is memory-mapped I/O (needs `VIRTIO_IOMMU_F_MMIO`).
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// ATTACH flag: the domain is a bypass (identity) domain (needs `VIRTIO_IOMMU_F_BYPASS_CONFIG`).
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;

/// Probe property type: end of the property list.
pub const VIRTIO_IOMMU_PROBE_T_NONE: u16 = 0;
/// Probe property type: a reserved memory region ([`VirtioIommuProbeResvMem`]).
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// Mask of the type bits in a probe property's `type` field (bits 15:12 are reserved).
pub const VIRTIO_IOMMU_PROBE_T_MASK: u16 = 0xfff;

/// RESV_MEM subtype: the driver must not map these IOVAs; accesses fault.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: an MSI doorbell region, translated 1:1.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: internal error or a reason not listed below.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint accessed memory without being attached to a domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: no mapping, or a mapping without the needed permission.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;

/// Fault flag: the faulting access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the faulting access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: the faulting access was an instruction fetch (in the Linux header only).
pub const VIRTIO_IOMMU_FAULT_F_EXEC: u32 = 1 << 2;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// Head of every request (device-readable).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuReqHead {
    /// Request type (`VIRTIO_IOMMU_T_*`).
    pub type_: u8,
    /// Reserved; the device ignores it.
    pub reserved: [u8; 3],
}

/// Tail of every request (device-writable).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuReqTail {
    /// Status (`VIRTIO_IOMMU_S_*`).
    pub status: u8,
    /// Reserved; the device writes 0.
    pub reserved: [u8; 3],
}

/// ATTACH body: attach `endpoint` to `domain`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuReqAttach {
    /// Domain ID.
    pub domain: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// `VIRTIO_IOMMU_ATTACH_F_*`.
    pub flags: Le32,
    /// Must be zero.
    pub reserved: [u8; 4],
}

/// DETACH body: detach `endpoint` from `domain`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuReqDetach {
    /// Domain ID.
    pub domain: Le32,
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Ignored by the device.
    pub reserved: [u8; 8],
}

/// MAP body: map `[virt_start, virt_end]` (inclusive) to `phys_start` in `domain`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuReqMap {
    /// Domain ID.
    pub domain: Le32,
    /// First IOVA of the range.
    pub virt_start: Le64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: Le64,
    /// Guest-physical address `virt_start` maps to.
    pub phys_start: Le64,
    /// `VIRTIO_IOMMU_MAP_F_*`.
    pub flags: Le32,
}

/// UNMAP body: remove the mappings inside `[virt_start, virt_end]` (inclusive) in `domain`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuReqUnmap {
    /// Domain ID.
    pub domain: Le32,
    /// First IOVA of the range.
    pub virt_start: Le64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: Le64,
    /// Should be zero.
    pub reserved: [u8; 4],
}

/// PROBE body (device-readable part). The device-writable part is `probe_size` bytes of
/// properties followed by the tail.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug)]
pub struct VirtioIommuReqProbe {
    /// Endpoint ID.
    pub endpoint: Le32,
    /// Ignored by the device (room for future fields).
    pub reserved: [u8; 64],
}

impl Default for VirtioIommuReqProbe {
    fn default() -> Self {
        VirtioIommuReqProbe {
            endpoint: Le32::default(),
            reserved: [0; 64],
        }
    }
}

/// Header of a probe property. The next property starts `4 + length` bytes after this one.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuProbeProperty {
    /// Bits 11:0 type (`VIRTIO_IOMMU_PROBE_T_*`), bits 15:12 reserved.
    pub type_: Le16,
    /// Bytes after this header.
    pub length: Le16,
}

/// RESV_MEM probe property: a reserved IOVA range `[start, end]` (inclusive).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuProbeResvMem {
    /// Header; `type_` = RESV_MEM, `length` = 20.
    pub head: VirtioIommuProbeProperty,
    /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
    pub subtype: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// First reserved IOVA.
    pub start: Le64,
    /// Last reserved IOVA (inclusive).
    pub end: Le64,
}

/// Fault report written into an eventq buffer.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioIommuFault {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// Zero (Linux rejects events with non-zero bits here).
    pub reserved: [u8; 3],
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: Le32,
    /// Endpoint that faulted.
    pub endpoint: Le32,
    /// Zero.
    pub reserved1: Le32,
    /// Faulting IOVA, valid with `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
    pub address: Le64,
}

/// A 64-bit inclusive range in the configuration.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuRange64 {
    /// First value.
    pub start: Le64,
    /// Last value (inclusive).
    pub end: Le64,
}

/// A 32-bit inclusive range in the configuration.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuRange32 {
    /// First value.
    pub start: Le32,
    /// Last value (inclusive).
    pub end: Le32,
}

/// Device configuration space (40 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIommuConfig {
    /// Supported page sizes; the lowest set bit is the mapping granule.
    pub page_size_mask: Le64,
    /// IOVA range the device translates (with `VIRTIO_IOMMU_F_INPUT_RANGE`).
    pub input_range: VirtioIommuRange64,
    /// Valid domain IDs (with `VIRTIO_IOMMU_F_DOMAIN_RANGE`).
    pub domain_range: VirtioIommuRange32,
    /// Bytes of property space in PROBE replies (with `VIRTIO_IOMMU_F_PROBE`).
    pub probe_size: Le32,
    /// 1: unattached endpoints bypass the IOMMU (with `VIRTIO_IOMMU_F_BYPASS_CONFIG`).
    pub bypass: u8,
    /// Zero.
    pub reserved: [u8; 3],
}

/// Byte offset of `bypass` in [`VirtioIommuConfig`], the only driver-writable field.
pub const VIRTIO_IOMMU_CONFIG_BYPASS_OFFSET: usize = 36;

// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqHead {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqTail {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqAttach {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqDetach {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqMap {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqUnmap {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuReqProbe {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuProbeProperty {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuProbeResvMem {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuFault {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuRange64 {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuRange32 {}
// SAFETY: repr(C, packed) with only integer, byte-array or endian-integer fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioIommuConfig {}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn request_parts_match_spec_sizes() {
        // Total request sizes in the spec are head (4) + body + tail (4).
        assert_eq!(size_of::<VirtioIommuReqHead>(), 4);
        assert_eq!(size_of::<VirtioIommuReqTail>(), 4);
        assert_eq!(4 + size_of::<VirtioIommuReqAttach>() + 4, 24);
        assert_eq!(4 + size_of::<VirtioIommuReqDetach>() + 4, 24);
        assert_eq!(4 + size_of::<VirtioIommuReqMap>() + 4, 40);
        assert_eq!(4 + size_of::<VirtioIommuReqUnmap>() + 4, 32);
        // PROBE: properties start at offset 72 of the request.
        assert_eq!(4 + size_of::<VirtioIommuReqProbe>(), 72);
    }

    #[test]
    fn map_fields_sit_at_spec_offsets() {
        // Offsets in the spec count from the start of the request, i.e. include the head.
        assert_eq!(4 + offset_of!(VirtioIommuReqMap, virt_start), 8);
        assert_eq!(4 + offset_of!(VirtioIommuReqMap, virt_end), 16);
        assert_eq!(4 + offset_of!(VirtioIommuReqMap, phys_start), 24);
        assert_eq!(4 + offset_of!(VirtioIommuReqMap, flags), 32);
        assert_eq!(4 + offset_of!(VirtioIommuReqUnmap, reserved), 24);
        assert_eq!(4 + offset_of!(VirtioIommuReqAttach, flags), 12);
    }

    #[test]
    fn probe_properties_match_spec_sizes() {
        assert_eq!(size_of::<VirtioIommuProbeProperty>(), 4);
        assert_eq!(size_of::<VirtioIommuProbeResvMem>(), 24);
        assert_eq!(offset_of!(VirtioIommuProbeResvMem, start), 8);
    }

    #[test]
    fn fault_matches_spec_layout() {
        assert_eq!(size_of::<VirtioIommuFault>(), 24);
        assert_eq!(offset_of!(VirtioIommuFault, flags), 4);
        assert_eq!(offset_of!(VirtioIommuFault, endpoint), 8);
        assert_eq!(offset_of!(VirtioIommuFault, address), 16);
    }

    #[test]
    fn config_matches_spec_layout() {
        assert_eq!(size_of::<VirtioIommuConfig>(), 40);
        assert_eq!(offset_of!(VirtioIommuConfig, input_range), 8);
        assert_eq!(offset_of!(VirtioIommuConfig, domain_range), 24);
        assert_eq!(offset_of!(VirtioIommuConfig, probe_size), 32);
        assert_eq!(
            offset_of!(VirtioIommuConfig, bypass),
            VIRTIO_IOMMU_CONFIG_BYPASS_OFFSET
        );
    }
}
