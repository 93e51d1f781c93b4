// SPDX-License-Identifier: Apache-2.0

//! The remapping unit's register model: [`RemapUnit`].

use std::ops::Range;

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::irte::{self, remap_index, BlockReason, Blocked, IrtTable};
use super::queue::{self, Descriptor, IecScope, QueueConfig};
use super::regs::*;
use crate::guest_debug;
use crate::interrupt::MsiMessage;

/// At most this many index ranges are collected before they are pushed to the
/// [`RemapSink`]; more collapse into [`RouteInvalidation::All`].
const MAX_PENDING_RANGES: usize = 256;
/// At most this many event MSIs are collected before they are pushed to the [`RemapSink`]
/// (each event source has at most one pending interrupt per register write, so this is never
/// reached).
const MAX_PENDING_MSIS: usize = 64;
/// How often an IRTE is re-read when a concurrent update changed it between the two
/// 64-bit loads.
const IRTE_READ_RETRIES: usize = 8;

/// The unit's own event interrupts, see [`RemapSink::raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitEvent {
    /// A fault event (FEDATA, FEUADDR:FEADDR; VT-d 7.4).
    Fault,
    /// An invalidation-completion event (IEDATA, IEUADDR:IEADDR; VT-d 6.5.2.8).
    InvalidationComplete,
}

/// Where the unit pushes what the VMM must act on: route invalidations and its own event
/// interrupts. Every unit entry point with side effects takes one, so nothing can be left
/// behind for a later poll.
pub trait RemapSink {
    /// The KVM routes `inv` covers may have changed. The sink recomputes them (translating
    /// through `unit` with [`RemapUnit::translate`]) and makes them effective before it
    /// returns. Called at each invalidation wait descriptor, for the invalidations queued
    /// ahead of it, *before* the descriptor's status write and completion event (VT-d
    /// 6.5.2.8), and at the end of a register write for invalidations not fenced by a wait
    /// (IRE, SIRTP, CFI, trailing IEC descriptors).
    fn invalidate(&mut self, unit: &mut RemapUnit, inv: RouteInvalidation);
    /// An event interrupt of the unit itself, to inject now (`KVM_SIGNAL_MSI`). The
    /// registers hold compatibility-format messages with destination bits 31:8 in the upper
    /// address (VT-d 5.1.6), which is KVM's layout already.
    fn raise(&mut self, kind: UnitEvent, msg: MsiMessage);
}

/// A [`RemapSink`] that records everything, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// Every invalidation pushed, in order.
    pub invalidations: Vec<RouteInvalidation>,
    /// Every event interrupt raised, in order.
    pub events: Vec<(UnitEvent, MsiMessage)>,
}

impl RecordingSink {
    /// The invalidations pushed since the last call, merged into one (`None`: none).
    pub fn take_invalidation(&mut self) -> Option<RouteInvalidation> {
        let mut merged: Option<RouteInvalidation> = None;
        for inv in self.invalidations.drain(..) {
            merged = Some(match (merged, inv) {
                (None, inv) => inv,
                (Some(RouteInvalidation::All), _) | (_, RouteInvalidation::All) => {
                    RouteInvalidation::All
                }
                (Some(RouteInvalidation::Indices(mut a)), RouteInvalidation::Indices(b)) => {
                    a.extend(b);
                    RouteInvalidation::Indices(coalesce(a))
                }
            });
        }
        merged
    }

    /// The messages of the event interrupts raised since the last call, oldest first.
    pub fn take_msis(&mut self) -> Vec<MsiMessage> {
        self.events.drain(..).map(|(_, m)| m).collect()
    }
}

impl RemapSink for RecordingSink {
    fn invalidate(&mut self, _unit: &mut RemapUnit, inv: RouteInvalidation) {
        self.invalidations.push(inv);
    }
    fn raise(&mut self, kind: UnitEvent, msg: MsiMessage) {
        self.events.push((kind, msg));
    }
}

/// IQT/IQH bits 18:4: the queue slot (128-bit descriptors); bits 3:0 must be 0.
const IQ_OFFSET_MASK: u64 = 0x7_fff0;
/// IQT bits the register keeps (the slot plus the low bits, so a misaligned tail is seen).
const IQT_WRITABLE: u64 = 0x7_ffff;
/// IRTA bits the register keeps: base, EIME and S (bits 10:4 are reserved).
const IRTA_WRITABLE: u64 = IrtTable::IRTA_BASE_MASK | IrtTable::IRTA_EIME | IrtTable::IRTA_S_MASK;
/// IQA bits the register keeps: base, DW and QS.
const IQA_WRITABLE: u64 =
    QueueConfig::IQA_BASE_MASK | QueueConfig::IQA_DW | QueueConfig::IQA_QS_MASK;
