// SPDX-License-Identifier: Apache-2.0

//! The PV-IR register page, request execution and translation: [`PvIrq`].

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::*;
use crate::guest_debug;
use crate::interrupt::msi::{
    ADDRESS_BASE, ADDR_HANDLE_HIGH_SHIFT, ADDR_HANDLE_LOW_SHIFT, ADDR_SHV,
};
use crate::interrupt::MsiMessage;
use crate::remap::irte::compatibility_msi;
use crate::remap::{remap_index, RouteInvalidation};

/// An interrupt source, as a handle is bound to it and as the VMM names the sender of a
/// message it translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PvSource {
    /// One pin of an IOAPIC (binding is per pin, spec §4).
    IoapicPin {
        /// The IOAPIC's ID, as in the MADT.
        ioapic_id: u8,
        /// The pin.
        pin: u8,
    },
    /// A PCI function, by requester ID (after DMA-alias resolution).
    Pci {
        /// PCI segment (only 0 exists here).
        segment: u16,
        /// bus << 8 | devfn.
        requester_id: u16,
    },
}

/// What the unit covers and which destinations exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PvIrqConfig {
    /// ID of the one IOAPIC behind the unit (as in the MADT).
    pub ioapic_id: u8,
    /// Its number of pins: pins `0..ioapic_pins` are valid sources.
    pub ioapic_pins: u8,
    /// Requester IDs (BDFs on segment 0) that may allocate handles.
    pub pci_requesters: Vec<u16>,
    /// The (x2)APIC IDs of the vCPUs: the only valid `dest` values.
    pub apic_ids: Vec<u32>,
    /// `MAX_HANDLES`: handles `0..max_handles` exist.
    pub max_handles: u16,
}

/// Why an interrupt is blocked (spec §5; the discriminants are the spec's reason numbers,
/// reported in `LAST_FAULT` bits 39:32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PvBlockReason {
    /// The handle is allocated but not present (never `SET`, or `CLEAR`ed).
    NotPresent = 1,
    /// The handle is bound to another source.
    NotOwner = 2,
    /// A compatibility-format message while `BLOCK_COMPAT` is set.
    CompatibilityBlocked = 3,
    /// The handle is not allocated, or beyond `MAX_HANDLES`.
    NotAllocated = 4,
    /// A remappable-format message while `ENABLE` is clear.
    Disabled = 5,
}

impl PvBlockReason {
    /// The spec's reason number.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A blocked interrupt: the source gets no KVM route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("PV-IR: interrupt blocked ({reason:?}, index {index:?})")]
pub struct PvBlocked {
    /// Why.
    pub reason: PvBlockReason,
    /// The handle (plus sub-handle) the message named; `None` for compatibility format.
    pub index: Option<u32>,
}

/// Request statuses (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum PvStatus {
    /// Done.
    Ok = 0,
    /// Unknown op, or a non-zero reserved or unused field.
    BadOp = 1,
    /// Unknown source type or source, or multi-MSI for an IOAPIC source.
    BadSource = 2,
    /// No free aligned block of `count` handles.
    NoSpace = 3,
    /// Handle not allocated; for `FREE` not the first of its block or `count` differs.
    BadHandle = 4,
    /// Vector below 0x10.
    BadVector = 5,
    /// No CPU with that APIC ID.
    BadDest = 6,
    /// Count 0, over 32 or not a power of two.
    BadCount = 7,
}

/// Requests executed, by op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PvOpStats {
    /// `ALLOC` requests.
    pub alloc: u64,
    /// `SET` requests.
    pub set: u64,
    /// `CLEAR` requests.
    pub clear: u64,
    /// `FREE` requests.
    pub free: u64,
    /// Requests with an unknown op.
    pub bad_op: u64,
}

