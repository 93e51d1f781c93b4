// SPDX-License-Identifier: Apache-2.0

//! Register-level tests of [`RemapUnit`]: guest sequences replayed through MMIO accesses.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::*;
use super::*;
use crate::interrupt::MsiMessage;
use crate::ioapic::rte_to_msi;

const MEM_SIZE: u64 = 0x40_0000;
/// Invalidation queue: one page, 256 descriptors (QS = 0), as Linux without scalable mode.
const IQ_BASE: u64 = 0x10_0000;
/// Interrupt-remapping table: 65536 entries (1 MiB), as Linux allocates it.
const IRT_BASE: u64 = 0x20_0000;
/// Where wait descriptors write their status (Linux: `qi->desc_status[wait_index]`).
const STATUS: u64 = 0x30_0000;
/// Linux's `QI_DONE`.
const QI_DONE: u32 = 2;
/// The IOAPIC's source-id (QEMU's pseudo bus 0xFF, devfn 0).
const IOAPIC_SID: u16 = 0xff00;

const QI_IWD_SW: u64 = 1 << 5;
const QI_IWD_IF: u64 = 1 << 4;

fn wait_desc(data: u32, address: u64, flags: u64) -> (u64, u64) {
    (u64::from(data) << 32 | flags | 0x5, address)
}

fn global_iec() -> (u64, u64) {
    (0x4, 0)
}

fn selective_iec(index: u16, mask: u8) -> (u64, u64) {
    (
        u64::from(index) << 32 | u64::from(mask) << 27 | 1 << 4 | 0x4,
        0,
    )
}

/// A guest driving the unit the way Linux does.
struct Guest {
    mem: GuestMemoryMmap,
    unit: RemapUnit,
    /// What the unit pushed.
    sink: RecordingSink,
    /// Next free queue slot (Linux's `free_head`).
    tail: u32,
    /// Queue slots (256 for QS = 0).
    slots: u32,
}

impl Guest {
    fn new() -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let unit = RemapUnit::new(mem.clone());
        Guest {
            mem,
            unit,
            sink: RecordingSink::default(),
            tail: 0,
            slots: 256,
        }
    }

    fn w32(&mut self, offset: u64, value: u32) {
        self.unit
            .write(offset, &value.to_le_bytes(), &mut self.sink);
    }

    fn w64(&mut self, offset: u64, value: u64) {
        self.unit
            .write(offset, &value.to_le_bytes(), &mut self.sink);
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.unit.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn r64(&mut self, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        self.unit.read(offset, &mut data);
        u64::from_le_bytes(data)
    }

    /// One interrupt request from `sid`: the route's translation and, when blocked, the
    /// request reported as the VMM does when a parked source fires.
    fn request(&mut self, msg: MsiMessage, sid: u16) -> Result<MsiMessage, Blocked> {
        let result = self.unit.translate(msg, sid);
        if let Err(blocked) = &result {
            self.unit.request_blocked(blocked, sid, &mut self.sink);
        }
        result
    }

    fn gsts(&mut self) -> u32 {
        self.r32(DMAR_GSTS_REG)
    }

    fn fsts(&mut self) -> u32 {
        self.r32(DMAR_FSTS_REG)
    }

    fn put_desc(&self, slot: u32, (qw0, qw1): (u64, u64)) {
        let at = GuestAddress(IQ_BASE + u64::from(slot) * 16);
        self.mem.write_obj(qw0, at).unwrap();
        self.mem.write_obj(qw1, at.unchecked_add(8)).unwrap();
    }

    fn put_irte(&self, index: u32, raw: u128) {
        let at = GuestAddress(IRT_BASE + u64::from(index) * 16);
        self.mem.write_slice(&raw.to_le_bytes(), at).unwrap();
    }

    fn status(&self, address: u64) -> u32 {
        self.mem.read_obj(GuestAddress(address)).unwrap()
    }

    /// Queues `descs` without moving the tail register.
    fn queue(&mut self, descs: &[(u64, u64)]) {
        for &desc in descs {
            self.put_desc(self.tail, desc);
            self.tail = (self.tail + 1) % self.slots;
        }
    }

    fn write_tail(&mut self) {
        self.w32(DMAR_IQT_REG, self.tail << 4);
    }

    /// Linux's `qi_submit_sync`: the descriptors, a status-write wait, the tail write; returns
    /// the status word the guest would spin on.
    fn submit(&mut self, descs: &[(u64, u64)]) -> u32 {
        self.mem.write_obj(0u32, GuestAddress(STATUS)).unwrap();
        self.queue(descs);
        self.queue(&[wait_desc(QI_DONE, STATUS, QI_IWD_SW)]);
        self.write_tail();
        self.status(STATUS)
    }

    /// Linux's bring-up: `__dmar_enable_qi`, `iommu_set_irq_remapping`, `qi_global_iec`,
    /// then IRE (CFI left clear).
    fn bring_up(eim: bool) -> Guest {
        let mut g = Guest::new();
        g.w32(DMAR_IQT_REG, 0);
        g.w64(DMAR_IQA_REG, IQ_BASE);
        g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
        assert_ne!(g.gsts() & DMA_GSTS_QIES, 0);

        g.w64(DMAR_IRTA_REG, IRT_BASE | u64::from(eim) << 11 | 0xf);
        g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_SIRTP);
        assert_ne!(g.gsts() & DMA_GSTS_IRTPS, 0);

        assert_eq!(g.submit(&[global_iec()]), QI_DONE);

        g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE);
        assert_ne!(g.gsts() & DMA_GSTS_IRES, 0);
        assert!(g.unit.enabled());
        g.sink.take_invalidation();
        g
    }
}

