//! MSI-X through interrupt remapping on real KVM, no Linux: a PCI function's vectors as the
//! VMM wires them (`vmm::pci::msix_vectors`: GSIs, irqfds, held in the router while masked)
//! behind an MSI-X table (`devices::pci::msix::MsixTable`) the test programs as a driver
//! would, with remappable-format messages through IRTEs of the remapping unit.
//!
//! - The device's irqfd delivers the vector, with no `KVM_SIGNAL_MSI` injection.
//! - Changing the IRTE plus one invalidation redirects it with exactly one routing update and
//!   one rebuilt route; the MSI-X table is not touched and the irqfd stays the same.
//! - A masked vector's interrupt sets its PBA bit and arrives only after unmask, once.
//! - A vector whose IRTE names another requester ID is blocked and recorded when it fires.

mod common;

use std::sync::{Arc, Mutex};

use common::remap::{enable_remapping, r64, remappable, w64, write_irte};
use common::{
    expect_nothing, expect_vector, start_routed_guest, wait_until, Poller, RoutedGuest, TinyGuest,
    FAULT_VECTOR, VECTOR,
};
use devices::pci::msix::{MsixTable, MSIX_CTRL_ENABLE};
use devices::remap::regs::{DMAR_FRCD_REG, DMAR_IQT_REG};
use devices::remap::RemapUnit;
use devices::InterruptLine;
use vm_memory::{Bytes, GuestAddress};
use vmm::interrupts::InterruptManager;
use vmm::irq_routing::{IrqRouter, RemapBus};

const IRT_BASE: u64 = 0x10_0000;
const IQ_BASE: u64 = 0x20_0000;
const STATUS_ADDR: u64 = 0x30_0000;
/// The function's requester ID (00:01.0) and an IRTE index for each vector.
const BDF: u16 = 0x08;
const INDEX0: u16 = 5;
const INDEX1: u16 = 6;
const FR_SID_MISMATCH: u64 = 0x26;

struct Setup {
    guest: TinyGuest,
    im: Arc<InterruptManager>,
    router: Arc<Mutex<IrqRouter>>,
    regs: RemapBus,
    table: MsixTable,
    msix: vmm::pci::MsixResources,
    tail: u64,
    _poller: Poller,
}

fn setup() -> Setup {
    let RoutedGuest {
        guest,
        im,
        router,
        mut regs,
        poller,
    } = start_routed_guest(0, 0xff00, |mem| Box::new(RemapUnit::new(mem.clone())));
    enable_remapping(&mut regs, IRT_BASE, IQ_BASE);
    let msix = vmm::pci::msix_vectors(2, BDF, &im, &router).unwrap();
    let table = MsixTable::new(msix.vectors.clone(), msix.sink.clone());
    Setup {
        guest,
        im,
        router,
        regs,
        table,
        msix,
        tail: 0,
        _poller: poller,
    }
}

impl Setup {
    fn write_irte(&self, index: u16, vector: u8, sid: u16) {
        write_irte(&self.guest.mem, IRT_BASE, index, vector, sid);
    }

    /// Programs table entry `v` with IRTE `index` (remappable format) and `masked`, as
    /// Linux's `pci_msix_write_vector_ctrl` + `__pci_write_msi_msg` do (dword writes).
    fn program(&mut self, v: u64, index: u16, masked: bool) {
        let m = remappable(index);
        self.table
            .table_write(v * 16, &(m.address as u32).to_le_bytes());
        self.table
            .table_write(v * 16 + 4, &((m.address >> 32) as u32).to_le_bytes());
        self.table.table_write(v * 16 + 8, &m.data.to_le_bytes());
        self.set_mask(v, masked);
    }

