// SPDX-License-Identifier: Apache-2.0

//! Interrupt-remapping table entries and the pure translation of an MSI message through them
//! (VT-d spec 5.1 "Interrupt Remapping", 9.10 "Interrupt Remapping Table Entry").
//!
//! Nothing here touches registers or guest memory: [`translate`] gets the table geometry
//! ([`IrtTable`]) and a closure that reads one 128-bit entry, so the rules can be tested
//! exhaustively and the register model ([`RemapUnit`](super::RemapUnit)) only supplies state.
//!
//! # Message formats
//!
//! - *Compatibility format* (address bit 4 clear): an ordinary MSI. With remapping enabled it
//!   passes through unchanged only while GSTS.CFIS is set and the table is in xAPIC mode
//!   (VT-d: "CFI is effective only when ... Extended Interrupt Mode is disabled"); otherwise it
//!   is blocked with fault reason 0x25.
//! - *Remappable format* (address bit 4 set): address bits 19:5 hold handle\[14:0\], bit 2
//!   handle\[15\], bit 3 SHV; with SHV the data's low 16 bits are a sub-handle added to the
//!   handle ([`remap_index`]).
//!
//! # Output
//!
//! A successful translation yields a compatibility-format message laid out the way KVM's
//! `kvm_irq_routing_msi` wants it with `KVM_X2APIC_API_USE_32BIT_IDS`: the 64-bit
//! [`MsiMessage::address`] is `address_hi << 32 | address_lo`, destination bits 7:0 in
//! `address_lo` bits 19:12 and destination bits 31:8 in `address_hi` bits 31:8.

use crate::interrupt::MsiMessage;

/// IRTE bit 0: present.
const IRTE_P: u128 = 1 << 0;
/// IRTE bit 1: fault processing disable.
const IRTE_FPD: u128 = 1 << 1;
/// IRTE bit 2: destination mode (0 physical, 1 logical).
const IRTE_DM_SHIFT: u32 = 2;
/// IRTE bit 3: redirection hint.
const IRTE_RH_SHIFT: u32 = 3;
/// IRTE bit 4: trigger mode (0 edge, 1 level).
const IRTE_TM_SHIFT: u32 = 4;
/// IRTE bits 7:5: delivery mode.
const IRTE_DLM_SHIFT: u32 = 5;
/// IRTE bits 11:8: available to software.
const IRTE_AVAIL_SHIFT: u32 = 8;
/// IRTE bit 15: IRTE mode (0 remapped, 1 posted).
const IRTE_IM: u128 = 1 << 15;
/// IRTE bits 23:16: vector.
const IRTE_V_SHIFT: u32 = 16;
/// IRTE bits 63:32: destination ID.
const IRTE_DST_SHIFT: u32 = 32;
/// IRTE bits 79:64: source-id.
const IRTE_SID_SHIFT: u32 = 64;
/// IRTE bits 81:80: source-id qualifier.
const IRTE_SQ_SHIFT: u32 = 80;
/// IRTE bits 83:82: source validation type.
const IRTE_SVT_SHIFT: u32 = 82;

/// Reserved in every mode: bits 14:12, 31:24 and 127:84.
const IRTE_RESERVED: u128 = (0x7 << 12) | (0xff << 24) | (!0u128 << 84);
/// Also reserved in xAPIC mode (IRTA.EIME = 0): DST bits 7:0 and 31:16 (IRTE bits 39:32 and
/// 63:48); the 8-bit APIC ID lives in DST bits 15:8.
const IRTE_RESERVED_XAPIC: u128 = (0xff << 32) | (0xffff << 48);

/// SVT value: no source-id verification.
pub const SVT_NONE: u8 = 0;
/// SVT value: verify the requester's source-id against SID, masked per SQ.
pub const SVT_REQUESTER_ID: u8 = 1;
/// SVT value: verify that the requester's bus is within the range held in SID.
pub const SVT_BUS_RANGE: u8 = 2;