/// FSTS status conditions: a new fault event is only generated while none of them is set.
const FSTS_CONDITIONS: u32 =
    DMA_FSTS_PFO | DMA_FSTS_PPF | DMA_FSTS_IQE | DMA_FSTS_ICE | DMA_FSTS_ITE;

/// Which KVM routes a change of the remapping state can have affected; see
/// [`RemapSink::invalidate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteInvalidation {
    /// Every route derived from a guest MSI/RTE may have changed: a global interrupt entry
    /// cache invalidation, or a change of IRE, the table pointer (SIRTP) or CFI.
    All,
    /// Only routes whose current interrupt index ([`remap_index`] of the guest message) falls
    /// in one of these ranges (sorted, disjoint, non-adjacent).
    Indices(Vec<Range<u32>>),
}

impl RouteInvalidation {
    /// Whether a route whose guest message has interrupt index `index` (`None`: compatibility
    /// format) must be recomputed.
    pub fn covers(&self, index: Option<u32>) -> bool {
        match (self, index) {
            (RouteInvalidation::All, _) => true,
            (RouteInvalidation::Indices(ranges), Some(i)) => ranges.iter().any(|r| r.contains(&i)),
            (RouteInvalidation::Indices(_), None) => false,
        }
    }
}

/// Interrupt requests blocked, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockedStats {
    /// [`BlockReason::RequestReserved`].
    pub request_reserved: u64,
    /// [`BlockReason::IndexOutOfBounds`].
    pub index_out_of_bounds: u64,
    /// [`BlockReason::NotPresent`].
    pub not_present: u64,
    /// [`BlockReason::TableReadFailed`].
    pub table_read_failed: u64,
    /// [`BlockReason::IrteReserved`].
    pub irte_reserved: u64,
    /// [`BlockReason::CompatibilityBlocked`].
    pub compatibility_blocked: u64,
    /// [`BlockReason::SourceIdMismatch`].
    pub source_id_mismatch: u64,
    /// [`BlockReason::RemappingDisabled`].
    pub remapping_disabled: u64,
}

impl BlockedStats {
    /// All blocked requests.
    pub fn total(&self) -> u64 {
        self.request_reserved
            + self.index_out_of_bounds
            + self.not_present
            + self.table_read_failed
            + self.irte_reserved
            + self.compatibility_blocked
            + self.source_id_mismatch
            + self.remapping_disabled
    }

    fn count(&mut self, reason: BlockReason) {
        let counter = match reason {
            BlockReason::RequestReserved => &mut self.request_reserved,
            BlockReason::IndexOutOfBounds => &mut self.index_out_of_bounds,
            BlockReason::NotPresent => &mut self.not_present,
            BlockReason::TableReadFailed => &mut self.table_read_failed,
            BlockReason::IrteReserved => &mut self.irte_reserved,
            BlockReason::CompatibilityBlocked => &mut self.compatibility_blocked,
            BlockReason::SourceIdMismatch => &mut self.source_id_mismatch,
            BlockReason::RemappingDisabled => &mut self.remapping_disabled,
        };
        *counter += 1;
    }
}

/// Counters of the unit's activity; see [`RemapUnit::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemapStats {
    /// Global interrupt entry cache invalidations processed.
    pub iec_global: u64,
    /// Index-selective interrupt entry cache invalidations processed.
    pub iec_selective: u64,
    /// Invalidation wait descriptors processed.
    pub wait_descriptors: u64,
    /// Descriptors for caches this unit does not have (context, IOTLB, ...), accepted.
    pub ignored_descriptors: u64,
    /// Invalidation queue errors (FSTS.IQE raised).
    pub queue_errors: u64,
    /// Remappable-format messages translated through an IRTE.
    pub translations: u64,
    /// Compatibility-format messages passed through unchanged.
    pub passthrough: u64,
    /// Requests blocked, by reason.
    pub blocked: BlockedStats,
    /// Faults written to a fault recording register.
    pub faults_recorded: u64,
    /// Faults not recorded because the entry had FPD set.
    pub faults_suppressed: u64,
    /// Faults lost to a full set of fault recording registers (FSTS.PFO).
    pub faults_overflowed: u64,
    /// Fault-event interrupts raised (pushed to the sink).
    pub fault_events: u64,
    /// Invalidation-completion interrupts raised (pushed to the sink).
    pub completion_events: u64,
}

/// A remapping-only VT-d unit: the register page, the invalidation queue and the
/// interrupt-remapping table pointer; see the [module documentation](super).
#[derive(Debug)]
pub struct RemapUnit {
    mem: GuestMemoryMmap,

