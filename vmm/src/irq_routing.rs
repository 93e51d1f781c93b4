//! Turns interrupt sources into KVM routes, through the interrupt-remapping unit when the
//! guest enabled it.
//!
//! The [`IrqRouter`] owns the IOAPIC model and the remapping unit (by value: nothing else
//! touches them) and one table of interrupt sources: the IOAPIC pins (GSI = pin, requester ID
//! the platform's IOAPIC source-id) and MSI sources (a GSI per vector, the device's requester
//! ID). Each [`Source`] holds the message the guest programmed and the route currently in KVM.
//!
//! Reprogramming only: the router runs when the guest writes an IOAPIC redirection entry or
//! the remapping unit's registers, when an MSI source is reprogrammed, and when a parked source
//! fires. The IOAPIC and the unit *push* what changed into the router (their
//! [`IoapicSink`] / [`RemapSink`]), so nothing waits for a later poll:
//!
//! - an RTE write pushes the pin's new message; the router recomputes that route;
//! - the unit pushes route invalidations at each invalidation wait descriptor, before the
//!   descriptor's status write (VT-d 6.5.2.8), and at the end of a register write; the router
//!   re-translates the covered sources (remappable-format message → IRTE → compatibility
//!   format) before the unit continues;
//! - the unit pushes its event interrupts (fault events, invalidation completion), which the
//!   router injects with `KVM_SIGNAL_MSI`.
//!
//! Every router entry point sends all the route changes it causes to KVM in **one**
//! `KVM_SET_GSI_ROUTING` (nothing if no route changed). The irqfds stay attached, so delivery
//! never involves this code.
//!
//! # Blocked sources
//!
//! A source whose route interrupt remapping blocks has no KVM route and is *parked*
//! ([`InterruptManager::park`]): its irqfd is detached and the VMM polls its eventfd. Each
//! time the device fires it, that is one blocked interrupt request: the unit records one fault
//! ([`RemapUnit::request_blocked`], VT-d 5.1.4) and raises the fault event. Computing a
//! blocked route records nothing, so a global invalidation does not re-fault every blocked
//! source. When the route becomes valid again the irqfd is re-attached (after the route is in
//! KVM).
//!
//! # Edge only
//!
//! Every source is an edge source; see [`devices::ioapic`]. `KVM_EXIT_IOAPIC_EOI` (KVM exits on
//! EOIs of level-triggered routes among the IOAPIC GSIs) reaches [`IrqRouter::eoi_exit`], which
//! counts it; there is nothing to release.
//!
//! # Locking
//!
//! One mutex around the router. The vCPU threads (IOAPIC, remapping-unit MMIO, EOI exits) and
//! the event loop (parked sources firing) take it; under it the router takes the interrupt
//! manager's lock. The interrupt manager calls parked handlers without holding its lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use arch::layout;
use devices::remap::{
    remap_index, BlockReason, Blocked, RemapSink, RemapStats, RemapUnit, RouteInvalidation,
    UnitEvent,
};
use devices::sync::lock;
use devices::{guest_warn, BusDevice, Ioapic, IoapicSink, IoapicStats, MsiMessage};

use crate::interrupts::{InterruptManager, ParkedHandler};

/// Number of IOAPIC pins.
const PINS: usize = layout::IOAPIC_PINS as usize;
/// At most this many faults are recorded for one batch of triggers of a parked source: the
/// unit has 8 fault recording registers, so more can only overflow. All are counted.
const MAX_FAULTS_PER_BATCH: u64 = 16;

/// What a source's route is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The guest masked the source: no route (an edge source's interrupt is dropped, as by
    /// a masked IOAPIC pin).
    Masked,
    /// The message KVM delivers.
    Routed(MsiMessage),
    /// Interrupt remapping blocks it: no route, the source is parked.
    Blocked(Blocked),
}

impl Route {
    fn kvm(&self) -> Option<MsiMessage> {
        match self {
            Route::Routed(m) => Some(*m),
            Route::Masked | Route::Blocked(_) => None,
        }
    }
}

/// One interrupt source: an IOAPIC pin or an MSI vector.
#[derive(Clone, Copy, Debug)]
struct Source {
    /// The guest-programmed message (`None`: masked).
    msg: Option<MsiMessage>,
    /// The requester ID the remapping unit checks.
    source_id: u16,
    /// [`remap_index`] of `msg`, for index-selective invalidations.
    index: Option<u32>,
    /// The route in KVM.
    route: Route,
}

