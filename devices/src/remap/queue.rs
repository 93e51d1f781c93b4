// SPDX-License-Identifier: Apache-2.0

//! Invalidation-queue descriptors (VT-d 6.5.2), legacy 128-bit format, decoded without side
//! effects; the register model ([`RemapUnit`](super::RemapUnit)) fetches them from guest memory and acts on them.
//!
//! The type is bits 3:0 of the low quadword plus bits 11:9 as type bits 6:4. This unit only
//! caches interrupt-remapping entries, so descriptors for the DMA-side caches are accepted and
//! ignored (without checking their fields); interrupt-entry-cache and wait descriptors are
//! checked for reserved bits as the spec requires.

use std::ops::Range;

/// Descriptor type: context-cache invalidation.
pub const QI_CC_TYPE: u8 = 0x1;
/// Descriptor type: IOTLB invalidation.
pub const QI_IOTLB_TYPE: u8 = 0x2;
/// Descriptor type: device-TLB invalidation.
pub const QI_DIOTLB_TYPE: u8 = 0x3;
/// Descriptor type: interrupt entry cache invalidation.
pub const QI_IEC_TYPE: u8 = 0x4;
/// Descriptor type: invalidation wait.
pub const QI_IWD_TYPE: u8 = 0x5;
/// Descriptor type: PASID-based IOTLB invalidation.
pub const QI_EIOTLB_TYPE: u8 = 0x6;
/// Descriptor type: PASID-based device-TLB invalidation.
pub const QI_DEIOTLB_TYPE: u8 = 0x7;
/// Descriptor type: PASID-cache invalidation.
pub const QI_PC_TYPE: u8 = 0x8;

/// IEC bit 4: granularity, 0 global, 1 index-selective (Linux `QI_IEC_SELECTIVE`).
const QI_IEC_SELECTIVE: u64 = 1 << 4;
/// IEC bits 31:27: index mask, 2^IM entries.
const QI_IEC_IM_SHIFT: u32 = 27;
/// IEC bits 47:32: interrupt index.
const QI_IEC_IIDX_SHIFT: u32 = 32;
/// IEC reserved bits in the low quadword: 8:5, 26:12, 63:48 (11:9 are type bits).
const QI_IEC_RSVD_LO: u64 = (0xf << 5) | (0x7fff << 12) | (0xffff << 48);

/// Wait bit 4: interrupt flag.
const QI_IWD_IF: u64 = 1 << 4;
/// Wait bit 5: status write.
const QI_IWD_SW: u64 = 1 << 5;
/// Wait bit 6: fence.
const QI_IWD_FN: u64 = 1 << 6;
/// Wait bits 63:32: status data.
const QI_IWD_STATUS_DATA_SHIFT: u32 = 32;
/// Wait reserved bits in the low quadword: 8:7 (PD needs page requests, ECAP.PRS = 0) and
/// 31:12.
const QI_IWD_RSVD_LO: u64 = (0x3 << 7) | (0xf_ffff << 12);
/// Wait reserved bits in the high quadword: the status address is 4-byte aligned.
const QI_IWD_RSVD_HI: u64 = 0x3;

/// Number of 128-bit descriptors in one 4 KiB queue page.
const DESCRIPTORS_PER_PAGE: u32 = 4096 / 16;

/// Which interrupt-entry-cache entries a descriptor invalidates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IecScope {
    /// Every entry.
    Global,
    /// The entries with these indices: 2^IM entries from IIDX with its low IM bits cleared.
    Indices(Range<u32>),
}

/// A decoded, well-formed descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// An invalidation of a cache this unit does not have (context, IOTLB, device-TLB,
    /// PASID-based caches): nothing to do.
    Ignored {
        /// The descriptor type.
        kind: u8,
    },
    /// Interrupt entry cache invalidation.
    InterruptEntryCache(IecScope),
    /// Invalidation wait: everything before it is complete once it is processed.
    Wait {
        /// SW: write `data` (4 bytes) to guest-physical `address`.
        status_write: Option<(u64, u32)>,
        /// IF: signal completion through ICS.IWC and the invalidation-completion event.
        interrupt: bool,
        /// FN: fence (meaningless for a unit that completes everything in order, at once).
        fence: bool,
    },
}

/// Why a descriptor is malformed, as an IQERCD.IQEI code (VT-d 11.4.7.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorError {
    /// IQEI 3: type not defined (or not usable in legacy 128-bit mode).
    InvalidType(u8),
    /// IQEI 4: reserved fields set.
    ReservedField,
}