    fn set_mask(&mut self, v: u64, masked: bool) {
        self.table
            .table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    /// One IEC descriptor for `index`, then a wait descriptor; one IQT write.
    fn invalidate(&mut self, index: u16) {
        let iec = [4u64 | 1 << 4 | u64::from(index) << 32, 0];
        let wait = [5u64 | 1 << 5 | 2 << 32, STATUS_ADDR];
        for desc in [iec, wait] {
            let mem = &self.guest.mem;
            mem.write_obj(desc[0], GuestAddress(IQ_BASE + self.tail))
                .unwrap();
            mem.write_obj(desc[1], GuestAddress(IQ_BASE + self.tail + 8))
                .unwrap();
            self.tail = (self.tail + 16) % 4096;
        }
        w64(&mut self.regs, DMAR_IQT_REG, self.tail);
        assert_eq!(
            self.guest
                .mem
                .read_obj::<u32>(GuestAddress(STATUS_ADDR))
                .unwrap(),
            2,
            "wait descriptor completed"
        );
    }
}

#[test]
fn msix_vector_through_an_irte_masking_redirect_and_wrong_requester() {
    let mut s = setup();
    let gsi0 = s.msix.gsis()[0];
    assert!(s.im.is_parked(gsi0), "vectors start held (parked)");

    // 1. Vector 0 through IRTE INDEX0 (to FAULT_VECTOR, which the guest counts and survives).
    s.write_irte(INDEX0, FAULT_VECTOR, BDF);
    s.program(0, INDEX0, false);
    assert_eq!(s.im.route(gsi0), None, "MSI-X still disabled");
    let before = s.im.counters();
    s.table.set_control(MSIX_CTRL_ENABLE);
    let after = s.im.counters();
    assert_eq!(after.routing_updates - before.routing_updates, 1);
    assert_eq!(
        s.im.route(gsi0).map(|m| m.data & 0xff),
        Some(u32::from(FAULT_VECTOR))
    );
    assert!(!s.im.is_parked(gsi0));
    s.msix.lines[0].trigger().unwrap();
    expect_vector(&s.guest, FAULT_VECTOR, "vector 0 via its irqfd");

    // 2. Masked: the trigger sets the PBA bit (through the parked irqfd), nothing arrives.
    let before = s.im.counters();
    s.set_mask(0, true);
    assert_eq!(s.im.counters().routing_updates - before.routing_updates, 1);
    assert!(s.im.is_parked(gsi0));
    s.msix.lines[0].trigger().unwrap();
    wait_until("the PBA bit", || s.msix.vectors.is_pending(0));
    let mut pba = [0u8; 8];
    s.table.pba_read(0, &mut pba);
    assert_eq!(u64::from_le_bytes(pba) & 1, 1);
    expect_nothing(&s.guest, "masked vector");
    // Unmask: delivered once, PBA clear.
    s.set_mask(0, false);
    expect_vector(&s.guest, FAULT_VECTOR, "the pending vector after unmask");
    expect_nothing(&s.guest, "a second delivery");
    assert!(!s.msix.vectors.is_pending(0));

    // 3. Vector 1's IRTE names another requester: blocked, recorded when it fires.
    s.write_irte(INDEX1, VECTOR, 0x0010);
    s.program(1, INDEX1, false);
    let gsi1 = s.msix.gsis()[1];
    assert_eq!(s.im.route(gsi1), None);
    assert!(s.im.is_parked(gsi1));
    s.msix.lines[1].trigger().unwrap();
    wait_until("the blocked request", || {
        s.im.counters().blocked_requests == 1
    });
    let hi = r64(&mut s.regs, DMAR_FRCD_REG + 8);
    assert_eq!(hi >> 63, 1, "fault recorded");
    assert_eq!(
        hi & 0xffff,
        u64::from(BDF),
        "requester = the function's BDF"
    );
    assert_eq!((hi >> 32) & 0xff, FR_SID_MISMATCH);
    expect_nothing(&s.guest, "blocked vector");

    // 4. Redirect vector 0: new IRTE contents + one invalidation of its index = one routing
    // update rebuilding one route; the table is untouched, the irqfd is the same.
    let batches = s.table.batches();
    s.write_irte(INDEX0, VECTOR, BDF);
    let before = s.im.counters();
    s.invalidate(INDEX0);
    let after = s.im.counters();
    assert_eq!(after.routing_updates - before.routing_updates, 1);
    assert_eq!(after.routes_rebuilt - before.routes_rebuilt, 1);
    assert_eq!(s.table.batches(), batches, "no MSI-X table write");
    assert_eq!(
        s.im.route(gsi0).map(|m| m.data & 0xff),
        Some(u32::from(VECTOR))
    );
    s.msix.lines[0].trigger().unwrap();
    expect_vector(&s.guest, VECTOR, "the redirected vector");
    s.guest.vcpu.join().unwrap();
    assert_eq!(
        s.im.counters().signal_msi,
        0,
        "every delivery through an irqfd"
    );
    drop(s.router);
}
