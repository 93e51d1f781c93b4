// SPDX-License-Identifier: Apache-2.0

//! Userspace IOAPIC (82093AA / ICH style, version 0x20, 24 pins) for KVM's split irqchip.
//!
//! With a split irqchip the LAPICs live in KVM and the IOAPIC lives here, but this model never
//! delivers an interrupt itself on the fast path. Its job is to hold the guest-programmed
//! redirection table and to turn each entry into the MSI message the IOAPIC would emit
//! ([`Ioapic::pin_msi`], built on the pure [`rte_to_msi`]). The VMM programs that message as
//! the KVM MSI route of the pin's GSI and attaches the device's irqfd to it, so a device
//! interrupt reaches the LAPIC without leaving the kernel. Guest writes go through
//! [`Ioapic::write`], which pushes every changed entry's new message into the caller's
//! [`IoapicSink`] (the VMM's interrupt router), so no change can be left unrouted.
//!
//! Once the guest enables interrupt remapping, entries are in remappable format and
//! [`rte_to_msi`] yields a remappable-format message ([`MsiMessage::is_remappable`]); the VMM
//! must translate it through the interrupt-remapping table before giving it to KVM, which
//! cannot decode that format.
//!
//! # Registers
//!
//! MMIO window of [`IOAPIC_WINDOW_SIZE`] bytes: IOREGSEL at 0x00, IOWIN at 0x10, EOI at 0x40,
//! all 32-bit and accessed only with 32-bit accesses (anything else is ignored; reads answer 0).
//! Indirect registers: ID 0x00, VER 0x01, ARB 0x02, then the redirection table at
//! `0x10 + 2 * pin` (low dword) and `0x11 + 2 * pin` (high dword).
//!
//! # Edge only
//!
//! Every device behind this IOAPIC is an edge source: split irqchip has no resample eventfd,
//! and the platform's firmware tables declare every pin edge-triggered. This model implements
//! no level semantics: Remote IRR is never set (it reads 0), a level-triggered entry is routed
//! exactly as its message says, and EOIs (the EOI register, or the VMM passing KVM's
//! `KVM_EXIT_IOAPIC_EOI` to [`Ioapic::end_of_interrupt`]) are only counted. A guest that
//! programs a level-triggered entry gets one interrupt per device trigger, as with edge.

use log::warn;

use crate::interrupt::MsiMessage;

/// Number of redirection-table entries (pins).
pub const IOAPIC_NUM_PINS: usize = 24;
/// Size of the IOAPIC MMIO window.
pub const IOAPIC_WINDOW_SIZE: u64 = 0x1000;
/// Value of the VER register's version field: 0x20 has the EOI register (ICH style).
pub const IOAPIC_VERSION: u8 = 0x20;

/// Where the IOAPIC pushes redirection-entry changes (the VMM's interrupt router).
pub trait IoapicSink {
    /// `pin`'s entry changed; `msg` is the message it now emits (`None`: masked).
    fn pin_changed(&mut self, pin: usize, msg: Option<MsiMessage>);
}

/// An [`IoapicSink`] that only records which pins changed (bit `n` = pin `n`); for tests and
/// for callers that recompute routes themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangedPins(pub u32);

impl IoapicSink for ChangedPins {
    fn pin_changed(&mut self, pin: usize, _msg: Option<MsiMessage>) {
        if pin < IOAPIC_NUM_PINS {
            self.0 |= 1 << pin;
        }
    }
}

// Direct (MMIO) register offsets.
const IOREGSEL_OFFSET: u64 = 0x00;
const IOWIN_OFFSET: u64 = 0x10;
const IOEOI_OFFSET: u64 = 0x40;

// Indirect register indexes (selected by IOREGSEL).
const IOAPIC_REG_ID: u8 = 0x00;
const IOAPIC_REG_VER: u8 = 0x01;
const IOAPIC_REG_ARB: u8 = 0x02;
const IOAPIC_REG_REDTBL_BASE: u8 = 0x10;

// ID and ARB registers: the 4-bit ID sits in bits 27:24.
const IOAPIC_ID_SHIFT: u32 = 24;
const IOAPIC_ID_MASK: u8 = 0x0f;
// VER register: maximum redirection entry index in bits 23:16.
const IOAPIC_VER_MAX_REDIR_SHIFT: u32 = 16;

