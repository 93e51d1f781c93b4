// SPDX-License-Identifier: Apache-2.0

//! How devices raise interrupts, and the MSI message type shared with the VMM.
//!
//! A device holds an `Arc<dyn InterruptLine>` and calls [`InterruptLine::trigger`]; it does not
//! know which GSI, route or vector is behind it. The VMM implements the trait over an irqfd
//! [`EventFd`] registered with KVM, so a trigger is one `write(2)` and KVM injects the MSI
//! without any VMM thread waking up.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

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

impl MsiMessage {
    /// Address bit 4, "interrupt format": set for a remappable-format message, which KVM cannot
    /// decode and which must be translated through the interrupt-remapping table first.
    pub const ADDR_REMAPPABLE_FORMAT: u64 = 1 << 4;

    /// Whether this message is in remappable format (see [`Self::ADDR_REMAPPABLE_FORMAT`]).
    pub fn is_remappable(&self) -> bool {
        self.address & Self::ADDR_REMAPPABLE_FORMAT != 0
    }
}

/// An [`InterruptLine`] that writes 1 to an [`EventFd`] per trigger, for use as a KVM irqfd.
#[derive(Debug)]
pub struct EventFdLine {
    eventfd: EventFd,
    triggers: AtomicU64,
}

impl EventFdLine {
    /// Wraps `eventfd`; the VMM registers [`Self::eventfd`] as the irqfd of the line's GSI.
    pub fn new(eventfd: EventFd) -> EventFdLine {
        EventFdLine {
            eventfd,
            triggers: AtomicU64::new(0),
        }
    }

    /// The eventfd written on each trigger.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// How many times the line was triggered successfully.
    pub fn triggers(&self) -> u64 {
        self.triggers.load(Ordering::Relaxed)
    }
}

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.eventfd.write(1)?;
        self.triggers.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn eventfd_line_writes_one_per_trigger() {
        let line = EventFdLine::new(EventFd::new(EFD_NONBLOCK).unwrap());
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
        assert_eq!(line.triggers(), 2);
    }

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
        assert_send_sync::<EventFdLine>();
    }
}
