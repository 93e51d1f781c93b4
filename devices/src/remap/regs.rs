// SPDX-License-Identifier: Apache-2.0

//! Register offsets and bits of the remapping unit's 4 KiB register page, named as in Linux
//! `drivers/iommu/intel/iommu.h` (offsets from the VT-d spec, chapter 11), and the capability
//! values this unit reports.

/// Size of the register page (one 4 KiB page; the DRHD size field is 0).
pub const REMAP_UNIT_SIZE: u64 = 0x1000;

/// Version register (32-bit).
pub const DMAR_VER_REG: u64 = 0x00;
/// Capability register (64-bit).
pub const DMAR_CAP_REG: u64 = 0x08;
/// Extended capability register (64-bit).
pub const DMAR_ECAP_REG: u64 = 0x10;
/// Global command register (32-bit, write).
pub const DMAR_GCMD_REG: u64 = 0x18;
/// Global status register (32-bit, read-only).
pub const DMAR_GSTS_REG: u64 = 0x1c;
/// Root table address register (64-bit; stored, unused: no DMA translation).
pub const DMAR_RTADDR_REG: u64 = 0x20;
/// Context command register (64-bit; ignored).
pub const DMAR_CCMD_REG: u64 = 0x28;
/// Fault status register (32-bit).
pub const DMAR_FSTS_REG: u64 = 0x34;
/// Fault event control register (32-bit).
pub const DMAR_FECTL_REG: u64 = 0x38;
/// Fault event data register (32-bit).
pub const DMAR_FEDATA_REG: u64 = 0x3c;
/// Fault event address register (32-bit).
pub const DMAR_FEADDR_REG: u64 = 0x40;
/// Fault event upper address register (32-bit).
pub const DMAR_FEUADDR_REG: u64 = 0x44;
/// Invalidation queue head register (64-bit, read-only).
pub const DMAR_IQH_REG: u64 = 0x80;
/// Invalidation queue tail register (64-bit).
pub const DMAR_IQT_REG: u64 = 0x88;
/// Invalidation queue address register (64-bit).
pub const DMAR_IQA_REG: u64 = 0x90;
/// Invalidation completion status register (32-bit).
pub const DMAR_ICS_REG: u64 = 0x9c;
/// Invalidation event control register (32-bit).
pub const DMAR_IECTL_REG: u64 = 0xa0;
/// Invalidation event data register (32-bit).
pub const DMAR_IEDATA_REG: u64 = 0xa4;
/// Invalidation event address register (32-bit).
pub const DMAR_IEADDR_REG: u64 = 0xa8;
/// Invalidation event upper address register (32-bit).
pub const DMAR_IEUADDR_REG: u64 = 0xac;
/// Invalidation queue error record register (64-bit, read-only).
pub const DMAR_IQER_REG: u64 = 0xb0;
/// Interrupt remapping table address register (64-bit).
pub const DMAR_IRTA_REG: u64 = 0xb8;

/// Offset of the first fault recording register (128-bit each); CAP.FRO = this / 16.
pub const DMAR_FRCD_REG: u64 = 0x400;
/// Number of fault recording registers; CAP.NFR = this - 1.
pub const DMAR_FRCD_REG_NR: usize = 8;
/// Offset of the IOTLB register pair (IVA, IOTLB), which reads 0: ECAP.IRO = this / 16.
/// Linux maps `max(IRO * 16 + 16, FRO * 16 + NFR * 16)` bytes, so both stay in the page.
pub const DMAR_IOTLB_REGS: u64 = 0x500;

/// VER: major 1, minor 0. The behaviour modelled follows the current (3.x) specification for
/// the interrupt-remapping subset; Linux only prints VER, so the value is informational.
pub const VTD_VER: u32 = 0x10;