// Message fields (VT-d 5.1.2 and 5.1.5; Intel SDM vol. 3 11.11): one definition, shared with
// the IOAPIC model.
use crate::interrupt::msi::{
    ADDRESS_BASE as MSI_ADDRESS_BASE, ADDRESS_HEAD_MASK as MSI_ADDRESS_HEAD_MASK,
    ADDR_DEST_SHIFT as MSI_ADDR_DEST_SHIFT, ADDR_DM_SHIFT as MSI_ADDR_DM_SHIFT,
    ADDR_HANDLE_HIGH_SHIFT as MSI_ADDR_HANDLE_HIGH_SHIFT,
    ADDR_HANDLE_LOW_MASK as MSI_ADDR_HANDLE_LOW_MASK,
    ADDR_HANDLE_LOW_SHIFT as MSI_ADDR_HANDLE_LOW_SHIFT, ADDR_RH_SHIFT as MSI_ADDR_RH_SHIFT,
    ADDR_SHV as MSI_ADDR_SHV, DATA_DELIVERY_MODE_SHIFT as MSI_DATA_DELIVERY_MODE_SHIFT,
    DATA_LEVEL_ASSERT_SHIFT as MSI_DATA_LEVEL_ASSERT_SHIFT,
    DATA_SUBHANDLE_MASK as MSI_DATA_SUBHANDLE_MASK, DATA_TRIGGER_SHIFT as MSI_DATA_TRIGGER_SHIFT,
};

/// One decoded 128-bit interrupt-remapping table entry (remapped format, VT-d 9.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Irte {
    /// The raw entry, bit 0 = P.
    pub raw: u128,
    /// P: the entry is valid.
    pub present: bool,
    /// FPD: faults caused by this entry are not recorded.
    pub fault_processing_disable: bool,
    /// DM: destination mode, 0 physical, 1 logical.
    pub destination_mode: u8,
    /// RH: redirection hint.
    pub redirection_hint: u8,
    /// TM: trigger mode, 0 edge, 1 level.
    pub trigger_mode: u8,
    /// DLM: delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub delivery_mode: u8,
    /// AVAIL: software-available bits 11:8.
    pub avail: u8,
    /// IM: IRTE mode, set for a posted-format entry (unsupported: CAP.PI = 0).
    pub posted: bool,
    /// V: the vector delivered.
    pub vector: u8,
    /// DST: the raw 32-bit destination field (see [`Irte::destination`]).
    pub destination_field: u32,
    /// SID: source-id to verify the requester against.
    pub source_id: u16,
    /// SQ: source-id qualifier (which function bits to ignore when SVT = 1).
    pub source_id_qualifier: u8,
    /// SVT: source validation type ([`SVT_NONE`], [`SVT_REQUESTER_ID`], [`SVT_BUS_RANGE`];
    /// 3 is reserved).
    pub source_validation_type: u8,
}

impl Irte {
    /// Decodes a raw entry (bit 0 = P, as read little-endian from the table).
    pub fn from_raw(raw: u128) -> Irte {
        let field = |shift: u32, mask: u128| ((raw >> shift) & mask) as u8;
        Irte {
            raw,
            present: raw & IRTE_P != 0,
            fault_processing_disable: raw & IRTE_FPD != 0,
            destination_mode: field(IRTE_DM_SHIFT, 1),
            redirection_hint: field(IRTE_RH_SHIFT, 1),
            trigger_mode: field(IRTE_TM_SHIFT, 1),
            delivery_mode: field(IRTE_DLM_SHIFT, 0x7),
            avail: field(IRTE_AVAIL_SHIFT, 0xf),
            posted: raw & IRTE_IM != 0,
            vector: field(IRTE_V_SHIFT, 0xff),
            // Masked to 32 and 16 bits, so the casts are lossless.
            destination_field: ((raw >> IRTE_DST_SHIFT) & 0xffff_ffff) as u32,
            source_id: ((raw >> IRTE_SID_SHIFT) & 0xffff) as u16,
            source_id_qualifier: field(IRTE_SQ_SHIFT, 0x3),
            source_validation_type: field(IRTE_SVT_SHIFT, 0x3),
        }
    }

    /// The destination APIC ID: the whole DST field in x2APIC mode (`eime`), DST bits 15:8 in
    /// xAPIC mode.
    pub fn destination(&self, eime: bool) -> u32 {
        if eime {
            self.destination_field
        } else {
            (self.destination_field >> 8) & 0xff
        }
    }

    /// Reserved bits that are set, for the table mode `eime`. Besides the always-reserved
    /// fields this counts IM (posted format is not supported, CAP.PI = 0), the reserved SVT
    /// encoding 3, the reserved delivery modes 3 and 6, and in xAPIC mode the DST bits outside
    /// 15:8.
    pub fn reserved_bits(&self, eime: bool) -> u128 {
        let mut reserved = IRTE_RESERVED | IRTE_IM;
        if !eime {
            reserved |= IRTE_RESERVED_XAPIC;
        }
        if self.source_validation_type == 3 {
            reserved |= 0x3 << IRTE_SVT_SHIFT;
        }
        if matches!(self.delivery_mode, 3 | 6) {
            // Delivery modes 3 and 6 are reserved encodings (VT-d 9.10, DLM): the field counts
            // as a reserved field (fault reason 0x24).
            reserved |= 0x7 << IRTE_DLM_SHIFT;
        }
        self.raw & reserved
    }

