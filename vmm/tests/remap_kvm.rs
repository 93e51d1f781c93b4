//! Interrupt remapping on real KVM, no Linux: a device whose requester ID does not match the
//! IRTE's source-id check is blocked and a fault is recorded in the unit's fault recording
//! register; the guest keeps running and still gets the interrupt of the rightful device.
//! The unit is programmed through its registers exactly as Linux does it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::remap::{enable_remapping, irte, r64, remappable};
use common::{start_tiny_guest, VECTOR, VECTOR_PORT, WAIT};
use devices::remap::regs::{DMAR_FRCD_REG, DMAR_FSTS_REG, DMA_FSTS_PPF};
use devices::remap::RemapUnit;
use devices::{BusDevice, InterruptLine, Ioapic};
use vm_memory::{Bytes, GuestAddress};
use vmm::interrupts::InterruptManager;
use vmm::irq_routing::{IrqRouter, RemapBus};

const IRT_BASE: u64 = 0x10_0000;
const IQ_BASE: u64 = 0x20_0000;
/// VT-d fault reason: interrupt request's source-id does not match the IRTE's.
const FR_SID_MISMATCH: u64 = 0x26;
/// The IRTE, and the requester IDs of the device it belongs to and of an intruder.
const INDEX: u16 = 3;
const OWNER_SID: u16 = 0x0010;
const OTHER_SID: u16 = 0x0020;

#[test]
fn interrupt_from_the_wrong_source_id_is_blocked_and_recorded() {
    let guest = start_tiny_guest();
    let im = Arc::new(InterruptManager::new(guest.vm.clone(), 24, (24, 1023)));
    im.init_routing().unwrap();
    let unit = Arc::new(Mutex::new(RemapUnit::new(guest.mem.clone())));
    let router = Arc::new(Mutex::new(IrqRouter::new(
        Arc::new(Mutex::new(Ioapic::new(0))),
        Some(unit.clone()),
        im.clone(),
        0xff00,
    )));
    let mut regs = RemapBus(router.clone());

    // The guest's driver: queued invalidation, x2APIC-format table of 256 entries, IR on.
    enable_remapping(&mut regs, IRT_BASE, IQ_BASE);
    // IRTE: present, fixed, physical APIC ID 0, VECTOR; SVT = 1 (verify SID), SQ = 0, SID.
    let entry = irte(VECTOR) | u128::from(OWNER_SID) << 64 | 1u128 << 82;
    guest
        .mem
        .write_obj(entry, GuestAddress(IRT_BASE + 16 * u64::from(INDEX)))
        .unwrap();

    // The intruder programs the owner's interrupt index: no route, a fault is recorded.
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
    intruder_line.trigger().unwrap();
    assert!(
        guest
            .ports
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "the blocked interrupt reached the guest"
    );
    let stats = unit.lock().unwrap().stats();
    assert_eq!(stats.blocked.source_id_mismatch, 1);
    assert_eq!(stats.faults_recorded, 1);
    let mut fsts = [0u8; 4];
    regs.read(DMAR_FSTS_REG, &mut fsts);
    assert_ne!(
        u32::from_le_bytes(fsts) & DMA_FSTS_PPF,
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

    // The rightful device still gets through, and the guest is still running to take it.
    let owner = im.allocate_msi().unwrap();
    let owner_line = im.irqfd_line(owner.gsi()).unwrap();
    router
        .lock()
        .unwrap()
        .set_msi_source(owner.gsi(), Some(remappable(INDEX)), OWNER_SID);
    assert!(im.route(owner.gsi()).is_some());
    owner_line.trigger().unwrap();
    let (port, vector) = guest
        .ports
        .recv_timeout(WAIT)
        .expect("guest did not get the interrupt");
    assert_eq!((port, vector), (VECTOR_PORT, VECTOR));
    guest.vcpu.join().unwrap();
    assert_eq!(im.counters().userspace_injected, 0);
}
