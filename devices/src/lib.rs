// SPDX-License-Identifier: Apache-2.0

//! Device models for the VMM (work in progress: more devices and the crate docs follow).

#![deny(missing_docs)]

pub mod bus;
pub mod exit;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod pm;
pub mod serial;
pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitRequest, ExitSignal, ExitSignalError};
pub use i8042::I8042;
pub use interrupt::{CountingLine, EventFdLine, InterruptLine, MsiMessage};
pub use ioapic::{rte_to_msi, Ioapic, IoapicStats};
pub use pm::{AcpiPm, PM_RESET_VALUE, PM_SLEEP_S5_VALUE};
pub use serial::Serial;
