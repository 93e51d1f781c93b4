//! PV-IR (paravirtual interrupt remapping) on real KVM, no Linux. The test plays the guest
//! driver: request blocks in guest memory, one `REQUEST` write each, through the router's
//! register-page bus device as a vCPU would (docs/pv-irq-remap.md).
//!
//! - An irqfd interrupt through a PV handle reaches the tiny guest through KVM alone (no
//!   userspace injection); a `SET` that moves the live handle is one routing update that
//!   rebuilds one route.
//! - An IOAPIC pin whose entry names another pin's handle is blocked (binding is per pin):
//!   when it fires, `FAULT_COUNT` and `LAST_FAULT` record {handle, pin, reason 2} and the
//!   guest keeps running; `CLEAR` blocks the rightful pin too (reason 1).

mod common;

use common::pvirq::{program_pin, rte_for, PvDriver};
use common::remap::{r32, r64};
use common::{
    expect_nothing, expect_vector, start_routed_guest, wait_until, RoutedGuest, FAULT_VECTOR,
    VECTOR,
};
use devices::pvirq::regs::{
    LAST_FAULT_PCI, LAST_FAULT_VALID, REG_FAULT_COUNT, REG_LAST_FAULT, REG_MAX_HANDLES,
};
use devices::{InterruptLine, PvIrq, PvIrqConfig};
use vmm::interrupts::InterruptManager;
use vmm::irq_routing::IoapicBus;

/// Where the driver's request block lives.
const BLOCK: u64 = 0x30_0000;
/// The PCI function whose MSI goes through a handle.
const RID: u16 = 0x0010;
const IOAPIC_ID: u8 = 0;
const IOAPIC_SID: u16 = 0xff00;
/// Reasons (spec §5).
const NOT_PRESENT: u64 = 1;
const NOT_OWNER: u64 = 2;

/// The tiny guest, a router translating through PV-IR (one IOAPIC, one PCI function, one
/// vCPU with APIC ID 0), and the VMM's parked-source poller.
fn setup() -> RoutedGuest {
    start_routed_guest(IOAPIC_ID, IOAPIC_SID, |mem| {
        Box::new(PvIrq::new(
            PvIrqConfig {
                ioapic_id: IOAPIC_ID,
                ioapic_pins: 24,
                pci_requesters: vec![RID],
                apic_ids: vec![0],
                max_handles: 256,
            },
            mem.clone(),
        ))
    })
}

/// Waits until the poller has reported `n` blocked requests in all.
fn wait_blocked(im: &InterruptManager, n: u64) {
    wait_until("the blocked request", || {
        im.counters().blocked_requests >= n
    });
}

#[test]
fn msi_through_a_pv_handle_is_delivered_by_kvm_and_a_set_is_one_routing_update() {
    let RoutedGuest {
        guest,
        im,
        router,
        mut regs,
        poller: _poller,
    } = setup();
    assert_eq!(r32(&mut regs, REG_MAX_HANDLES), 256);
    let msi = im.allocate_msi().unwrap();
    let line = im.irqfd_line(msi.gsi()).unwrap();
    let mut drv = PvDriver {
        regs: &mut regs,
        mem: &guest.mem,
        block: BLOCK,
    };
    drv.enable();
    let (status, handle, msg) = drv.alloc_pci(RID, 1);
    assert_eq!(status, 0, "ALLOC");
    assert!(msg.is_remappable());

    // The device is programmed with the opaque message before the handle is SET: blocked.
    router
        .lock()
        .unwrap()
        .set_msi_source(msi.gsi(), Some(msg), RID);
    assert_eq!(im.route(msi.gsi()), None, "not present yet");
    assert!(im.is_parked(msi.gsi()));

    let before = im.counters();
    assert_eq!(drv.set(handle, FAULT_VECTOR, 0), 0, "SET");
    let after = im.counters();
    assert_eq!(after.routing_updates - before.routing_updates, 1);
    assert_eq!(after.routes_rebuilt - before.routes_rebuilt, 1);
    assert!(!im.is_parked(msi.gsi()), "irqfd re-attached");
    assert_eq!(
        im.route(msi.gsi()).map(|m| m.data & 0xff),
        Some(u32::from(FAULT_VECTOR))
    );
    line.trigger().unwrap();
    expect_vector(&guest, FAULT_VECTOR, "the MSI through the handle");

    // Moving the live handle: one KVM_SET_GSI_ROUTING, one route, the device untouched.
    let before = im.counters();
    assert_eq!(drv.set(handle, VECTOR, 0), 0, "SET on a live handle");
    let after = im.counters();
    assert_eq!(after.routing_updates - before.routing_updates, 1);
    assert_eq!(after.routes_rebuilt - before.routes_rebuilt, 1);
    line.trigger().unwrap();
    expect_vector(&guest, VECTOR, "the MSI after the SET");
    guest.vcpu.join().unwrap();

    let c = im.counters();
    assert_eq!(
        (c.signal_msi, c.blocked_requests),
        (0, 0),
        "no userspace injection"
    );
    let stats = router.lock().unwrap().pvirq_stats().unwrap();
    assert_eq!(
        (stats.requests.alloc, stats.requests.set, stats.statuses.ok),
        (1, 2, 3)
    );
    assert_eq!(stats.live_handles, 1);
    assert!(router.lock().unwrap().remap_stats().is_none());
}

