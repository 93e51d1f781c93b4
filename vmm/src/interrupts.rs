//! The interrupt manager: GSI allocation, the table of KVM MSI routes and the irqfds.
//!
//! Every interrupt source is a GSI whose KVM route is an MSI (split irqchip: KVM has no
//! IOAPIC, so `KVM_IRQ_ROUTING_IRQCHIP` entries don't exist). A device raises its interrupt by
//! writing its irqfd; KVM looks the GSI up and injects the MSI without waking any VMM thread.
//! This is the fast path. The slow path is a guest reprogramming a source (an IOAPIC
//! redirection entry, later an MSI-X entry or an IRTE): the VMM recomputes only the touched
//! routes and pushes the whole table with one `KVM_SET_GSI_ROUTING`; the irqfds stay attached.
//!
//! Ordering: the routing table is pushed before any irqfd is registered (an irqfd attached to a
//! GSI with no routing table crashed hosts lacking Linux commit a80ced6ea514, as Firecracker and
//! Cloud Hypervisor note next to their equivalent code).
//!
//! # Parked sources
//!
//! A GSI whose interrupts must not be delivered but must not be lost either is *parked*
//! ([`InterruptManager::park`]): its irqfd is detached from KVM (`KVM_IRQFD` deassign), and the
//! VMM's event loop polls the same eventfd instead ([`ParkedPoller`]); each time it fires, the
//! [`ParkedHandler`] given at parking time is told how often. The device keeps writing the
//! same eventfd throughout and never knows. [`InterruptManager::unpark`] re-attaches the irqfd
//! (after the caller pushed the route) and returns the triggers that were still unread.
//! Users: the interrupt router parks a source whose route interrupt remapping blocks (each
//! request is a VT-d fault, recorded when it happens); an MSI-X layer parks a masked vector
//! (a fire sets its PBA bit; unmask delivers once). Only the error / masked path is polled:
//! a routed source never wakes a VMM thread.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use devices::sync::lock;
use devices::{InterruptLine, MsiMessage};
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, kvm_msi,
    KvmIrqRouting, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors of the interrupt manager.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// All MSI GSIs are in use.
    #[error("No free GSI left for MSI routes")]
    GsiExhausted,
    /// The GSI is outside the range this manager owns.
    #[error("GSI {0} is out of range")]
    GsiOutOfRange(u32),
    /// Building the routing table failed.
    #[error("Cannot build the KVM routing table")]
    RoutingTable(#[source] vmm_sys_util::fam::Error),
    /// KVM refused the routing table.
    #[error("Cannot update KVM GSI routing")]
    SetGsiRouting(#[source] kvm_ioctls::Error),
    /// Creating an eventfd failed.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the irqfd.
    #[error("Cannot attach irqfd to GSI {gsi}")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused to detach the irqfd.
    #[error("Cannot detach the irqfd of GSI {gsi}")]
    UnregisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The GSI already has an interrupt line.
    #[error("GSI {0} already has an interrupt line")]
    GsiInUse(u32),
    /// `KVM_SIGNAL_MSI` failed.
    #[error("Cannot inject an MSI from userspace")]
    SignalMsi(#[source] kvm_ioctls::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, InterruptError>;

/// Counters that prove where interrupts went.
#[derive(Debug, Default)]
pub struct InterruptStats {
    /// Writes to irqfds by device models (delivered by KVM, or polled while parked).
    pub irqfd_triggers: AtomicU64,
    /// Interrupts injected from userspace with `KVM_SIGNAL_MSI` (the remapping unit's fault
    /// and invalidation-completion events).
    pub signal_msi: AtomicU64,
    /// `KVM_EXIT_IOAPIC_EOI` exits handled (a level-triggered route's EOI; the platform is
    /// edge-only, so these should stay 0).
    pub ioapic_eoi_exits: AtomicU64,
    /// `KVM_SET_GSI_ROUTING` calls.
    pub routing_updates: AtomicU64,
    /// Route entries recomputed because a guest changed an interrupt source.
    pub routes_rebuilt: AtomicU64,
    /// irqfds attached.
    pub irqfds: AtomicU64,
    /// Triggers of parked sources seen by the VMM (each one an interrupt request that was
    /// not delivered: blocked by interrupt remapping).
    pub blocked_requests: AtomicU64,
    /// Fault-event interrupts the remapping unit raised.
    pub fault_events: AtomicU64,
}

/// A snapshot of [`InterruptStats`] plus the table size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InterruptCounters {
    /// See [`InterruptStats::irqfd_triggers`].
    pub irqfd_triggers: u64,
    /// See [`InterruptStats::signal_msi`].
    pub signal_msi: u64,
    /// See [`InterruptStats::ioapic_eoi_exits`].
    pub ioapic_eoi_exits: u64,
    /// See [`InterruptStats::routing_updates`].
    pub routing_updates: u64,
    /// See [`InterruptStats::routes_rebuilt`].
    pub routes_rebuilt: u64,
    /// See [`InterruptStats::irqfds`].
    pub irqfds: u64,
    /// See [`InterruptStats::blocked_requests`].
    pub blocked_requests: u64,
    /// See [`InterruptStats::fault_events`].
    pub fault_events: u64,
    /// Routes currently in KVM's table.
    pub routes_in_use: u64,
    /// Sources currently parked (irqfd detached, eventfd polled by the VMM).
    pub parked: u64,
}

/// Told when a parked source fires; see [`InterruptManager::park`].
pub trait ParkedHandler: Send + Sync {
    /// The parked `gsi`'s eventfd was written `count` times since the last call. Called on
    /// the event-loop thread with no interrupt-manager lock held.
    fn fired(&self, gsi: u32, count: u64);
}

/// Where the routing table goes: KVM in the VMM, a recorder in tests.
pub trait RoutingBackend: Send + Sync {
    /// Replaces the whole GSI routing table.
    fn set_gsi_routing(
        &self,
        routing: &KvmIrqRouting,
    ) -> std::result::Result<(), kvm_ioctls::Error>;
    /// Attaches `fd` to `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::result::Result<(), kvm_ioctls::Error>;
    /// Detaches `fd` from `gsi`.
    fn unregister_irqfd(
        &self,
        fd: &EventFd,
        gsi: u32,
    ) -> std::result::Result<(), kvm_ioctls::Error>;
    /// Injects an MSI from userspace.
    fn signal_msi(&self, msi: kvm_msi) -> std::result::Result<(), kvm_ioctls::Error>;
}

impl RoutingBackend for VmFd {
    fn set_gsi_routing(
        &self,
        routing: &KvmIrqRouting,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::set_gsi_routing(self, routing)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, fd, gsi)
    }
    fn unregister_irqfd(
        &self,
        fd: &EventFd,
        gsi: u32,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::unregister_irqfd(self, fd, gsi)
    }
    fn signal_msi(&self, msi: kvm_msi) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::signal_msi(self, msi).map(|_| ())
    }
}

