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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::{InterruptLine, MsiMessage};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, kvm_msi,
    KvmIrqRouting, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
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
    /// `KVM_SIGNAL_MSI` failed.
    #[error("Cannot inject an MSI from userspace")]
    SignalMsi(#[source] kvm_ioctls::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, InterruptError>;

/// Counters that prove where interrupts went.
#[derive(Debug, Default)]
pub struct InterruptStats {
    /// Writes to irqfds by device models (delivered by KVM, no userspace injection).
    pub irqfd_triggers: AtomicU64,
    /// Interrupts injected from userspace with `KVM_SIGNAL_MSI`.
    pub userspace_injected: AtomicU64,
    /// `KVM_SET_GSI_ROUTING` calls.
    pub routing_updates: AtomicU64,
    /// Route entries recomputed because a guest changed an interrupt source.
    pub routes_rebuilt: AtomicU64,
    /// irqfds attached.
    pub irqfds: AtomicU64,
}

/// A snapshot of [`InterruptStats`] plus the table size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InterruptCounters {
    /// See [`InterruptStats::irqfd_triggers`].
    pub irqfd_triggers: u64,
    /// See [`InterruptStats::userspace_injected`].
    pub userspace_injected: u64,
    /// See [`InterruptStats::routing_updates`].
    pub routing_updates: u64,
    /// See [`InterruptStats::routes_rebuilt`].
    pub routes_rebuilt: u64,
    /// See [`InterruptStats::irqfds`].
    pub irqfds: u64,
    /// Routes currently in KVM's table.
    pub routes_in_use: u64,
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
    fn signal_msi(&self, msi: kvm_msi) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::signal_msi(self, msi).map(|_| ())
    }
}

#[derive(Debug, Default)]
struct State {
    /// Routes by GSI; only unmasked sources have one.
    routes: BTreeMap<u32, MsiMessage>,
    /// MSI GSIs handed out.
    allocated: BTreeSet<u32>,
}

/// Owns the GSI space, the route table and the irqfds.
pub struct InterruptManager {
    backend: Arc<dyn RoutingBackend>,
    state: Mutex<State>,
    stats: Arc<InterruptStats>,
    msi_range: (u32, u32),
    legacy_pins: u32,
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
    pub fn new(backend: Arc<dyn RoutingBackend>, legacy_pins: u32, msi_range: (u32, u32)) -> Self {
        InterruptManager {
            backend,
            state: Mutex::new(State::default()),
            stats: Arc::new(InterruptStats::default()),
            msi_range,
            legacy_pins,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (each update is applied in
        // full before KVM is called), so keep going rather than propagate the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<InterruptStats> {
        &self.stats
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> InterruptCounters {
        let s = &self.stats;
        InterruptCounters {
            irqfd_triggers: s.irqfd_triggers.load(Ordering::Relaxed),
            userspace_injected: s.userspace_injected.load(Ordering::Relaxed),
            routing_updates: s.routing_updates.load(Ordering::Relaxed),
            routes_rebuilt: s.routes_rebuilt.load(Ordering::Relaxed),
            irqfds: s.irqfds.load(Ordering::Relaxed),
            routes_in_use: self.lock().routes.len() as u64,
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
    pub fn update_routes(&self, updates: &[(u32, Option<MsiMessage>)]) -> Result<usize> {
        let mut state = self.lock();
        let mut changed = 0;
        for (gsi, msg) in updates {
            self.check_gsi(*gsi)?;
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

    /// Creates an eventfd and attaches it as the irqfd of `gsi`.
    pub fn irqfd_line(&self, gsi: u32) -> Result<Arc<IrqfdLine>> {
        self.check_gsi(gsi)?;
        let fd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.backend
            .register_irqfd(&fd, gsi)
            .map_err(|source| InterruptError::RegisterIrqfd { gsi, source })?;
        self.stats.irqfds.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(IrqfdLine {
            fd,
            gsi,
            stats: Arc::clone(&self.stats),
            triggers: AtomicU64::new(0),
        }))
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
        self.stats
            .userspace_injected
            .fetch_add(1, Ordering::Relaxed);
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

/// A device's interrupt line: an eventfd attached to KVM as an irqfd.
#[derive(Debug)]
pub struct IrqfdLine {
    fd: EventFd,
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
mod tests {
    use super::*;

    /// Records what would have gone to KVM.
    #[derive(Default)]
    struct Recorder {
        tables: Mutex<Vec<Vec<(u32, u32, u32)>>>,
        irqfds: Mutex<Vec<u32>>,
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
        fn signal_msi(&self, _: kvm_msi) -> std::result::Result<(), kvm_ioctls::Error> {
            Ok(())
        }
    }

    fn manager() -> (Arc<Recorder>, Arc<InterruptManager>) {
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
        assert_eq!(
            (c.irqfd_triggers, c.userspace_injected, c.irqfds),
            (2, 1, 1)
        );
        assert_eq!(*rec.irqfds.lock().unwrap(), vec![4]);
    }
}
