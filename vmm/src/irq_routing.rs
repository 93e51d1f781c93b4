//! Turns interrupt sources into KVM routes, through the interrupt-remapping unit when the
//! guest enabled it.
//!
//! Slow path only: it runs when the guest writes an IOAPIC redirection entry or the remapping
//! unit's registers (an invalidation-queue tail write carrying Interrupt Entry Cache
//! invalidations, or a command such as IRE/SIRTP). Each such write recomputes the affected
//! pins' routes — remappable-format message → IRTE → compatibility-format MSI — and pushes
//! them with one `KVM_SET_GSI_ROUTING`. The irqfds stay attached, so delivery (the fast path)
//! never involves this code.

use std::sync::{Arc, Mutex, MutexGuard};

use arch::layout;
use devices::remap::{remap_index, RemapUnit, RouteInvalidation};
use devices::{BusDevice, Ioapic, MsiMessage};

use crate::interrupts::InterruptManager;

/// Number of IOAPIC pins.
const PINS: usize = layout::IOAPIC_PINS as usize;

/// The routing state shared by the IOAPIC and remapping-unit bus devices.
pub struct IrqRouter {
    ioapic: Arc<Mutex<Ioapic>>,
    remap: Option<Arc<Mutex<RemapUnit>>>,
    interrupts: Arc<InterruptManager>,
    /// Requester ID of the IOAPIC's interrupts (the DMAR device scope's bus/devfn).
    ioapic_source_id: u16,
    /// The IRTE index each pin's current message uses, for index-selective invalidations.
    pin_index: [Option<u32>; PINS],
    /// Routes left out because the message was blocked (no route: the interrupt is dropped).
    blocked: u64,
    /// Route updates that changed something, with the reason, for logs and counters.
    rebuilds: u64,
    /// MSI sources (MSI/MSI-X vectors of devices): GSI → (guest-programmed message, the
    /// device's requester ID). Recomputed on invalidations like the IOAPIC pins.
    msi_sources: std::collections::BTreeMap<u32, (MsiMessage, u16)>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IrqRouter {
    /// A router for `ioapic`, remapping through `remap` when given.
    pub fn new(
        ioapic: Arc<Mutex<Ioapic>>,
        remap: Option<Arc<Mutex<RemapUnit>>>,
        interrupts: Arc<InterruptManager>,
        ioapic_source_id: u16,
    ) -> Self {
        IrqRouter {
            ioapic,
            remap,
            interrupts,
            ioapic_source_id,
            pin_index: [None; PINS],
            blocked: 0,
            rebuilds: 0,
            msi_sources: std::collections::BTreeMap::new(),
        }
    }

    /// The route for a message from `source_id` (an IOAPIC pin's or a device's MSI):
    /// translated through the remapping unit when there is one, checked against the requester
    /// ID; `None` (no route, the interrupt is dropped) when blocked.
    fn msi_route(&mut self, gsi: u32, msg: MsiMessage, source_id: u16) -> Option<MsiMessage> {
        let routed = match &self.remap {
            Some(unit) => lock(unit).translate(msg, source_id).ok(),
            // Without a remapping unit a remappable-format message means nothing.
            None => (!msg.is_remappable()).then_some(msg),
        };
        if routed.is_none() {
            self.blocked += 1;
            log::debug!("irq: GSI {gsi} message {msg:x?} from {source_id:#06x} blocked");
        }
        routed
    }

    /// Sets (or with `None` removes: masked) the message a device programmed for the MSI
    /// source on `gsi`, and pushes its route.
    pub fn set_msi_source(&mut self, gsi: u32, msg: Option<MsiMessage>, source_id: u16) {
        let route = match msg {
            Some(m) => {
                self.msi_sources.insert(gsi, (m, source_id));
                self.msi_route(gsi, m, source_id)
            }
            None => {
                self.msi_sources.remove(&gsi);
                None
            }
        };
        if let Err(e) = self.interrupts.update_routes(&[(gsi, route)]) {
            log::error!("irq: cannot update the route of GSI {gsi}: {e}");
        }
    }

    fn update_msi_sources(&mut self, inv: &RouteInvalidation) {
        let affected: Vec<_> = self
            .msi_sources
            .iter()
            .filter(|(_, (m, _))| inv.covers(remap_index(*m)))
            .map(|(g, (m, sid))| (*g, *m, *sid))
            .collect();
        if affected.is_empty() {
            return;
        }
        let updates: Vec<_> = affected
            .into_iter()
            .map(|(g, m, sid)| (g, self.msi_route(g, m, sid)))
            .collect();
        if let Err(e) = self.interrupts.update_routes(&updates) {
            log::error!("irq: cannot update MSI routes: {e}");
        }
    }

    /// The route of one pin: `None` when masked or blocked.
    fn pin_route(&mut self, pin: usize) -> Option<MsiMessage> {
        let msg = lock(&self.ioapic).pin_msi(pin)?;
        self.pin_index[pin] = remap_index(msg);
        // Pin n is GSI n.
        self.msi_route(pin as u32, msg, self.ioapic_source_id)
    }

    /// Recomputes the routes of the pins in `mask` and pushes them in one batch.
    pub fn update_pins(&mut self, mask: u32, why: &str) {
        let updates: Vec<_> = (0..PINS)
            .filter(|p| mask & (1 << p) != 0)
            .map(|p| (p as u32, self.pin_route(p)))
            .collect();
        if updates.is_empty() {
            return;
        }
        match self.interrupts.update_routes(&updates) {
            Ok(0) => {}
            Ok(n) => {
                self.rebuilds += 1;
                log::info!("irq: rebuilt {n} route(s) after {why} (pins {mask:#x})");
            }
            Err(e) => log::error!("irq: cannot update routes after {why}: {e}"),
        }
    }

    /// Handles what a write to the remapping unit asked for: route invalidations and
    /// interrupts the unit raises itself (invalidation completion, fault events).
    pub fn after_remap_write(&mut self) {
        let Some(unit) = self.remap.clone() else {
            return;
        };
        let (inv, msis) = {
            let mut u = lock(&unit);
            (u.take_route_invalidation(), u.take_pending_msis())
        };
        if let Some(inv) = &inv {
            self.update_msi_sources(inv);
        }
        match inv {
            Some(RouteInvalidation::All) => {
                self.update_pins(u32::MAX >> (32 - PINS), "a global invalidation")
            }
            Some(inv @ RouteInvalidation::Indices(_)) => {
                let mask = (0..PINS)
                    .filter(|&p| self.pin_index[p].is_some() && inv.covers(self.pin_index[p]))
                    .fold(0u32, |m, p| m | (1 << p));
                if mask != 0 {
                    self.update_pins(mask, "an interrupt-entry-cache invalidation");
                }
            }
            None => {}
        }
        for msi in msis {
            // Control-plane interrupts of the unit itself (rare): injected from userspace and
            // counted as such.
            if let Err(e) = self.interrupts.signal_msi(msi) {
                log::warn!("irq: cannot inject remapping-unit interrupt: {e}");
            }
        }
    }

    /// Messages blocked so far.
    pub fn blocked(&self) -> u64 {
        self.blocked
    }
}

/// The IOAPIC on the MMIO bus: after each guest write, the pins whose redirection entry
/// changed get their route recomputed.
pub struct IoapicBus(pub Arc<Mutex<IrqRouter>>);

impl BusDevice for IoapicBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let router = lock(&self.0);
        lock(&router.ioapic).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut router = lock(&self.0);
        let dirty = {
            let mut ioapic = lock(&router.ioapic);
            ioapic.write(offset, data);
            ioapic.take_dirty_pins()
        };
        if dirty != 0 {
            router.update_pins(dirty, "an IOAPIC entry write");
        }
    }
}

/// The remapping unit's registers on the MMIO bus.
pub struct RemapBus(pub Arc<Mutex<IrqRouter>>);

impl BusDevice for RemapBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let router = lock(&self.0);
        if let Some(unit) = &router.remap {
            lock(unit).read(offset, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut router = lock(&self.0);
        if let Some(unit) = router.remap.clone() {
            lock(&unit).write(offset, data);
            router.after_remap_write();
        }
    }
}
