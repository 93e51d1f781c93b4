//! Interrupt remapping on real KVM, no Linux. The unit is programmed through its registers
//! exactly as Linux does it, with fault events unmasked and aimed at a vector the tiny guest
//! counts ([`FAULT_VECTOR`]).
//!
//! - A device whose requester ID does not match the IRTE's source-id check is blocked; the
//!   fault is recorded only when it actually fires (once per request), and the fault-event
//!   MSI reaches the guest, which keeps running and still gets the rightful device's
//!   interrupt.
//! - An IOAPIC entry programmed onto a non-present IRTE: when the pin fires, the fault is
//!   recorded and the fault-event MSI reaches the guest.

mod common;

use std::sync::Mutex;

use common::pvirq::program_pin;
use common::remap::{enable_remapping, r32, r64, remappable, w32, write_irte};
use common::{
    expect_nothing, expect_vector, start_routed_guest, RoutedGuest, FAULT_VECTOR, VECTOR,
};
use devices::remap::regs::{
    DMAR_FEADDR_REG, DMAR_FECTL_REG, DMAR_FEDATA_REG, DMAR_FEUADDR_REG, DMAR_FRCD_REG,
    DMAR_FSTS_REG, DMA_FSTS_PPF,
};
use devices::remap::RemapUnit;
use devices::InterruptLine;
use vmm::irq_routing::{IoapicBus, IrqRouter};

const IRT_BASE: u64 = 0x10_0000;
const IQ_BASE: u64 = 0x20_0000;
/// VT-d fault reasons: source-id mismatch, entry not present.
const FR_SID_MISMATCH: u64 = 0x26;
const FR_NOT_PRESENT: u64 = 0x22;
/// The IRTE, and the requester IDs of the device it belongs to and of an intruder.
const INDEX: u16 = 3;
const OWNER_SID: u16 = 0x0010;
const OTHER_SID: u16 = 0x0020;
const IOAPIC_SID: u16 = 0xff00;

/// The tiny guest, the router with a remapping unit brought up as Linux does, fault events
/// unmasked to FAULT_VECTOR on APIC 0, and the VMM's parked-source poller running.
fn setup() -> RoutedGuest {
    let mut s = start_routed_guest(0, IOAPIC_SID, |mem| Box::new(RemapUnit::new(mem.clone())));
    // The guest's driver: queued invalidation, x2APIC-format table of 256 entries, IR on.
    enable_remapping(&mut s.regs, IRT_BASE, IQ_BASE);
    // dmar_set_interrupt(): the fault event's message, then unmask it.
    w32(&mut s.regs, DMAR_FEDATA_REG, u32::from(FAULT_VECTOR));
    w32(&mut s.regs, DMAR_FEADDR_REG, 0xfee0_0000);
    w32(&mut s.regs, DMAR_FEUADDR_REG, 0);
    w32(&mut s.regs, DMAR_FECTL_REG, 0);
    s
}

fn faults_recorded(router: &Mutex<IrqRouter>) -> u64 {
    router
        .lock()
        .unwrap()
        .remap_stats()
        .unwrap()
        .faults_recorded
}