#[derive(Default)]
struct State {
    /// Routes by GSI; only unmasked sources have one.
    routes: BTreeMap<u32, MsiMessage>,
    /// MSI GSIs handed out.
    allocated: BTreeSet<u32>,
    /// The eventfd of each GSI's interrupt line (weak: dropping the line closes it, which
    /// also detaches it from KVM).
    lines: BTreeMap<u32, Weak<EventFd>>,
    /// Parked GSIs and who to tell when they fire.
    parked: BTreeMap<u32, Arc<dyn ParkedHandler>>,
}

impl State {
    /// The live eventfd of `gsi`'s line.
    fn line(&self, gsi: u32) -> Option<Arc<EventFd>> {
        self.lines.get(&gsi).and_then(Weak::upgrade)
    }
}

/// Owns the GSI space, the route table and the irqfds.
pub struct InterruptManager {
    backend: Arc<dyn RoutingBackend>,
    state: Mutex<State>,
    stats: Arc<InterruptStats>,
    msi_range: (u32, u32),
    legacy_pins: u32,
    /// Written whenever the set of parked eventfds changes, so the [`ParkedPoller`]
    /// re-reads it.
    parked_changed: EventFd,
}

impl std::fmt::Debug for InterruptManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptManager")
            .field("msi_range", &self.msi_range)
            .field("legacy_pins", &self.legacy_pins)
            .finish()
    }
}

