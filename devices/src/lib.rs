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
//!  guest writes IOAPIC RTE ──► Ioapic::take_dirty_pins / pin_msi ──► VMM rebuilds the route
//! ```
//!
//! - **Fast path**: a device calls [`InterruptLine::trigger`]; the VMM's implementation writes
//!   the irqfd and KVM injects the routed MSI. No VMM thread wakes up.
//! - **Slow path**: the guest programs a redirection entry through the IOAPIC's MMIO window.
//!   The VMM asks [`Ioapic::take_dirty_pins`] which pins changed, gets each pin's message from
//!   [`Ioapic::pin_msi`] (`None` = masked: drop the route), and updates the KVM routing table.
//!   [`rte_to_msi`] is pure, so an interrupt-remapping unit can sit between the IOAPIC and the
//!   routes: remappable-format messages ([`MsiMessage::is_remappable`]) must be translated
//!   through the remapping table before KVM sees them.
//! - Devices are edge sources (split irqchip has no resample eventfd). EOIs for
//!   level-triggered pins reach [`Ioapic::end_of_interrupt`], which clears Remote IRR.
//!
//! Port I/O and MMIO both dispatch through a [`Bus`] of [`BusDevice`]s. Power-off and reset
//! requests from the guest ([`AcpiPm`], [`PowerOff`] for device-tree guests, [`I8042`]) reach the VMM's event loop through an
//! [`ExitSignal`].

#![deny(missing_docs)]

pub mod bus;
pub mod exit;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod pm;
pub mod poweroff;
pub mod ratelimit;
pub mod remap;
pub mod serial;
pub mod sync;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitRequest, ExitSignal, ExitSignalError};
pub use i8042::I8042;
pub use interrupt::{CountingLine, EventFdLine, InterruptLine, MsiMessage};
pub use ioapic::{rte_to_msi, Ioapic, IoapicStats};
pub use pm::{AcpiPm, PM_RESET_VALUE, PM_SLEEP_S5_VALUE};
pub use poweroff::PowerOff;
pub use remap::{RemapStats, RemapUnit, RouteInvalidation};
pub use serial::Serial;