    /// Whether `requester` passes this entry's source-id verification (SVT/SID/SQ).
    ///
    /// - SVT 0: always.
    /// - SVT 1: `requester` equals SID after masking per SQ: 0 compares all 16 bits, 1 ignores
    ///   bit 2, 2 ignores bits 2:1, 3 ignores bits 2:0 (function-number bits; VT-d 9.10, SQ).
    /// - SVT 2: the requester's bus (bits 15:8) is within `[SID[15:8], SID[7:0]]`, start bus
    ///   in the high byte and end bus in the low byte.
    /// - SVT 3 (reserved): never; [`Irte::reserved_bits`] reports it first.
    pub fn source_id_matches(&self, requester: u16) -> bool {
        match self.source_validation_type {
            SVT_NONE => true,
            SVT_REQUESTER_ID => {
                let mask = sid_mask(self.source_id_qualifier);
                requester & mask == self.source_id & mask
            }
            SVT_BUS_RANGE => {
                let bus = requester >> 8;
                let start = self.source_id >> 8;
                let end = self.source_id & 0xff;
                (start..=end).contains(&bus)
            }
            _ => false,
        }
    }
}

/// The source-id bits compared for SVT = 1 and qualifier `sq` (bits 1:0 used).
fn sid_mask(sq: u8) -> u16 {
    match sq & 0x3 {
        0 => 0xffff,
        1 => !0b100,
        2 => !0b110,
        _ => !0b111,
    }
}

/// Geometry of an interrupt-remapping table, from an IRTA register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrtTable {
    /// Guest-physical base address (4 KiB aligned).
    pub base: u64,
    /// Number of entries, 2^(S+1).
    pub entries: u32,
    /// EIME: x2APIC mode, 32-bit destinations.
    pub eime: bool,
}

impl IrtTable {
    /// IRTA bit 11: extended interrupt mode enable.
    pub const IRTA_EIME: u64 = 1 << 11;
    /// IRTA bits 3:0: table size S (2^(S+1) entries).
    pub const IRTA_S_MASK: u64 = 0xf;
    /// IRTA bits 63:12: table base.
    pub const IRTA_BASE_MASK: u64 = !0xfff;

    /// Decodes an IRTA register value.
    pub fn from_irta(irta: u64) -> IrtTable {
        IrtTable {
            base: irta & Self::IRTA_BASE_MASK,
            entries: 2 << (irta & Self::IRTA_S_MASK),
            eime: irta & Self::IRTA_EIME != 0,
        }
    }

    /// Guest-physical address of entry `index` (16 bytes each); `None` if it would overflow.
    pub fn entry_address(&self, index: u32) -> Option<u64> {
        self.base.checked_add(u64::from(index) * 16)
    }
}

/// Why an interrupt request was blocked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// Reserved fields set in the request itself: address bits 63:32 non-zero, address bits
    /// 31:20 other than 0xFEE, or data bits 31:16 non-zero with SHV (fault reason 0x20).
    RequestReserved,
    /// The index is not below the table size from IRTA (0x21).
    IndexOutOfBounds,
    /// The entry's P bit is clear (0x22).
    NotPresent,
    /// The entry could not be read from guest memory, or no table was ever latched (0x23).
    TableReadFailed,
    /// Reserved entry bits set, posted format (IM = 1), or SVT = 3 (0x24).
    IrteReserved,
    /// A compatibility-format request while CFIS is clear or the table is in x2APIC mode
    /// (0x25).
    CompatibilityBlocked,
    /// The requester failed the entry's source-id verification (0x26).
    SourceIdMismatch,
    /// A remappable-format request while interrupt remapping is disabled (GSTS.IRES clear).
    /// Not a VT-d fault: nothing is recorded, there is just no usable message.
    RemappingDisabled,
}

impl BlockReason {
    /// The VT-d fault reason code for the fault recording register (the values of QEMU's
    /// `VTD_FR_IR_*` and Linux's `irq_remap_fault_reasons`), or `None` when the block is not a
    /// remapping fault.
    pub fn fault_reason(self) -> Option<u8> {
        match self {
            BlockReason::RequestReserved => Some(0x20),
            BlockReason::IndexOutOfBounds => Some(0x21),
            BlockReason::NotPresent => Some(0x22),
            BlockReason::TableReadFailed => Some(0x23),
            BlockReason::IrteReserved => Some(0x24),
            BlockReason::CompatibilityBlocked => Some(0x25),
            BlockReason::SourceIdMismatch => Some(0x26),
            BlockReason::RemappingDisabled => None,
        }
    }
}