/// Requests executed, by the status written back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PvStatusStats {
    /// [`PvStatus::Ok`].
    pub ok: u64,
    /// [`PvStatus::BadOp`].
    pub bad_op: u64,
    /// [`PvStatus::BadSource`].
    pub bad_source: u64,
    /// [`PvStatus::NoSpace`].
    pub no_space: u64,
    /// [`PvStatus::BadHandle`].
    pub bad_handle: u64,
    /// [`PvStatus::BadVector`].
    pub bad_vector: u64,
    /// [`PvStatus::BadDest`].
    pub bad_dest: u64,
    /// [`PvStatus::BadCount`].
    pub bad_count: u64,
}

impl PvStatusStats {
    fn count(&mut self, status: PvStatus) {
        let counter = match status {
            PvStatus::Ok => &mut self.ok,
            PvStatus::BadOp => &mut self.bad_op,
            PvStatus::BadSource => &mut self.bad_source,
            PvStatus::NoSpace => &mut self.no_space,
            PvStatus::BadHandle => &mut self.bad_handle,
            PvStatus::BadVector => &mut self.bad_vector,
            PvStatus::BadDest => &mut self.bad_dest,
            PvStatus::BadCount => &mut self.bad_count,
        };
        *counter += 1;
    }

    /// All requests that got a status.
    pub fn total(&self) -> u64 {
        self.ok
            + self.bad_op
            + self.bad_source
            + self.no_space
            + self.bad_handle
            + self.bad_vector
            + self.bad_dest
            + self.bad_count
    }
}

/// Blocked interrupts reported with [`PvIrq::request_blocked`], by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PvBlockedStats {
    /// [`PvBlockReason::NotPresent`].
    pub not_present: u64,
    /// [`PvBlockReason::NotOwner`].
    pub not_owner: u64,
    /// [`PvBlockReason::CompatibilityBlocked`].
    pub compatibility_blocked: u64,
    /// [`PvBlockReason::NotAllocated`].
    pub not_allocated: u64,
    /// [`PvBlockReason::Disabled`].
    pub disabled: u64,
}

impl PvBlockedStats {
    fn add(&mut self, reason: PvBlockReason, count: u64) {
        let counter = match reason {
            PvBlockReason::NotPresent => &mut self.not_present,
            PvBlockReason::NotOwner => &mut self.not_owner,
            PvBlockReason::CompatibilityBlocked => &mut self.compatibility_blocked,
            PvBlockReason::NotAllocated => &mut self.not_allocated,
            PvBlockReason::Disabled => &mut self.disabled,
        };
        *counter = counter.saturating_add(count);
    }

    /// All blocked interrupts.
    pub fn total(&self) -> u64 {
        self.not_present
            .saturating_add(self.not_owner)
            .saturating_add(self.compatibility_blocked)
            .saturating_add(self.not_allocated)
            .saturating_add(self.disabled)
    }
}

/// Counters of the unit's activity; see [`PvIrq::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PvIrqStats {
    /// Requests executed, by op.
    pub requests: PvOpStats,
    /// Requests executed, by status.
    pub statuses: PvStatusStats,
    /// `REQUEST` values ignored: not 64-byte aligned, or not all guest RAM.
    pub bad_request_gpa: u64,
    /// Handles allocated now.
    pub live_handles: u32,
    /// Remappable-format messages translated.
    pub translations: u64,
    /// Compatibility-format messages passed through.
    pub passthrough: u64,
    /// Blocked interrupts, by reason.
    pub blocked: PvBlockedStats,
    /// Register page reads (every access).
    pub page_reads: u64,
    /// Register page writes (every access).
    pub page_writes: u64,
    /// Accesses at offsets or sizes that are no register (read 0, write ignored).
    pub ignored_accesses: u64,
    /// `CTRL.RESET` writes.
    pub resets: u64,
}

/// Where [`PvIrq::write`] pushes the routes to rebuild, *during* the write.
pub trait PvIrqSink {
    /// The KVM routes `inv` covers ([`RouteInvalidation::covers`] of the
    /// [`remap_index`] of the source's message) may have changed: recompute them with
    /// [`PvIrq::translate`] through `pv` and make them effective (one routing update) before
    /// returning.
    fn invalidate(&mut self, pv: &mut PvIrq, inv: RouteInvalidation);
}