    gsts: u32,
    rtaddr: u64,
    /// PFO, IQE, ICE, ITE and FRI; PPF is derived from the fault records.
    fsts: u32,
    fectl: u32,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    iectl: u32,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
    iqer: u64,
    irta: u64,
    /// Fault recording registers: \[low quadword, high quadword\].
    frcd: [[u64; 2]; DMAR_FRCD_REG_NR],
    /// The fault recording register the next fault goes to.
    next_frcd: usize,

    /// The queue geometry latched from IQA when QI was enabled.
    queue: Option<QueueConfig>,
    /// The table latched from IRTA by the last SIRTP.
    table: Option<IrtTable>,

    /// Invalidations not yet pushed to the sink (within one entry point).
    invalidation: Option<RouteInvalidation>,
    /// Event MSIs not yet pushed to the sink (within one entry point).
    pending_msis: Vec<(UnitEvent, MsiMessage)>,
    /// A register write asked for queue processing; done at the end of the write, where the
    /// sink is at hand for the wait descriptors' fences.
    queue_kicked: bool,
    warned_te: bool,
    warned_iqe: bool,
    stats: RemapStats,
}

impl RemapUnit {
    /// A unit in its reset state (everything disabled, event interrupts masked) that reads
    /// descriptors and remapping entries from `mem` and writes wait-descriptor status there.
    pub fn new(mem: GuestMemoryMmap) -> RemapUnit {
        RemapUnit {
            mem,
            gsts: 0,
            rtaddr: 0,
            fsts: 0,
            fectl: DMA_FECTL_IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: DMA_FECTL_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            iqer: 0,
            irta: 0,
            frcd: [[0; 2]; DMAR_FRCD_REG_NR],
            next_frcd: 0,
            queue: None,
            table: None,
            invalidation: None,
            pending_msis: Vec::new(),
            queue_kicked: false,
            warned_te: false,
            warned_iqe: false,
            stats: RemapStats::default(),
        }
    }

    /// Returns to the reset state (platform reset). Counters are kept; every route is
    /// invalidated through `sink` ([`RouteInvalidation::All`]).
    pub fn reset(&mut self, sink: &mut dyn RemapSink) {
        let stats = self.stats;
        *self = RemapUnit::new(self.mem.clone());
        self.stats = stats;
        sink.invalidate(self, RouteInvalidation::All);
    }

    /// Whether interrupt remapping is enabled (GSTS.IRES).
    pub fn enabled(&self) -> bool {
        self.gsts & DMA_GSTS_IRES != 0
    }

    /// Pushes pending invalidations, then pending event MSIs, to `sink`.
    fn flush(&mut self, sink: &mut dyn RemapSink) {
        self.fence(sink);
        for (kind, msg) in std::mem::take(&mut self.pending_msis) {
            sink.raise(kind, msg);
        }
    }

    /// Pushes pending invalidations to `sink`, which applies them before returning.
    fn fence(&mut self, sink: &mut dyn RemapSink) {
        let inv = match self.invalidation.take() {
            None => return,
            Some(RouteInvalidation::All) => RouteInvalidation::All,
            Some(RouteInvalidation::Indices(ranges)) => {
                RouteInvalidation::Indices(coalesce(ranges))
            }
        };
        sink.invalidate(self, inv);
    }

    /// Counters since creation.
    pub fn stats(&self) -> RemapStats {
        self.stats
    }

    /// The message KVM should route for the guest-programmed message `msg` from requester
    /// `source_id` (the bus/device/function the DMAR device scope gives the source, e.g. the
    /// IOAPIC's).
    ///
    /// - Remapping disabled (IRES clear): a compatibility-format `msg` passes through
    ///   unchanged; a remappable-format one is blocked ([`BlockReason::RemappingDisabled`],
    ///   not recorded as a fault).
    /// - Remapping enabled: [`irte::translate`] against the table latched by the last SIRTP,
    ///   reading entries from guest memory, with GSTS.CFIS deciding compatibility format.
    ///
    /// This computes a route; it records nothing. Faults are per interrupt *request* (VT-d
    /// 5.1.4): when a source whose route is blocked actually fires, the VMM reports it with
    /// [`RemapUnit::request_blocked`].
    pub fn translate(&mut self, msg: MsiMessage, source_id: u16) -> Result<MsiMessage, Blocked> {
        let result = self.translate_message(msg, source_id);
        match &result {
            Ok(_) if msg.is_remappable() => self.stats.translations += 1,
            Ok(_) => self.stats.passthrough += 1,
            Err(blocked) => guest_debug!(
                "remap: route of {msg:x?} from source {source_id:#06x} blocked: {:?} (index {:?})",
                blocked.reason,
                blocked.index
            ),
        }
        result
    }

