//! Turns interrupt sources into KVM routes, through the interrupt-remapping unit when the
//! guest enabled it.
//!
//! The [`IrqRouter`] owns the IOAPIC model and the remapping unit (by value: nothing else
//! touches them) and one table of interrupt sources: the IOAPIC pins (GSI = pin, identified by
//! IOAPIC ID and pin, plus the platform's IOAPIC source-id as requester ID) and MSI sources (a
//! GSI per vector, the device's requester ID). Each [`Source`] holds the message the guest
//! programmed and the route currently in KVM.
//!
//! The unit is an [`InterruptRemapper`]: the emulated VT-d unit
//! ([`RemapUnit`], `--iommu=intremap`) or PV-IR ([`devices::PvIrq`], `--iommu=pvremap`,
//! docs/pv-irq-remap.md), never both. Each pushes into its own sink trait
//! ([`devices::RemapSink`], [`devices::PvIrqSink`]); [`crate::remapper`] adapts both to the
//! router's [`RouterSink`].
//!
//! Reprogramming only: the router runs when the guest writes an IOAPIC redirection entry or
//! the remapping unit's registers, when an MSI source is reprogrammed, and when a parked source
//! fires. The IOAPIC and the unit *push* what changed into the router (their
//! [`IoapicSink`] / [`RouterSink`]), so nothing waits for a later poll:
//!
//! - an RTE write pushes the pin's new message; the router recomputes that route;
//! - VT-d pushes route invalidations at each invalidation wait descriptor, before the
//!   descriptor's status write (VT-d 6.5.2.8), and at the end of a register write; PV-IR
//!   pushes the handle range of each `SET` / `CLEAR` / `FREE` request (and everything on a
//!   `CTRL` change) before the `REQUEST` write returns. The router re-translates the covered
//!   sources (remappable-format message → IRTE or handle → compatibility format) before the
//!   unit continues;
//! - VT-d pushes its event interrupts (fault events, invalidation completion), which the
//!   router injects with `KVM_SIGNAL_MSI`. PV-IR has none (`FAULT_COUNT` / `LAST_FAULT`).
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
use devices::remap::{remap_index, RemapStats, RemapUnit, RouteInvalidation, UnitEvent};
use devices::sync::lock;
use devices::{guest_warn, BusDevice, Ioapic, IoapicSink, IoapicStats, MsiMessage, PvIrqStats};

use crate::interrupts::{InterruptManager, ParkedHandler};
use crate::remapper::{InterruptRemapper, IrqSource, RemapBlocked, RemapperStats, RouterSink};

/// Number of IOAPIC pins.
const PINS: usize = layout::IOAPIC_PINS as usize;

/// What a source's route is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    /// The guest masked the source: no route (an edge source's interrupt is dropped, as by
    /// a masked IOAPIC pin).
    Masked,
    /// The message KVM delivers.
    Routed(MsiMessage),
    /// Interrupt remapping blocks it: no route, the source is parked.
    Blocked(RemapBlocked),
    /// A masked MSI-X vector: no route, the source is parked, and each trigger sets its
    /// pending bit ([`HeldVector::fired_while_held`]) instead of being dropped.
    Held,
}

impl Route {
    /// Whether a source with this route is parked.
    fn parked(&self) -> bool {
        matches!(self, Route::Blocked(_) | Route::Held)
    }
}

/// The device side of a masked MSI-X vector, for [`IrqRouter::register_held_vector`].
pub trait HeldVector: Send + Sync {
    /// The vector's irqfd fired while the router held it (or just before it was released):
    /// set its pending bit (which delivers it if the vector is no longer masked).
    fn fired_while_held(&self);
}

impl Route {
    fn kvm(&self) -> Option<MsiMessage> {
        match self {
            Route::Routed(m) => Some(*m),
            Route::Masked | Route::Blocked(_) | Route::Held => None,
        }
    }
}

/// One interrupt source: an IOAPIC pin or an MSI vector.
#[derive(Clone, Debug)]
struct Source {
    /// The guest-programmed message (`None`: masked).
    msg: Option<MsiMessage>,
    /// Who raises it (the identity the remapper checks).
    origin: IrqSource,
    /// [`remap_index`] of `msg`, for index-selective invalidations.
    index: Option<u32>,
    /// The route in KVM.
    route: Route,
}