/// CAP.ND (bits 2:0) = 2: 8-bit domain IDs (unused: no DMA translation).
const CAP_ND: u64 = 2;
/// CAP.MGAW (bits 21:16) = 47: 48-bit guest addresses (unused; SAGAW = 0 means no DMA
/// translation, which is what makes Linux ignore the unit for DMA but keep it for IR).
const CAP_MGAW: u64 = 47 << 16;
/// CAP.FRO (bits 33:24).
const CAP_FRO: u64 = (DMAR_FRCD_REG / 16) << 24;
/// CAP.NFR (bits 47:40).
const CAP_NFR: u64 = (DMAR_FRCD_REG_NR as u64 - 1) << 40;

/// CAP: SAGAW = 0 (no DMA translation), PI = 0 (no posted interrupts), ESIRTPS = 0 (SIRTP
/// does not invalidate the entry cache, so Linux follows it with a global IEC), plus ND, MGAW,
/// FRO and NFR as above.
pub const VTD_CAP: u64 = CAP_ND | CAP_MGAW | CAP_FRO | CAP_NFR;

/// ECAP.C (bit 0): table accesses are coherent, so Linux needs no cache flushes after
/// writing an IRTE.
pub const ECAP_C: u64 = 1 << 0;
/// ECAP.QI (bit 1): queued invalidation (required for interrupt remapping).
pub const ECAP_QI: u64 = 1 << 1;
/// ECAP.IR (bit 3): interrupt remapping.
pub const ECAP_IR: u64 = 1 << 3;
/// ECAP.EIM (bit 4): extended interrupt mode (x2APIC, 32-bit destinations).
pub const ECAP_EIM: u64 = 1 << 4;
/// ECAP.IRO (bits 17:8).
const ECAP_IRO: u64 = (DMAR_IOTLB_REGS / 16) << 8;
/// ECAP.MHMV (bits 23:20) = 15: an IEC may cover up to 2^15 entries.
const ECAP_MHMV: u64 = 0xf << 20;

/// ECAP: C, QI, IR, EIM, IRO, MHMV; no DT, PT, SC, SMTS or PASID.
pub const VTD_ECAP: u64 = ECAP_C | ECAP_QI | ECAP_IR | ECAP_EIM | ECAP_IRO | ECAP_MHMV;

/// GCMD/GSTS bit 31: translation enable (refused).
pub const DMA_GCMD_TE: u32 = 1 << 31;
/// GCMD bit 30: set root table pointer (one-shot).
pub const DMA_GCMD_SRTP: u32 = 1 << 30;
/// GCMD bit 26: queued invalidation enable (level).
pub const DMA_GCMD_QIE: u32 = 1 << 26;
/// GCMD bit 25: interrupt remapping enable (level).
pub const DMA_GCMD_IRE: u32 = 1 << 25;
/// GCMD bit 24: set interrupt remapping table pointer (one-shot).
pub const DMA_GCMD_SIRTP: u32 = 1 << 24;
/// GCMD bit 23: compatibility format interrupts allowed (level).
pub const DMA_GCMD_CFI: u32 = 1 << 23;

/// GSTS bit 31: translation enabled (always 0).
pub const DMA_GSTS_TES: u32 = 1 << 31;
/// GSTS bit 30: root table pointer set.
pub const DMA_GSTS_RTPS: u32 = 1 << 30;
/// GSTS bit 26: queued invalidation enabled.
pub const DMA_GSTS_QIES: u32 = 1 << 26;
/// GSTS bit 25: interrupt remapping enabled.
pub const DMA_GSTS_IRES: u32 = 1 << 25;
/// GSTS bit 24: interrupt remapping table pointer set.
pub const DMA_GSTS_IRTPS: u32 = 1 << 24;
/// GSTS bit 23: compatibility format interrupts pass through.
pub const DMA_GSTS_CFIS: u32 = 1 << 23;