/// A [`PvIrqSink`] that records every invalidation, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct RecordingPvSink {
    /// Every invalidation pushed, in order.
    pub invalidations: Vec<RouteInvalidation>,
}

impl PvIrqSink for RecordingPvSink {
    fn invalidate(&mut self, _pv: &mut PvIrq, inv: RouteInvalidation) {
        self.invalidations.push(inv);
    }
}

/// Where a present handle delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    vector: u8,
    dest: u32,
}

/// One allocated handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    source: PvSource,
    /// First handle of the block this one belongs to.
    first: u16,
    /// Size of that block.
    count: u16,
    /// `None`: not present.
    target: Option<Target>,
}

/// What a successful request did.
enum Done {
    /// `ALLOC`: the first handle and the message.
    Allocated(u16, MsiMessage),
    /// `SET`, `CLEAR`, `FREE`: these handles' routes changed.
    Changed(Range<u32>),
}

/// The PV-IR unit: register page, handle table and translation; see the
/// [module documentation](super).
#[derive(Debug)]
pub struct PvIrq {
    cfg: PvIrqConfig,
    mem: GuestMemoryMmap,
    /// One entry per handle, `cfg.max_handles` of them.
    slots: Vec<Option<Slot>>,
    live: u32,
    /// `CTRL` bits 1:0.
    ctrl: u32,
    fault_count: u32,
    last_fault: u64,
    stats: PvIrqStats,
    translations: AtomicU64,
    passthrough: AtomicU64,
}