/// A blocked interrupt request: no message may be given to KVM for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Interrupt request blocked ({reason:?}, index {index:?})")]
pub struct Blocked {
    /// What check failed.
    pub reason: BlockReason,
    /// The interrupt index, when the request was remappable (the fault record's FI field).
    pub index: Option<u32>,
    /// The entry had FPD set: the block stands but no fault is recorded.
    pub fault_processing_disable: bool,
}

impl Blocked {
    fn new(reason: BlockReason, index: Option<u32>) -> Blocked {
        Blocked {
            reason,
            index,
            fault_processing_disable: false,
        }
    }

    /// Whether this block should be recorded in a fault recording register: it is a VT-d fault
    /// and the entry did not suppress it with FPD.
    pub fn records_fault(&self) -> bool {
        self.reason.fault_reason().is_some() && !self.fault_processing_disable
    }
}

/// The interrupt index of a remappable-format message: handle + (SHV ? data\[15:0\] : 0).
/// `None` for a compatibility-format message. The result can exceed 16 bits (handle and
/// sub-handle are both 16-bit); such an index is out of bounds for every table.
pub fn remap_index(msg: MsiMessage) -> Option<u32> {
    if !msg.is_remappable() {
        return None;
    }
    let low = (msg.address >> MSI_ADDR_HANDLE_LOW_SHIFT) & MSI_ADDR_HANDLE_LOW_MASK;
    let high = (msg.address >> MSI_ADDR_HANDLE_HIGH_SHIFT) & 1;
    // 16 bits, so the cast is lossless.
    let handle = (low | high << 15) as u32;
    let subhandle = if msg.address & MSI_ADDR_SHV != 0 {
        msg.data & MSI_DATA_SUBHANDLE_MASK
    } else {
        0
    };
    Some(handle + subhandle)
}

/// Translates `msg` from requester `source_id` through the remapping table `table`, with
/// interrupt remapping enabled.
///
/// `read_irte(index)` returns the raw entry at `index` (already bounds-checked against
/// `table.entries`), or `None` if it cannot be read. `cfi_allowed` is GSTS.CFIS.
///
/// Returns the compatibility-format message KVM should route (see the
/// [module documentation](self) for its layout): a permitted compatibility-format `msg`
/// unchanged, or the message built from the entry. Whether remapping is enabled at all is the
/// caller's business: with it disabled, messages are not translated.
///
/// Checks, in order: compatibility format (CFIS and xAPIC mode), reserved request fields,
/// index bounds, the entry read, P, reserved entry bits (posted format included), source-id.
/// FPD in the entry marks the last three as not to be recorded.
pub fn translate(
    msg: MsiMessage,
    source_id: u16,
    table: &IrtTable,
    read_irte: impl Fn(u32) -> Option<u128>,
    cfi_allowed: bool,
) -> Result<MsiMessage, Blocked> {
    let Some(index) = remap_index(msg) else {
        return if cfi_allowed && !table.eime {
            Ok(msg)
        } else {
            Err(Blocked::new(BlockReason::CompatibilityBlocked, None))
        };
    };

    let shv = msg.address & MSI_ADDR_SHV != 0;
    if msg.address & !0xffff_ffff != 0
        || msg.address & MSI_ADDRESS_HEAD_MASK != MSI_ADDRESS_BASE
        || (shv && msg.data & !MSI_DATA_SUBHANDLE_MASK != 0)
    {
        return Err(Blocked::new(BlockReason::RequestReserved, Some(index)));
    }
    if index >= table.entries {
        return Err(Blocked::new(BlockReason::IndexOutOfBounds, Some(index)));
    }
    let Some(raw) = read_irte(index) else {
        return Err(Blocked::new(BlockReason::TableReadFailed, Some(index)));
    };

    let irte = Irte::from_raw(raw);
    let entry_fault = |reason| Blocked {
        reason,
        index: Some(index),
        fault_processing_disable: irte.fault_processing_disable,
    };
    if !irte.present {
        return Err(entry_fault(BlockReason::NotPresent));
    }
    if irte.reserved_bits(table.eime) != 0 {
        return Err(entry_fault(BlockReason::IrteReserved));
    }
    if !irte.source_id_matches(source_id) {
        return Err(entry_fault(BlockReason::SourceIdMismatch));
    }

    Ok(compatibility_message(&irte, table.eime))
}

