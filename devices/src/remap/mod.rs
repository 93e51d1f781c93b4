// SPDX-License-Identifier: Apache-2.0

//! Interrupt remapping through a remapping-only VT-d (DMAR) unit.
//!
//! An unmodified x86 Linux guest only remaps interrupts through a unit described by the ACPI
//! DMAR table (Linux drivers/iommu/irq_remapping.c picks the remapper while it sets up the
//! APIC; the DMAR unit is the one a stock kernel knows): it programs interrupt-remapping
//! table entries (IRTEs) in its own memory, points the unit at the table, and tells it about
//! changes through the queued-invalidation interface. This module models such a unit with no DMA
//! translation at all (CAP.SAGAW = 0, so Linux ignores it for DMA, which virtio-iommu owns).
//!
//! # Pieces
//!
//! - [`irte`]: the pure part. [`Irte`] decodes an entry, [`remap_index`] finds the entry a
//!   remappable-format message names, and [`translate`] turns a message into the
//!   compatibility-format message KVM routes, or [`Blocked`] with the VT-d fault reason.
//! - [`queue`]: decoding of invalidation-queue descriptors.
//! - [`RemapUnit`] ([`unit`](mod@unit)): the 4 KiB register page as a [`BusDevice`](crate::BusDevice)
//!   (the VMM maps it at 0xFED9_0000, where the DMAR table's DRHD points), the queue
//!   processor, fault recording and the event interrupts.
//! - [`regs`]: register offsets, bits and the capability values reported.
//!
//! # How the VMM uses it
//!
//! Interrupts never pass through the unit at run time. The VMM keeps, per interrupt source
//! (IOAPIC pin, MSI-X vector), the message the guest programmed, and builds each KVM MSI
//! route from [`RemapUnit::translate`] of it (an error means: no route; the source is
//! *parked*, its eventfd polled by the VMM). The unit *pushes* everything the VMM must act on
//! into the [`RemapSink`] that every side-effecting entry point takes:
//!
//! - [`RemapSink::invalidate`]: which routes to recompute, all of them or those whose
//!   message's [`remap_index`] falls in the given ranges (index-selective interrupt entry
//!   cache invalidations). Called at each wait descriptor *before* its status write, so a
//!   guest that sees the status knows the new routes are in KVM;
//! - [`RemapSink::raise`]: invalidation-completion and fault-event interrupts, injected with
//!   `KVM_SIGNAL_MSI` (control plane only).
//!
//! A parked source that fires is an interrupt request the remapping hardware blocks: the VMM
//! reports it with [`RemapUnit::request_blocked`], which records the fault (one per request,
//! VT-d 5.1.4) and raises the fault event through the sink.
//!
//! ```text
//!  guest writes IRTE, then IEC + wait descriptors, then IQT
//!     └─► RemapUnit::write(IQT, sink) ─► IEC descriptors collected
//!            └─► wait descriptor: sink.invalidate(unit, inv) ─► VMM re-translates affected
//!                   sources (RemapUnit::translate) ─► one KVM_SET_GSI_ROUTING
//!            └─► then the status write / IWC / completion event (sink.raise)
//! ```
//!
//! # Register behaviour worth knowing
//!
//! - GCMD: TE is refused (TES stays 0); QIE, IRE and CFI are levels mirrored at once in GSTS
//!   (Linux polls GSTS and panics if it waits too long); SRTP and SIRTP are one-shot, SIRTP
//!   latches IRTA into the table used for translation.
//! - The queue is processed synchronously on every IQT write, on QIE enable and when the
//!   guest clears FSTS.IQE. A malformed descriptor stops processing with IQH pointing at it
//!   and raises FSTS.IQE (IQER holds the reason); only 128-bit descriptors exist (IQA.DW = 1
//!   is a queue error).
//! - Accesses are 4 or 8 bytes, 4-byte aligned; anything else is ignored (reads return 0).
//!   Unknown offsets read 0 and ignore writes.

pub mod irte;
pub mod queue;
pub mod regs;
pub mod unit;

#[cfg(test)]
mod tests;

pub use irte::{remap_index, translate, BlockReason, Blocked, IrtTable, Irte};
pub use regs::{REMAP_UNIT_SIZE, VTD_CAP, VTD_ECAP, VTD_VER};
pub use unit::{
    BlockedStats, RecordingSink, RemapSink, RemapStats, RemapUnit, RouteInvalidation, UnitEvent,
};