fn routing_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: msg.address as u32,
                address_hi: (msg.address >> 32) as u32,
                data: msg.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

impl InterruptManager {
    /// A manager whose GSIs `0..legacy_pins` are IOAPIC pins and whose MSI GSIs are
    /// `msi_range.0..=msi_range.1`.
    ///
    /// # Panics
    ///
    /// If no eventfd can be created (file descriptors exhausted at VM creation).
    pub fn new(backend: Arc<dyn RoutingBackend>, legacy_pins: u32, msi_range: (u32, u32)) -> Self {
        InterruptManager {
            backend,
            state: Mutex::new(State::default()),
            stats: Arc::new(InterruptStats::default()),
            msi_range,
            legacy_pins,
            parked_changed: EventFd::new(EFD_NONBLOCK)
                .expect("cannot create the interrupt manager's eventfd"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<InterruptStats> {
        &self.stats
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> InterruptCounters {
        let s = &self.stats;
        let state = self.lock();
        InterruptCounters {
            irqfd_triggers: s.irqfd_triggers.load(Ordering::Relaxed),
            signal_msi: s.signal_msi.load(Ordering::Relaxed),
            ioapic_eoi_exits: s.ioapic_eoi_exits.load(Ordering::Relaxed),
            routing_updates: s.routing_updates.load(Ordering::Relaxed),
            routes_rebuilt: s.routes_rebuilt.load(Ordering::Relaxed),
            irqfds: s.irqfds.load(Ordering::Relaxed),
            blocked_requests: s.blocked_requests.load(Ordering::Relaxed),
            fault_events: s.fault_events.load(Ordering::Relaxed),
            routes_in_use: state.routes.len() as u64,
            parked: state.parked.len() as u64,
        }
    }

    fn check_gsi(&self, gsi: u32) -> Result<()> {
        let ok = gsi < self.legacy_pins || (self.msi_range.0..=self.msi_range.1).contains(&gsi);
        ok.then_some(()).ok_or(InterruptError::GsiOutOfRange(gsi))
    }

    fn push(&self, state: &State) -> Result<()> {
        let mut table = KvmIrqRouting::new(0).map_err(InterruptError::RoutingTable)?;
        for (gsi, msg) in &state.routes {
            table
                .push(routing_entry(*gsi, *msg))
                .map_err(InterruptError::RoutingTable)?;
        }
        self.backend
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetGsiRouting)?;
        self.stats.routing_updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Pushes the (possibly empty) table once, so irqfds attach to an existing table.
    pub fn init_routing(&self) -> Result<()> {
        let state = self.lock();
        self.push(&state)
    }

    /// Applies route changes (`None` removes the route: a masked source) and pushes the
    /// table with a single `KVM_SET_GSI_ROUTING`. Entries that don't change are skipped; if
    /// nothing changes KVM is not called.
    /// Every GSI is checked first: on error nothing is applied.
    pub fn update_routes(&self, updates: &[(u32, Option<MsiMessage>)]) -> Result<usize> {
        for (gsi, _) in updates {
            self.check_gsi(*gsi)?;
        }
        let mut state = self.lock();
        let mut changed = 0;
        for (gsi, msg) in updates {
            let old = match msg {
                Some(m) => state.routes.insert(*gsi, *m),
                None => state.routes.remove(gsi),
            };
            if old != *msg {
                changed += 1;
            }
        }
        if changed > 0 {
            self.stats
                .routes_rebuilt
                .fetch_add(changed as u64, Ordering::Relaxed);
            self.push(&state)?;
        }
        Ok(changed)
    }

    /// The route of `gsi`, if any.
    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.lock().routes.get(&gsi).copied()
    }

    /// Allocates an MSI GSI, freed (and its route removed) when the handle drops.
    pub fn allocate_msi(self: &Arc<Self>) -> Result<Gsi> {
        let mut state = self.lock();
        let gsi = (self.msi_range.0..=self.msi_range.1)
            .find(|g| !state.allocated.contains(g))
            .ok_or(InterruptError::GsiExhausted)?;
        state.allocated.insert(gsi);
        Ok(Gsi {
            gsi,
            manager: Arc::clone(self),
        })
    }

    fn free_msi(&self, gsi: u32) {
        let mut state = self.lock();
        state.allocated.remove(&gsi);
        if state.routes.remove(&gsi).is_some() {
            if let Err(e) = self.push(&state) {
                log::warn!("Removing the route of freed GSI {gsi} failed: {e}");
            }
        }
    }

    /// Creates an eventfd and attaches it as the irqfd of `gsi` (one line per GSI). A parked
    /// GSI's line is polled instead until it is unparked.
    pub fn irqfd_line(&self, gsi: u32) -> Result<Arc<IrqfdLine>> {
        self.check_gsi(gsi)?;
        let mut state = self.lock();
        if state.line(gsi).is_some() {
            return Err(InterruptError::GsiInUse(gsi));
        }
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?);
        if state.parked.contains_key(&gsi) {
            self.wake_poller();
        } else {
            self.backend
                .register_irqfd(&fd, gsi)
                .map_err(|source| InterruptError::RegisterIrqfd { gsi, source })?;
            self.stats.irqfds.fetch_add(1, Ordering::Relaxed);
        }
        state.lines.insert(gsi, Arc::downgrade(&fd));
        Ok(Arc::new(IrqfdLine {
            fd,
            gsi,
            stats: Arc::clone(&self.stats),
            triggers: AtomicU64::new(0),
        }))
    }

    fn wake_poller(&self) {
        if let Err(e) = self.parked_changed.write(1) {
            log::error!("Cannot wake the parked-source poller: {e}");
        }
    }

    /// Parks `gsi` (see the [module documentation](self)): its irqfd is detached from KVM and
    /// its eventfd polled by the [`ParkedPoller`], which tells `handler` about every trigger.
    /// Parking an already parked GSI only replaces the handler. Call it *before* removing
    /// the GSI's route, so no trigger in between is dropped by KVM.
    pub fn park(&self, gsi: u32, handler: Arc<dyn ParkedHandler>) -> Result<()> {
        self.check_gsi(gsi)?;
        let mut state = self.lock();
        if state.parked.insert(gsi, handler).is_some() {
            return Ok(());
        }
        if let Some(fd) = state.line(gsi) {
            if let Err(source) = self.backend.unregister_irqfd(&fd, gsi) {
                state.parked.remove(&gsi);
                return Err(InterruptError::UnregisterIrqfd { gsi, source });
            }
            self.wake_poller();
        }
        Ok(())
    }

    /// Unparks `gsi`: the irqfd is attached to KVM again. Returns the triggers of the
    /// eventfd not yet seen by the poller (requests made while parked, which the caller
    /// handles like [`ParkedHandler::fired`]). Call it *after* pushing the GSI's new route.
    /// Unparking a GSI that is not parked does nothing and returns 0.
    pub fn unpark(&self, gsi: u32) -> Result<u64> {
        let mut state = self.lock();
        if state.parked.remove(&gsi).is_none() {
            return Ok(0);
        }
        let Some(fd) = state.line(gsi) else {
            return Ok(0);
        };
        // Non-blocking: EAGAIN means nothing is pending.
        let pending = fd.read().unwrap_or(0);
        self.wake_poller();
        self.backend
            .register_irqfd(&fd, gsi)
            .map_err(|source| InterruptError::RegisterIrqfd { gsi, source })?;
        Ok(pending)
    }

    /// Whether `gsi` is parked.
    pub fn is_parked(&self, gsi: u32) -> bool {
        self.lock().parked.contains_key(&gsi)
    }

    /// The eventfds to poll: parked GSIs that have a line.
    fn parked_fds(&self) -> BTreeMap<RawFd, u32> {
        let state = self.lock();
        state
            .parked
            .keys()
            .filter_map(|gsi| state.line(*gsi).map(|fd| (fd.as_raw_fd(), *gsi)))
            .collect()
    }

    /// Reads the eventfd of parked `gsi` and tells its handler. Returns the triggers seen
    /// (0 if the GSI is no longer parked: then the eventfd belongs to KVM and is left alone).
    pub fn service_parked(&self, gsi: u32) -> u64 {
        let (count, handler) = {
            let state = self.lock();
            let (Some(handler), Some(fd)) = (state.parked.get(&gsi), state.line(gsi)) else {
                return 0;
            };
            (fd.read().unwrap_or(0), Arc::clone(handler))
        };
        if count > 0 {
            // Called without the lock: the handler takes the router's, which is taken
            // before this one elsewhere.
            handler.fired(gsi, count);
        }
        count
    }

    /// [`InterruptManager::service_parked`] for every parked GSI; returns the triggers seen.
    pub fn service_all_parked(&self) -> u64 {
        let gsis: Vec<u32> = self.lock().parked.keys().copied().collect();
        gsis.into_iter().map(|gsi| self.service_parked(gsi)).sum()
    }

    /// Injects `msg` from userspace (`KVM_SIGNAL_MSI`). Counted: the data plane must never
    /// need this.
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.stats.signal_msi.fetch_add(1, Ordering::Relaxed);
        self.backend
            .signal_msi(msi)
            .map_err(InterruptError::SignalMsi)
    }
}

/// An allocated MSI GSI; dropping it frees the GSI and removes its route.
#[derive(Debug)]
pub struct Gsi {
    gsi: u32,
    manager: Arc<InterruptManager>,
}

impl Gsi {
    /// The GSI number.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl Drop for Gsi {
    fn drop(&mut self) {
        self.manager.free_msi(self.gsi);
    }
}

/// The event-loop subscriber that polls parked sources' eventfds (see the
/// [module documentation](self)).
pub struct ParkedPoller {
    manager: Arc<InterruptManager>,
    /// The eventfds currently registered with the event loop.
    watched: BTreeMap<RawFd, u32>,
}

impl ParkedPoller {
    /// A poller for `manager`'s parked sources.
    pub fn new(manager: Arc<InterruptManager>) -> Self {
        ParkedPoller {
            manager,
            watched: BTreeMap::new(),
        }
    }