/// Little-endian u16 at `at` of the block.
fn u16_at(block: &[u8; REQUEST_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([block[at], block[at + 1]])
}

/// Little-endian u32 at `at` of the block.
fn u32_at(block: &[u8; REQUEST_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

/// Whether a byte outside the `used` ranges of the block (and outside `status`) is non-zero.
fn unused_nonzero(block: &[u8; REQUEST_SIZE], used: &[Range<usize>]) -> bool {
    block.iter().enumerate().any(|(i, &b)| {
        b != 0
            && !(req::STATUS..req::STATUS + 2).contains(&i)
            && !used.iter().any(|r| r.contains(&i))
    })
}

/// Whether `count` is a valid block size: a power of two, 1..=32.
fn count_ok(count: u16) -> bool {
    count.is_power_of_two() && count <= MAX_COUNT
}

/// The message `ALLOC` returns for `handle` bound to `source` (VT-d remappable format).
fn alloc_message(handle: u16, source: PvSource) -> MsiMessage {
    let h = u64::from(handle);
    let address = ADDRESS_BASE
        | (h & 0x7fff) << ADDR_HANDLE_LOW_SHIFT
        | MsiMessage::ADDR_REMAPPABLE_FORMAT
        | (h >> 15) << ADDR_HANDLE_HIGH_SHIFT;
    match source {
        PvSource::IoapicPin { pin, .. } => MsiMessage {
            address,
            data: u32::from(pin),
        },
        PvSource::Pci { .. } => MsiMessage {
            address: address | ADDR_SHV,
            data: 0,
        },
    }
}

impl PvIrq {
    /// A unit with no handle allocated, remapping disabled, compatibility format allowed.
    /// Request blocks are read from and written back to `mem`.
    pub fn new(cfg: PvIrqConfig, mem: GuestMemoryMmap) -> PvIrq {
        PvIrq {
            slots: vec![None; usize::from(cfg.max_handles)],
            cfg,
            mem,
            live: 0,
            ctrl: 0,
            fault_count: 0,
            last_fault: 0,
            stats: PvIrqStats::default(),
            translations: AtomicU64::new(0),
            passthrough: AtomicU64::new(0),
        }
    }

    /// The configuration the unit was built with.
    pub fn config(&self) -> &PvIrqConfig {
        &self.cfg
    }

    /// Whether `CTRL.ENABLE` is set.
    pub fn enabled(&self) -> bool {
        self.ctrl & CTRL_ENABLE != 0
    }

    /// Counters since creation (`live_handles`: now).
    pub fn stats(&self) -> PvIrqStats {
        PvIrqStats {
            live_handles: self.live,
            translations: self.translations.load(Ordering::Relaxed),
            passthrough: self.passthrough.load(Ordering::Relaxed),
            ..self.stats
        }
    }

    /// The message KVM should route for the message `msg` the guest programmed into `source`
    /// (spec §4): a remappable-format message, with `ENABLE` set, through a handle that is
    /// allocated, present and bound to `source` becomes a Fixed, edge, physical-destination
    /// compatibility-format message to the handle's (vector, dest); a compatibility-format
    /// message passes unchanged unless `BLOCK_COMPAT` is set. Everything else is
    /// [`PvBlocked`]. Records nothing but the translation counters; a blocked source that
    /// fires is reported with [`PvIrq::request_blocked`].
    pub fn translate(&self, msg: MsiMessage, source: PvSource) -> Result<MsiMessage, PvBlocked> {
        let result = self.translate_message(msg, source);
        match &result {
            Ok(_) if msg.is_remappable() => {
                self.translations.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                self.passthrough.fetch_add(1, Ordering::Relaxed);
            }
            Err(blocked) => guest_debug!(
                "pvirq: route of {msg:x?} from {source:?} blocked: {:?} (index {:?})",
                blocked.reason,
                blocked.index
            ),
        }
        result
    }

    fn translate_message(
        &self,
        msg: MsiMessage,
        source: PvSource,
    ) -> Result<MsiMessage, PvBlocked> {
        let blocked = |reason, index| PvBlocked { reason, index };
        let Some(index) = remap_index(msg) else {
            return if self.ctrl & CTRL_BLOCK_COMPAT != 0 {
                Err(blocked(PvBlockReason::CompatibilityBlocked, None))
            } else {
                Ok(msg)
            };
        };
        if !self.enabled() {
            return Err(blocked(PvBlockReason::Disabled, Some(index)));
        }
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.slots.get(i))
            .copied()
            .flatten()
            .ok_or(blocked(PvBlockReason::NotAllocated, Some(index)))?;
        if slot.source != source {
            return Err(blocked(PvBlockReason::NotOwner, Some(index)));
        }
        let target = slot
            .target
            .ok_or(blocked(PvBlockReason::NotPresent, Some(index)))?;
        Ok(compatibility_msi(target.dest, target.vector, 0, 0, 0, 0))
    }

    /// `count` interrupts from `source` that `blocked` (the result of the translation its
    /// route was computed with) stopped: counted by reason, `FAULT_COUNT` grows (saturating)
    /// and `LAST_FAULT` latches the newest. `count` 0 changes nothing.
    pub fn request_blocked(&mut self, blocked: &PvBlocked, source: PvSource, count: u64) {
        if count == 0 {
            return;
        }
        self.stats.blocked.add(blocked.reason, count);
        self.fault_count =
            u32::try_from(u64::from(self.fault_count).saturating_add(count)).unwrap_or(u32::MAX);
        let (source_field, pci) = match source {
            PvSource::IoapicPin { pin, .. } => (u64::from(pin), 0),
            PvSource::Pci { requester_id, .. } => (u64::from(requester_id), LAST_FAULT_PCI),
        };
        self.last_fault = LAST_FAULT_VALID
            | pci
            | u64::from(blocked.reason.code()) << LAST_FAULT_REASON_SHIFT
            | source_field << LAST_FAULT_SOURCE_SHIFT
            | u64::from(blocked.index.unwrap_or(0) & 0xffff);
    }

    /// A reset of the VM (not the guest's `CTRL.RESET`, which does the same): every handle
    /// freed, `CTRL`, `FAULT_COUNT` and `LAST_FAULT` cleared, and every route invalidated
    /// through `sink` ([`RouteInvalidation::All`]). Counters are kept.
    pub fn reset(&mut self, sink: &mut dyn PvIrqSink) {
        self.reset_state();
        sink.invalidate(self, RouteInvalidation::All);
    }

    /// Frees every handle and clears `CTRL`, `FAULT_COUNT` and `LAST_FAULT` (`CTRL.RESET`).
    fn reset_state(&mut self) {
        self.slots.fill(None);
        self.live = 0;
        self.ctrl = 0;
        self.fault_count = 0;
        self.last_fault = 0;
        self.stats.resets += 1;
    }

    fn status_register(&self) -> u32 {
        let mut status = 0;
        if self.ctrl & CTRL_ENABLE != 0 {
            status |= STATUS_ENABLED;
        }
        if self.ctrl & CTRL_BLOCK_COMPAT != 0 {
            status |= STATUS_COMPAT_BLOCKED;
        }
        if self.last_fault & LAST_FAULT_VALID != 0 {
            status |= STATUS_FAULT_VALID;
        }
        status
    }

    /// A guest read of the register page. Registers answer only accesses of their own size
    /// at their own offset; everything else reads 0.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.stats.page_reads += 1;
        let value: Option<u64> = match (offset, data.len()) {
            (REG_ID, 4) => Some(PVIR_ID.into()),
            (REG_VERSION, 4) => Some(PVIR_VERSION.into()),
            (REG_FEATURES, 4) => Some(PVIR_FEATURES.into()),
            (REG_MAX_HANDLES, 4) => Some(self.cfg.max_handles.into()),
            (REG_CTRL, 4) => Some(self.ctrl.into()),
            (REG_STATUS, 4) => Some(self.status_register().into()),
            (REG_REQUEST, 8) => Some(0),
            (REG_FAULT_COUNT, 4) => Some(self.fault_count.into()),
            (REG_LAST_FAULT, 8) => Some(self.last_fault),
            _ => None,
        };
        match value {
            Some(v) => {
                let bytes = v.to_le_bytes();
                let n = data.len().min(bytes.len());
                data[..n].copy_from_slice(&bytes[..n]);
            }
            None => {
                self.stats.ignored_accesses += 1;
                guest_debug!("pvirq: {}-byte read at {offset:#x} ignored", data.len());
                data.fill(0);
            }
        }
    }

    /// A guest write of the register page. A `REQUEST` write executes the request block
    /// completely, and a `CTRL` change takes effect, before this returns: every route
    /// invalidation it causes is pushed to `sink` first.
    pub fn write(&mut self, offset: u64, data: &[u8], sink: &mut dyn PvIrqSink) {
        self.stats.page_writes += 1;
        match (offset, <[u8; 4]>::try_from(data), <[u8; 8]>::try_from(data)) {
            (REG_CTRL, Ok(dword), _) => self.write_ctrl(u32::from_le_bytes(dword), sink),
            (REG_REQUEST, _, Ok(qword)) => self.request(u64::from_le_bytes(qword), sink),
            (REG_LAST_FAULT, _, Ok(qword)) => {
                if u64::from_le_bytes(qword) & LAST_FAULT_VALID != 0 {
                    self.last_fault &= !LAST_FAULT_VALID;
                }
            }
            (
                REG_ID | REG_VERSION | REG_FEATURES | REG_MAX_HANDLES | REG_STATUS
                | REG_FAULT_COUNT,
                Ok(_),
                _,
            ) => {
                guest_debug!("pvirq: write to read-only register {offset:#x} ignored");
            }
            _ => {
                self.stats.ignored_accesses += 1;
                guest_debug!("pvirq: {}-byte write at {offset:#x} ignored", data.len());
            }
        }
    }

    fn write_ctrl(&mut self, value: u32, sink: &mut dyn PvIrqSink) {
        if value & CTRL_RESET != 0 {
            self.reset(sink);
            return;
        }
        let ctrl = value & (CTRL_ENABLE | CTRL_BLOCK_COMPAT);
        if ctrl != self.ctrl {
            self.ctrl = ctrl;
            sink.invalidate(self, RouteInvalidation::All);
        }
    }

    /// Executes the request block at `gpa` (spec §3).
    fn request(&mut self, gpa: u64, sink: &mut dyn PvIrqSink) {
        if !gpa.is_multiple_of(REQUEST_SIZE as u64) {
            self.stats.bad_request_gpa += 1;
            guest_debug!("pvirq: request block at {gpa:#x} is not 64-byte aligned: ignored");
            return;
        }
        let mut block = [0u8; REQUEST_SIZE];
        if let Err(e) = self.mem.read_slice(&mut block, GuestAddress(gpa)) {
            self.stats.bad_request_gpa += 1;
            guest_debug!("pvirq: request block at {gpa:#x} is not guest RAM ({e}): ignored");
            return;
        }
        let op = u16_at(&block, req::OP);
        match op {
            OP_ALLOC => self.stats.requests.alloc += 1,
            OP_SET => self.stats.requests.set += 1,
            OP_CLEAR => self.stats.requests.clear += 1,
            OP_FREE => self.stats.requests.free += 1,
            _ => self.stats.requests.bad_op += 1,
        }
        let result = self.execute(op, &block);
        let status = match result {
            Ok(_) => PvStatus::Ok,
            Err(status) => {
                guest_debug!("pvirq: request {op} at {gpa:#x} failed: {status:?}");
                status
            }
        };
        self.stats.statuses.count(status);
        match result {
            Ok(Done::Allocated(handle, msg)) => {
                let mut out = [0u8; 12];
                // Low and high halves of the address.
                out[..4].copy_from_slice(&(msg.address as u32).to_le_bytes());
                out[4..8].copy_from_slice(&((msg.address >> 32) as u32).to_le_bytes());
                out[8..].copy_from_slice(&msg.data.to_le_bytes());
                self.write_back(gpa, req::HANDLE, &handle.to_le_bytes());
                self.write_back(gpa, req::ADDRESS_LO, &out);
            }
            Ok(Done::Changed(range)) => {
                sink.invalidate(self, RouteInvalidation::Indices(vec![range]));
            }
            Err(_) => {}
        }
        self.write_back(gpa, req::STATUS, &(status as u16).to_le_bytes());
    }

    /// Writes `bytes` at offset `at` of the request block at `gpa` (inside the 64 bytes).
    fn write_back(&self, gpa: u64, at: usize, bytes: &[u8]) {
        debug_assert!(at + bytes.len() <= REQUEST_SIZE);
        // `gpa` is 64-byte aligned and its 64 bytes were just read, so this cannot overflow.
        let address = GuestAddress(gpa.saturating_add(at as u64));
        if let Err(e) = self.mem.write_slice(bytes, address) {
            guest_debug!("pvirq: cannot write back to the request block at {gpa:#x}: {e}");
        }
    }

    fn execute(&mut self, op: u16, block: &[u8; REQUEST_SIZE]) -> Result<Done, PvStatus> {
        let used: &[Range<usize>] = match op {
            OP_ALLOC => &[
                req::OP..req::OP + 2,
                req::SOURCE_TYPE..req::SOURCE_TYPE + 1,
                req::COUNT..req::HANDLE + 2,
                req::ADDRESS_LO..req::DATA + 4,
            ],
            OP_SET => &[
                req::OP..req::OP + 2,
                req::HANDLE..req::HANDLE + 2,
                req::DEST..req::VECTOR + 1,
            ],
            OP_CLEAR => &[req::OP..req::OP + 2, req::HANDLE..req::HANDLE + 2],
            OP_FREE => &[
                req::OP..req::OP + 2,
                req::COUNT..req::COUNT + 2,
                req::HANDLE..req::HANDLE + 2,
            ],
            _ => return Err(PvStatus::BadOp),
        };
        if unused_nonzero(block, used) {
            return Err(PvStatus::BadOp);
        }
        let handle = u16_at(block, req::HANDLE);
        let count = u16_at(block, req::COUNT);
        match op {
            OP_ALLOC => self.alloc(block, count),
            OP_SET => {
                self.slot(handle)?;
                let vector = block[req::VECTOR];
                let dest = u32_at(block, req::DEST);
                if vector < MIN_VECTOR {
                    return Err(PvStatus::BadVector);
                }
                if !self.cfg.apic_ids.contains(&dest) {
                    return Err(PvStatus::BadDest);
                }
                self.slot(handle)?.target = Some(Target { vector, dest });
                Ok(Done::Changed(one(handle)))
            }
            OP_CLEAR => {
                self.slot(handle)?.target = None;
                Ok(Done::Changed(one(handle)))
            }
            _ => self.free(handle, count),
        }
    }

    /// The allocated slot `handle`, or `BAD_HANDLE`.
    fn slot(&mut self, handle: u16) -> Result<&mut Slot, PvStatus> {
        self.slots
            .get_mut(usize::from(handle))
            .and_then(Option::as_mut)
            .ok_or(PvStatus::BadHandle)
    }

    fn alloc(&mut self, block: &[u8; REQUEST_SIZE], count: u16) -> Result<Done, PvStatus> {
        let high = u16_at(block, req::SOURCE_HI);
        let low = u16_at(block, req::SOURCE_LO);
        let source = match block[req::SOURCE_TYPE] {
            SOURCE_IOAPIC => PvSource::IoapicPin {
                ioapic_id: u8::try_from(high).map_err(|_| PvStatus::BadSource)?,
                pin: u8::try_from(low).map_err(|_| PvStatus::BadSource)?,
            },
            SOURCE_PCI => PvSource::Pci {
                segment: high,
                requester_id: low,
            },
            _ => return Err(PvStatus::BadSource),
        };
        if !count_ok(count) {
            return Err(PvStatus::BadCount);
        }
        let known = match source {
            PvSource::IoapicPin { ioapic_id, pin } => {
                ioapic_id == self.cfg.ioapic_id && pin < self.cfg.ioapic_pins && count == 1
            }
            PvSource::Pci {
                segment,
                requester_id,
            } => segment == 0 && self.cfg.pci_requesters.contains(&requester_id),
        };
        if !known {
            return Err(PvStatus::BadSource);
        }
        let first = self.find_free(count).ok_or(PvStatus::NoSpace)?;
        let start = usize::from(first);
        for slot in &mut self.slots[start..start + usize::from(count)] {
            *slot = Some(Slot {
                source,
                first,
                count,
                target: None,
            });
        }
        self.live += u32::from(count);
        Ok(Done::Allocated(first, alloc_message(first, source)))
    }

    /// The first free block of `count` handles aligned to `count`.
    fn find_free(&self, count: u16) -> Option<u16> {
        let count = usize::from(count);
        self.slots
            .chunks_exact(count)
            .position(|block| block.iter().all(Option::is_none))
            .and_then(|i| u16::try_from(i * count).ok())
    }

    fn free(&mut self, handle: u16, count: u16) -> Result<Done, PvStatus> {
        if !count_ok(count) {
            return Err(PvStatus::BadCount);
        }
        let slot = *self.slot(handle)?;
        if slot.first != handle || slot.count != count {
            return Err(PvStatus::BadHandle);
        }
        let start = usize::from(handle);
        self.slots[start..start + usize::from(count)].fill(None);
        self.live -= u32::from(count);
        let start = u32::from(handle);
        Ok(Done::Changed(start..start + u32::from(count)))
    }
}

/// The index range of one handle.
fn one(handle: u16) -> Range<u32> {
    u32::from(handle)..u32::from(handle) + 1
}