    /// An interrupt request from `source_id` that `blocked` (the result of the translation
    /// its route was computed with) stops: counted, and, when it is a VT-d fault not
    /// suppressed by FPD, recorded in the next fault recording register (or FSTS.PFO when
    /// that one is still full), which may raise a fault event through `sink`.
    pub fn request_blocked(&mut self, blocked: &Blocked, source_id: u16, sink: &mut dyn RemapSink) {
        self.stats.blocked.count(blocked.reason);
        if blocked.records_fault() {
            self.record_fault(blocked, source_id);
        } else if blocked.fault_processing_disable {
            self.stats.faults_suppressed += 1;
        }
        self.flush(sink);
    }

    fn translate_message(&self, msg: MsiMessage, source_id: u16) -> Result<MsiMessage, Blocked> {
        let cfis = self.gsts & DMA_GSTS_CFIS != 0;
        let blocked = |reason, index| Blocked {
            reason,
            index,
            fault_processing_disable: false,
        };
        if !self.enabled() {
            return match remap_index(msg) {
                Some(index) => Err(blocked(BlockReason::RemappingDisabled, Some(index))),
                None => Ok(msg),
            };
        }
        let Some(table) = self.table else {
            // IRE without a prior SIRTP: there is no table to read anything from.
            return match remap_index(msg) {
                Some(index) => Err(blocked(BlockReason::TableReadFailed, Some(index))),
                None if cfis => Ok(msg),
                None => Err(blocked(BlockReason::CompatibilityBlocked, None)),
            };
        };
        irte::translate(
            msg,
            source_id,
            &table,
            |index| self.read_irte(&table, index),
            cfis,
        )
    }

    /// Reads IRTE `index` as two single 64-bit loads (the guest may be rewriting it on
    /// another vCPU: Linux without CMPXCHG16B writes the low, then the high quadword). Both
    /// quadwords are read twice, and the read is retried (boundedly) until two consecutive
    /// reads agree, so a half-updated entry is not used.
    fn read_irte(&self, table: &IrtTable, index: u32) -> Option<u128> {
        let address = table.entry_address(index)?;
        let high_address = address.checked_add(8)?;
        let load = |at: u64| self.mem.load::<u64>(GuestAddress(at), Ordering::Acquire);
        let read = || -> Result<(u64, u64), vm_memory::GuestMemoryError> {
            Ok((load(address)?, load(high_address)?))
        };
        let result = (|| -> Result<Option<(u64, u64)>, vm_memory::GuestMemoryError> {
            let mut previous = read()?;
            for _ in 0..IRTE_READ_RETRIES {
                let current = read()?;
                if current == previous {
                    return Ok(Some(current));
                }
                previous = current;
            }
            Ok(None)
        })();
        match result {
            Ok(Some((low, high))) => Some(u128::from(high) << 64 | u128::from(low)),
            Ok(None) => {
                guest_debug!("remap: IRTE {index} at {address:#x} kept changing while read");
                None
            }
            Err(e) => {
                guest_debug!("remap: cannot read IRTE {index} at {address:#x}: {e}");
                None
            }
        }
    }

    // Fault recording and event interrupts (VT-d 7.2.1 primary fault logging, 7.4 fault
    // events, 6.5.2.8 invalidation completion events).

    /// FSTS as the guest reads it: PPF set while any fault record has F set.
    fn fsts_value(&self) -> u32 {
        let ppf = self.frcd.iter().any(|r| r[1] & DMA_FRCD_F != 0);
        self.fsts | if ppf { DMA_FSTS_PPF } else { 0 }
    }

    fn record_fault(&mut self, blocked: &Blocked, source_id: u16) {
        let Some(reason) = blocked.reason.fault_reason() else {
            return;
        };
        let before = self.fsts_value();
        if before & DMA_FSTS_PFO != 0 {
            // Overflowed: nothing more is recorded until software clears PFO.
            self.stats.faults_overflowed += 1;
            return;
        }
        let slot = self.next_frcd;
        if self.frcd[slot][1] & DMA_FRCD_F != 0 {
            self.stats.faults_overflowed += 1;
            self.fsts |= DMA_FSTS_PFO;
            self.fault_event(before);
            return;
        }
        let index = u64::from(blocked.index.unwrap_or(0) & 0xffff);
        self.frcd[slot] = [
            index << DMA_FRCD_IR_INDEX_SHIFT,
            DMA_FRCD_F | u64::from(reason) << DMA_FRCD_FR_SHIFT | u64::from(source_id),
        ];
        if before & DMA_FSTS_PPF == 0 {
            // slot < DMAR_FRCD_REG_NR (8), so the cast is lossless.
            let fri = (slot as u32) << DMA_FSTS_FRI_SHIFT;
            self.fsts = (self.fsts & !(0xff << DMA_FSTS_FRI_SHIFT)) | fri;
        }
        self.next_frcd = (slot + 1) % DMAR_FRCD_REG_NR;
        self.stats.faults_recorded += 1;
        self.fault_event(before);
    }

