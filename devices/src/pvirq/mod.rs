// SPDX-License-Identifier: Apache-2.0

//! PV-IR, paravirtual interrupt remapping (interface v1.0, `docs/pv-irq-remap.md`): instead of
//! building remapping tables in its own memory for an emulated IOMMU, the guest asks the VMM,
//! through one 64-byte request block per `REQUEST` register write, for the MSI address/data
//! pair that delivers a (vector, CPU) from a given source (an IOAPIC pin or a PCI requester
//! ID). [`PvIrq`] owns the handle table, binds every handle to the source it was allocated
//! for, and, like [`RemapUnit`](crate::RemapUnit), is not a [`BusDevice`](crate::BusDevice):
//! the VMM's interrupt router owns it, forwards the register page's accesses
//! ([`PvIrq::read`], [`PvIrq::write`]), builds each KVM route from [`PvIrq::translate`] of the
//! message a source was programmed with, and is told through the [`PvIrqSink`], during the
//! write that caused it, which routes to rebuild ([`RouteInvalidation`](crate::remap::RouteInvalidation), in the index space of
//! [`remap_index`](crate::remap::remap_index)). Blocked interrupts that fire are reported back
//! with [`PvIrq::request_blocked`] (`FAULT_COUNT`, `LAST_FAULT`).

mod device;
pub mod regs;

#[cfg(test)]
mod tests;

pub use device::{
    PvBlockReason, PvBlocked, PvBlockedStats, PvIrq, PvIrqConfig, PvIrqSink, PvIrqStats, PvOpStats,
    PvSource, PvStatus, PvStatusStats, RecordingPvSink,
};
pub use regs::PVIR_PAGE_SIZE;