// Redirection-table entry fields (82093AA datasheet 3.2.4; remappable format: VT-d 5.1.5.1).
const RTE_VECTOR_MASK: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DELIVERY_MODE_MASK: u64 = 0x7;
/// Destination mode (compatibility format) or handle bit 15 (remappable format).
const RTE_DEST_MODE_SHIFT: u32 = 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Remote IRR: never set by this edge-only model.
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_MODE_SHIFT: u32 = 15;
const RTE_MASKED: u64 = 1 << 16;
/// Bits 63:48: destination (63:56) + bits 55:49 + format (48 = 0) in compatibility format, or
/// handle\[14:0\] (63:49) + format (48 = 1) in remappable format.
const RTE_DEST_INDEX_SHIFT: u32 = 48;
const RTE_DEST_INDEX_MASK: u64 = 0xffff;
/// Bits the guest cannot write: delivery status and Remote IRR.
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
/// Reset value of an entry: masked, everything else zero.
const RTE_RESET: u64 = RTE_MASKED;

// MSI message fields (Intel SDM vol. 3 11.11; VT-d 5.1.2): the shared definitions.
use crate::interrupt::msi::{
    ADDRESS_BASE as MSI_ADDRESS_BASE, ADDR_DM_SHIFT as MSI_ADDR_DEST_MODE_SHIFT,
    DATA_DELIVERY_MODE_SHIFT as MSI_DATA_DELIVERY_MODE_SHIFT,
    DATA_LEVEL_ASSERT_SHIFT as MSI_DATA_LEVEL_ASSERT_SHIFT,
    DATA_TRIGGER_SHIFT as MSI_DATA_TRIGGER_SHIFT,
};
/// RTE bits 63:48 land in address bits 19:4 (both formats).
const MSI_ADDR_DEST_INDEX_SHIFT: u32 = 4;

/// The MSI message an IOAPIC emits for redirection-table entry `rte`, ignoring the mask bit.
///
/// One rule covers both entry formats (as QEMU's `ioapic_entry_parse` does): RTE bits 63:48
/// become address bits 19:4 and RTE bit 11 becomes address bit 2.
///
/// - Compatibility format (bit 48 = 0): destination (bits 63:56) lands in address bits 19:12,
///   destination mode (bit 11) in address bit 2. Bits 55:49 land in address bits 11:5, where
///   a guest puts the extended destination ID (APIC ID bits 14:8) when the hypervisor offers
///   `KVM_FEATURE_MSI_EXT_DEST_ID`. This VMM does not offer it and has at most 254 CPUs
///   (`arch::layout::MAX_CPUS`), so a guest leaves those bits 0. Nothing moves them to
///   `address_hi` (QEMU does, in `kvm_arch_fixup_msi_route`); KVM ignores address bits 11:5.
/// - Remappable format (bit 48 = 1): handle\[14:0\] (bits 63:49) lands in address bits 19:5, the
///   format bit in address bit 4 and handle\[15\] (bit 11) in address bit 2, which is exactly the
///   remappable MSI address layout; SHV (address bit 3) stays 0, so the data (the vector field,
///   where Linux puts the pin number) is not part of the IRTE index.
///
/// Data: vector (bits 7:0), delivery mode (bits 10:8), trigger mode in bit 15, and the level
/// "assert" bit 14 set for level-triggered entries (KVM always asserts; the bit is for fidelity;
/// the model is edge-only, see the [module documentation](self)).
/// Polarity, delivery status, Remote IRR and the mask bit do not appear in the message.
pub fn rte_to_msi(rte: u64) -> MsiMessage {
    let dest_index = (rte >> RTE_DEST_INDEX_SHIFT) & RTE_DEST_INDEX_MASK;
    let dest_mode = (rte >> RTE_DEST_MODE_SHIFT) & 1;
    let address = MSI_ADDRESS_BASE
        | (dest_index << MSI_ADDR_DEST_INDEX_SHIFT)
        | (dest_mode << MSI_ADDR_DEST_MODE_SHIFT);

    let vector = rte & RTE_VECTOR_MASK;
    let delivery_mode = (rte >> RTE_DELIVERY_MODE_SHIFT) & RTE_DELIVERY_MODE_MASK;
    let level = (rte >> RTE_TRIGGER_MODE_SHIFT) & 1;
    let data = vector
        | (delivery_mode << MSI_DATA_DELIVERY_MODE_SHIFT)
        | (level << MSI_DATA_LEVEL_ASSERT_SHIFT)
        | (level << MSI_DATA_TRIGGER_SHIFT);

    MsiMessage {
        address,
        // Bits 15:0 only, so the cast is lossless.
        data: data as u32,
    }
}