impl DescriptorError {
    /// The IQEI code for the Invalidation Queue Error Record register.
    pub fn iqei(self) -> u64 {
        match self {
            DescriptorError::InvalidType(_) => IQEI_INVALID_DESCRIPTOR_TYPE,
            DescriptorError::ReservedField => IQEI_RESERVED_FIELD,
        }
    }
}

/// IQEI: no further information.
pub const IQEI_INFO_NOT_AVAILABLE: u64 = 0;
/// IQEI: tail pointer beyond the queue or not descriptor-aligned.
pub const IQEI_INVALID_TAIL: u64 = 1;
/// IQEI: a descriptor could not be fetched.
pub const IQEI_FETCH_ERROR: u64 = 2;
/// IQEI: invalid descriptor type.
pub const IQEI_INVALID_DESCRIPTOR_TYPE: u64 = 3;
/// IQEI: reserved field set in a descriptor.
pub const IQEI_RESERVED_FIELD: u64 = 4;
/// IQEI: descriptor width not supported (IQA.DW = 1 without scalable mode).
pub const IQEI_INVALID_WIDTH: u64 = 5;

/// The descriptor type: bits 3:0, and bits 11:9 as bits 6:4.
pub fn descriptor_type(qw0: u64) -> u8 {
    // Masked to 7 bits, so the cast is lossless.
    ((qw0 & 0xf) | ((qw0 >> 9) & 0x7) << 4) as u8
}

/// Decodes one 128-bit descriptor (`qw0` low quadword, `qw1` high quadword).
pub fn decode(qw0: u64, qw1: u64) -> Result<Descriptor, DescriptorError> {
    match descriptor_type(qw0) {
        kind @ (QI_CC_TYPE | QI_IOTLB_TYPE | QI_DIOTLB_TYPE | QI_EIOTLB_TYPE | QI_DEIOTLB_TYPE
        | QI_PC_TYPE) => Ok(Descriptor::Ignored { kind }),
        QI_IEC_TYPE => {
            if qw0 & QI_IEC_RSVD_LO != 0 || qw1 != 0 {
                return Err(DescriptorError::ReservedField);
            }
            if qw0 & QI_IEC_SELECTIVE == 0 {
                return Ok(Descriptor::InterruptEntryCache(IecScope::Global));
            }
            let mask = ((qw0 >> QI_IEC_IM_SHIFT) & 0x1f) as u32;
            let index = ((qw0 >> QI_IEC_IIDX_SHIFT) & 0xffff) as u32;
            Ok(Descriptor::InterruptEntryCache(IecScope::Indices(
                iec_range(index, mask),
            )))
        }
        QI_IWD_TYPE => {
            if qw0 & QI_IWD_RSVD_LO != 0 || qw1 & QI_IWD_RSVD_HI != 0 {
                return Err(DescriptorError::ReservedField);
            }
            let data = (qw0 >> QI_IWD_STATUS_DATA_SHIFT) as u32;
            Ok(Descriptor::Wait {
                status_write: (qw0 & QI_IWD_SW != 0).then_some((qw1, data)),
                interrupt: qw0 & QI_IWD_IF != 0,
                fence: qw0 & QI_IWD_FN != 0,
            })
        }
        kind => Err(DescriptorError::InvalidType(kind)),
    }
}

/// The indices an index-selective IEC with IIDX `index` and IM `mask` covers. A mask above 16
/// (beyond any MHMV) covers the whole 16-bit index space.
fn iec_range(index: u32, mask: u32) -> Range<u32> {
    let count = 1u32 << mask.min(16);
    let start = index & !(count - 1);
    start..start + count
}

/// Geometry of the invalidation queue, from an IQA register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Guest-physical base (4 KiB aligned).
    pub base: u64,
    /// Number of 128-bit descriptors: 2^QS pages of 256.
    pub entries: u32,
    /// DW: 256-bit descriptors requested (unsupported without scalable mode).
    pub wide: bool,
}

impl QueueConfig {
    /// IQA bits 63:12: queue base.
    pub const IQA_BASE_MASK: u64 = !0xfff;
    /// IQA bit 11: descriptor width.
    pub const IQA_DW: u64 = 1 << 11;
    /// IQA bits 2:0: queue size QS.
    pub const IQA_QS_MASK: u64 = 0x7;

    /// Decodes an IQA register value.
    pub fn from_iqa(iqa: u64) -> QueueConfig {
        QueueConfig {
            base: iqa & Self::IQA_BASE_MASK,
            entries: DESCRIPTORS_PER_PAGE << (iqa & Self::IQA_QS_MASK),
            wide: iqa & Self::IQA_DW != 0,
        }
    }