    /// A new fault condition was raised; `before` is FSTS before it. An event is only
    /// generated when no earlier condition is still pending.
    fn fault_event(&mut self, before: u32) {
        if before & FSTS_CONDITIONS != 0 {
            return;
        }
        self.fectl |= DMA_FECTL_IP;
        if self.fectl & DMA_FECTL_IM == 0 {
            self.send_fault_event();
        }
    }

    fn send_fault_event(&mut self) {
        self.fectl &= !DMA_FECTL_IP;
        self.stats.fault_events += 1;
        let msg = MsiMessage {
            address: u64::from(self.feuaddr) << 32 | u64::from(self.feaddr),
            data: self.fedata,
        };
        self.push_msi(UnitEvent::Fault, msg);
    }

    /// After software cleared a status condition: once none is left, FECTL.IP clears.
    fn fault_conditions_cleared(&mut self) {
        if self.fsts_value() & FSTS_CONDITIONS == 0 {
            self.fectl &= !DMA_FECTL_IP;
        }
    }

    fn completion_event(&mut self) {
        if self.ics & DMA_ICS_IWC != 0 {
            // The previous completion is not acknowledged yet: no new event.
            return;
        }
        self.ics |= DMA_ICS_IWC;
        self.iectl |= DMA_FECTL_IP;
        if self.iectl & DMA_FECTL_IM == 0 {
            self.send_completion_event();
        }
    }

    fn send_completion_event(&mut self) {
        self.iectl &= !DMA_FECTL_IP;
        self.stats.completion_events += 1;
        let msg = MsiMessage {
            address: u64::from(self.ieuaddr) << 32 | u64::from(self.ieaddr),
            data: self.iedata,
        };
        self.push_msi(UnitEvent::InvalidationComplete, msg);
    }

    fn push_msi(&mut self, kind: UnitEvent, msg: MsiMessage) {
        if self.pending_msis.len() < MAX_PENDING_MSIS {
            self.pending_msis.push((kind, msg));
        } else {
            guest_debug!("remap: dropping event interrupt {msg:x?}: too many in one write");
        }
    }

    // Route invalidations.

    fn invalidate_all(&mut self) {
        self.invalidation = Some(RouteInvalidation::All);
    }

    fn invalidate_indices(&mut self, range: Range<u32>) {
        match &mut self.invalidation {
            Some(RouteInvalidation::All) => {}
            Some(RouteInvalidation::Indices(ranges)) if ranges.len() >= MAX_PENDING_RANGES => {
                self.invalidation = Some(RouteInvalidation::All);
            }
            Some(RouteInvalidation::Indices(ranges)) => ranges.push(range),
            None => self.invalidation = Some(RouteInvalidation::Indices(vec![range])),
        }
    }

    // Queued invalidation (VT-d 6.5.2).

    /// Processes descriptors from IQH up to IQT, synchronously: the guest spins on the wait
    /// descriptor's status word with interrupts off right after writing IQT. Each wait
    /// descriptor first pushes the invalidations ahead of it to `sink` (which applies them),
    /// then writes its status and raises its completion event.
    fn process_queue(&mut self, sink: &mut dyn RemapSink) {
        let Some(queue) = self.queue else {
            return;
        };
        if self.fsts & DMA_FSTS_IQE != 0 {
            // No descriptor is fetched until software clears IQE.
            return;
        }
        if queue.wide {
            self.queue_error(
                queue::IQEI_INVALID_WIDTH,
                "IQA.DW = 1 (256-bit descriptors)",
            );
            return;
        }
        if self.iqt & !IQ_OFFSET_MASK != 0 {
            self.queue_error(queue::IQEI_INVALID_TAIL, "IQT not 16-byte aligned");
            return;
        }
        // 15 bits, so the casts are lossless.
        let tail = (self.iqt >> 4) as u32;
        let mut head = (self.iqh >> 4) as u32;
        if tail >= queue.entries || head >= queue.entries {
            self.queue_error(queue::IQEI_INVALID_TAIL, "IQT beyond the queue");
            return;
        }
        while head != tail {
            if let Err((iqei, what)) = self.process_descriptor(&queue, head, sink) {
                // IQH keeps pointing at the offending descriptor.
                self.queue_error(iqei, &what);
                return;
            }
            head = (head + 1) % queue.entries;
            self.iqh = u64::from(head) << 4;
        }
    }