/// An invalidation of one index range.
fn single(range: std::ops::Range<u32>) -> RouteInvalidation {
    RouteInvalidation::Indices(vec![range])
}

/// A present IRTE as Linux's `prepare_irte` builds it (xAPIC: `dest << 8`), with SVT=1,
/// SQ=0 and `sid`.
fn irte(vector: u8, dest_field: u32, sid: u16) -> u128 {
    1 | u128::from(vector) << 16 | u128::from(dest_field) << 32 | u128::from(sid) << 64 | 1 << 82
}

/// The message a remapped IOAPIC RTE with `index` produces.
fn ioapic_msg(index: u16) -> MsiMessage {
    let index = u64::from(index);
    rte_to_msi(1 << 48 | (index & 0x7fff) << 49 | (index >> 15) << 11 | 4)
}

#[test]
fn linux_bring_up_sequence() {
    let mut g = Guest::new();
    // Identification as alloc_iommu reads it.
    assert_eq!(g.r32(DMAR_VER_REG), 0x10);
    assert_eq!(g.r64(DMAR_CAP_REG), VTD_CAP);
    assert_eq!(g.r64(DMAR_ECAP_REG), VTD_ECAP);
    assert_eq!(g.gsts(), 0);

    // __dmar_enable_qi.
    g.w32(DMAR_IQT_REG, 0);
    g.w64(DMAR_IQA_REG, IQ_BASE);
    assert_eq!(g.r64(DMAR_IQA_REG), IQ_BASE);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
    assert_eq!(g.gsts(), DMA_GSTS_QIES);
    assert_eq!(g.r64(DMAR_IQH_REG), 0);

    // iommu_set_irq_remapping: IRTA with EIME and S = 0xF, then SIRTP.
    g.w64(DMAR_IRTA_REG, IRT_BASE | 1 << 11 | 0xf);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_SIRTP);
    assert_eq!(g.gsts(), DMA_GSTS_QIES | DMA_GSTS_IRTPS);
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));

    // qi_global_iec: IEC + wait through the queue.
    assert_eq!(g.submit(&[global_iec()]), QI_DONE);
    assert_eq!(g.r64(DMAR_IQH_REG), 2 << 4);
    assert_eq!(g.r64(DMAR_IQH_REG), g.r64(DMAR_IQT_REG));
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    assert_eq!(g.sink.take_invalidation(), None);

    // intel_enable_irq_remapping: IRE, CFI stays clear.
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE);
    assert_eq!(g.gsts(), DMA_GSTS_QIES | DMA_GSTS_IRTPS | DMA_GSTS_IRES);
    assert!(g.unit.enabled());
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    assert_eq!(g.fsts(), 0);

    let stats = g.unit.stats();
    assert_eq!(stats.iec_global, 1);
    assert_eq!(stats.wait_descriptors, 1);
    assert_eq!(stats.queue_errors, 0);
}

#[test]
fn remapped_ioapic_entry_translates_after_selective_iec() {
    let mut g = Guest::bring_up(false);
    // Linux modify_irte: write the entry, then qi_flush_iec(index, 0).
    g.put_irte(7, irte(0x33, 0x02 << 8, IOAPIC_SID));
    assert_eq!(g.submit(&[selective_iec(7, 0)]), QI_DONE);
    let inv = g.sink.take_invalidation().unwrap();
    assert_eq!(inv, single(7..8));
    assert!(inv.covers(remap_index(ioapic_msg(7))));
    assert!(!inv.covers(remap_index(ioapic_msg(8))));
    assert!(!inv.covers(None));

    let msg = g.request(ioapic_msg(7), IOAPIC_SID).unwrap();
    assert_eq!(
        msg,
        MsiMessage {
            address: 0xfee0_2000,
            data: 0x33
        }
    );
    assert_eq!(g.unit.stats().translations, 1);
    assert_eq!(g.unit.stats().iec_selective, 1);
}

