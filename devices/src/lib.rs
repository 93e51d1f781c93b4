// SPDX-License-Identifier: Apache-2.0

//! Device models for the VMM: the I/O bus, the userspace IOAPIC, a 16550 UART, ACPI power
//! management, an MMIO power-off register (device-tree guests) and an i8042 reset stub.
//!
//! This crate has no KVM dependency, spawns no threads and opens no device nodes; the VMM
//! wires the models to KVM.
//!
//! # Interrupt model
//!
//! The VMM runs KVM with a *split irqchip*: the LAPICs are in KVM, the IOAPIC is
//! [`Ioapic`], here. Every interrupt source is a GSI with a KVM MSI route and an irqfd:
//!
//! ```text
//!  device ──trigger()──► InterruptLine (irqfd) ──► KVM MSI route of the GSI ──► LAPIC
//!                                                   ▲
//!  guest writes IOAPIC RTE ──► Ioapic::write ──► IoapicSink::pin_changed ──► VMM rebuilds
//!                                                                           the route
//! ```
//!
//! - **Delivery**: a device calls [`InterruptLine::trigger`]; the VMM's implementation writes
//!   the irqfd and KVM injects the routed MSI. No VMM thread wakes up.
//! - **Reprogramming**: the guest writes a redirection entry through the IOAPIC's MMIO window.
//!   [`Ioapic::write`] pushes each changed pin and its new message ([`Ioapic::pin_msi`],
//!   `None` = masked: drop the route) into the VMM's [`IoapicSink`], which updates the KVM
//!   routing table. [`rte_to_msi`] is pure, so an interrupt-remapping unit ([`remap`]) sits
//!   between the IOAPIC and the routes: remappable-format messages
//!   ([`MsiMessage::is_remappable`]) are translated through the remapping table before KVM
//!   sees them, and the unit pushes invalidations and its own event interrupts into a
//!   [`RemapSink`]. [`PvIrq`] ([`pvirq`], PV-IR) is the paravirtual alternative: the guest asks
//!   it for the message of each (vector, CPU) instead of writing remapping tables, and it pushes
//!   the routes to rebuild into a [`PvIrqSink`]. A VM has one or the other.
//! - **Edge only**: devices are edge sources (split irqchip has no resample eventfd). The
//!   IOAPIC never sets Remote IRR; EOIs ([`Ioapic::end_of_interrupt`]) are only counted.
//!
//! Port I/O and MMIO both dispatch through a [`Bus`] of [`BusDevice`]s. Power-off and reset
//! requests from the guest ([`AcpiPm`], [`PowerOff`] for device-tree guests, [`I8042`]) reach the VMM's event loop through an
//! [`ExitSignal`].

#![deny(missing_docs)]

pub mod bus;
pub mod debug_exit;
pub mod exit;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod marker;
pub mod pci;
pub mod pm;
pub mod poweroff;
pub mod pvirq;
pub mod ratelimit;
pub mod remap;
pub mod serial;
pub mod sync;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use debug_exit::DebugExit;
pub use exit::{ExitRequest, ExitSignal, ExitSignalError};
pub use i8042::I8042;
pub use interrupt::{CountingLine, InterruptLine, MsiMessage};
pub use ioapic::{rte_to_msi, ChangedPins, Ioapic, IoapicSink, IoapicStats};
pub use pm::{AcpiPm, PM_RESET_VALUE, PM_SLEEP_S5_VALUE};
pub use poweroff::PowerOff;
pub use pvirq::{
    PvBlockReason, PvBlocked, PvIrq, PvIrqConfig, PvIrqSink, PvIrqStats, PvSource, PVIR_PAGE_SIZE,
};
pub use remap::{RemapSink, RemapStats, RemapUnit, RouteInvalidation, UnitEvent};
pub use serial::Serial;