    fn process_descriptor(
        &mut self,
        queue: &QueueConfig,
        slot: u32,
        sink: &mut dyn RemapSink,
    ) -> Result<(), (u64, String)> {
        let address = queue.slot_address(slot).ok_or((
            queue::IQEI_FETCH_ERROR,
            format!("descriptor {slot} beyond the address space"),
        ))?;
        let mut raw = [0u8; 16];
        self.mem
            .read_slice(&mut raw, GuestAddress(address))
            .map_err(|e| {
                (
                    queue::IQEI_FETCH_ERROR,
                    format!("cannot read descriptor {slot} at {address:#x}: {e}"),
                )
            })?;
        let raw = u128::from_le_bytes(raw);
        // Low and high quadwords, so the casts keep exactly 64 bits each.
        let (qw0, qw1) = (raw as u64, (raw >> 64) as u64);
        let descriptor = queue::decode(qw0, qw1).map_err(|e| {
            (
                e.iqei(),
                format!("descriptor {slot} ({qw0:#018x}, {qw1:#018x}) is invalid: {e:?}"),
            )
        })?;
        match descriptor {
            Descriptor::Ignored { .. } => self.stats.ignored_descriptors += 1,
            Descriptor::InterruptEntryCache(IecScope::Global) => {
                self.stats.iec_global += 1;
                self.invalidate_all();
            }
            Descriptor::InterruptEntryCache(IecScope::Indices(range)) => {
                self.stats.iec_selective += 1;
                self.invalidate_indices(range);
            }
            Descriptor::Wait {
                status_write,
                interrupt,
                ..
            } => {
                self.stats.wait_descriptors += 1;
                // Everything ahead of this descriptor takes effect first (VT-d 6.5.2.8).
                self.fence(sink);
                if let Some((status_address, data)) = status_write {
                    self.mem
                        .write_slice(&data.to_le_bytes(), GuestAddress(status_address))
                        .map_err(|e| {
                            (
                                queue::IQEI_INFO_NOT_AVAILABLE,
                                format!("cannot write wait status to {status_address:#x}: {e}"),
                            )
                        })?;
                }
                if interrupt {
                    self.completion_event();
                }
                self.flush(sink);
            }
        }
        Ok(())
    }

    fn queue_error(&mut self, iqei: u64, what: &str) {
        let before = self.fsts_value();
        self.fsts |= DMA_FSTS_IQE;
        self.iqer = iqei;
        self.stats.queue_errors += 1;
        if self.warned_iqe {
            guest_debug!(
                "remap: invalidation queue error at IQH {:#x}: {what}",
                self.iqh
            );
        } else {
            self.warned_iqe = true;
            crate::guest_warn!(
                "remap: invalidation queue error at IQH {:#x}: {what}",
                self.iqh
            );
        }
        self.fault_event(before);
    }

    // Register writes with side effects.

    fn write_gcmd(&mut self, value: u32) {
        if value & DMA_GCMD_TE != 0 && !self.warned_te {
            self.warned_te = true;
            crate::guest_warn!(
                "remap: guest set GCMD.TE; this unit does no DMA translation (CAP.SAGAW = 0)"
            );
        }
        if value & DMA_GCMD_SRTP != 0 {
            // Nothing uses the root table; acknowledge so a guest polling RTPS moves on.
            self.gsts |= DMA_GSTS_RTPS;
        }

        let qie = value & DMA_GCMD_QIE != 0;
        if qie != (self.gsts & DMA_GSTS_QIES != 0) {
            if qie {
                self.enable_qi();
            } else {
                self.disable_qi();
            }
        }

        // SIRTP before IRE: a guest may set both in one write.
        if value & DMA_GCMD_SIRTP != 0 {
            let table = IrtTable::from_irta(self.irta);
            guest_debug!("remap: interrupt remapping table latched: {table:x?}");
            self.table = Some(table);
            self.gsts |= DMA_GSTS_IRTPS;
            self.invalidate_all();
        }

        let ire = value & DMA_GCMD_IRE != 0;
        if ire != self.enabled() {
            guest_debug!(
                "remap: interrupt remapping {}",
                if ire { "enabled" } else { "disabled" }
            );
            self.gsts ^= DMA_GSTS_IRES;
            self.invalidate_all();
        }

        let cfi = value & DMA_GCMD_CFI != 0;
        if cfi != (self.gsts & DMA_GSTS_CFIS != 0) {
            guest_debug!(
                "remap: compatibility-format interrupts {}",
                if cfi { "allowed" } else { "blocked" }
            );
            self.gsts ^= DMA_GSTS_CFIS;
            self.invalidate_all();
        }
    }