    /// Guest-physical address of descriptor slot `slot`; `None` if it would overflow.
    pub fn slot_address(&self, slot: u32) -> Option<u64> {
        self.base.checked_add(u64::from(slot) * 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_includes_bits_11_9() {
        assert_eq!(descriptor_type(0x4), 4);
        assert_eq!(descriptor_type(1 << 9 | 0x4), 0x14);
        assert_eq!(
            decode(1 << 9 | 0x4, 0),
            Err(DescriptorError::InvalidType(0x14))
        );
    }

    #[test]
    fn global_iec_is_linux_qi_global_iec() {
        // qi_global_iec: qw0 = QI_IEC_TYPE, qw1 = 0.
        assert_eq!(
            decode(0x4, 0),
            Ok(Descriptor::InterruptEntryCache(IecScope::Global))
        );
    }

    #[test]
    fn selective_iec_covers_2_pow_im_aligned_entries() {
        // qi_flush_iec(index 0x20, mask 0): IIDX << 32 | TYPE | IM << 27 | SELECTIVE.
        let one = 0x20u64 << 32 | 0x4 | QI_IEC_SELECTIVE;
        assert_eq!(
            decode(one, 0),
            Ok(Descriptor::InterruptEntryCache(IecScope::Indices(
                0x20..0x21
            )))
        );
        // mask 3 → 8 entries; a misaligned IIDX is rounded down.
        let eight = 0x23u64 << 32 | 3 << 27 | 0x4 | QI_IEC_SELECTIVE;
        assert_eq!(
            decode(eight, 0),
            Ok(Descriptor::InterruptEntryCache(IecScope::Indices(
                0x20..0x28
            )))
        );
        // The largest mask the field holds covers everything.
        let all = 0xffffu64 << 32 | 31 << 27 | 0x4 | QI_IEC_SELECTIVE;
        assert_eq!(
            decode(all, 0),
            Ok(Descriptor::InterruptEntryCache(IecScope::Indices(
                0..0x1_0000
            )))
        );
    }

    #[test]
    fn iec_reserved_bits_are_errors() {
        for bit in [5u32, 8, 12, 26, 48, 63] {
            assert_eq!(
                decode(0x4 | 1 << bit, 0),
                Err(DescriptorError::ReservedField),
                "bit {bit}"
            );
        }
        assert_eq!(decode(0x4, 1), Err(DescriptorError::ReservedField));
    }

    #[test]
    fn wait_is_linux_qi_submit_sync_wait() {
        // QI_IWD_STATUS_DATA(QI_DONE = 2) | QI_IWD_STATUS_WRITE | QI_IWD_TYPE.
        let qw0 = 2u64 << 32 | QI_IWD_SW | 0x5;
        assert_eq!(
            decode(qw0, 0x1234_5678),
            Ok(Descriptor::Wait {
                status_write: Some((0x1234_5678, 2)),
                interrupt: false,
                fence: false,
            })
        );
        assert_eq!(
            decode(0x5 | QI_IWD_IF | QI_IWD_FN, 0),
            Ok(Descriptor::Wait {
                status_write: None,
                interrupt: true,
                fence: true,
            })
        );
    }

    #[test]
    fn wait_reserved_bits_are_errors() {
        for bit in [7u32, 8, 12, 31] {
            assert_eq!(
                decode(0x5 | 1 << bit, 0),
                Err(DescriptorError::ReservedField),
                "bit {bit}"
            );
        }
        // Status address not 4-byte aligned.
        assert_eq!(
            decode(0x5 | QI_IWD_SW, 0x1002),
            Err(DescriptorError::ReservedField)
        );
    }

    #[test]
    fn dma_side_descriptors_are_ignored_and_unknown_types_fail() {
        for kind in [1u8, 2, 3, 6, 7, 8] {
            assert_eq!(
                decode(u64::from(kind) | 0xffff_0000, 0xff),
                Ok(Descriptor::Ignored { kind })
            );
        }
        for kind in [0u64, 9, 0xf] {
            assert_eq!(
                decode(kind, 0),
                Err(DescriptorError::InvalidType(kind as u8))
            );
        }
        assert_eq!(DescriptorError::InvalidType(0).iqei(), 3);
        assert_eq!(DescriptorError::ReservedField.iqei(), 4);
    }

    #[test]
    fn iqa_decodes_base_size_and_width() {
        let q = QueueConfig::from_iqa(0x7654_3000 | 2);
        assert_eq!(
            q,
            QueueConfig {
                base: 0x7654_3000,
                entries: 1024,
                wide: false
            }
        );
        assert_eq!(QueueConfig::from_iqa(0).entries, 256);
        assert!(QueueConfig::from_iqa(QueueConfig::IQA_DW).wide);
        assert_eq!(q.slot_address(2), Some(0x7654_3020));
    }
}