/// Counters of guest activity on the IOAPIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoapicStats {
    /// Guest writes to a redirection-table dword (low or high half), changed or not.
    pub rte_writes: u64,
    /// EOIs received, from the EOI register or from [`Ioapic::end_of_interrupt`] (counted
    /// only: the model is edge-only).
    pub eois: u64,
}

/// The userspace IOAPIC; see the [module documentation](self).
#[derive(Clone, Debug)]
pub struct Ioapic {
    /// Initial ID, restored by [`Ioapic::reset`].
    reset_id: u8,
    /// 4-bit IOAPIC ID (ID register bits 27:24); must match the MADT and DMAR scope.
    id: u8,
    ioregsel: u8,
    redirection_table: [u64; IOAPIC_NUM_PINS],
    stats: IoapicStats,
}

impl Ioapic {
    /// Creates an IOAPIC with the given ID and every pin masked.
    ///
    /// The ID register holds 4 bits; higher bits of `id` are dropped (with a warning).
    pub fn new(id: u8) -> Ioapic {
        if id > IOAPIC_ID_MASK {
            warn!(
                "ioapic: ID {id} does not fit in 4 bits; using {}",
                id & IOAPIC_ID_MASK
            );
        }
        let id = id & IOAPIC_ID_MASK;
        Ioapic {
            reset_id: id,
            id,
            ioregsel: 0,
            redirection_table: [RTE_RESET; IOAPIC_NUM_PINS],
            stats: IoapicStats::default(),
        }
    }

    /// Returns the IOAPIC to its power-on state (every pin masked, ID as created) and reports
    /// every pin to `sink` as masked. Counters are kept.
    pub fn reset(&mut self, sink: &mut dyn IoapicSink) {
        self.id = self.reset_id;
        self.ioregsel = 0;
        self.redirection_table = [RTE_RESET; IOAPIC_NUM_PINS];
        for pin in 0..IOAPIC_NUM_PINS {
            sink.pin_changed(pin, None);
        }
    }

    /// The ID the IOAPIC was created with (the MADT's; the guest may rewrite the ID register).
    pub fn platform_id(&self) -> u8 {
        self.reset_id
    }

    /// The raw 64-bit redirection entry of `pin`. A pin that does not exist reads as a reset
    /// (masked) entry.
    pub fn redirection_entry(&self, pin: usize) -> u64 {
        self.redirection_table
            .get(pin)
            .copied()
            .unwrap_or(RTE_RESET)
    }

    /// The MSI message the IOAPIC emits for `pin`, or `None` if the pin is masked or does not
    /// exist. See [`rte_to_msi`] for the encoding.
    pub fn pin_msi(&self, pin: usize) -> Option<MsiMessage> {
        let rte = *self.redirection_table.get(pin)?;
        (rte & RTE_MASKED == 0).then(|| rte_to_msi(rte))
    }

    /// Counts an EOI for `vector` (the EOI register, or `KVM_EXIT_IOAPIC_EOI`). Nothing else
    /// happens: the model is edge-only and never sets Remote IRR (see the
    /// [module documentation](self)).
    pub fn end_of_interrupt(&mut self, vector: u8) {
        self.stats.eois += 1;
        crate::guest_debug!(
            "ioapic: EOI for vector {vector:#x} (edge-only model: nothing to release)"
        );
    }

    /// Counters since creation.
    pub fn stats(&self) -> IoapicStats {
        self.stats
    }

    /// The redirection-table pin and half (`true` = high dword) selected by `index`, if any.
    fn redirection_index(index: u8) -> Option<(usize, bool)> {
        let rel = usize::from(index.checked_sub(IOAPIC_REG_REDTBL_BASE)?);
        let pin = rel / 2;
        (pin < IOAPIC_NUM_PINS).then_some((pin, rel % 2 == 1))
    }