#[test]
fn x2apic_entry_translates_to_kvm_extended_destination() {
    let mut g = Guest::bring_up(true);
    g.put_irte(0x8001, irte(0x40, 0x0000_0123, IOAPIC_SID));
    let msg = g.request(ioapic_msg(0x8001), IOAPIC_SID).unwrap();
    assert_eq!(msg.address, 0x100 << 32 | 0xfee2_3000);
    assert_eq!(msg.data, 0x40);
}

#[test]
fn selective_iecs_accumulate_and_merge() {
    let mut g = Guest::bring_up(false);
    g.submit(&[
        selective_iec(10, 0),
        selective_iec(8, 1),
        selective_iec(32, 2),
    ]);
    g.submit(&[selective_iec(11, 0)]);
    assert_eq!(
        g.sink.take_invalidation(),
        Some(RouteInvalidation::Indices(vec![8..12, 32..36]))
    );
    // A global one among selective ones wins.
    g.submit(&[selective_iec(1, 0), global_iec(), selective_iec(2, 0)]);
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    assert_eq!(g.unit.stats().iec_selective, 6);
}

#[test]
fn malformed_descriptor_sets_iqe_and_stops_there() {
    let mut g = Guest::bring_up(false);
    let head = g.r64(DMAR_IQH_REG);
    // IEC, an undefined type (0), then the wait.
    assert_eq!(g.submit(&[selective_iec(3, 0), (0, 0)]), 0);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQH_REG), head + (1 << 4));
    assert_eq!(g.r64(DMAR_IQER_REG), 3);
    assert_eq!(g.unit.stats().queue_errors, 1);
    // The IEC before the bad descriptor took effect.
    assert_eq!(g.sink.take_invalidation(), Some(single(3..4)));

    // Nothing is fetched while IQE is set, even on another tail write.
    g.write_tail();
    assert_eq!(g.status(STATUS), 0);

    // qi_check_fault: copy the wait descriptor over the bad one, clear IQE; fetching resumes.
    let bad_slot = u32::try_from(g.r64(DMAR_IQH_REG) >> 4).unwrap();
    g.put_desc(bad_slot, wait_desc(QI_DONE, STATUS, QI_IWD_SW));
    g.w32(DMAR_FSTS_REG, DMA_FSTS_IQE);
    assert_eq!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.status(STATUS), QI_DONE);
    assert_eq!(g.r64(DMAR_IQH_REG), g.r64(DMAR_IQT_REG));
    assert_eq!(g.r64(DMAR_IQER_REG), 0);
}

#[test]
fn reserved_bits_in_descriptor_are_a_queue_error() {
    let mut g = Guest::bring_up(false);
    assert_eq!(g.submit(&[(0x4 | 1 << 20, 0)]), 0);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQER_REG), 4);
}

#[test]
fn wait_status_outside_guest_memory_is_a_queue_error() {
    let mut g = Guest::bring_up(false);
    g.queue(&[wait_desc(QI_DONE, MEM_SIZE + 0x1000, QI_IWD_SW)]);
    g.write_tail();
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQH_REG), u64::from(g.tail - 1) << 4);
}

#[test]
fn descriptor_outside_guest_memory_is_a_queue_error() {
    let mut g = Guest::new();
    g.w64(DMAR_IQA_REG, MEM_SIZE + 0x10_0000);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
    g.w32(DMAR_IQT_REG, 1 << 4);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQER_REG), 2);
    assert_eq!(g.r64(DMAR_IQH_REG), 0);
}

#[test]
fn bad_tail_is_a_queue_error() {
    // Misaligned.
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_IQT_REG, 0x28);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQER_REG), 1);

    // Beyond a one-page (256-slot) queue.
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_IQT_REG, 256 << 4);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQER_REG), 1);
}

#[test]
fn wide_descriptors_are_a_queue_error() {
    let mut g = Guest::new();
    g.w64(DMAR_IQA_REG, IQ_BASE | 1 << 11);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
    g.w32(DMAR_IQT_REG, 1 << 4);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    assert_eq!(g.r64(DMAR_IQER_REG), 5);
}