impl Source {
    fn new(msg: Option<MsiMessage>, source_id: u16) -> Source {
        Source {
            msg,
            source_id,
            index: msg.and_then(remap_index),
            route: Route::Masked,
        }
    }
}

/// How a device programmed one MSI source, for [`IrqRouter::set_msi_sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiSource {
    /// The source's GSI.
    pub gsi: u32,
    /// The guest-programmed message; `None` when masked.
    pub msg: Option<MsiMessage>,
    /// The device's requester ID.
    pub source_id: u16,
}

/// The router's state besides the IOAPIC and the unit: what their sinks act on.
struct Core {
    interrupts: Arc<InterruptManager>,
    sources: BTreeMap<u32, Source>,
    /// Sources whose message changed since the last flush.
    dirty: BTreeSet<u32>,
    /// Given to the interrupt manager for every parked source.
    parked_handler: Arc<dyn ParkedHandler>,
    /// Interrupt requests of blocked sources.
    blocked_requests: u64,
}

/// Routes every interrupt source of the VM; see the [module documentation](self).
pub struct IrqRouter {
    ioapic: Ioapic,
    unit: Option<RemapUnit>,
    core: Core,
}

/// Passes parked-source triggers to the router.
struct RouterHandle(Weak<Mutex<IrqRouter>>);

impl ParkedHandler for RouterHandle {
    fn fired(&self, gsi: u32, count: u64) {
        if let Some(router) = self.0.upgrade() {
            lock(&router).parked_fired(gsi, count);
        }
    }
}

/// Where the vCPU threads send `KVM_EXIT_IOAPIC_EOI`.
pub trait IoapicEoi: Send + Sync {
    /// The guest EOIed `vector`, a level-triggered route's.
    fn ioapic_eoi(&self, vector: u8);
}

impl IoapicEoi for Mutex<IrqRouter> {
    fn ioapic_eoi(&self, vector: u8) {
        lock(self).eoi_exit(vector);
    }
}

impl Core {
    /// The route for `msg` from `source_id`: translated through `unit` when there is one.
    fn translate(unit: Option<&mut RemapUnit>, msg: MsiMessage, source_id: u16) -> Route {
        let result = match unit {
            Some(unit) => unit.translate(msg, source_id),
            // Without a remapping unit a remappable-format message means nothing.
            None => match remap_index(msg) {
                Some(index) => Err(Blocked {
                    reason: BlockReason::RemappingDisabled,
                    index: Some(index),
                    fault_processing_disable: false,
                }),
                None => Ok(msg),
            },
        };
        match result {
            Ok(m) => Route::Routed(m),
            Err(b) => Route::Blocked(b),
        }
    }

    /// Recomputes the routes of `gsis` and sends every change to KVM in one batch; parks the
    /// sources that became blocked (before their route goes) and unparks those that no longer
    /// are (after their route is in KVM).
    fn refresh(&mut self, mut unit: Option<&mut RemapUnit>, gsis: Vec<u32>, why: &str) {
        let mut updates = Vec::with_capacity(gsis.len());
        let mut park = Vec::new();
        let mut unpark = Vec::new();
        for gsi in gsis {
            let Some(source) = self.sources.get_mut(&gsi) else {
                continue;
            };
            let route = match source.msg {
                None => Route::Masked,
                Some(m) => Core::translate(unit.as_deref_mut(), m, source.source_id),
            };
            match (source.route, route) {
                (Route::Blocked(_), Route::Blocked(_)) => {}
                (_, Route::Blocked(_)) => park.push(gsi),
                (Route::Blocked(old), _) => unpark.push((gsi, old, source.source_id)),
                _ => {}
            }
            source.route = route;
            updates.push((gsi, route.kvm()));
        }
        for &gsi in &park {
            if let Err(e) = self.interrupts.park(gsi, Arc::clone(&self.parked_handler)) {
                log::error!("irq: cannot park blocked GSI {gsi}: {e}");
            }
        }
        match self.interrupts.update_routes(&updates) {
            Ok(0) => {}
            Ok(n) => {
                let gsis: Vec<u32> = updates.iter().map(|u| u.0).collect();
                devices::ratelimit::guest_log(
                    log::Level::Info,
                    module_path!(),
                    format_args!("irq: rebuilt {n} route(s) after {why} (GSIs {gsis:?})"),
                );
            }
            Err(e) => log::error!("irq: cannot update routes after {why}: {e}"),
        }
        for (gsi, blocked, source_id) in unpark {
            match self.interrupts.unpark(gsi) {
                // Triggers that came in while the source was still blocked.
                Ok(pending) if pending > 0 => {
                    self.blocked(unit.as_deref_mut(), &blocked, source_id, pending)
                }
                Ok(_) => {}
                Err(e) => log::error!("irq: cannot unpark GSI {gsi}: {e}"),
            }
        }
    }