/// FSTS bit 0: primary fault overflow (RW1C).
pub const DMA_FSTS_PFO: u32 = 1 << 0;
/// FSTS bit 1: primary pending fault (read-only: some FRCD has F set).
pub const DMA_FSTS_PPF: u32 = 1 << 1;
/// FSTS bit 4: invalidation queue error (RW1C).
pub const DMA_FSTS_IQE: u32 = 1 << 4;
/// FSTS bit 5: invalidation completion error (RW1C; never set here: no device-TLBs).
pub const DMA_FSTS_ICE: u32 = 1 << 5;
/// FSTS bit 6: invalidation time-out error (RW1C; never set here).
pub const DMA_FSTS_ITE: u32 = 1 << 6;
/// FSTS bits 15:8: fault record index of the first pending fault.
pub const DMA_FSTS_FRI_SHIFT: u32 = 8;
/// FSTS bits software clears by writing 1.
pub const DMA_FSTS_RW1C: u32 = DMA_FSTS_PFO | DMA_FSTS_IQE | DMA_FSTS_ICE | DMA_FSTS_ITE;

/// FECTL/IECTL bit 31: interrupt mask (set at reset).
pub const DMA_FECTL_IM: u32 = 1 << 31;
/// FECTL/IECTL bit 30: interrupt pending (read-only).
pub const DMA_FECTL_IP: u32 = 1 << 30;

/// ICS bit 0: invalidation wait descriptor complete (RW1C).
pub const DMA_ICS_IWC: u32 = 1 << 0;

/// FRCD high quadword bit 63 (bit 127 of the record): fault (RW1C).
pub const DMA_FRCD_F: u64 = 1 << 63;
/// FRCD high quadword bits 39:32: fault reason.
pub const DMA_FRCD_FR_SHIFT: u32 = 32;
/// FRCD low quadword bits 63:48: interrupt index of an interrupt-remapping fault (FI field).
pub const DMA_FRCD_IR_INDEX_SHIFT: u32 = 48;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_fields_decode_as_linux_does() {
        // Linux: cap_fault_reg_offset = ((cap >> 24) & 0x3ff) * 16,
        // cap_num_fault_regs = ((cap >> 40) & 0xff) + 1, cap_sagaw = (cap >> 8) & 0x1f,
        // cap_pi_support = (cap >> 59) & 1, cap_esirtps = (cap >> 62) & 1.
        assert_eq!(((VTD_CAP >> 24) & 0x3ff) * 16, DMAR_FRCD_REG);
        assert_eq!(((VTD_CAP >> 40) & 0xff) + 1, DMAR_FRCD_REG_NR as u64);
        assert_eq!((VTD_CAP >> 8) & 0x1f, 0);
        assert_eq!((VTD_CAP >> 59) & 1, 0);
        assert_eq!((VTD_CAP >> 62) & 1, 0);
        // ecap_qis, ecap_ir_support, ecap_eim_support, ecap_max_handle_mask,
        // ecap_iotlb_offset = ((ecap >> 8) & 0x3ff) * 16, ecap_smts (bit 43).
        assert_eq!(VTD_ECAP & 0b11010, 0b11010);
        assert_eq!((VTD_ECAP >> 20) & 0xf, 0xf);
        assert_eq!(((VTD_ECAP >> 8) & 0x3ff) * 16, DMAR_IOTLB_REGS);
        assert_eq!((VTD_ECAP >> 43) & 1, 0);
        // No device-TLB, pass-through or snoop control.
        assert_eq!(VTD_ECAP & (1 << 2 | 1 << 6 | 1 << 7), 0);
    }

    #[test]
    fn registers_fit_in_one_page() {
        // Linux's map_iommu: max(ecap_max_iotlb_offset, cap_max_fault_reg_offset).
        let iotlb_end = DMAR_IOTLB_REGS + 16;
        let frcd_end = DMAR_FRCD_REG + 16 * DMAR_FRCD_REG_NR as u64;
        assert!(iotlb_end <= REMAP_UNIT_SIZE && frcd_end <= REMAP_UNIT_SIZE);
        assert!(frcd_end <= DMAR_IOTLB_REGS || iotlb_end <= DMAR_FRCD_REG);
    }
}