#[test]
fn wrapped_queue_is_processed_in_order() {
    let mut g = Guest::bring_up(false);
    // Move the head to slot 254 with IOTLB descriptors (ignored).
    let filler = vec![(0x2u64, 0u64); 254 - g.tail as usize];
    g.queue(&filler);
    g.write_tail();
    assert_eq!(g.r64(DMAR_IQH_REG), 254 << 4);

    const A: u64 = STATUS + 0x100;
    const B: u64 = STATUS + 0x200;
    g.queue(&[
        wait_desc(1, A, QI_IWD_SW),
        selective_iec(5, 0),
        wait_desc(2, B, QI_IWD_SW),
        wait_desc(3, A, QI_IWD_SW),
    ]);
    assert_eq!(g.tail, 2);
    g.write_tail();
    assert_eq!(g.r64(DMAR_IQH_REG), 2 << 4);
    assert_eq!(g.status(A), 3);
    assert_eq!(g.status(B), 2);
    assert_eq!(g.sink.take_invalidation(), Some(single(5..6)));
    assert_eq!(g.fsts(), 0);
}

#[test]
fn wait_with_interrupt_flag_sets_iwc_and_queues_msi() {
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_IEDATA_REG, 0x4041);
    g.w32(DMAR_IEADDR_REG, 0xfee0_0000);
    g.w32(DMAR_IEUADDR_REG, 0x100);
    g.w32(DMAR_IECTL_REG, 0);
    let expected = MsiMessage {
        address: 0x100 << 32 | 0xfee0_0000,
        data: 0x4041,
    };

    g.queue(&[wait_desc(0, 0, QI_IWD_IF)]);
    g.write_tail();
    assert_eq!(g.r32(DMAR_ICS_REG), DMA_ICS_IWC);
    assert_eq!(g.sink.take_msis(), vec![expected]);

    // IWC still set: no new event.
    g.queue(&[wait_desc(0, 0, QI_IWD_IF)]);
    g.write_tail();
    assert!(g.sink.take_msis().is_empty());

    // W1C: writing 0 leaves it, writing 1 clears it; then the next wait interrupts again.
    g.w32(DMAR_ICS_REG, 0);
    assert_eq!(g.r32(DMAR_ICS_REG), DMA_ICS_IWC);
    g.w32(DMAR_ICS_REG, DMA_ICS_IWC);
    assert_eq!(g.r32(DMAR_ICS_REG), 0);
    g.queue(&[wait_desc(0, 0, QI_IWD_IF)]);
    g.write_tail();
    assert_eq!(g.sink.take_msis(), vec![expected]);
    assert_eq!(g.unit.stats().completion_events, 2);
}

#[test]
fn masked_completion_event_is_pending_until_unmasked() {
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_IEDATA_REG, 0x55);
    g.w32(DMAR_IEADDR_REG, 0xfee0_1000);
    // IECTL.IM is set at reset.
    assert_eq!(g.r32(DMAR_IECTL_REG), DMA_FECTL_IM);
    g.queue(&[wait_desc(0, 0, QI_IWD_IF)]);
    g.write_tail();
    assert_eq!(g.r32(DMAR_IECTL_REG), DMA_FECTL_IM | DMA_FECTL_IP);
    assert!(g.sink.take_msis().is_empty());
    g.w32(DMAR_IECTL_REG, 0);
    assert_eq!(g.r32(DMAR_IECTL_REG), 0);
    assert_eq!(
        g.sink.take_msis(),
        vec![MsiMessage {
            address: 0xfee0_1000,
            data: 0x55
        }]
    );
}

#[test]
fn blocked_interrupt_records_a_fault() {
    let mut g = Guest::bring_up(false);
    // Entry 9 is not present.
    let err = g.request(ioapic_msg(9), IOAPIC_SID).unwrap_err();
    assert_eq!(err.reason, BlockReason::NotPresent);

    let frcd = DMAR_FRCD_REG;
    assert_eq!(g.r64(frcd), 9 << 48);
    let high = g.r64(frcd + 8);
    assert_ne!(high & DMA_FRCD_F, 0);
    assert_eq!((high >> 32) & 0xff, 0x22);
    assert_eq!(high & 0xffff, u64::from(IOAPIC_SID));
    assert_eq!(g.fsts(), DMA_FSTS_PPF);
    assert_eq!(g.unit.stats().faults_recorded, 1);
    assert_eq!(g.unit.stats().blocked.not_present, 1);

    // FECTL.IM is set at reset: the event is pending; Linux's dmar_msi_unmask sends it.
    assert!(g.sink.take_msis().is_empty());
    assert_ne!(g.r32(DMAR_FECTL_REG) & DMA_FECTL_IP, 0);
    g.w32(DMAR_FEDATA_REG, 0x21);
    g.w32(DMAR_FEADDR_REG, 0xfee0_0000);
    g.w32(DMAR_FECTL_REG, 0);
    assert_eq!(
        g.sink.take_msis(),
        vec![MsiMessage {
            address: 0xfee0_0000,
            data: 0x21
        }]
    );

    // dmar_fault: a 32-bit write of F at +12 clears the record; PPF follows.
    g.w32(frcd + 8, 1 << 31); // Bit 95: not F, no effect.
    assert_ne!(g.r64(frcd + 8) & DMA_FRCD_F, 0);
    g.w32(frcd + 12, 1 << 31);
    assert_eq!(g.r64(frcd + 8) & DMA_FRCD_F, 0);
    assert_eq!(g.fsts(), 0);

    // The next fault goes to the next record, FRI names it, and an unmasked event is sent.
    g.request(ioapic_msg(10), IOAPIC_SID).unwrap_err();
    assert_ne!(g.r64(frcd + 16 + 8) & DMA_FRCD_F, 0);
    assert_eq!(g.fsts(), DMA_FSTS_PPF | 1 << 8);
    assert_eq!(g.sink.take_msis().len(), 1);
}