#[test]
fn a_pin_naming_another_pins_handle_is_blocked_and_recorded_and_clear_blocks() {
    const OWNER_PIN: u32 = 4;
    const OTHER_PIN: u32 = 5;
    let RoutedGuest {
        guest,
        im,
        router,
        mut regs,
        poller: _poller,
    } = setup();
    let owner_line = im.irqfd_line(OWNER_PIN).unwrap();
    let other_line = im.irqfd_line(OTHER_PIN).unwrap();
    let mut drv = PvDriver {
        regs: &mut regs,
        mem: &guest.mem,
        block: BLOCK,
    };
    drv.enable();
    let (status, handle, msg) = drv.alloc_pin(IOAPIC_ID, OWNER_PIN as u8);
    assert_eq!(status, 0, "ALLOC");
    assert_eq!(drv.set(handle, FAULT_VECTOR, 0), 0, "SET");

    let mut ioapic = IoapicBus(router.clone());
    program_pin(&mut ioapic, OWNER_PIN, rte_for(msg));
    assert!(im.route(OWNER_PIN).is_some());
    // The other pin's entry names the owner's handle: blocked, nothing recorded until it fires.
    program_pin(&mut ioapic, OTHER_PIN, rte_for(msg));
    assert_eq!(im.route(OTHER_PIN), None, "another pin's handle");
    assert!(im.is_parked(OTHER_PIN));
    assert_eq!(r32(drv.regs, REG_FAULT_COUNT), 0);

    other_line.trigger().unwrap();
    wait_blocked(&im, 1);
    let fault = r64(drv.regs, REG_LAST_FAULT);
    assert_eq!(
        fault & LAST_FAULT_VALID,
        LAST_FAULT_VALID,
        "LAST_FAULT valid"
    );
    assert_eq!(fault & 0xffff, u64::from(handle), "handle");
    assert_eq!((fault >> 16) & 0xffff, u64::from(OTHER_PIN), "pin");
    assert_eq!((fault >> 32) & 0xff, NOT_OWNER, "reason");
    assert_eq!(fault & LAST_FAULT_PCI, 0, "an IOAPIC source");
    assert_eq!(r32(drv.regs, REG_FAULT_COUNT), 1);
    let stats = router.lock().unwrap().pvirq_stats().unwrap();
    assert_eq!(stats.blocked.not_owner, 1);

    // The guest is still running and the owner still gets through.
    owner_line.trigger().unwrap();
    expect_vector(&guest, FAULT_VECTOR, "the owner pin's interrupt");

    // CLEAR: the owner is blocked too (not present), and recorded when it fires.
    let before = im.counters();
    assert_eq!(drv.clear(handle), 0, "CLEAR");
    assert_eq!(im.counters().routing_updates - before.routing_updates, 1);
    assert_eq!(im.route(OWNER_PIN), None);
    assert!(im.is_parked(OWNER_PIN));
    owner_line.trigger().unwrap();
    wait_blocked(&im, 2);
    let fault = r64(drv.regs, REG_LAST_FAULT);
    assert_eq!((fault >> 16) & 0xffff, u64::from(OWNER_PIN), "pin");
    assert_eq!((fault >> 32) & 0xff, NOT_PRESENT, "reason");
    assert_eq!(r32(drv.regs, REG_FAULT_COUNT), 2);
    expect_nothing(&guest, "the cleared handle");

    // SET again: delivered, and the guest (still alive) ends on VECTOR.
    assert_eq!(drv.set(handle, VECTOR, 0), 0, "SET after CLEAR");
    owner_line.trigger().unwrap();
    expect_vector(&guest, VECTOR, "the owner pin's interrupt after SET");
    guest.vcpu.join().unwrap();
    let c = im.counters();
    assert_eq!(
        (c.signal_msi, c.fault_events),
        (0, 0),
        "PV-IR has no event MSI"
    );
}