#[test]
fn interrupt_from_the_wrong_source_id_is_blocked_and_recorded_when_it_fires() {
    let RoutedGuest {
        guest,
        im,
        router,
        mut regs,
        poller: _poller,
    } = setup();
    // IRTE: present, fixed, physical APIC ID 0, VECTOR; SVT = 1 (verify SID), SQ = 0, SID.
    write_irte(&guest.mem, IRT_BASE, INDEX, VECTOR, OWNER_SID);

    // The intruder programs the owner's interrupt index: no route; nothing recorded yet,
    // because nothing was requested yet.
    let intruder = im.allocate_msi().unwrap();
    let intruder_line = im.irqfd_line(intruder.gsi()).unwrap();
    router
        .lock()
        .unwrap()
        .set_msi_source(intruder.gsi(), Some(remappable(INDEX)), OTHER_SID);
    assert_eq!(
        im.route(intruder.gsi()),
        None,
        "blocked message must have no KVM route"
    );
    assert!(im.is_parked(intruder.gsi()), "blocked source is parked");
    assert_eq!(faults_recorded(&router), 0, "no request, no fault");
    assert_eq!(r64(&mut regs, DMAR_FRCD_REG + 8) >> 63, 0, "FRCD empty");

    // The intruder fires: one fault, and the fault event reaches the guest (not VECTOR).
    intruder_line.trigger().unwrap();
    expect_vector(&guest, FAULT_VECTOR, "the fault-event interrupt");
    assert_eq!(faults_recorded(&router), 1);
    let stats = router.lock().unwrap().remap_stats().unwrap();
    assert_eq!(stats.blocked.source_id_mismatch, 1);
    assert_ne!(
        r32(&mut regs, DMAR_FSTS_REG) & DMA_FSTS_PPF,
        0,
        "primary pending fault"
    );
    let (lo, hi) = (
        r64(&mut regs, DMAR_FRCD_REG),
        r64(&mut regs, DMAR_FRCD_REG + 8),
    );
    assert_eq!(hi >> 63, 1, "fault record valid (F)");
    assert_eq!(hi & 0xffff, u64::from(OTHER_SID), "recorded requester");
    assert_eq!((hi >> 32) & 0xff, FR_SID_MISMATCH, "recorded reason");
    assert_eq!(lo >> 48, u64::from(INDEX), "recorded interrupt index");
    let c = im.counters();
    assert_eq!(
        (c.blocked_requests, c.fault_events, c.signal_msi),
        (1, 1, 1)
    );

    // The rightful device still gets through, and the guest is still running to take it.
    let owner = im.allocate_msi().unwrap();
    let owner_line = im.irqfd_line(owner.gsi()).unwrap();
    router
        .lock()
        .unwrap()
        .set_msi_source(owner.gsi(), Some(remappable(INDEX)), OWNER_SID);
    assert!(im.route(owner.gsi()).is_some());
    assert!(!im.is_parked(owner.gsi()));
    owner_line.trigger().unwrap();
    expect_vector(&guest, VECTOR, "the owner's interrupt");
    guest.vcpu.join().unwrap();
    assert_eq!(im.counters().signal_msi, 1, "only the fault event");
}

#[test]
fn ioapic_entry_onto_a_missing_irte_raises_a_fault_event_when_the_pin_fires() {
    const PIN: u32 = 5;
    const BAD_INDEX: u64 = 9;
    let RoutedGuest {
        guest,
        im,
        router,
        mut regs,
        poller: _poller,
    } = setup();
    let line = im.irqfd_line(PIN).unwrap();
    // IRTE 9 is not present (zeroed memory). Remappable-format RTE: handle 9, vector field =
    // pin, unmasked.
    let rte: u64 = BAD_INDEX << 49 | 1 << 48 | u64::from(PIN);
    let mut ioapic = IoapicBus(router.clone());
    program_pin(&mut ioapic, PIN, rte);
    assert_eq!(im.route(PIN), None);
    assert!(im.is_parked(PIN));
    assert_eq!(faults_recorded(&router), 0);

    line.trigger().unwrap();
    expect_vector(&guest, FAULT_VECTOR, "the fault-event interrupt");
    let hi = r64(&mut regs, DMAR_FRCD_REG + 8);
    assert_eq!(hi >> 63, 1, "fault record valid (F)");
    assert_eq!((hi >> 32) & 0xff, FR_NOT_PRESENT, "recorded reason");
    assert_eq!(hi & 0xffff, u64::from(IOAPIC_SID), "recorded requester");
    assert_eq!(faults_recorded(&router), 1);
    // Nothing else arrives: the blocked interrupt itself is not delivered.
    expect_nothing(&guest, "the blocked interrupt");
}