#[test]
fn computing_a_blocked_route_records_nothing() {
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_FECTL_REG, 0);
    // Index 10 is not present: the route is blocked, but no interrupt was requested.
    for _ in 0..3 {
        g.unit.translate(ioapic_msg(10), IOAPIC_SID).unwrap_err();
    }
    assert_eq!(g.fsts(), 0);
    assert_eq!(g.unit.stats().faults_recorded, 0);
    assert!(g.sink.take_msis().is_empty());
    // Each request is one fault.
    let blocked = g.unit.translate(ioapic_msg(10), IOAPIC_SID).unwrap_err();
    g.unit.request_blocked(&blocked, IOAPIC_SID, &mut g.sink);
    g.unit.request_blocked(&blocked, IOAPIC_SID, &mut g.sink);
    assert_eq!(g.unit.stats().faults_recorded, 2);
    assert_eq!(g.unit.stats().blocked.not_present, 2);
    assert_eq!(
        g.sink.events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![UnitEvent::Fault],
        "one event: the second fault arrives while PPF is pending"
    );
}

/// Records, at each invalidation, what the guest's wait-status word said then.
struct FenceProbe {
    mem: GuestMemoryMmap,
    seen: Vec<(RouteInvalidation, u32)>,
}

impl RemapSink for FenceProbe {
    fn invalidate(&mut self, _unit: &mut RemapUnit, inv: RouteInvalidation) {
        let status = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        self.seen.push((inv, status));
    }
    fn raise(&mut self, _kind: UnitEvent, _msg: MsiMessage) {}
}

#[test]
fn each_wait_descriptor_fences_the_invalidations_before_it() {
    let mut g = Guest::bring_up(false);
    let second_status = STATUS + 0x100;
    g.mem.write_obj(0u32, GuestAddress(STATUS)).unwrap();
    g.mem.write_obj(0u32, GuestAddress(second_status)).unwrap();
    g.queue(&[
        selective_iec(3, 0),
        wait_desc(QI_DONE, STATUS, QI_IWD_SW),
        selective_iec(9, 0),
        wait_desc(QI_DONE, second_status, QI_IWD_SW),
    ]);
    let mut probe = FenceProbe {
        mem: g.mem.clone(),
        seen: Vec::new(),
    };
    g.unit
        .write(DMAR_IQT_REG, &(g.tail << 4).to_le_bytes(), &mut probe);
    // Index 3 was pushed before the first status was written; index 9 after it but before
    // the second.
    assert_eq!(
        probe.seen,
        vec![(single(3..4), 0), (single(9..10), QI_DONE),]
    );
    assert_eq!(g.status(second_status), QI_DONE);
}

#[test]
fn fault_records_overflow_into_pfo() {
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_FECTL_REG, 0);
    for index in 0..DMAR_FRCD_REG_NR as u16 {
        g.request(ioapic_msg(100 + index), IOAPIC_SID).unwrap_err();
    }
    // One event for the first fault only: the rest arrive while PPF is pending.
    assert_eq!(g.sink.take_msis().len(), 1);
    assert_eq!(g.fsts() & DMA_FSTS_PFO, 0);
    g.request(ioapic_msg(200), IOAPIC_SID).unwrap_err();
    assert_eq!(
        g.fsts() & (DMA_FSTS_PFO | DMA_FSTS_PPF),
        DMA_FSTS_PFO | DMA_FSTS_PPF
    );
    let stats = g.unit.stats();
    assert_eq!(stats.faults_recorded, 8);
    assert_eq!(stats.faults_overflowed, 1);

    // Linux's dmar_fault: clear every F, then write PFO | PPF back.
    for slot in 0..DMAR_FRCD_REG_NR as u64 {
        g.w32(DMAR_FRCD_REG + slot * 16 + 12, 1 << 31);
    }
    g.w32(DMAR_FSTS_REG, DMA_FSTS_PFO | DMA_FSTS_PPF);
    assert_eq!(g.fsts(), 0);
    assert_eq!(g.r32(DMAR_FECTL_REG) & DMA_FECTL_IP, 0);
}