    /// `count` interrupt requests that `blocked` stops: recorded by the unit.
    fn blocked(
        &mut self,
        unit: Option<&mut RemapUnit>,
        blocked: &Blocked,
        source_id: u16,
        count: u64,
    ) {
        self.blocked_requests += count;
        self.interrupts
            .stats()
            .blocked_requests
            .fetch_add(count, Ordering::Relaxed);
        if let Some(unit) = unit {
            for _ in 0..count.min(MAX_FAULTS_PER_BATCH) {
                unit.request_blocked(blocked, source_id, self);
            }
        }
    }

    /// Recomputes the routes of the sources changed since the last flush.
    fn flush(&mut self, unit: Option<&mut RemapUnit>, why: &str) {
        let dirty: Vec<u32> = std::mem::take(&mut self.dirty).into_iter().collect();
        if !dirty.is_empty() {
            self.refresh(unit, dirty, why);
        }
    }

    fn set_message(&mut self, gsi: u32, msg: Option<MsiMessage>, source_id: u16) {
        let source = self
            .sources
            .entry(gsi)
            .or_insert_with(|| Source::new(None, source_id));
        source.msg = msg;
        source.source_id = source_id;
        source.index = msg.and_then(remap_index);
        self.dirty.insert(gsi);
    }
}

impl IoapicSink for Core {
    fn pin_changed(&mut self, pin: usize, msg: Option<MsiMessage>) {
        let Ok(gsi) = u32::try_from(pin) else {
            return;
        };
        // Pins are created with the router; the IOAPIC has no others.
        if let Some(source) = self.sources.get(&gsi) {
            let source_id = source.source_id;
            self.set_message(gsi, msg, source_id);
        }
    }
}

impl RemapSink for Core {
    fn invalidate(&mut self, unit: &mut RemapUnit, inv: RouteInvalidation) {
        let affected: Vec<u32> = self
            .sources
            .iter()
            .filter(|(_, s)| s.msg.is_some() && inv.covers(s.index))
            .map(|(gsi, _)| *gsi)
            .collect();
        if affected.is_empty() {
            return;
        }
        let why = match inv {
            RouteInvalidation::All => "a global invalidation",
            RouteInvalidation::Indices(_) => "an interrupt-entry-cache invalidation",
        };
        self.refresh(Some(unit), affected, why);
    }

    fn raise(&mut self, kind: UnitEvent, msg: MsiMessage) {
        if kind == UnitEvent::Fault {
            self.interrupts
                .stats()
                .fault_events
                .fetch_add(1, Ordering::Relaxed);
        }
        // Control-plane interrupts of the unit itself (rare): injected from userspace and
        // counted as such.
        if let Err(e) = self.interrupts.signal_msi(msg) {
            guest_warn!("irq: cannot inject remapping-unit interrupt {msg:x?}: {e}");
        }
    }
}

impl IrqRouter {
    /// A router owning `ioapic` and, with interrupt remapping, `unit`. The IOAPIC's pins
    /// are sources with requester ID `ioapic_source_id` (the DMAR device scope's).
    pub fn new(
        ioapic: Ioapic,
        unit: Option<RemapUnit>,
        interrupts: Arc<InterruptManager>,
        ioapic_source_id: u16,
    ) -> Arc<Mutex<IrqRouter>> {
        Arc::new_cyclic(|weak: &Weak<Mutex<IrqRouter>>| {
            let sources = (0..PINS)
                .map(|pin| {
                    // Lossless: PINS is 24.
                    let gsi = pin as u32;
                    (gsi, Source::new(ioapic.pin_msi(pin), ioapic_source_id))
                })
                .collect();
            let mut router = IrqRouter {
                ioapic,
                unit,
                core: Core {
                    interrupts,
                    sources,
                    dirty: (0..PINS as u32).collect(),
                    parked_handler: Arc::new(RouterHandle(weak.clone())),
                    blocked_requests: 0,
                },
            };
            router.core.flush(router.unit.as_mut(), "start-up");
            Mutex::new(router)
        })
    }