    fn enable_qi(&mut self) {
        let queue = QueueConfig::from_iqa(self.iqa);
        guest_debug!("remap: queued invalidation enabled: {queue:x?}");
        self.queue = Some(queue);
        self.iqh = 0;
        self.gsts |= DMA_GSTS_QIES;
        // Linux writes IQT = 0 first; a guest that queued descriptors before enabling gets
        // them processed now.
        self.queue_kicked = true;
    }

    fn disable_qi(&mut self) {
        self.queue_kicked = false;
        if self.iqh != self.iqt & IQ_OFFSET_MASK {
            guest_debug!(
                "remap: queued invalidation disabled with descriptors pending (IQH {:#x}, IQT {:#x})",
                self.iqh, self.iqt
            );
        }
        self.queue = None;
        self.iqh = 0;
        self.gsts &= !DMA_GSTS_QIES;
    }

    fn write_fsts(&mut self, value: u32) {
        let clear = value & DMA_FSTS_RW1C & self.fsts;
        self.fsts &= !clear;
        if clear & DMA_FSTS_IQE != 0 {
            self.iqer = 0;
        }
        self.fault_conditions_cleared();
        if clear & DMA_FSTS_IQE != 0 {
            // Fetching resumes at IQH (Linux replaces the bad descriptor, then clears IQE).
            self.queue_kicked = true;
        }
    }

    fn write_fectl(&mut self, value: u32) {
        self.fectl = (self.fectl & !DMA_FECTL_IM) | (value & DMA_FECTL_IM);
        if self.fectl & (DMA_FECTL_IM | DMA_FECTL_IP) == DMA_FECTL_IP {
            self.send_fault_event();
        }
    }

    fn write_iectl(&mut self, value: u32) {
        self.iectl = (self.iectl & !DMA_FECTL_IM) | (value & DMA_FECTL_IM);
        if self.iectl & (DMA_FECTL_IM | DMA_FECTL_IP) == DMA_FECTL_IP {
            self.send_completion_event();
        }
    }

    fn write_ics(&mut self, value: u32) {
        if value & DMA_ICS_IWC != 0 {
            self.ics &= !DMA_ICS_IWC;
            self.iectl &= !DMA_FECTL_IP;
        }
    }

    // Register access. Every register is seen as 32-bit halves for reads; 64-bit registers
    // take 32-bit writes to either half (merged) and 64-bit writes at once.

    /// Index of the fault recording register holding `offset`, and whether it is the high
    /// quadword.
    fn frcd_at(offset: u64) -> Option<(usize, bool)> {
        let relative = offset.checked_sub(DMAR_FRCD_REG)?;
        let slot = usize::try_from(relative / 16).ok()?;
        (slot < DMAR_FRCD_REG_NR).then_some((slot, relative % 16 >= 8))
    }

    /// The 64-bit register at 8-aligned `offset`, if there is one.
    fn read_reg64(&self, offset: u64) -> Option<u64> {
        Some(match offset {
            DMAR_CAP_REG => VTD_CAP,
            DMAR_ECAP_REG => VTD_ECAP,
            DMAR_RTADDR_REG => self.rtaddr,
            DMAR_CCMD_REG => 0,
            DMAR_IQH_REG => self.iqh,
            DMAR_IQT_REG => self.iqt,
            DMAR_IQA_REG => self.iqa,
            DMAR_IQER_REG => self.iqer,
            DMAR_IRTA_REG => self.irta,
            o if o == DMAR_IOTLB_REGS || o == DMAR_IOTLB_REGS + 8 => 0,
            o => {
                let (slot, high) = Self::frcd_at(o)?;
                self.frcd[slot][usize::from(high)]
            }
        })
    }

    /// The 32-bit register at 4-aligned `offset`, if there is one.
    fn read_reg32(&self, offset: u64) -> Option<u32> {
        Some(match offset {
            DMAR_VER_REG => VTD_VER,
            DMAR_GSTS_REG => self.gsts,
            DMAR_FSTS_REG => self.fsts_value(),
            DMAR_FECTL_REG => self.fectl,
            DMAR_FEDATA_REG => self.fedata,
            DMAR_FEADDR_REG => self.feaddr,
            DMAR_FEUADDR_REG => self.feuaddr,
            DMAR_ICS_REG => self.ics,
            DMAR_IECTL_REG => self.iectl,
            DMAR_IEDATA_REG => self.iedata,
            DMAR_IEADDR_REG => self.ieaddr,
            DMAR_IEUADDR_REG => self.ieuaddr,
            // GCMD reads are undefined; everything else here is reserved.
            _ => return None,
        })
    }

    fn read32(&self, offset: u64) -> u32 {
        match self.read_reg64(offset & !7) {
            // The half selected by bit 2 of the offset.
            Some(value) => (value >> ((offset & 4) * 8)) as u32,
            None => self.read_reg32(offset).unwrap_or(0),
        }
    }