    fn read_iowin(&self) -> u32 {
        match self.ioregsel {
            IOAPIC_REG_ID | IOAPIC_REG_ARB => u32::from(self.id) << IOAPIC_ID_SHIFT,
            IOAPIC_REG_VER => {
                // Lossless: 23 fits in a byte.
                let max_redir = (IOAPIC_NUM_PINS - 1) as u32;
                (max_redir << IOAPIC_VER_MAX_REDIR_SHIFT) | u32::from(IOAPIC_VERSION)
            }
            index => match Self::redirection_index(index) {
                Some((pin, high)) => {
                    let rte = self.redirection_table[pin];
                    // Truncation to the selected half is the point.
                    if high {
                        (rte >> 32) as u32
                    } else {
                        rte as u32
                    }
                }
                None => {
                    crate::guest_debug!("ioapic: read of unknown register {index:#x}");
                    0
                }
            },
        }
    }

    fn write_iowin(&mut self, value: u32, sink: &mut dyn IoapicSink) {
        match self.ioregsel {
            IOAPIC_REG_ID => {
                // Lossless after the shift: the mask keeps 4 bits.
                self.id = ((value >> IOAPIC_ID_SHIFT) as u8) & IOAPIC_ID_MASK;
            }
            IOAPIC_REG_VER | IOAPIC_REG_ARB => {
                crate::guest_debug!(
                    "ioapic: write {value:#x} to read-only register {:#x}",
                    self.ioregsel
                );
            }
            index => match Self::redirection_index(index) {
                Some((pin, high)) => self.write_rte_half(pin, high, value, sink),
                None => {
                    crate::guest_debug!("ioapic: write {value:#x} to unknown register {index:#x}")
                }
            },
        }
    }