    /// Brings the watched set in line with the parked set.
    fn reconcile(&mut self, ops: &mut EventOps) {
        let wanted = self.manager.parked_fds();
        for (fd, _) in self
            .watched
            .iter()
            .filter(|(fd, _)| !wanted.contains_key(fd))
        {
            if let Err(e) = ops.remove(Events::new_raw(*fd, EventSet::IN)) {
                log::debug!("Cannot stop polling fd {fd}: {e:?}");
            }
        }
        for (fd, gsi) in wanted
            .iter()
            .filter(|(fd, _)| !self.watched.contains_key(fd))
        {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                log::error!("Cannot poll the eventfd of parked GSI {gsi}: {e:?}");
            }
        }
        self.watched = wanted;
    }
}

impl MutEventSubscriber for ParkedPoller {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.manager.parked_changed.as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::error!("Cannot watch the parked-source set: {e:?}");
        }
        self.reconcile(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.manager.parked_changed.as_raw_fd() {
            let _ = self.manager.parked_changed.read();
            self.reconcile(ops);
        } else if let Some(&gsi) = self.watched.get(&fd) {
            self.manager.service_parked(gsi);
        }
        // The set may have changed while the handler ran; picked up on the next wake.
    }
}

/// A device's interrupt line: an eventfd attached to KVM as an irqfd.
#[derive(Debug)]
pub struct IrqfdLine {
    fd: Arc<EventFd>,
    gsi: u32,
    stats: Arc<InterruptStats>,
    triggers: AtomicU64,
}