    /// Writes the bits of `value` selected by `mask` to the 64-bit register at 8-aligned
    /// `offset`. Returns `false` if there is no 64-bit register there.
    fn write_reg64(&mut self, offset: u64, value: u64, mask: u64) -> bool {
        let merge = |current: u64| (current & !mask) | (value & mask);
        match offset {
            DMAR_RTADDR_REG => self.rtaddr = merge(self.rtaddr),
            DMAR_IQT_REG => {
                self.iqt = merge(self.iqt) & IQT_WRITABLE;
                self.queue_kicked = true;
            }
            DMAR_IQA_REG => {
                if self.queue.is_some() {
                    guest_debug!("remap: IQA written while queued invalidation is enabled");
                }
                self.iqa = merge(self.iqa) & IQA_WRITABLE;
            }
            DMAR_IRTA_REG => self.irta = merge(self.irta) & IRTA_WRITABLE,
            // Read-only, or registers of the DMA side this unit ignores.
            DMAR_CAP_REG | DMAR_ECAP_REG | DMAR_CCMD_REG | DMAR_IQH_REG | DMAR_IQER_REG => {}
            o if o == DMAR_IOTLB_REGS || o == DMAR_IOTLB_REGS + 8 => {}
            o => match Self::frcd_at(o) {
                Some((slot, true)) => {
                    // Only F is writable (RW1C); the rest of the record is read-only.
                    if value & mask & DMA_FRCD_F != 0 {
                        self.frcd[slot][1] &= !DMA_FRCD_F;
                        self.fault_conditions_cleared();
                    }
                }
                Some((_, false)) => {}
                None => return false,
            },
        }
        true
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let base = offset & !7;
        let shift = (offset & 4) * 8;
        if self.write_reg64(base, u64::from(value) << shift, 0xffff_ffff << shift) {
            return;
        }
        match offset {
            DMAR_GCMD_REG => self.write_gcmd(value),
            DMAR_FSTS_REG => self.write_fsts(value),
            DMAR_FECTL_REG => self.write_fectl(value),
            DMAR_FEDATA_REG => self.fedata = value,
            DMAR_FEADDR_REG => self.feaddr = value & !0x3,
            DMAR_FEUADDR_REG => self.feuaddr = value,
            DMAR_ICS_REG => self.write_ics(value),
            DMAR_IECTL_REG => self.write_iectl(value),
            DMAR_IEDATA_REG => self.iedata = value,
            DMAR_IEADDR_REG => self.ieaddr = value & !0x3,
            DMAR_IEUADDR_REG => self.ieuaddr = value,
            DMAR_VER_REG | DMAR_GSTS_REG => {}
            _ => guest_debug!("remap: write of {value:#x} to unknown register {offset:#x} ignored"),
        }
    }

    fn write64(&mut self, offset: u64, value: u64) {
        if offset.is_multiple_of(8) && self.write_reg64(offset, value, !0) {
            return;
        }
        // Two 32-bit registers (or a misaligned access): low half first. The halves of
        // `value` are exactly 32 bits each.
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// Sorts `ranges` and merges overlapping or adjacent ones.
fn coalesce(mut ranges: Vec<Range<u32>>) -> Vec<Range<u32>> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u32>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// Whether a `len`-byte access at `offset` is one this unit answers: 4 or 8 bytes, 4-byte
/// aligned, inside the page.
fn access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8)
        && offset.is_multiple_of(4)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= REMAP_UNIT_SIZE)
}

impl RemapUnit {
    /// A guest MMIO read of the register page.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len()) {
            guest_debug!("remap: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0);
            return;
        }
        let low = self.read32(offset);
        if let Ok(dword) = <&mut [u8; 4]>::try_from(&mut *data) {
            *dword = low.to_le_bytes();
        } else {
            let value = u64::from(self.read32(offset + 4)) << 32 | u64::from(low);
            data.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A guest MMIO write of the register page. Queue processing it starts (an IQT write,
    /// QIE, clearing IQE) runs here, with each wait descriptor fenced through `sink`; every
    /// route invalidation and event interrupt the write causes is pushed to `sink` before
    /// this returns.
    pub fn write(&mut self, offset: u64, data: &[u8], sink: &mut dyn RemapSink) {
        if !access_ok(offset, data.len()) {
            guest_debug!("remap: {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        if let Ok(dword) = <[u8; 4]>::try_from(data) {
            self.write32(offset, u32::from_le_bytes(dword));
        } else if let Ok(qword) = <[u8; 8]>::try_from(data) {
            self.write64(offset, u64::from_le_bytes(qword));
        }
        if std::mem::take(&mut self.queue_kicked) {
            self.process_queue(sink);
        }
        self.flush(sink);
    }
}