    fn write_rte_half(&mut self, pin: usize, high: bool, value: u32, sink: &mut dyn IoapicSink) {
        self.stats.rte_writes += 1;
        let old = self.redirection_table[pin];
        let mut new = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        // Delivery status and Remote IRR are read-only (and always 0 in this model).
        new = (new & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
        self.redirection_table[pin] = new;
        if new != old {
            crate::guest_debug!("ioapic: pin {pin} entry {old:#018x} -> {new:#018x}");
            sink.pin_changed(pin, self.pin_msi(pin));
        }
    }
}

impl Ioapic {
    /// A guest MMIO read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            crate::guest_debug!("ioapic: ignoring {}-byte read at {offset:#x}", data.len());
            return;
        }
        let value = match offset {
            IOREGSEL_OFFSET => u32::from(self.ioregsel),
            IOWIN_OFFSET => self.read_iowin(),
            // EOI is write-only.
            IOEOI_OFFSET => 0,
            _ => {
                crate::guest_debug!("ioapic: read of unknown offset {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest MMIO write at `offset` in the window; every redirection entry it changes is
    /// pushed to `sink`.
    pub fn write(&mut self, offset: u64, data: &[u8], sink: &mut dyn IoapicSink) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_debug!("ioapic: ignoring {}-byte write at {offset:#x}", data.len());
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            // IOREGSEL is an 8-bit register; the upper bits of the dword are ignored.
            IOREGSEL_OFFSET => self.ioregsel = value as u8,
            IOWIN_OFFSET => self.write_iowin(value, sink),
            IOEOI_OFFSET => {
                // The vector is in bits 7:0.
                self.end_of_interrupt(value as u8);
            }
            _ => crate::guest_debug!("ioapic: write {value:#x} to unknown offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write whose changes nobody looks at; returns the pins it changed.
    fn w(ioapic: &mut Ioapic, offset: u64, data: &[u8]) -> u32 {
        let mut changed = ChangedPins::default();
        ioapic.write(offset, data, &mut changed);
        changed.0
    }

    fn select(ioapic: &mut Ioapic, index: u8) {
        w(ioapic, IOREGSEL_OFFSET, &u32::from(index).to_le_bytes());
    }

    /// Writes an indirect register; returns the pins whose entry changed.
    fn write_reg(ioapic: &mut Ioapic, index: u8, value: u32) -> u32 {
        select(ioapic, index);
        w(ioapic, IOWIN_OFFSET, &value.to_le_bytes())
    }

    fn read_reg(ioapic: &mut Ioapic, index: u8) -> u32 {
        select(ioapic, index);
        let mut data = [0u8; 4];
        ioapic.read(IOWIN_OFFSET, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_rte(ioapic: &mut Ioapic, pin: u8, rte: u64) -> u32 {
        write_reg(ioapic, 0x10 + 2 * pin, rte as u32)
            | write_reg(ioapic, 0x11 + 2 * pin, (rte >> 32) as u32)
    }

    fn read_rte(ioapic: &mut Ioapic, pin: u8) -> u64 {
        let low = read_reg(ioapic, 0x10 + 2 * pin);
        let high = read_reg(ioapic, 0x11 + 2 * pin);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Level-triggered, unmasked, fixed delivery to APIC 0.
    fn level_rte(vector: u8) -> u64 {
        1 << RTE_TRIGGER_MODE_SHIFT | u64::from(vector)
    }

    // --- rte_to_msi -------------------------------------------------------------------------

    #[test]
    fn msi_for_physical_fixed_edge_entry() {
        // Destination APIC 3 (bits 63:56), vector 0x30, fixed, physical, edge.
        let rte = 3 << 56 | 0x30;
        assert_eq!(
            rte_to_msi(rte),
            MsiMessage {
                address: 0xfee0_3000,
                data: 0x30
            }
        );
    }

    #[test]
    fn msi_for_logical_lowest_priority_entry() {
        // Logical destination 0x0f (bit 11 -> address bit 2), lowest priority (1 -> data 10:8).
        let rte = 0x0f << 56 | 1 << 11 | 1 << 8 | 0x41;
        assert_eq!(
            rte_to_msi(rte),
            MsiMessage {
                address: 0xfee0_f004,
                data: 0x141
            }
        );
    }

    #[test]
    fn msi_for_level_entry_sets_trigger_and_assert() {
        let msi = rte_to_msi(level_rte(0x50));
        assert_eq!(msi.data, 0xc050);
        assert_eq!(msi.address, 0xfee0_0000);
    }

    #[test]
    fn msi_for_nmi_and_extint_keep_delivery_mode() {
        assert_eq!(rte_to_msi(4 << 8).data, 0x400);
        assert_eq!(rte_to_msi(7 << 8).data, 0x700);
    }

    #[test]
    fn msi_ignores_mask_polarity_and_status_bits() {
        let plain = 2 << 56 | 0x33;
        let noisy = plain | RTE_MASKED | 1 << 13 | RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
        assert_eq!(rte_to_msi(noisy), rte_to_msi(plain));
    }

    #[test]
    fn msi_carries_extended_destination_id_in_address_11_5() {
        // APIC ID 0x1234: bits 7:0 (0x34) in RTE 63:56, bits 14:8 (0x12) in RTE 55:49.
        let rte = 0x34 << 56 | 0x12 << 49 | 0x30;
        let msi = rte_to_msi(rte);
        assert_eq!(msi.address, 0xfee3_4000 | 0x12 << 5);
        assert!(!msi.is_remappable());
    }

    #[test]
    fn msi_for_remappable_entry_encodes_handle() {
        // Handle 0x1234: bits 14:0 in RTE 63:49, format bit 48; vector field holds pin 5.
        let rte = 0x1234 << 49 | 1 << 48 | 5;
        let msi = rte_to_msi(rte);
        assert_eq!(msi.address, 0xfee0_0000 | 0x1234 << 5 | 1 << 4);
        assert!(msi.is_remappable());
        // SHV (address bit 3) stays clear.
        assert_eq!(msi.address & 1 << 3, 0);
        assert_eq!(msi.data, 5);
    }

    #[test]
    fn msi_for_remappable_entry_puts_handle_bit_15_in_address_bit_2() {
        // Handle 0x8005: bit 15 goes in RTE bit 11, bits 14:0 (5) in RTE 63:49.
        let rte = 5 << 49 | 1 << 48 | 1 << 11 | 1 << RTE_TRIGGER_MODE_SHIFT | 9;
        let msi = rte_to_msi(rte);
        assert_eq!(msi.address, 0xfee0_0000 | 5 << 5 | 1 << 4 | 1 << 2);
        assert_eq!(msi.data, 0xc009);
    }

    #[test]
    fn msi_for_largest_remappable_handle() {
        let rte = 0x7fff << 49 | 1 << 48 | 1 << 11;
        let msi = rte_to_msi(rte);
        assert_eq!(msi.address, 0xfeef_fff4);
        assert!(msi.address < 1 << 32);
    }

    #[test]
    fn msi_address_stays_in_interrupt_window() {
        for rte in [0, u64::MAX, 0xffff_0000_0000_0000, 0x0000_ffff_ffff_ffff] {
            let msi = rte_to_msi(rte);
            assert_eq!(msi.address & !0xf_ffff, 0xfee0_0000, "{rte:#x}");
            assert_eq!(msi.data & !0xc7ff, 0, "{rte:#x}");
        }
    }

    // --- registers ----------------------------------------------------------------------------

    #[test]
    fn new_ioapic_masks_every_pin() {
        let mut ioapic = Ioapic::new(0);
        for pin in 0..IOAPIC_NUM_PINS as u8 {
            assert_eq!(read_rte(&mut ioapic, pin), RTE_MASKED);
        }
    }

    #[test]
    fn masked_pin_has_no_msi() {
        let mut ioapic = Ioapic::new(0);
        assert_eq!(ioapic.pin_msi(4), None);
        write_rte(&mut ioapic, 4, RTE_MASKED | 0x30);
        assert_eq!(ioapic.pin_msi(4), None);
    }

    #[test]
    fn unmasked_pin_msi_matches_rte_to_msi() {
        let mut ioapic = Ioapic::new(0);
        let rte = 1 << 56 | 0x31;
        write_rte(&mut ioapic, 4, rte);
        assert_eq!(ioapic.redirection_entry(4), rte);
        assert_eq!(ioapic.pin_msi(4), Some(rte_to_msi(rte)));
    }

    #[test]
    fn nonexistent_pin_is_masked_and_has_no_msi() {
        let ioapic = Ioapic::new(0);
        assert_eq!(ioapic.redirection_entry(IOAPIC_NUM_PINS), RTE_MASKED);
        assert_eq!(ioapic.pin_msi(IOAPIC_NUM_PINS), None);
    }

    #[test]
    fn version_register_reports_0x20_and_24_pins() {
        let mut ioapic = Ioapic::new(0);
        assert_eq!(read_reg(&mut ioapic, IOAPIC_REG_VER), 0x0017_0020);
        write_reg(&mut ioapic, IOAPIC_REG_VER, 0);
        assert_eq!(read_reg(&mut ioapic, IOAPIC_REG_VER), 0x0017_0020);
    }

    #[test]
    fn id_register_holds_4_bit_id() {
        let mut ioapic = Ioapic::new(2);
        assert_eq!(read_reg(&mut ioapic, IOAPIC_REG_ID), 2 << 24);
        assert_eq!(read_reg(&mut ioapic, IOAPIC_REG_ARB), 2 << 24);
        write_reg(&mut ioapic, IOAPIC_REG_ID, 0xff00_0000);
        assert_eq!(read_reg(&mut ioapic, IOAPIC_REG_ID), 0x0f00_0000);
        assert_eq!(Ioapic::new(0x13).id, 3);
    }

    #[test]
    fn ioregsel_reads_back() {
        let mut ioapic = Ioapic::new(0);
        select(&mut ioapic, 0x2f);
        let mut data = [0u8; 4];
        ioapic.read(IOREGSEL_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x2f);
    }

    #[test]
    fn rte_write_pushes_the_changed_pin_and_its_message() {
        struct Record(Vec<(usize, Option<MsiMessage>)>);
        impl IoapicSink for Record {
            fn pin_changed(&mut self, pin: usize, msg: Option<MsiMessage>) {
                self.0.push((pin, msg));
            }
        }
        let mut ioapic = Ioapic::new(0);
        let mut rec = Record(Vec::new());
        select(&mut ioapic, 0x10 + 2 * 7);
        ioapic.write(IOWIN_OFFSET, &0x30u32.to_le_bytes(), &mut rec); // unmask pin 7
        select(&mut ioapic, 0x10 + 2 * 7);
        ioapic.write(IOWIN_OFFSET, &RTE_MASKED.to_le_bytes()[..4], &mut rec); // mask it again
        assert_eq!(
            rec.0,
            vec![(7, Some(rte_to_msi(0x30))), (7, None)],
            "each change is pushed with the pin's new message"
        );
        assert_eq!(write_reg(&mut ioapic, 0x11 + 2 * 9, 1 << 24), 1 << 9);
    }

    #[test]
    fn unchanged_rte_write_pushes_nothing() {
        let mut ioapic = Ioapic::new(0);
        assert_eq!(write_rte(&mut ioapic, 3, 0x30), 1 << 3);
        assert_eq!(write_rte(&mut ioapic, 3, 0x30), 0);
        assert_eq!(ioapic.stats().rte_writes, 4);
    }

    #[test]
    fn remote_irr_is_read_only_and_never_set() {
        let mut ioapic = Ioapic::new(0);
        // The guest cannot set it, and EOIs leave entries alone (edge-only model).
        write_rte(&mut ioapic, 2, level_rte(0x40) | RTE_REMOTE_IRR);
        assert_eq!(ioapic.redirection_entry(2), level_rte(0x40));
        ioapic.end_of_interrupt(0x40);
        assert_eq!(ioapic.redirection_entry(2), level_rte(0x40));
    }

    #[test]
    fn delivery_status_is_read_only() {
        let mut ioapic = Ioapic::new(0);
        write_rte(&mut ioapic, 1, RTE_DELIVERY_STATUS | 0x30);
        assert_eq!(ioapic.redirection_entry(1), 0x30);
    }

    #[test]
    fn high_dword_bits_are_all_writable() {
        // Destination, extended destination ID and the remappable format bit live there.
        let mut ioapic = Ioapic::new(0);
        write_reg(&mut ioapic, 0x11, 0xffff_ffff);
        assert_eq!(
            ioapic.redirection_entry(0),
            0xffff_ffff_0000_0000 | RTE_MASKED
        );
    }

    #[test]
    fn unknown_register_reads_zero_and_ignores_writes() {
        let mut ioapic = Ioapic::new(0);
        // 0x40 is just past the last entry (0x10 + 2 * 24); 0x03 and 0xff are unassigned.
        for index in [0x03, 0x0f, 0x40, 0xff] {
            assert_eq!(write_reg(&mut ioapic, index, 0xffff_ffff), 0);
            assert_eq!(read_reg(&mut ioapic, index), 0, "{index:#x}");
        }
    }

    #[test]
    fn non_32bit_access_is_ignored() {
        let mut ioapic = Ioapic::new(0);
        select(&mut ioapic, 0x10);
        w(&mut ioapic, IOWIN_OFFSET, &[0x30, 0, 0, 0, 0, 0, 0, 0]);
        w(&mut ioapic, IOWIN_OFFSET, &[0x30]);
        assert_eq!(ioapic.redirection_entry(0), RTE_MASKED);

        let mut data = [0xaau8; 8];
        ioapic.read(IOWIN_OFFSET, &mut data);
        assert_eq!(data, [0; 8]);
        let mut byte = [0xaau8; 1];
        ioapic.read(IOREGSEL_OFFSET, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let mut ioapic = Ioapic::new(0);
        for offset in (0..IOAPIC_WINDOW_SIZE + 8).chain([u64::MAX - 3, u64::MAX]) {
            for len in 0..=8 {
                let mut data = vec![0xffu8; len];
                w(&mut ioapic, offset, &data);
                ioapic.read(offset, &mut data);
            }
        }
        for index in 0..=u8::MAX {
            write_reg(&mut ioapic, index, 0xffff_ffff);
            read_reg(&mut ioapic, index);
        }
    }

    // --- EOI ----------------------------------------------------------------------------------

    #[test]
    fn eoi_register_write_is_counted() {
        let mut ioapic = Ioapic::new(0);
        write_rte(&mut ioapic, 5, level_rte(0x55));
        // Upper bits of the EOI dword are not part of the vector.
        assert_eq!(
            w(&mut ioapic, IOEOI_OFFSET, &0xffff_ff55u32.to_le_bytes()),
            0
        );
        assert_eq!(ioapic.redirection_entry(5), level_rte(0x55));
        assert_eq!(ioapic.stats().eois, 1);
    }

    #[test]
    fn stats_count_rte_writes_and_eois() {
        let mut ioapic = Ioapic::new(0);
        write_rte(&mut ioapic, 0, 0x30);
        write_reg(&mut ioapic, 0x12, 0x31);
        ioapic.end_of_interrupt(0x30);
        w(&mut ioapic, IOEOI_OFFSET, &0x31u32.to_le_bytes());
        assert_eq!(
            ioapic.stats(),
            IoapicStats {
                rte_writes: 3,
                eois: 2
            }
        );
    }

    #[test]
    fn reset_masks_every_pin_and_reports_all() {
        let mut ioapic = Ioapic::new(1);
        write_rte(&mut ioapic, 0, 0x30);
        write_reg(&mut ioapic, IOAPIC_REG_ID, 0x0500_0000);
        let mut changed = ChangedPins::default();
        ioapic.reset(&mut changed);
        assert_eq!(ioapic.pin_msi(0), None);
        assert_eq!(changed.0, 0x00ff_ffff);
        assert_eq!(read_reg(&mut ioapic, IOAPIC_REG_ID), 1 << 24);
    }
}
