// SPDX-License-Identifier: Apache-2.0

//! Device models for the VMM (work in progress: more devices and the crate docs follow).

#![deny(missing_docs)]

pub mod bus;
pub mod interrupt;
pub mod ioapic;
pub mod serial;
pub use bus::{Bus, BusDevice, BusError};
pub use interrupt::{CountingLine, EventFdLine, InterruptLine, MsiMessage};
pub use ioapic::{rte_to_msi, Ioapic, IoapicStats};
pub use serial::Serial;