#[test]
fn fpd_entry_blocks_without_recording() {
    let mut g = Guest::bring_up(false);
    g.put_irte(4, irte(0x30, 0, IOAPIC_SID) | 1 << 1);
    let err = g.request(ioapic_msg(4), 0x0010).unwrap_err();
    assert_eq!(err.reason, BlockReason::SourceIdMismatch);
    assert_eq!(g.fsts(), 0);
    assert_eq!(g.unit.stats().faults_suppressed, 1);
    assert_eq!(g.unit.stats().blocked.source_id_mismatch, 1);
}

#[test]
fn source_id_mismatch_is_recorded_with_requester() {
    let mut g = Guest::bring_up(false);
    g.put_irte(4, irte(0x30, 0, IOAPIC_SID));
    g.request(ioapic_msg(4), 0x0010).unwrap_err();
    let high = g.r64(DMAR_FRCD_REG + 8);
    assert_eq!((high >> 32) & 0xff, 0x26);
    assert_eq!(high & 0xffff, 0x0010);
}

#[test]
fn unreadable_table_is_recorded() {
    let mut g = Guest::bring_up(false);
    g.w64(DMAR_IRTA_REG, (MEM_SIZE + 0x10_0000) | 0xf);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE | DMA_GCMD_SIRTP);
    let err = g.request(ioapic_msg(1), IOAPIC_SID).unwrap_err();
    assert_eq!(err.reason, BlockReason::TableReadFailed);
    assert_eq!((g.r64(DMAR_FRCD_REG + 8) >> 32) & 0xff, 0x23);
}

#[test]
fn table_is_the_one_latched_by_sirtp() {
    let mut g = Guest::bring_up(false);
    g.put_irte(2, irte(0x30, 1 << 8, IOAPIC_SID));
    // A new IRTA without SIRTP changes nothing.
    g.w64(DMAR_IRTA_REG, (IRT_BASE + 0x1000) | 0xf);
    assert!(g.request(ioapic_msg(2), IOAPIC_SID).is_ok());
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE | DMA_GCMD_SIRTP);
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    // Entry 2 of the new table is entry 258 of the old one: not present.
    let err = g.request(ioapic_msg(2), IOAPIC_SID).unwrap_err();
    assert_eq!(err.reason, BlockReason::NotPresent);
}

#[test]
fn ire_without_sirtp_blocks_remappable_messages() {
    let mut g = Guest::new();
    g.w32(DMAR_GCMD_REG, DMA_GCMD_IRE);
    assert!(g.unit.enabled());
    let err = g.request(ioapic_msg(0), IOAPIC_SID).unwrap_err();
    assert_eq!(err.reason, BlockReason::TableReadFailed);
}

#[test]
fn remapping_disabled_passes_compat_and_blocks_remappable() {
    let mut g = Guest::new();
    let compat = MsiMessage {
        address: 0xfee0_1000,
        data: 0x31,
    };
    assert_eq!(g.request(compat, 0), Ok(compat));
    let err = g.request(ioapic_msg(3), IOAPIC_SID).unwrap_err();
    assert_eq!(err.reason, BlockReason::RemappingDisabled);
    assert_eq!(err.index, Some(3));
    // Not a fault: nothing recorded.
    assert_eq!(g.fsts(), 0);
    let stats = g.unit.stats();
    assert_eq!(stats.passthrough, 1);
    assert_eq!(stats.blocked.remapping_disabled, 1);
    assert_eq!(stats.faults_recorded, 0);
}

#[test]
fn cfi_controls_compatibility_format() {
    let mut g = Guest::bring_up(false);
    let compat = MsiMessage {
        address: 0xfee0_1000,
        data: 0x31,
    };
    let err = g.request(compat, 0x0010).unwrap_err();
    assert_eq!(err.reason, BlockReason::CompatibilityBlocked);
    assert_eq!((g.r64(DMAR_FRCD_REG + 8) >> 32) & 0xff, 0x25);

    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE | DMA_GCMD_CFI);
    assert_ne!(g.gsts() & DMA_GSTS_CFIS, 0);
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    assert_eq!(g.request(compat, 0x0010), Ok(compat));

    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE);
    assert_eq!(g.gsts() & DMA_GSTS_CFIS, 0);
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
}

