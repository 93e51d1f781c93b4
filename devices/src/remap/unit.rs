// SPDX-License-Identifier: Apache-2.0

//! The remapping unit's register model: [`RemapUnit`].

use std::ops::Range;

use log::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::irte::{self, remap_index, BlockReason, Blocked, IrtTable};
use super::queue::{self, Descriptor, IecScope, QueueConfig};
use super::regs::*;
use crate::bus::BusDevice;
use crate::interrupt::MsiMessage;

/// At most this many index ranges are kept between two
/// [`RemapUnit::take_route_invalidation`] calls; more collapse into
/// [`RouteInvalidation::All`].
const MAX_PENDING_RANGES: usize = 256;
/// At most this many control-plane MSIs are kept between two
/// [`RemapUnit::take_pending_msis`] calls (each event source has one pending interrupt at a
/// time, so this is never reached by a well-behaved VMM).
const MAX_PENDING_MSIS: usize = 64;

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
/// [`RemapUnit::take_route_invalidation`].
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Fault-event interrupts queued for the VMM to inject.
    pub fault_events: u64,
    /// Invalidation-completion interrupts queued for the VMM to inject.
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

    invalidation: Option<RouteInvalidation>,
    pending_msis: Vec<MsiMessage>,
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
            warned_te: false,
            warned_iqe: false,
            stats: RemapStats::default(),
        }
    }

    /// Returns to the reset state (platform reset). Counters are kept; every route must be
    /// recomputed ([`RouteInvalidation::All`]) and pending MSIs are dropped.
    pub fn reset(&mut self) {
        let stats = self.stats;
        *self = RemapUnit::new(self.mem.clone());
        self.stats = stats;
        self.invalidation = Some(RouteInvalidation::All);
    }

    /// Whether interrupt remapping is enabled (GSTS.IRES).
    pub fn enabled(&self) -> bool {
        self.gsts & DMA_GSTS_IRES != 0
    }

    /// Which routes to recompute since the last call, or `None` if nothing changed. The VMM
    /// calls this after every MMIO write it forwards to the unit.
    pub fn take_route_invalidation(&mut self) -> Option<RouteInvalidation> {
        match self.invalidation.take()? {
            RouteInvalidation::All => Some(RouteInvalidation::All),
            RouteInvalidation::Indices(ranges) => {
                Some(RouteInvalidation::Indices(coalesce(ranges)))
            }
        }
    }

    /// Control-plane interrupts to inject from userspace (`KVM_SIGNAL_MSI`) since the last
    /// call: invalidation-completion events (IEDATA/IEUADDR:IEADDR) and fault events
    /// (FEDATA/FEUADDR:FEADDR), oldest first. These registers hold compatibility-format
    /// messages with destination bits 31:8 in the upper address (VT-d 5.1.6), which is KVM's
    /// layout already. Call after every MMIO write and every [`RemapUnit::translate`].
    pub fn take_pending_msis(&mut self) -> Vec<MsiMessage> {
        std::mem::take(&mut self.pending_msis)
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
    /// A block that is a VT-d fault and not suppressed by the entry's FPD is recorded in the
    /// next fault recording register (or sets FSTS.PFO when that one is still full) and may
    /// queue a fault-event MSI ([`RemapUnit::take_pending_msis`]). Faults are recorded when
    /// a route is computed, not per interrupt: a blocked source simply has no route.
    pub fn translate(&mut self, msg: MsiMessage, source_id: u16) -> Result<MsiMessage, Blocked> {
        let result = self.translate_message(msg, source_id);
        match &result {
            Ok(_) if msg.is_remappable() => self.stats.translations += 1,
            Ok(_) => self.stats.passthrough += 1,
            Err(blocked) => {
                debug!(
                    "remap: blocked {msg:x?} from source {source_id:#06x}: {:?} (index {:?})",
                    blocked.reason, blocked.index
                );
                self.stats.blocked.count(blocked.reason);
                if blocked.records_fault() {
                    self.record_fault(blocked, source_id);
                } else if blocked.fault_processing_disable {
                    self.stats.faults_suppressed += 1;
                }
            }
        }
        result
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

    fn read_irte(&self, table: &IrtTable, index: u32) -> Option<u128> {
        let address = table.entry_address(index)?;
        let mut raw = [0u8; 16];
        match self.mem.read_slice(&mut raw, GuestAddress(address)) {
            Ok(()) => Some(u128::from_le_bytes(raw)),
            Err(e) => {
                debug!("remap: cannot read IRTE {index} at {address:#x}: {e}");
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
        self.push_msi(msg);
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
        self.push_msi(msg);
    }

    fn push_msi(&mut self, msg: MsiMessage) {
        if self.pending_msis.len() < MAX_PENDING_MSIS {
            self.pending_msis.push(msg);
        } else {
            debug!("remap: dropping event interrupt {msg:x?}: the VMM has not taken earlier ones");
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
    /// descriptor's status word with interrupts off right after writing IQT.
    fn process_queue(&mut self) {
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
            if let Err((iqei, what)) = self.process_descriptor(&queue, head) {
                // IQH keeps pointing at the offending descriptor.
                self.queue_error(iqei, &what);
                return;
            }
            head = (head + 1) % queue.entries;
            self.iqh = u64::from(head) << 4;
        }
    }

    fn process_descriptor(&mut self, queue: &QueueConfig, slot: u32) -> Result<(), (u64, String)> {
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
            debug!(
                "remap: invalidation queue error at IQH {:#x}: {what}",
                self.iqh
            );
        } else {
            self.warned_iqe = true;
            warn!(
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
            warn!("remap: guest set GCMD.TE; this unit does no DMA translation (CAP.SAGAW = 0)");
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
            debug!("remap: interrupt remapping table latched: {table:x?}");
            self.table = Some(table);
            self.gsts |= DMA_GSTS_IRTPS;
            self.invalidate_all();
        }

        let ire = value & DMA_GCMD_IRE != 0;
        if ire != self.enabled() {
            debug!(
                "remap: interrupt remapping {}",
                if ire { "enabled" } else { "disabled" }
            );
            self.gsts ^= DMA_GSTS_IRES;
            self.invalidate_all();
        }

        let cfi = value & DMA_GCMD_CFI != 0;
        if cfi != (self.gsts & DMA_GSTS_CFIS != 0) {
            debug!(
                "remap: compatibility-format interrupts {}",
                if cfi { "allowed" } else { "blocked" }
            );
            self.gsts ^= DMA_GSTS_CFIS;
            self.invalidate_all();
        }
    }

    fn enable_qi(&mut self) {
        let queue = QueueConfig::from_iqa(self.iqa);
        debug!("remap: queued invalidation enabled: {queue:x?}");
        self.queue = Some(queue);
        self.iqh = 0;
        self.gsts |= DMA_GSTS_QIES;
        // Linux writes IQT = 0 first; a guest that queued descriptors before enabling gets
        // them processed now.
        self.process_queue();
    }

    fn disable_qi(&mut self) {
        if self.iqh != self.iqt & IQ_OFFSET_MASK {
            debug!(
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
            self.process_queue();
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
                self.process_queue();
            }
            DMAR_IQA_REG => {
                if self.queue.is_some() {
                    debug!("remap: IQA written while queued invalidation is enabled");
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
            _ => debug!("remap: write of {value:#x} to unknown register {offset:#x} ignored"),
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

impl BusDevice for RemapUnit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len()) {
            debug!("remap: {}-byte read at {offset:#x} ignored", data.len());
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

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !access_ok(offset, data.len()) {
            debug!("remap: {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        if let Ok(dword) = <[u8; 4]>::try_from(data) {
            self.write32(offset, u32::from_le_bytes(dword));
        } else if let Ok(qword) = <[u8; 8]>::try_from(data) {
            self.write64(offset, u64::from_le_bytes(qword));
        }
    }
}
