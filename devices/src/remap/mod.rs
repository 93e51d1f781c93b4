// SPDX-License-Identifier: Apache-2.0

//! Interrupt remapping through a remapping-only VT-d (DMAR) unit.
//!
//! An unmodified x86 Linux guest only remaps interrupts through a unit described by the ACPI
//! DMAR table (virtio-iommu brief B.1, F.3): it programs interrupt-remapping table entries
//! (IRTEs) in its own memory, points the unit at the table, and tells it about changes
//! through the queued-invalidation interface. This module models such a unit with no DMA
//! translation at all (CAP.SAGAW = 0, so Linux ignores it for DMA, which virtio-iommu owns).
//!
//! This commit holds the pure parts: [`irte`] (entry decoding, [`remap_index`] and
//! [`translate`]), [`queue`] (invalidation descriptors) and [`regs`] (register layout and the
//! capability values reported).

pub mod irte;
pub mod queue;
pub mod regs;

pub use irte::{remap_index, translate, BlockReason, Blocked, IrtTable, Irte};
pub use regs::{REMAP_UNIT_SIZE, VTD_CAP, VTD_ECAP, VTD_VER};
