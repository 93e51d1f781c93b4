// SPDX-License-Identifier: Apache-2.0

//! How devices raise interrupts, and the MSI message type shared with the VMM.
//!
//! A device holds an `Arc<dyn InterruptLine>` and calls [`InterruptLine::trigger`]; it does not
//! know which GSI, route or vector is behind it. The VMM implements the trait over an irqfd
//! (an eventfd registered with KVM: `vmm::interrupts::IrqfdLine`), so a trigger is one `write(2)` and KVM injects the MSI
//! without any VMM thread waking up.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// One interrupt source a device can raise (edge semantics: every call is one interrupt).
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An MSI message in compatibility or remappable format, as a device or the IOAPIC emits it.
///
/// `address` holds the full 64-bit message address (`address_hi << 32 | address_lo`); the
/// messages built in this crate always have `address_hi == 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (0xFEEx_xxxx for interrupts).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// MSI address and data fields (Intel SDM vol. 3 11.11; remappable format: VT-d 5.1.2),
/// shared by the IOAPIC model and the remapping unit.
pub mod msi {
    /// Address bits 31:20 of every interrupt message.
    pub const ADDRESS_BASE: u64 = 0xfee0_0000;
    /// The bits [`ADDRESS_BASE`] occupies.
    pub const ADDRESS_HEAD_MASK: u64 = 0xfff0_0000;
    /// Compatibility format: destination ID in address bits 19:12.
    pub const ADDR_DEST_SHIFT: u32 = 12;
    /// Compatibility format: redirection hint in address bit 3.
    pub const ADDR_RH_SHIFT: u32 = 3;
    /// Compatibility format: destination mode in address bit 2.
    pub const ADDR_DM_SHIFT: u32 = 2;
    /// Remappable format: sub-handle valid (address bit 3).
    pub const ADDR_SHV: u64 = 1 << 3;
    /// Remappable format: handle\[14:0\] in address bits 19:5.
    pub const ADDR_HANDLE_LOW_SHIFT: u32 = 5;
    /// Mask of handle\[14:0\].
    pub const ADDR_HANDLE_LOW_MASK: u64 = 0x7fff;
    /// Remappable format: handle\[15\] in address bit 2.
    pub const ADDR_HANDLE_HIGH_SHIFT: u32 = 2;
    /// Remappable format: the sub-handle in data bits 15:0.
    pub const DATA_SUBHANDLE_MASK: u32 = 0xffff;
    /// Delivery mode in data bits 10:8.
    pub const DATA_DELIVERY_MODE_SHIFT: u32 = 8;
    /// Level "assert" in data bit 14.
    pub const DATA_LEVEL_ASSERT_SHIFT: u32 = 14;
    /// Trigger mode in data bit 15 (1 = level).
    pub const DATA_TRIGGER_SHIFT: u32 = 15;
}

impl MsiMessage {
    /// Address bit 4, "interrupt format": set for a remappable-format message, which KVM cannot
    /// decode and which must be translated through the interrupt-remapping table first.
    pub const ADDR_REMAPPABLE_FORMAT: u64 = 1 << 4;

    /// Whether this message is in remappable format (see [`Self::ADDR_REMAPPABLE_FORMAT`]).
    pub fn is_remappable(&self) -> bool {
        self.address & Self::ADDR_REMAPPABLE_FORMAT != 0
    }
}

/// An [`InterruptLine`] that only counts triggers. Meant for tests (in this crate and in the
/// VMM's), and for a device whose interrupt is deliberately not wired.
#[derive(Debug, Default)]
pub struct CountingLine {
    triggers: AtomicU64,
}

impl CountingLine {
    /// A line that has never been triggered.
    pub fn new() -> CountingLine {
        CountingLine::default()
    }

    /// How many times the line was triggered.
    pub fn triggers(&self) -> u64 {
        self.triggers.load(Ordering::Relaxed)
    }
}

impl InterruptLine for CountingLine {
    fn trigger(&self) -> io::Result<()> {
        self.triggers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_line_counts_triggers() {
        let line = CountingLine::new();
        assert_eq!(line.triggers(), 0);
        line.trigger().unwrap();
        assert_eq!(line.triggers(), 1);
    }

    #[test]
    fn remappable_flag_is_address_bit_4() {
        let compat = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        let remap = MsiMessage {
            address: 0xfee0_0010,
            data: 0,
        };
        assert!(!compat.is_remappable());
        assert!(remap.is_remappable());
    }

    #[test]
    fn lines_are_shareable() {
        fn assert_send_sync<T: Send + Sync + ?Sized>() {}
        assert_send_sync::<dyn InterruptLine>();
        assert_send_sync::<CountingLine>();
    }
}