#[test]
fn cfi_has_no_effect_in_x2apic_mode() {
    let mut g = Guest::bring_up(true);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_IRE | DMA_GCMD_CFI);
    let compat = MsiMessage {
        address: 0xfee0_1000,
        data: 0x31,
    };
    let err = g.request(compat, 0).unwrap_err();
    assert_eq!(err.reason, BlockReason::CompatibilityBlocked);
}

#[test]
fn ire_off_invalidates_everything() {
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
    assert!(!g.unit.enabled());
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    // Writing the same levels again changes nothing.
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE);
    assert_eq!(g.sink.take_invalidation(), None);
}

#[test]
fn translation_enable_is_refused() {
    let mut g = Guest::new();
    g.w32(DMAR_GCMD_REG, DMA_GCMD_TE | DMA_GCMD_QIE);
    assert_eq!(g.gsts() & DMA_GSTS_TES, 0);
    assert_ne!(g.gsts() & DMA_GSTS_QIES, 0);
    // SRTP is acknowledged (one-shot) even though nothing uses the root table.
    g.w64(DMAR_RTADDR_REG, 0x5000);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_QIE | DMA_GCMD_SRTP);
    assert_ne!(g.gsts() & DMA_GSTS_RTPS, 0);
    assert_eq!(g.r64(DMAR_RTADDR_REG), 0x5000);
}

#[test]
fn disabling_qi_resets_the_head_and_stops_processing() {
    let mut g = Guest::bring_up(false);
    assert_ne!(g.r64(DMAR_IQH_REG), 0);
    g.w32(DMAR_GCMD_REG, DMA_GCMD_IRE);
    assert_eq!(g.gsts() & DMA_GSTS_QIES, 0);
    assert_eq!(g.r64(DMAR_IQH_REG), 0);
    // With QI off a tail write processes nothing.
    g.tail = 0;
    g.mem.write_obj(0u32, GuestAddress(STATUS)).unwrap();
    g.queue(&[wait_desc(QI_DONE, STATUS, QI_IWD_SW)]);
    g.write_tail();
    assert_eq!(g.status(STATUS), 0);
    // Enabling with a non-zero tail processes what is queued.
    g.w32(DMAR_GCMD_REG, DMA_GCMD_IRE | DMA_GCMD_QIE);
    assert_eq!(g.status(STATUS), QI_DONE);
}

#[test]
fn fsts_status_bits_are_write_one_to_clear() {
    let mut g = Guest::bring_up(false);
    let head = g.r64(DMAR_IQH_REG);
    g.w64(DMAR_IQT_REG, head | 0x8); // Misaligned: IQE.
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    g.w32(DMAR_FSTS_REG, 0);
    assert_ne!(g.fsts() & DMA_FSTS_IQE, 0);
    // Fix the tail before clearing IQE, or processing resumes straight into the same error.
    g.w64(DMAR_IQT_REG, head);
    // PPF cannot be cleared through FSTS (it follows the records).
    g.request(ioapic_msg(1), IOAPIC_SID).unwrap_err();
    g.w32(DMAR_FSTS_REG, DMA_FSTS_PPF | DMA_FSTS_IQE);
    assert_eq!(g.fsts() & (DMA_FSTS_IQE | DMA_FSTS_PPF), DMA_FSTS_PPF);
}

#[test]
fn fault_event_waits_for_earlier_conditions() {
    let mut g = Guest::bring_up(false);
    g.w32(DMAR_FECTL_REG, 0);
    g.w32(DMAR_IQT_REG, 0x8); // IQE: first condition, one event.
    assert_eq!(g.sink.take_msis().len(), 1);
    g.request(ioapic_msg(1), IOAPIC_SID).unwrap_err();
    assert!(g.sink.take_msis().is_empty());
    assert_eq!(g.unit.stats().fault_events, 1);
}

