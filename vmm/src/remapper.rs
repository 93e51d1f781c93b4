//! The interrupt remapper as the [router](crate::irq_routing) sees it: one trait over the
//! emulated VT-d unit ([`RemapUnit`]) and the paravirtual one (PV-IR), so the router's
//! source table, batching and parking do not depend on which one the VM has.
//!
//! Each unit has its own sink trait; the adapters here turn the router's [`RouterSink`] into
//! the unit's, and hand the unit back to the router as `&mut dyn InterruptRemapper` so the
//! router can re-translate the affected sources while the unit's register write is still in
//! progress (and push them to KVM before the write returns).

use devices::remap::{Blocked, RemapSink, RemapStats, RemapUnit, RouteInvalidation, UnitEvent};
use devices::{MsiMessage, PvBlocked, PvIrq, PvIrqSink, PvIrqStats, PvSource};

/// At most this many VT-d faults are recorded for one batch of triggers of a parked source:
/// the unit has 8 fault recording registers, so more can only overflow. All are counted.
const MAX_FAULTS_PER_BATCH: u64 = 16;

/// Who raises an interrupt: enough identity for either unit (VT-d checks the requester ID,
/// PV-IR binds per IOAPIC pin or per PCI requester).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqSource {
    /// An IOAPIC pin.
    IoapicPin {
        /// The IOAPIC's ID (as in the MADT).
        ioapic_id: u8,
        /// The pin.
        pin: u8,
        /// The requester ID of the IOAPIC's interrupts (the DMAR device scope's).
        requester_id: u16,
    },
    /// An MSI / MSI-X vector of a PCI (or virtio-mmio) function on segment 0.
    Msi {
        /// The function's requester ID (bus << 8 | devfn).
        requester_id: u16,
    },
}

impl IrqSource {
    /// The PV-IR view: IOAPIC pins by (IOAPIC ID, pin), everything else a PCI requester on
    /// segment 0.
    pub fn pv(&self) -> PvSource {
        match *self {
            IrqSource::IoapicPin { ioapic_id, pin, .. } => PvSource::IoapicPin { ioapic_id, pin },
            IrqSource::Msi { requester_id } => PvSource::Pci {
                segment: 0,
                requester_id,
            },
        }
    }

    /// The requester ID the VT-d unit checks.
    pub fn requester_id(&self) -> u16 {
        match *self {
            IrqSource::IoapicPin { requester_id, .. } | IrqSource::Msi { requester_id } => {
                requester_id
            }
        }
    }
}

/// Why a source has no route: what the unit that blocked it needs to record it when it fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemapBlocked {
    /// No remapper: a remappable-format message means nothing. Counted, never recorded.
    NoRemapper {
        /// The interrupt index the message names.
        index: u32,
    },
    /// Blocked by the VT-d unit.
    Vtd(Blocked),
    /// Blocked by PV-IR.
    Pv(PvBlocked),
}

/// A unit's counters.
#[derive(Clone, Debug)]
pub enum RemapperStats {
    /// The VT-d unit's.
    Vtd(RemapStats),
    /// PV-IR's.
    Pv(PvIrqStats),
}

/// What a remapper pushes back into the router while it runs.
pub trait RouterSink {
    /// The routes `inv` covers may have changed: re-translate them through `unit` and make
    /// them effective (one `KVM_SET_GSI_ROUTING`) before returning.
    fn invalidate(&mut self, unit: &mut dyn InterruptRemapper, inv: RouteInvalidation);
    /// An event interrupt of the unit itself (VT-d fault / invalidation-completion event), to
    /// inject now.
    fn raise(&mut self, kind: UnitEvent, msg: MsiMessage);
}