/// The compatibility-format message (KVM layout) that delivers what `irte` describes.
fn compatibility_message(irte: &Irte, eime: bool) -> MsiMessage {
    compatibility_msi(
        irte.destination(eime),
        irte.vector,
        irte.redirection_hint,
        irte.destination_mode,
        irte.delivery_mode,
        irte.trigger_mode,
    )
}

/// A compatibility-format message in the layout KVM routes (see the
/// [module documentation](self)): destination bits 7:0 in address bits 19:12, bits 31:8 in
/// `address_hi` bits 31:8 (x2APIC destinations above 255). Shared with PV-IR
/// ([`crate::pvirq`]), whose routes are Fixed, edge, physical messages (all modes 0).
pub(crate) fn compatibility_msi(
    dest: u32,
    vector: u8,
    redirection_hint: u8,
    destination_mode: u8,
    delivery_mode: u8,
    trigger_mode: u8,
) -> MsiMessage {
    let address_lo = MSI_ADDRESS_BASE
        | u64::from(dest & 0xff) << MSI_ADDR_DEST_SHIFT
        | u64::from(redirection_hint) << MSI_ADDR_RH_SHIFT
        | u64::from(destination_mode) << MSI_ADDR_DM_SHIFT;
    let address_hi = u64::from(dest & 0xffff_ff00);
    let data = u32::from(vector)
        | u32::from(delivery_mode) << MSI_DATA_DELIVERY_MODE_SHIFT
        | u32::from(trigger_mode) << MSI_DATA_LEVEL_ASSERT_SHIFT
        | u32::from(trigger_mode) << MSI_DATA_TRIGGER_SHIFT;
    MsiMessage {
        address: address_hi << 32 | address_lo,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::rte_to_msi;

    /// Builds a present entry the way Linux's `prepare_irte` does, plus SVT/SQ/SID.
    fn entry(vector: u8, dst_field: u32) -> u128 {
        IRTE_P | u128::from(vector) << IRTE_V_SHIFT | u128::from(dst_field) << IRTE_DST_SHIFT
    }

    fn with_sid(raw: u128, svt: u8, sq: u8, sid: u16) -> u128 {
        raw | u128::from(svt) << IRTE_SVT_SHIFT
            | u128::from(sq) << IRTE_SQ_SHIFT
            | u128::from(sid) << IRTE_SID_SHIFT
    }

    /// A remappable-format MSI for `handle`, optionally with SHV and a sub-handle in `data`.
    fn remappable(handle: u32, shv: bool, data: u32) -> MsiMessage {
        let handle = u64::from(handle);
        MsiMessage {
            address: MSI_ADDRESS_BASE
                | (handle & 0x7fff) << 5
                | MsiMessage::ADDR_REMAPPABLE_FORMAT
                | u64::from(shv) << 3
                | (handle >> 15 & 1) << 2,
            data,
        }
    }

    const XAPIC: IrtTable = IrtTable {
        base: 0x10_0000,
        entries: 256,
        eime: false,
    };
    const X2APIC: IrtTable = IrtTable {
        base: 0x10_0000,
        entries: 65536,
        eime: true,
    };

    /// Translates against a table whose only readable entry is `raw` at `at`.
    fn run(
        msg: MsiMessage,
        sid: u16,
        table: &IrtTable,
        at: u32,
        raw: u128,
    ) -> Result<MsiMessage, Blocked> {
        translate(
            msg,
            sid,
            table,
            |i| (i == at).then_some(raw).or(Some(0)),
            false,
        )
    }

    #[test]
    fn irte_decodes_every_field() {
        // P, FPD, DM, RH, TM, DLM=5, AVAIL=0xa, V=0x42, DST=0x1234_5678, SID=0xbeef, SQ=2, SVT=1.
        let raw: u128 = 0b1_1111
            | 5 << IRTE_DLM_SHIFT
            | 0xa << IRTE_AVAIL_SHIFT
            | 0x42 << IRTE_V_SHIFT
            | 0x1234_5678 << IRTE_DST_SHIFT
            | 0xbeef << IRTE_SID_SHIFT
            | 2 << IRTE_SQ_SHIFT
            | 1 << IRTE_SVT_SHIFT;
        let irte = Irte::from_raw(raw);
        assert_eq!(
            irte,
            Irte {
                raw,
                present: true,
                fault_processing_disable: true,
                destination_mode: 1,
                redirection_hint: 1,
                trigger_mode: 1,
                delivery_mode: 5,
                avail: 0xa,
                posted: false,
                vector: 0x42,
                destination_field: 0x1234_5678,
                source_id: 0xbeef,
                source_id_qualifier: 2,
                source_validation_type: 1,
            }
        );
        assert_eq!(irte.reserved_bits(true), 0);
        assert_ne!(Irte::from_raw(raw | IRTE_IM).reserved_bits(true), 0);
        assert!(Irte::from_raw(raw | IRTE_IM).posted);
    }

    #[test]
    fn xapic_destination_is_dst_bits_15_8() {
        // Linux's IRTE_DEST(dest) = dest << 8 in xAPIC mode.
        let irte = Irte::from_raw(entry(0x31, 0x07 << 8));
        assert_eq!(irte.destination(false), 7);
        let msg = run(
            remappable(3, false, 0),
            0,
            &XAPIC,
            3,
            entry(0x31, 0x07 << 8),
        )
        .unwrap();
        assert_eq!(
            msg,
            MsiMessage {
                address: 0xfee0_7000,
                data: 0x31
            }
        );
    }

    #[test]
    fn x2apic_destination_uses_all_32_bits() {
        let raw = entry(0x40, 0x0001_2345);
        assert_eq!(Irte::from_raw(raw).destination(true), 0x0001_2345);
        let msg = run(remappable(9, false, 0), 0, &X2APIC, 9, raw).unwrap();
        // Bits 7:0 in address_lo 19:12, bits 31:8 in address_hi (KVM X2APIC_API layout).
        assert_eq!(msg.address, 0x0001_2300 << 32 | 0xfee4_5000);
        assert_eq!(msg.data, 0x40);
    }

    #[test]
    fn translation_carries_mode_hint_delivery_and_trigger() {
        // DM=1 (logical), RH=1, TM=1 (level), DLM=1 (lowest priority).
        let raw = entry(0x55, 0x0f << 8)
            | 1 << IRTE_DM_SHIFT
            | 1 << IRTE_RH_SHIFT
            | 1 << IRTE_TM_SHIFT
            | 1 << IRTE_DLM_SHIFT;
        let msg = run(remappable(0, false, 0), 0, &XAPIC, 0, raw).unwrap();
        assert_eq!(msg.address, 0xfee0_f000 | 1 << 3 | 1 << 2);
        // vector | DLM << 8 | level assert (14) | trigger (15).
        assert_eq!(msg.data, 0x55 | 1 << 8 | 1 << 14 | 1 << 15);
    }

    #[test]
    fn remap_index_decodes_handle_and_subhandle() {
        assert_eq!(remap_index(remappable(0x1234, false, 0xffff)), Some(0x1234));
        assert_eq!(remap_index(remappable(0x1234, true, 3)), Some(0x1237));
        // handle[15] lives in address bit 2.
        assert_eq!(remap_index(remappable(0x8001, false, 0)), Some(0x8001));
        assert_eq!(
            remap_index(remappable(0xffff, true, 0xffff)),
            Some(0x1_fffe)
        );
        let compat = MsiMessage {
            address: 0xfee0_1000,
            data: 0x30,
        };
        assert_eq!(remap_index(compat), None);
    }

    #[test]
    fn remap_index_matches_remapped_ioapic_rte() {
        // Remappable RTE: format bit 48, index[14:0] in 63:49, index[15] in bit 11; the vector
        // field holds the pin number and must not become a sub-handle.
        let index: u64 = 0x8123;
        let rte = 1 << 48 | (index & 0x7fff) << 49 | (index >> 15) << 11 | 5;
        assert_eq!(remap_index(rte_to_msi(rte)), Some(0x8123));
    }

    #[test]
    fn subhandle_selects_the_entry() {
        // Multi-MSI: handle 8, sub-handle 2 → entry 10.
        let msg = run(remappable(8, true, 2), 0, &XAPIC, 10, entry(0x61, 1 << 8)).unwrap();
        assert_eq!(msg.data, 0x61);
        let msg = run(remappable(8, false, 2), 0, &XAPIC, 10, entry(0x61, 1 << 8));
        assert_eq!(msg.unwrap_err().reason, BlockReason::NotPresent);
    }

    #[test]
    fn not_present_is_blocked() {
        let err = run(
            remappable(1, false, 0),
            0,
            &XAPIC,
            1,
            entry(0x30, 0) & !IRTE_P,
        )
        .unwrap_err();
        assert_eq!(err.reason, BlockReason::NotPresent);
        assert_eq!(err.reason.fault_reason(), Some(0x22));
        assert_eq!(err.index, Some(1));
        assert!(err.records_fault());
    }

    #[test]
    fn index_beyond_table_is_blocked() {
        let small = IrtTable::from_irta(0x10_0000 | 1); // S=1: 4 entries.
        assert_eq!(small.entries, 4);
        let err = run(remappable(4, false, 0), 0, &small, 4, entry(0x30, 0)).unwrap_err();
        assert_eq!(err.reason, BlockReason::IndexOutOfBounds);
        assert_eq!(err.reason.fault_reason(), Some(0x21));
        // Handle + sub-handle past 16 bits is out of bounds for the largest table.
        let err = run(remappable(0xffff, true, 0xffff), 0, &X2APIC, 0, 0).unwrap_err();
        assert_eq!(err.reason, BlockReason::IndexOutOfBounds);
        assert!(run(remappable(3, false, 0), 0, &small, 3, entry(0x30, 0)).is_ok());
    }

    #[test]
    fn unreadable_entry_is_blocked() {
        let err = translate(remappable(2, false, 0), 0, &XAPIC, |_| None, false).unwrap_err();
        assert_eq!(err.reason, BlockReason::TableReadFailed);
        assert_eq!(err.reason.fault_reason(), Some(0x23));
    }

    #[test]
    fn reserved_irte_bits_are_blocked() {
        for bit in [12u32, 14, 24, 31, 84, 100, 127] {
            let err = run(
                remappable(0, false, 0),
                0,
                &X2APIC,
                0,
                entry(0x30, 1) | 1 << bit,
            )
            .unwrap_err();
            assert_eq!(err.reason, BlockReason::IrteReserved, "bit {bit}");
            assert_eq!(err.reason.fault_reason(), Some(0x24));
        }
        // In xAPIC mode DST bits other than 15:8 are reserved too; in x2APIC mode they are not.
        let wide = entry(0x30, 0x0001_0100);
        let err = run(remappable(0, false, 0), 0, &XAPIC, 0, wide).unwrap_err();
        assert_eq!(err.reason, BlockReason::IrteReserved);
        assert!(run(remappable(0, false, 0), 0, &X2APIC, 0, wide).is_ok());
    }

    #[test]
    fn reserved_delivery_modes_are_reserved_fields() {
        for mode in 0u128..8 {
            let raw = entry(0x30, 1) & !(0x7 << IRTE_DLM_SHIFT) | mode << IRTE_DLM_SHIFT;
            let result = run(remappable(0, false, 0), 0, &X2APIC, 0, raw);
            if mode == 3 || mode == 6 {
                let err = result.unwrap_err();
                assert_eq!(err.reason, BlockReason::IrteReserved, "mode {mode}");
                assert_eq!(err.reason.fault_reason(), Some(0x24));
            } else {
                assert!(result.is_ok(), "mode {mode}");
            }
        }
    }

    #[test]
    fn posted_format_is_blocked() {
        let err = run(
            remappable(0, false, 0),
            0,
            &X2APIC,
            0,
            entry(0x30, 1) | IRTE_IM,
        )
        .unwrap_err();
        assert_eq!(err.reason, BlockReason::IrteReserved);
    }

    #[test]
    fn reserved_svt_encoding_is_blocked() {
        let raw = with_sid(entry(0x30, 1), 3, 0, 0);
        let err = run(remappable(0, false, 0), 0, &X2APIC, 0, raw).unwrap_err();
        assert_eq!(err.reason, BlockReason::IrteReserved);
    }

    #[test]
    fn request_reserved_fields_are_blocked() {
        // Data bits 31:16 with SHV.
        let err = run(remappable(0, true, 0x1_0000), 0, &XAPIC, 0, entry(0x30, 0)).unwrap_err();
        assert_eq!(err.reason, BlockReason::RequestReserved);
        assert_eq!(err.reason.fault_reason(), Some(0x20));
        // Without SHV the data is not part of the request's remapping fields.
        assert!(run(remappable(0, false, 0x1_0000), 0, &XAPIC, 0, entry(0x30, 0)).is_ok());
        // Address bits 63:32, or a head other than 0xFEE.
        let mut msg = remappable(0, false, 0);
        msg.address |= 1 << 40;
        assert_eq!(
            run(msg, 0, &XAPIC, 0, entry(0x30, 0)).unwrap_err().reason,
            BlockReason::RequestReserved
        );
        let mut msg = remappable(0, false, 0);
        msg.address ^= 0xfee0_0000 ^ 0xfed0_0000;
        assert_eq!(
            run(msg, 0, &XAPIC, 0, entry(0x30, 0)).unwrap_err().reason,
            BlockReason::RequestReserved
        );
    }

    #[test]
    fn source_id_full_match_when_sq_is_0() {
        let raw = with_sid(entry(0x30, 0), SVT_REQUESTER_ID, 0, 0x00f8);
        assert!(run(remappable(0, false, 0), 0x00f8, &XAPIC, 0, raw).is_ok());
        for sid in [0x00f9, 0x00fc, 0x01f8] {
            let err = run(remappable(0, false, 0), sid, &XAPIC, 0, raw).unwrap_err();
            assert_eq!(err.reason, BlockReason::SourceIdMismatch, "{sid:#x}");
            assert_eq!(err.reason.fault_reason(), Some(0x26));
        }
    }

    #[test]
    fn source_id_qualifier_ignores_function_bits() {
        // (SQ, requester that must match, requester that must not) against SID 0x10 (00:02.0).
        let cases = [
            (1u8, 0x14u16, 0x12u16), // ignore bit 2
            (2, 0x16, 0x11),         // ignore bits 2:1
            (3, 0x17, 0x18),         // ignore bits 2:0; bit 3 still compared
        ];
        for (sq, good, bad) in cases {
            let raw = with_sid(entry(0x30, 0), SVT_REQUESTER_ID, sq, 0x10);
            assert!(
                run(remappable(0, false, 0), good, &XAPIC, 0, raw).is_ok(),
                "sq {sq}"
            );
            let err = run(remappable(0, false, 0), bad, &XAPIC, 0, raw).unwrap_err();
            assert_eq!(err.reason, BlockReason::SourceIdMismatch, "sq {sq}");
        }
    }

    #[test]
    fn source_id_bus_range() {
        // Buses 0x02..=0x05.
        let raw = with_sid(entry(0x30, 0), SVT_BUS_RANGE, 0, 0x0205);
        for sid in [0x0200, 0x03ff, 0x0507] {
            assert!(
                run(remappable(0, false, 0), sid, &XAPIC, 0, raw).is_ok(),
                "{sid:#x}"
            );
        }
        for sid in [0x0100, 0x0600, 0xff00] {
            let err = run(remappable(0, false, 0), sid, &XAPIC, 0, raw).unwrap_err();
            assert_eq!(err.reason, BlockReason::SourceIdMismatch, "{sid:#x}");
        }
    }

    #[test]
    fn fpd_suppresses_recording_but_not_the_block() {
        let raw = with_sid(entry(0x30, 0) | IRTE_FPD, SVT_REQUESTER_ID, 0, 0x10);
        let err = run(remappable(0, false, 0), 0x11, &XAPIC, 0, raw).unwrap_err();
        assert_eq!(err.reason, BlockReason::SourceIdMismatch);
        assert!(err.fault_processing_disable);
        assert!(!err.records_fault());
        let err = run(remappable(0, false, 0), 0, &XAPIC, 0, IRTE_FPD).unwrap_err();
        assert_eq!(err.reason, BlockReason::NotPresent);
        assert!(!err.records_fault());
    }

    #[test]
    fn compatibility_format_depends_on_cfis_and_mode() {
        let compat = MsiMessage {
            address: 0xfee0_3000,
            data: 0x41,
        };
        let read = |_| Some(0);
        assert_eq!(translate(compat, 0, &XAPIC, read, true), Ok(compat));
        let err = translate(compat, 0, &XAPIC, read, false).unwrap_err();
        assert_eq!(err.reason, BlockReason::CompatibilityBlocked);
        assert_eq!(err.reason.fault_reason(), Some(0x25));
        assert_eq!(err.index, None);
        // x2APIC mode blocks compatibility format whatever CFI says.
        let err = translate(compat, 0, &X2APIC, read, true).unwrap_err();
        assert_eq!(err.reason, BlockReason::CompatibilityBlocked);
    }

    #[test]
    fn remapping_disabled_is_not_a_fault() {
        let blocked = Blocked::new(BlockReason::RemappingDisabled, Some(0));
        assert_eq!(blocked.reason.fault_reason(), None);
        assert!(!blocked.records_fault());
    }

    #[test]
    fn irta_decodes_base_mode_and_size() {
        // Linux: table | eim << 11 | 0xF (65536 entries).
        let table = IrtTable::from_irta(0x1234_5000 | 1 << 11 | 0xf);
        assert_eq!(
            table,
            IrtTable {
                base: 0x1234_5000,
                entries: 65536,
                eime: true
            }
        );
        assert_eq!(IrtTable::from_irta(0).entries, 2);
        assert_eq!(table.entry_address(3), Some(0x1234_5030));
        let top = IrtTable::from_irta(!0xfff);
        assert_eq!(top.entry_address(0x1000), None);
    }
}