    /// A guest read of the IOAPIC window.
    pub fn ioapic_read(&mut self, offset: u64, data: &mut [u8]) {
        self.ioapic.read(offset, data);
    }

    /// A guest write to the IOAPIC window: the changed pin's route is recomputed and pushed.
    pub fn ioapic_write(&mut self, offset: u64, data: &[u8]) {
        self.ioapic.write(offset, data, &mut self.core);
        self.core.flush(self.unit.as_mut(), "an IOAPIC entry write");
    }

    /// A guest read of the remapping unit's registers (zeros without a unit).
    pub fn remap_read(&mut self, offset: u64, data: &mut [u8]) {
        match &mut self.unit {
            Some(unit) => unit.read(offset, data),
            None => data.fill(0),
        }
    }

    /// A guest write to the remapping unit's registers. Invalidations are applied at each
    /// wait descriptor, before its status write; event interrupts are injected.
    pub fn remap_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(unit) = &mut self.unit {
            unit.write(offset, data, &mut self.core);
        }
    }

    /// Sets how devices programmed MSI sources (`msg: None`: masked) and sends all the
    /// resulting route changes to KVM in one batch.
    pub fn set_msi_sources(&mut self, sources: &[MsiSource]) {
        for s in sources {
            if (s.gsi as usize) < PINS {
                log::error!("irq: GSI {} is an IOAPIC pin, not an MSI source", s.gsi);
                continue;
            }
            self.core.set_message(s.gsi, s.msg, s.source_id);
        }
        self.core.flush(self.unit.as_mut(), "an MSI source update");
    }

    /// [`IrqRouter::set_msi_sources`] for one source.
    pub fn set_msi_source(&mut self, gsi: u32, msg: Option<MsiMessage>, source_id: u16) {
        self.set_msi_sources(&[MsiSource {
            gsi,
            msg,
            source_id,
        }]);
    }

    /// `KVM_EXIT_IOAPIC_EOI` for `vector`: counted (the platform is edge-only).
    pub fn eoi_exit(&mut self, vector: u8) {
        self.core
            .interrupts
            .stats()
            .ioapic_eoi_exits
            .fetch_add(1, Ordering::Relaxed);
        self.ioapic.end_of_interrupt(vector);
    }

    /// Parked `gsi` fired `count` times.
    fn parked_fired(&mut self, gsi: u32, count: u64) {
        let Some(source) = self.core.sources.get(&gsi) else {
            return;
        };
        match source.route {
            Route::Blocked(blocked) => {
                let source_id = source.source_id;
                self.core
                    .blocked(self.unit.as_mut(), &blocked, source_id, count);
            }
            // Unparked meanwhile (the poller read the eventfd just before): the requests
            // were made while it was blocked, but what blocked them is gone.
            Route::Routed(_) | Route::Masked => log::debug!(
                "irq: {count} trigger(s) of GSI {gsi} seen after it was unparked; dropped"
            ),
        }
    }

    /// Platform reset: every pin masked, the unit in its reset state, routes recomputed.
    pub fn reset(&mut self) {
        self.ioapic.reset(&mut self.core);
        if let Some(unit) = &mut self.unit {
            unit.reset(&mut self.core);
        }
        self.core.flush(self.unit.as_mut(), "a reset");
    }

    /// Interrupt requests of blocked (parked) sources so far.
    pub fn blocked(&self) -> u64 {
        self.core.blocked_requests
    }

    /// The IOAPIC's counters.
    pub fn ioapic_stats(&self) -> IoapicStats {
        self.ioapic.stats()
    }

    /// The remapping unit's counters, if there is one.
    pub fn remap_stats(&self) -> Option<RemapStats> {
        self.unit.as_ref().map(RemapUnit::stats)
    }
}

/// The IOAPIC on the MMIO bus.
pub struct IoapicBus(pub Arc<Mutex<IrqRouter>>);

impl BusDevice for IoapicBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).ioapic_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).ioapic_write(offset, data);
    }
}

/// The remapping unit's registers on the MMIO bus.
pub struct RemapBus(pub Arc<Mutex<IrqRouter>>);

impl BusDevice for RemapBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).remap_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).remap_write(offset, data);
    }
}