impl IrqfdLine {
    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
    /// How often this line fired.
    pub fn triggers(&self) -> u64 {
        self.triggers.load(Ordering::Relaxed)
    }
    /// The eventfd (for tests that want to trigger it directly).
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

impl InterruptLine for IrqfdLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.triggers.fetch_add(1, Ordering::Relaxed);
        self.stats.irqfd_triggers.fetch_add(1, Ordering::Relaxed);
        self.fd.write(1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records what would have gone to KVM.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) tables: Mutex<Vec<Vec<(u32, u32, u32)>>>,
        /// GSIs whose irqfd is attached.
        pub(crate) irqfds: Mutex<Vec<u32>>,
        /// `KVM_SIGNAL_MSI` calls: (address_lo, data).
        pub(crate) signalled: Mutex<Vec<(u32, u32)>>,
    }

    impl RoutingBackend for Recorder {
        fn set_gsi_routing(&self, r: &KvmIrqRouting) -> std::result::Result<(), kvm_ioctls::Error> {
            let t = r
                .as_slice()
                .iter()
                .map(|e| {
                    // SAFETY: every entry this manager builds is of type KVM_IRQ_ROUTING_MSI,
                    // so `msi` is the initialised union member.
                    let msi = unsafe { e.u.msi };
                    (e.gsi, msi.address_lo, msi.data)
                })
                .collect();
            self.tables.lock().unwrap().push(t);
            Ok(())
        }
        fn register_irqfd(
            &self,
            _: &EventFd,
            gsi: u32,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            self.irqfds.lock().unwrap().push(gsi);
            Ok(())
        }
        fn unregister_irqfd(
            &self,
            _: &EventFd,
            gsi: u32,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            let mut fds = self.irqfds.lock().unwrap();
            let at = fds.iter().position(|g| *g == gsi).expect("irqfd attached");
            fds.remove(at);
            Ok(())
        }
        fn signal_msi(&self, msi: kvm_msi) -> std::result::Result<(), kvm_ioctls::Error> {
            self.signalled
                .lock()
                .unwrap()
                .push((msi.address_lo, msi.data));
            Ok(())
        }
    }

    pub(crate) fn manager() -> (Arc<Recorder>, Arc<InterruptManager>) {
        let rec = Arc::new(Recorder::default());
        let im = Arc::new(InterruptManager::new(rec.clone(), 24, (24, 27)));
        (rec, im)
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_0000,
        data: 0x31,
    };

    #[test]
    fn update_pushes_one_table_with_all_routes() {
        let (rec, im) = manager();
        im.update_routes(&[(4, Some(MSG)), (5, Some(MsiMessage { data: 0x32, ..MSG }))])
            .unwrap();
        let tables = rec.tables.lock().unwrap();
        assert_eq!(tables.len(), 1);
        assert_eq!(
            tables[0],
            vec![(4, 0xfee0_0000, 0x31), (5, 0xfee0_0000, 0x32)]
        );
        assert_eq!(im.counters().routes_rebuilt, 2);
    }

    #[test]
    fn unchanged_routes_do_not_call_kvm() {
        let (rec, im) = manager();
        im.update_routes(&[(4, Some(MSG))]).unwrap();
        assert_eq!(im.update_routes(&[(4, Some(MSG)), (6, None)]).unwrap(), 0);
        assert_eq!(rec.tables.lock().unwrap().len(), 1);
    }

    #[test]
    fn masked_source_is_removed_from_the_table() {
        let (rec, im) = manager();
        im.update_routes(&[(4, Some(MSG))]).unwrap();
        im.update_routes(&[(4, None)]).unwrap();
        assert_eq!(rec.tables.lock().unwrap().last().unwrap(), &vec![]);
        assert_eq!(im.route(4), None);
    }

    #[test]
    fn gsi_is_freed_on_drop() {
        let (_, im) = manager();
        let a = im.allocate_msi().unwrap();
        let b = im.allocate_msi().unwrap();
        assert_ne!(a.gsi(), b.gsi());
        let freed = a.gsi();
        im.update_routes(&[(freed, Some(MSG))]).unwrap();
        drop(a);
        assert_eq!(im.route(freed), None);
        assert_eq!(im.allocate_msi().unwrap().gsi(), freed);
    }

    #[test]
    fn msi_gsis_run_out_cleanly() {
        let (_, im) = manager();
        let held: Vec<_> = (0..4).map(|_| im.allocate_msi().unwrap()).collect();
        assert!(matches!(
            im.allocate_msi(),
            Err(InterruptError::GsiExhausted)
        ));
        drop(held);
        assert!(im.allocate_msi().is_ok());
    }

    #[test]
    fn out_of_range_gsi_is_refused() {
        let (_, im) = manager();
        assert!(matches!(
            im.update_routes(&[(100, Some(MSG))]),
            Err(InterruptError::GsiOutOfRange(100))
        ));
        assert!(im.irqfd_line(30).is_err());
    }

    #[test]
    fn irqfd_triggers_are_counted_apart_from_userspace_injection() {
        let (rec, im) = manager();
        let line = im.irqfd_line(4).unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
        im.signal_msi(MSG).unwrap();
        let c = im.counters();
        assert_eq!((c.irqfd_triggers, c.signal_msi, c.irqfds), (2, 1, 1));
        assert_eq!(*rec.irqfds.lock().unwrap(), vec![4]);
    }

    #[test]
    fn a_failed_update_applies_nothing() {
        let (rec, im) = manager();
        assert!(im
            .update_routes(&[(4, Some(MSG)), (100, Some(MSG))])
            .is_err());
        assert_eq!(im.route(4), None, "validated before anything is applied");
        assert!(rec.tables.lock().unwrap().is_empty());
    }

    #[test]
    fn one_line_per_gsi() {
        let (_, im) = manager();
        let line = im.irqfd_line(4).unwrap();
        assert!(matches!(im.irqfd_line(4), Err(InterruptError::GsiInUse(4))));
        // Dropping the line closes its eventfd (KVM detaches a closed irqfd): the GSI is free.
        drop(line);
        assert!(im.irqfd_line(4).is_ok());
    }

    #[derive(Default)]
    struct Fires(Mutex<Vec<(u32, u64)>>);
    impl ParkedHandler for Fires {
        fn fired(&self, gsi: u32, count: u64) {
            self.0.lock().unwrap().push((gsi, count));
        }
    }

    #[test]
    fn parked_line_is_detached_polled_and_reattached() {
        let (rec, im) = manager();
        let line = im.irqfd_line(5).unwrap();
        let fires = Arc::new(Fires::default());
        im.park(5, fires.clone()).unwrap();
        assert!(rec.irqfds.lock().unwrap().is_empty(), "irqfd detached");
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(im.service_all_parked(), 2);
        assert_eq!(*fires.0.lock().unwrap(), vec![(5, 2)]);
        assert_eq!(im.counters().parked, 1);
        // A trigger not yet polled when the source is unparked is handed back.
        line.trigger().unwrap();
        assert_eq!(im.unpark(5).unwrap(), 1);
        assert_eq!(*rec.irqfds.lock().unwrap(), vec![5], "irqfd attached again");
        // Not parked any more: the eventfd is KVM's, the poller leaves it alone.
        line.trigger().unwrap();
        assert_eq!(im.service_all_parked(), 0);
        assert_eq!(im.service_parked(5), 0);
        assert_eq!(line.eventfd().read().unwrap(), 1);
        assert_eq!(im.unpark(5).unwrap(), 0);
    }

    #[test]
    fn a_line_created_for_a_parked_gsi_starts_polled() {
        let (rec, im) = manager();
        im.park(6, Arc::new(Fires::default())).unwrap();
        let _line = im.irqfd_line(6).unwrap();
        assert!(rec.irqfds.lock().unwrap().is_empty());
        im.unpark(6).unwrap();
        assert_eq!(*rec.irqfds.lock().unwrap(), vec![6]);
    }
}