/// An interrupt-remapping unit the router translates through.
pub trait InterruptRemapper: Send {
    /// The message KVM should route for `msg` from `source` (computes; records nothing).
    fn translate(&mut self, msg: MsiMessage, source: IrqSource)
        -> Result<MsiMessage, RemapBlocked>;
    /// `count` interrupt requests from `source` that `blocked` stops: counted and recorded
    /// as the unit records faults (which may raise its event interrupt through `sink`).
    fn request_blocked(
        &mut self,
        blocked: &RemapBlocked,
        source: IrqSource,
        count: u64,
        sink: &mut dyn RouterSink,
    );
    /// A guest read of the register page.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of the register page; every route change it causes reaches `sink`
    /// before this returns.
    fn write(&mut self, offset: u64, data: &[u8], sink: &mut dyn RouterSink);
    /// Platform reset; every route is invalidated through `sink`.
    fn reset(&mut self, sink: &mut dyn RouterSink);
    /// The unit's counters.
    fn stats(&self) -> RemapperStats;
    /// What caused `inv`, for the route-rebuild log line.
    fn invalidation_cause(&self, inv: &RouteInvalidation) -> &'static str;
}

/// [`RemapSink`] over a [`RouterSink`].
struct VtdSink<'a>(&'a mut dyn RouterSink);

impl RemapSink for VtdSink<'_> {
    fn invalidate(&mut self, unit: &mut RemapUnit, inv: RouteInvalidation) {
        self.0.invalidate(unit, inv);
    }

    fn raise(&mut self, kind: UnitEvent, msg: MsiMessage) {
        self.0.raise(kind, msg);
    }
}

impl InterruptRemapper for RemapUnit {
    fn translate(
        &mut self,
        msg: MsiMessage,
        source: IrqSource,
    ) -> Result<MsiMessage, RemapBlocked> {
        RemapUnit::translate(self, msg, source.requester_id()).map_err(RemapBlocked::Vtd)
    }

    fn request_blocked(
        &mut self,
        blocked: &RemapBlocked,
        source: IrqSource,
        count: u64,
        sink: &mut dyn RouterSink,
    ) {
        let RemapBlocked::Vtd(blocked) = blocked else {
            return;
        };
        for _ in 0..count.min(MAX_FAULTS_PER_BATCH) {
            RemapUnit::request_blocked(self, blocked, source.requester_id(), &mut VtdSink(sink));
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        RemapUnit::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8], sink: &mut dyn RouterSink) {
        RemapUnit::write(self, offset, data, &mut VtdSink(sink));
    }

    fn reset(&mut self, sink: &mut dyn RouterSink) {
        RemapUnit::reset(self, &mut VtdSink(sink));
    }

    fn stats(&self) -> RemapperStats {
        RemapperStats::Vtd(RemapUnit::stats(self))
    }

    fn invalidation_cause(&self, inv: &RouteInvalidation) -> &'static str {
        match inv {
            RouteInvalidation::All => "a global invalidation",
            RouteInvalidation::Indices(_) => "an interrupt-entry-cache invalidation",
        }
    }
}

/// [`PvIrqSink`] over a [`RouterSink`].
struct PvSink<'a>(&'a mut dyn RouterSink);

impl PvIrqSink for PvSink<'_> {
    fn invalidate(&mut self, pv: &mut PvIrq, inv: RouteInvalidation) {
        self.0.invalidate(pv, inv);
    }
}

impl InterruptRemapper for PvIrq {
    fn translate(
        &mut self,
        msg: MsiMessage,
        source: IrqSource,
    ) -> Result<MsiMessage, RemapBlocked> {
        PvIrq::translate(self, msg, source.pv()).map_err(RemapBlocked::Pv)
    }

    fn request_blocked(
        &mut self,
        blocked: &RemapBlocked,
        source: IrqSource,
        count: u64,
        _sink: &mut dyn RouterSink,
    ) {
        // PV-IR has no event interrupt: FAULT_COUNT and LAST_FAULT only.
        if let RemapBlocked::Pv(blocked) = blocked {
            PvIrq::request_blocked(self, blocked, source.pv(), count);
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        PvIrq::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8], sink: &mut dyn RouterSink) {
        PvIrq::write(self, offset, data, &mut PvSink(sink));
    }

    fn reset(&mut self, sink: &mut dyn RouterSink) {
        PvIrq::reset(self, &mut PvSink(sink));
    }

    fn stats(&self) -> RemapperStats {
        RemapperStats::Pv(PvIrq::stats(self))
    }

    fn invalidation_cause(&self, inv: &RouteInvalidation) -> &'static str {
        match inv {
            RouteInvalidation::All => "a PV-IR control change",
            RouteInvalidation::Indices(_) => "a PV-IR request",
        }
    }
}