impl Source {
    fn new(msg: Option<MsiMessage>, origin: IrqSource) -> Source {
        Source {
            msg,
            origin,
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
    /// MSI-X vectors: masked means held (pending bit), not dropped.
    held: BTreeMap<u32, Arc<dyn HeldVector>>,
}

/// Routes every interrupt source of the VM; see the [module documentation](self).
pub struct IrqRouter {
    ioapic: Ioapic,
    unit: Option<Box<dyn InterruptRemapper>>,
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
    /// The route for `msg` from `origin`: translated through `unit` when there is one.
    fn translate(
        unit: Option<&mut dyn InterruptRemapper>,
        msg: MsiMessage,
        origin: IrqSource,
    ) -> Route {
        let result = match unit {
            Some(unit) => unit.translate(msg, origin),
            // Without a remapping unit a remappable-format message means nothing.
            None => match remap_index(msg) {
                Some(index) => Err(RemapBlocked::NoRemapper { index }),
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
    fn refresh(&mut self, mut unit: Option<&mut dyn InterruptRemapper>, gsis: Vec<u32>, why: &str) {
        let mut updates = Vec::with_capacity(gsis.len());
        let mut park = Vec::new();
        let mut unpark = Vec::new();
        for gsi in gsis {
            let Some(source) = self.sources.get_mut(&gsi) else {
                continue;
            };
            let route = match source.msg {
                None if self.held.contains_key(&gsi) => Route::Held,
                None => Route::Masked,
                Some(m) => Core::translate(reborrow(&mut unit), m, source.origin),
            };
            match (source.route.parked(), route.parked()) {
                (false, true) => park.push(gsi),
                (true, false) => unpark.push((gsi, source.route.clone(), source.origin)),
                _ => {}
            }
            updates.push((gsi, route.kvm()));
            source.route = route;
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
        for (gsi, old, origin) in unpark {
            match (self.interrupts.unpark(gsi), old) {
                // Triggers that came in while the source was still blocked.
                (Ok(pending), Route::Blocked(blocked)) if pending > 0 => {
                    self.blocked(reborrow(&mut unit), &blocked, origin, pending)
                }
                // Triggers of a masked vector not yet polled: its pending bit (delivered by
                // the MSI-X layer once the vector is released).
                (Ok(pending), Route::Held) if pending > 0 => {
                    if let Some(h) = self.held.get(&gsi) {
                        h.fired_while_held();
                    }
                }
                (Ok(_), _) => {}
                (Err(e), _) => log::error!("irq: cannot unpark GSI {gsi}: {e}"),
            }
        }
    }

    /// `count` interrupt requests that `blocked` stops: recorded by the unit.
    fn blocked(
        &mut self,
        unit: Option<&mut dyn InterruptRemapper>,
        blocked: &RemapBlocked,
        origin: IrqSource,
        count: u64,
    ) {
        self.blocked_requests += count;
        self.interrupts
            .stats()
            .blocked_requests
            .fetch_add(count, Ordering::Relaxed);
        if let Some(unit) = unit {
            unit.request_blocked(blocked, origin, count, self);
        }
    }

    /// Recomputes the routes of the sources changed since the last flush.
    fn flush(&mut self, unit: Option<&mut dyn InterruptRemapper>, why: &str) {
        let dirty: Vec<u32> = std::mem::take(&mut self.dirty).into_iter().collect();
        if !dirty.is_empty() {
            self.refresh(unit, dirty, why);
        }
    }

    fn set_message(&mut self, gsi: u32, msg: Option<MsiMessage>, origin: IrqSource) {
        let source = self
            .sources
            .entry(gsi)
            .or_insert_with(|| Source::new(None, origin));
        source.msg = msg;
        source.origin = origin;
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
            let origin = source.origin;
            self.set_message(gsi, msg, origin);
        }
    }
}

impl RouterSink for Core {
    fn invalidate(&mut self, unit: &mut dyn InterruptRemapper, inv: RouteInvalidation) {
        let affected: Vec<u32> = self
            .sources
            .iter()
            .filter(|(_, s)| s.msg.is_some() && inv.covers(s.index))
            .map(|(gsi, _)| *gsi)
            .collect();
        if affected.is_empty() {
            return;
        }
        let why = unit.invalidation_cause(&inv);
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

/// A shorter borrow of an optional unit (`Option::as_deref_mut` keeps the object lifetime,
/// which `&mut` makes invariant).
fn reborrow<'a>(
    unit: &'a mut Option<&mut dyn InterruptRemapper>,
) -> Option<&'a mut dyn InterruptRemapper> {
    match unit {
        Some(unit) => Some(&mut **unit),
        None => None,
    }
}

/// The router's unit, for the [`Core`] functions that translate through it.
fn unit_mut(unit: &mut Option<Box<dyn InterruptRemapper>>) -> Option<&mut dyn InterruptRemapper> {
    match unit {
        Some(unit) => Some(unit.as_mut()),
        None => None,
    }
}

impl IrqRouter {
    /// A router owning `ioapic` and, with VT-d interrupt remapping, `unit`. The IOAPIC's pins
    /// are sources with requester ID `ioapic_source_id` (the DMAR device scope's).
    pub fn new(
        ioapic: Ioapic,
        unit: Option<RemapUnit>,
        interrupts: Arc<InterruptManager>,
        ioapic_source_id: u16,
    ) -> Arc<Mutex<IrqRouter>> {
        let unit = unit.map(|u| Box::new(u) as Box<dyn InterruptRemapper>);
        IrqRouter::with_remapper(ioapic, unit, interrupts, ioapic_source_id)
    }

    /// A router owning `ioapic` and, with interrupt remapping, `unit` (VT-d or PV-IR). The
    /// IOAPIC's pins are sources with requester ID `ioapic_source_id`.
    pub fn with_remapper(
        ioapic: Ioapic,
        unit: Option<Box<dyn InterruptRemapper>>,
        interrupts: Arc<InterruptManager>,
        ioapic_source_id: u16,
    ) -> Arc<Mutex<IrqRouter>> {
        Arc::new_cyclic(|weak: &Weak<Mutex<IrqRouter>>| {
            let ioapic_id = ioapic.platform_id();
            let sources = (0..PINS)
                .map(|pin| {
                    // Lossless: PINS is 24.
                    let gsi = pin as u32;
                    let origin = IrqSource::IoapicPin {
                        ioapic_id,
                        pin: pin as u8,
                        requester_id: ioapic_source_id,
                    };
                    (gsi, Source::new(ioapic.pin_msi(pin), origin))
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
                    held: BTreeMap::new(),
                },
            };
            router.core.flush(unit_mut(&mut router.unit), "start-up");
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
        self.core
            .flush(unit_mut(&mut self.unit), "an IOAPIC entry write");
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
    ///
    /// A masked source has no route and KVM drops its triggers (IOAPIC-pin semantics), unless
    /// it was registered with [`IrqRouter::register_held_vector`] (MSI-X): then it is held,
    /// parked with its triggers setting the PBA bit. The router stays the only one parking
    /// its sources' GSIs, so block/unblock and mask/unmask transitions compose.
    pub fn set_msi_sources(&mut self, sources: &[MsiSource]) {
        for s in sources {
            if (s.gsi as usize) < PINS {
                log::error!("irq: GSI {} is an IOAPIC pin, not an MSI source", s.gsi);
                continue;
            }
            let origin = IrqSource::Msi {
                requester_id: s.source_id,
            };
            self.core.set_message(s.gsi, s.msg, origin);
        }
        self.core
            .flush(unit_mut(&mut self.unit), "an MSI source update");
    }

    /// Makes `gsi` an MSI-X vector of requester `source_id`: while its message is `None`
    /// (masked) it is *held* — parked, each trigger reported to `vector` (which sets the
    /// PBA bit) — instead of dropped. Starts held; one routing update at most.
    pub fn register_held_vector(&mut self, gsi: u32, source_id: u16, vector: Arc<dyn HeldVector>) {
        if (gsi as usize) < PINS {
            log::error!("irq: GSI {gsi} is an IOAPIC pin, not an MSI-X vector");
            return;
        }
        self.core.held.insert(gsi, vector);
        self.core.set_message(
            gsi,
            None,
            IrqSource::Msi {
                requester_id: source_id,
            },
        );
        self.core
            .flush(unit_mut(&mut self.unit), "an MSI-X vector registration");
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
        match &source.route {
            Route::Blocked(blocked) => {
                let (blocked, origin) = (blocked.clone(), source.origin);
                self.core
                    .blocked(unit_mut(&mut self.unit), &blocked, origin, count);
            }
            // Unparked meanwhile (the poller read the eventfd just before): the requests
            // were made while it was blocked, but what blocked them is gone.
            Route::Held => {
                if let Some(h) = self.core.held.get(&gsi) {
                    h.fired_while_held();
                }
            }
            // Unmasked meanwhile: the MSI-X layer delivers the pending bit now.
            Route::Routed(_) | Route::Masked if self.core.held.contains_key(&gsi) => {
                if let Some(h) = self.core.held.get(&gsi) {
                    h.fired_while_held();
                }
            }
            Route::Routed(_) | Route::Masked => devices::guest_debug!(
                "irq: {count} trigger(s) of GSI {gsi} seen after it was unparked; dropped"
            ),
        }
    }

    /// Platform reset: every pin masked, the unit in its reset state, routes recomputed.
    pub fn reset(&mut self) {
        self.ioapic.reset(&mut self.core);
        if let Some(unit) = unit_mut(&mut self.unit) {
            unit.reset(&mut self.core);
        }
        self.core.flush(unit_mut(&mut self.unit), "a reset");
    }

    /// Interrupt requests of blocked (parked) sources so far.
    pub fn blocked(&self) -> u64 {
        self.core.blocked_requests
    }

    /// The IOAPIC's counters.
    pub fn ioapic_stats(&self) -> IoapicStats {
        self.ioapic.stats()
    }

    /// The VT-d unit's counters, if there is one.
    pub fn remap_stats(&self) -> Option<RemapStats> {
        match self.unit.as_ref()?.stats() {
            RemapperStats::Vtd(s) => Some(s),
            RemapperStats::Pv(_) => None,
        }
    }

    /// PV-IR's counters, if the router translates through it.
    pub fn pvirq_stats(&self) -> Option<PvIrqStats> {
        match self.unit.as_ref()?.stats() {
            RemapperStats::Pv(s) => Some(s),
            RemapperStats::Vtd(_) => None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupts::tests::{manager, Recorder};
    use crate::interrupts::{IrqfdLine, RoutingBackend};
    use devices::remap::regs::*;
    use devices::InterruptLine;
    use kvm_bindings::{kvm_msi, KvmIrqRouting};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    const IRT_BASE: u64 = 0x1_0000;
    const IQ_BASE: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const SID: u16 = 0xff00;
    /// Fault-event message the guest programs.
    const FE_DATA: u32 = 0x41;
    const FE_ADDR: u32 = 0xfee0_0000;

    struct Vm {
        mem: GuestMemoryMmap,
        router: Arc<Mutex<IrqRouter>>,
        rec: Arc<Recorder>,
        im: Arc<InterruptManager>,
        tail: u64,
    }

    /// An IRTE: present, fixed, physical APIC 0, `vector`.
    fn irte(vector: u8) -> u128 {
        1 | u128::from(vector) << 16
    }

    impl Vm {
        /// A router with a unit brought up as Linux does (QI, x2APIC table of 256 entries,
        /// IRE), fault events unmasked.
        fn new() -> Vm {
            let (rec, im) = manager();
            Vm::with(rec, im)
        }

        fn with(rec: Arc<Recorder>, im: Arc<InterruptManager>) -> Vm {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let router = IrqRouter::new(
                Ioapic::new(0),
                Some(RemapUnit::new(mem.clone())),
                im.clone(),
                SID,
            );
            let mut vm = Vm {
                mem,
                router,
                rec,
                im,
                tail: 0,
            };
            vm.w64(DMAR_IQT_REG, 0);
            vm.w64(DMAR_IQA_REG, IQ_BASE);
            vm.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
            vm.w64(DMAR_IRTA_REG, IRT_BASE | 1 << 11 | 7);
            vm.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_SIRTP);
            vm.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE);
            vm.w32(DMAR_FEDATA_REG, FE_DATA);
            vm.w32(DMAR_FEADDR_REG, FE_ADDR);
            vm.w32(DMAR_FECTL_REG, 0);
            vm
        }

        fn w32(&mut self, off: u64, v: u32) {
            lock(&self.router).remap_write(off, &v.to_le_bytes());
        }

        fn w64(&mut self, off: u64, v: u64) {
            lock(&self.router).remap_write(off, &v.to_le_bytes());
        }

        fn put_irte(&self, index: u64, raw: u128) {
            self.mem
                .write_obj(raw, GuestAddress(IRT_BASE + 16 * index))
                .unwrap();
        }

        /// Linux's qi_submit_sync: `descs`, a status-write wait, the tail write.
        fn submit(&mut self, descs: &[[u64; 2]]) {
            self.mem.write_obj(0u32, GuestAddress(STATUS)).unwrap();
            let wait = [5 | 1 << 5 | 2 << 32, STATUS];
            for d in descs.iter().chain([&wait]) {
                self.mem
                    .write_obj(d[0], GuestAddress(IQ_BASE + self.tail))
                    .unwrap();
                self.mem
                    .write_obj(d[1], GuestAddress(IQ_BASE + self.tail + 8))
                    .unwrap();
                self.tail = (self.tail + 16) % 4096;
            }
            let tail = self.tail;
            self.w64(DMAR_IQT_REG, tail);
            assert_eq!(self.mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 2);
        }

        /// Programs IOAPIC `pin` in remappable format onto IRTE `index`, unmasked.
        fn program_pin(&mut self, pin: u32, index: u64) {
            write_rte(&self.router, pin, index << 49 | 1 << 48 | u64::from(pin));
        }

        fn tables(&self) -> usize {
            self.rec.tables.lock().unwrap().len()
        }

        fn signalled(&self) -> Vec<(u32, u32)> {
            self.rec.signalled.lock().unwrap().clone()
        }

        fn faults(&self) -> u64 {
            lock(&self.router).remap_stats().unwrap().faults_recorded
        }
    }

    /// Writes redirection entry `pin` (both dwords, through IOREGSEL/IOWIN) as a guest does.
    fn write_rte(router: &Mutex<IrqRouter>, pin: u32, rte: u64) {
        let mut r = lock(router);
        for (reg, val) in [
            (0x10 + 2 * pin, rte as u32),
            (0x11 + 2 * pin, (rte >> 32) as u32),
        ] {
            r.ioapic_write(0x00, &reg.to_le_bytes());
            r.ioapic_write(0x10, &val.to_le_bytes());
        }
    }

    fn selective_iec(index: u64) -> [u64; 2] {
        [4 | 1 << 4 | index << 32, 0]
    }

    fn remappable(index: u64) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000 | index << 5 | 1 << 4,
            data: 0,
        }
    }

    #[test]
    fn index_selective_invalidation_rebuilds_only_the_affected_route() {
        let mut vm = Vm::new();
        vm.put_irte(1, irte(0x31));
        vm.put_irte(2, irte(0x32));
        vm.program_pin(4, 1);
        vm.program_pin(5, 2);
        assert_eq!(vm.im.route(4).map(|m| m.data), Some(0x31));
        let before = (vm.tables(), vm.im.counters().routes_rebuilt);

        vm.put_irte(2, irte(0x42));
        vm.submit(&[selective_iec(2)]);
        assert_eq!(vm.im.route(5).map(|m| m.data), Some(0x42));
        assert_eq!(vm.im.route(4).map(|m| m.data), Some(0x31));
        let after = (vm.tables(), vm.im.counters().routes_rebuilt);
        assert_eq!(after.0 - before.0, 1, "one KVM_SET_GSI_ROUTING");
        assert_eq!(after.1 - before.1, 1, "only pin 5's route was rebuilt");
    }

    #[test]
    fn a_global_invalidation_covering_pins_and_msi_sources_is_one_push() {
        let mut vm = Vm::new();
        for i in 1..=4 {
            vm.put_irte(i, irte(0x30 + i as u8));
        }
        vm.program_pin(4, 1);
        vm.program_pin(5, 2);
        let before = vm.tables();
        lock(&vm.router).set_msi_sources(&[
            MsiSource {
                gsi: 24,
                msg: Some(remappable(3)),
                source_id: 0x10,
            },
            MsiSource {
                gsi: 25,
                msg: Some(remappable(4)),
                source_id: 0x18,
            },
        ]);
        assert_eq!(vm.tables() - before, 1, "set_msi_sources is one push");

        for i in 1..=4 {
            vm.put_irte(i, irte(0x50 + i as u8));
        }
        let before = (vm.tables(), vm.im.counters().routes_rebuilt);
        vm.submit(&[[4, 0]]); // global IEC
        assert_eq!(
            vm.tables() - before.0,
            1,
            "one push for pins and MSI sources"
        );
        assert_eq!(vm.im.counters().routes_rebuilt - before.1, 4);
        assert_eq!(vm.im.route(25).map(|m| m.data), Some(0x54));
    }

    #[test]
    fn rte_onto_a_bad_irte_parks_the_pin_and_its_trigger_raises_the_fault_event() {
        let mut vm = Vm::new();
        let line = vm.im.irqfd_line(4).unwrap();
        vm.program_pin(4, 9); // IRTE 9 is not present
        assert_eq!(vm.im.route(4), None);
        assert!(vm.im.is_parked(4));
        assert_eq!(vm.faults(), 0, "computing the route records nothing");
        assert!(vm.signalled().is_empty());

        line.trigger().unwrap();
        assert_eq!(vm.im.service_all_parked(), 1);
        assert_eq!(vm.faults(), 1);
        assert_eq!(
            vm.signalled(),
            vec![(FE_ADDR, FE_DATA)],
            "the fault event is injected at once"
        );
        let c = vm.im.counters();
        assert_eq!(
            (c.blocked_requests, c.fault_events, c.signal_msi),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_parked_source_records_one_fault_per_trigger() {
        let mut vm = Vm::new();
        let line = vm.im.irqfd_line(6).unwrap();
        vm.program_pin(6, 9);
        for n in 1..=3 {
            line.trigger().unwrap();
            vm.im.service_all_parked();
            assert_eq!(vm.faults(), n);
        }
        assert_eq!(lock(&vm.router).blocked(), 3);
        // One event: the later faults arrive while the first is pending (PPF).
        assert_eq!(vm.signalled().len(), 1);
    }

    #[test]
    fn a_global_invalidation_does_not_refault_blocked_sources() {
        let mut vm = Vm::new();
        let _line = vm.im.irqfd_line(7).unwrap();
        vm.program_pin(7, 9);
        vm.submit(&[[4, 0]]);
        vm.w32(DMAR_GCMD_REG, DMA_GCMD_QIE); // IRE off ...
        vm.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE); // ... and on again
        assert_eq!(vm.faults(), 0);
        assert!(vm.signalled().is_empty());
    }

    #[test]
    fn fixing_the_irte_unparks_the_source_and_reattaches_its_irqfd() {
        let mut vm = Vm::new();
        let line: Arc<IrqfdLine> = vm.im.irqfd_line(8).unwrap();
        vm.program_pin(8, 9);
        assert!(!vm.rec.irqfds.lock().unwrap().contains(&8));
        vm.put_irte(9, irte(0x39));
        vm.submit(&[selective_iec(9)]);
        assert_eq!(vm.im.route(8).map(|m| m.data), Some(0x39));
        assert!(!vm.im.is_parked(8));
        assert!(vm.rec.irqfds.lock().unwrap().contains(&8));
        line.trigger().unwrap();
        assert_eq!(vm.im.service_all_parked(), 0, "KVM's again");
        assert_eq!(vm.faults(), 0);
    }

    /// A backend that records the guest's wait-status word at every routing push.
    struct StatusProbe {
        inner: Arc<Recorder>,
        mem: Mutex<Option<GuestMemoryMmap>>,
        seen: Mutex<Vec<u32>>,
    }

    impl RoutingBackend for StatusProbe {
        fn set_gsi_routing(&self, r: &KvmIrqRouting) -> std::result::Result<(), kvm_ioctls::Error> {
            if let Some(mem) = &*self.mem.lock().unwrap() {
                let status = mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap();
                self.seen.lock().unwrap().push(status);
            }
            self.inner.set_gsi_routing(r)
        }
        fn register_irqfd(
            &self,
            fd: &EventFd,
            gsi: u32,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            self.inner.register_irqfd(fd, gsi)
        }
        fn unregister_irqfd(
            &self,
            fd: &EventFd,
            gsi: u32,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            self.inner.unregister_irqfd(fd, gsi)
        }
        fn signal_msi(&self, msi: kvm_msi) -> std::result::Result<(), kvm_ioctls::Error> {
            self.inner.signal_msi(msi)
        }
    }

    #[test]
    fn routes_reach_kvm_before_the_wait_descriptor_completes() {
        let probe = Arc::new(StatusProbe {
            inner: Arc::new(Recorder::default()),
            mem: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        });
        let im = Arc::new(InterruptManager::new(probe.clone(), 24, (24, 27)));
        let mut vm = Vm::with(probe.inner.clone(), im);
        vm.put_irte(1, irte(0x31));
        vm.program_pin(4, 1);
        *probe.mem.lock().unwrap() = Some(vm.mem.clone());

        vm.put_irte(1, irte(0x51));
        vm.submit(&[selective_iec(1)]);
        assert_eq!(
            *probe.seen.lock().unwrap(),
            vec![0],
            "the route was pushed while the status word still read 0"
        );
        assert_eq!(vm.im.route(4).map(|m| m.data), Some(0x51));
    }

    #[test]
    fn eoi_exits_are_counted() {
        let vm = Vm::new();
        vm.router.ioapic_eoi(0x30);
        vm.router.ioapic_eoi(0x31);
        assert_eq!(vm.im.counters().ioapic_eoi_exits, 2);
        assert_eq!(lock(&vm.router).ioapic_stats().eois, 2);
    }

    #[test]
    fn without_a_unit_remappable_messages_are_parked_and_compat_ones_routed() {
        let (rec, im) = manager();
        let router = IrqRouter::new(Ioapic::new(0), None, im.clone(), SID);
        let _line = im.irqfd_line(24).unwrap();
        lock(&router).set_msi_source(24, Some(remappable(1)), 0x10);
        assert!(im.is_parked(24));
        let compat = MsiMessage {
            address: 0xfee0_0000,
            data: 0x33,
        };
        lock(&router).set_msi_source(24, Some(compat), 0x10);
        assert!(!im.is_parked(24));
        assert_eq!(im.route(24), Some(compat));
        assert!(rec.signalled.lock().unwrap().is_empty());
    }

    /// PV-IR behind the router: request blocks at [`PV_BLOCK`] in `mem`.
    mod pv {
        use super::*;
        use devices::pvirq::regs::{req, CTRL_ENABLE, OP_ALLOC, OP_CLEAR, OP_SET, REG_CTRL};
        use devices::pvirq::regs::{REG_REQUEST, SOURCE_IOAPIC, SOURCE_PCI};
        use devices::{PvIrq, PvIrqConfig};

        const PV_BLOCK: u64 = 0x4_0000;
        const RID: u16 = 0x10;

        struct Pv {
            mem: GuestMemoryMmap,
            router: Arc<Mutex<IrqRouter>>,
            rec: Arc<Recorder>,
            im: Arc<InterruptManager>,
        }

        impl Pv {
            fn new() -> Pv {
                let (rec, im) = manager();
                let mem =
                    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
                let pv = PvIrq::new(
                    PvIrqConfig {
                        ioapic_id: 0,
                        ioapic_pins: 24,
                        pci_requesters: vec![RID],
                        apic_ids: vec![0, 1],
                        max_handles: 64,
                    },
                    mem.clone(),
                );
                let router =
                    IrqRouter::with_remapper(Ioapic::new(0), Some(Box::new(pv)), im.clone(), SID);
                lock(&router).remap_write(REG_CTRL, &CTRL_ENABLE.to_le_bytes());
                Pv {
                    mem,
                    router,
                    rec,
                    im,
                }
            }

            /// Issues a block with `fields`; returns (status, handle, address, data).
            fn request(&self, fields: &[(usize, &[u8])]) -> (u16, u16, u64, u32) {
                let mut block = [0u8; 64];
                for (at, b) in fields {
                    block[*at..*at + b.len()].copy_from_slice(b);
                }
                block[req::STATUS..req::STATUS + 2].copy_from_slice(&0xffffu16.to_le_bytes());
                self.mem
                    .write_slice(&block, GuestAddress(PV_BLOCK))
                    .unwrap();
                lock(&self.router).remap_write(REG_REQUEST, &PV_BLOCK.to_le_bytes());
                let at = |o: usize| GuestAddress(PV_BLOCK + o as u64);
                let lo: u32 = self.mem.read_obj(at(req::ADDRESS_LO)).unwrap();
                let hi: u32 = self.mem.read_obj(at(req::ADDRESS_HI)).unwrap();
                (
                    self.mem.read_obj(at(req::STATUS)).unwrap(),
                    self.mem.read_obj(at(req::HANDLE)).unwrap(),
                    u64::from(hi) << 32 | u64::from(lo),
                    self.mem.read_obj(at(req::DATA)).unwrap(),
                )
            }

            fn alloc(&self, source_type: u8, lo: u16) -> (u16, MsiMessage) {
                let (status, handle, address, data) = self.request(&[
                    (req::OP, &OP_ALLOC.to_le_bytes()),
                    (req::SOURCE_TYPE, &[source_type]),
                    (req::COUNT, &1u16.to_le_bytes()),
                    (req::SOURCE_LO, &lo.to_le_bytes()),
                ]);
                assert_eq!(status, 0, "ALLOC");
                (handle, MsiMessage { address, data })
            }

            fn set(&self, handle: u16, vector: u8, dest: u32) {
                let (status, ..) = self.request(&[
                    (req::OP, &OP_SET.to_le_bytes()),
                    (req::HANDLE, &handle.to_le_bytes()),
                    (req::DEST, &dest.to_le_bytes()),
                    (req::VECTOR, &[vector]),
                ]);
                assert_eq!(status, 0, "SET");
            }

            /// Programs IOAPIC `pin` with the remappable-format `msg` (as Linux's driver).
            fn program_pin(&self, pin: u32, msg: MsiMessage) {
                let handle = (msg.address >> 5) & 0x7fff | ((msg.address >> 2) & 1) << 15;
                let rte = (handle & 0x7fff) << 49
                    | 1 << 48
                    | (handle >> 15) << 11
                    | u64::from(msg.data & 0xff);
                write_rte(&self.router, pin, rte);
            }

            fn tables(&self) -> usize {
                self.rec.tables.lock().unwrap().len()
            }
        }

        #[test]
        fn a_set_rebuilds_only_its_handles_routes_in_one_push() {
            let pv = Pv::new();
            let (h4, m4) = pv.alloc(SOURCE_IOAPIC, 4);
            let (h5, m5) = pv.alloc(SOURCE_IOAPIC, 5);
            let (h_msi, m_msi) = pv.alloc(SOURCE_PCI, RID);
            pv.set(h4, 0x31, 0);
            pv.set(h5, 0x32, 0);
            pv.set(h_msi, 0x33, 1);
            pv.program_pin(4, m4);
            pv.program_pin(5, m5);
            lock(&pv.router).set_msi_source(24, Some(m_msi), RID);
            assert_eq!(pv.im.route(24).map(|m| m.data), Some(0x33));
            let before = (pv.tables(), pv.im.counters().routes_rebuilt);

            pv.set(h5, 0x42, 1);
            let after = (pv.tables(), pv.im.counters().routes_rebuilt);
            assert_eq!(after.0 - before.0, 1, "one KVM_SET_GSI_ROUTING");
            assert_eq!(after.1 - before.1, 1, "only pin 5's route");
            let r5 = pv.im.route(5).unwrap();
            assert_eq!((r5.data, (r5.address >> 12) & 0xff), (0x42, 1));
            assert_eq!(pv.im.route(4).map(|m| m.data), Some(0x31));
            assert!(lock(&pv.router).remap_stats().is_none());
            assert_eq!(lock(&pv.router).pvirq_stats().unwrap().live_handles, 3);
        }

        #[test]
        fn binding_is_per_pin_and_per_requester() {
            let pv = Pv::new();
            let (h4, m4) = pv.alloc(SOURCE_IOAPIC, 4);
            pv.set(h4, 0x31, 0);
            let _line = pv.im.irqfd_line(6).unwrap();
            pv.program_pin(6, m4);
            assert_eq!(pv.im.route(6), None);
            assert!(pv.im.is_parked(6));
            let (h, m) = pv.alloc(SOURCE_PCI, RID);
            pv.set(h, 0x35, 0);
            lock(&pv.router).set_msi_source(25, Some(m), RID + 8);
            assert_eq!(pv.im.route(25), None, "another requester");
            lock(&pv.router).set_msi_source(25, Some(m), RID);
            assert_eq!(pv.im.route(25).map(|m| m.data), Some(0x35));
        }

        #[test]
        fn clear_and_reset_block_the_routes() {
            let pv = Pv::new();
            let (h, m) = pv.alloc(SOURCE_PCI, RID);
            pv.set(h, 0x35, 0);
            lock(&pv.router).set_msi_source(25, Some(m), RID);
            let before = pv.tables();
            let (status, ..) = pv.request(&[
                (req::OP, &OP_CLEAR.to_le_bytes()),
                (req::HANDLE, &h.to_le_bytes()),
            ]);
            assert_eq!(status, 0);
            assert_eq!(pv.tables() - before, 1);
            assert_eq!(pv.im.route(25), None);
            assert!(pv.im.is_parked(25));
            pv.set(h, 0x36, 0);
            assert_eq!(pv.im.route(25).map(|m| m.data), Some(0x36));
            lock(&pv.router).reset();
            assert_eq!(pv.im.route(25), None, "reset frees the handle");
            assert_eq!(lock(&pv.router).pvirq_stats().unwrap().live_handles, 0);
        }
    }
}