#[test]
fn register_halves_and_whole_quadwords_agree() {
    let mut g = Guest::new();
    // IRTA as two 32-bit halves reads back as one 64-bit value, and vice versa.
    g.w32(DMAR_IRTA_REG, 0x0020_080f);
    g.w32(DMAR_IRTA_REG + 4, 0x1);
    assert_eq!(g.r64(DMAR_IRTA_REG), 0x1_0020_080f);
    // Reserved IRTA bits 10:4 are dropped.
    g.w64(DMAR_IRTA_REG, 0x3000 | 0x7f0 | 0x3);
    assert_eq!(g.r64(DMAR_IRTA_REG), 0x3003);
    assert_eq!(g.r32(DMAR_IRTA_REG + 4), 0);
    assert_eq!(g.r32(DMAR_CAP_REG), VTD_CAP as u32);
    assert_eq!(g.r32(DMAR_CAP_REG + 4), (VTD_CAP >> 32) as u32);
    // A 64-bit access over two 32-bit registers: FEDATA and FEADDR.
    g.w64(DMAR_FEDATA_REG, 0xfee0_0000_0000_0041);
    assert_eq!(g.r32(DMAR_FEDATA_REG), 0x41);
    assert_eq!(g.r32(DMAR_FEADDR_REG), 0xfee0_0000);
    assert_eq!(g.r64(DMAR_FEDATA_REG), 0xfee0_0000_0000_0041);
}

#[test]
fn other_widths_and_unknown_offsets_are_ignored() {
    let mut g = Guest::new();
    let mut byte = [0xffu8; 1];
    g.unit.read(DMAR_VER_REG, &mut byte);
    assert_eq!(byte, [0]);
    let mut word = [0xffu8; 2];
    g.unit.read(DMAR_GSTS_REG, &mut word);
    assert_eq!(word, [0, 0]);
    g.unit.write(DMAR_GCMD_REG, &[0, 0, 0, 4], &mut g.sink); // 4 bytes: QIE (bit 26)
    g.unit.write(DMAR_GCMD_REG + 3, &[2], &mut g.sink); // 1 byte: ignored
    assert_eq!(g.gsts(), DMA_GSTS_QIES);
    // Unaligned 4-byte access, unknown offset, beyond the page.
    assert_eq!(g.r32(DMAR_VER_REG + 2), 0);
    assert_eq!(g.r32(0x60), 0);
    assert_eq!(g.r64(0xff8 + 8), 0);
    let mut data = [0xffu8; 8];
    g.unit.read(0xffc, &mut data);
    assert_eq!(data, [0; 8]);
    g.w32(0x60, 0xffff_ffff);
    g.w64(0x2000, !0);
    assert_eq!(g.gsts(), DMA_GSTS_QIES);
}

#[test]
fn read_only_registers_ignore_writes() {
    let mut g = Guest::bring_up(false);
    let iqh = g.r64(DMAR_IQH_REG);
    g.w64(DMAR_CAP_REG, 0);
    g.w64(DMAR_ECAP_REG, 0);
    g.w32(DMAR_VER_REG, 0);
    g.w32(DMAR_GSTS_REG, 0);
    g.w64(DMAR_IQH_REG, 0);
    assert_eq!(g.r64(DMAR_CAP_REG), VTD_CAP);
    assert_eq!(g.r64(DMAR_ECAP_REG), VTD_ECAP);
    assert_eq!(g.r32(DMAR_VER_REG), VTD_VER);
    assert_ne!(g.gsts(), 0);
    assert_eq!(g.r64(DMAR_IQH_REG), iqh);
}

#[test]
fn reset_restores_power_on_state_and_keeps_counters() {
    let mut g = Guest::bring_up(false);
    g.unit.reset(&mut g.sink);
    assert_eq!(g.gsts(), 0);
    assert!(!g.unit.enabled());
    assert_eq!(g.r32(DMAR_FECTL_REG), DMA_FECTL_IM);
    assert_eq!(g.sink.take_invalidation(), Some(RouteInvalidation::All));
    assert_eq!(g.unit.stats().iec_global, 1);
}

#[test]
fn arbitrary_accesses_never_panic() {
    let mut g = Guest::new();
    // Guest memory full of junk so the queue and table contain garbage too.
    let junk: Vec<u8> = (0..0x1000u32)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8)
        .collect();
    for base in [0u64, IQ_BASE, IRT_BASE] {
        g.mem.write_slice(&junk, GuestAddress(base)).unwrap();
    }
    let mut seed: u64 = 0x1234_5678_9abc_def0;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let r = next();
        let offset = (r >> 8) % 0x1010;
        let len = [1usize, 2, 3, 4, 8, 16][(r % 6) as usize];
        let value = next();
        if r & 0x80 != 0 {
            g.unit
                .write(offset & !3, &value.to_le_bytes()[..len.min(8)], &mut g.sink);
        } else {
            let mut data = vec![0u8; len];
            g.unit.read(offset, &mut data);
        }
        let msg = MsiMessage {
            address: 0xfee0_0000 | (value & 0xf_fffc),
            data: (value >> 32) as u32,
        };
        let _ = g.request(msg, (value >> 16) as u16);
        g.sink.take_invalidation();
        g.sink.take_msis();
    }
}
