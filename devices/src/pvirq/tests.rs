// SPDX-License-Identifier: Apache-2.0

//! Tests of [`PvIrq`]: guest request sequences replayed through the register page.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::*;
use super::*;
use crate::interrupt::MsiMessage;
use crate::ioapic::rte_to_msi;
use crate::remap::{remap_index, RouteInvalidation};

/// RAM: 0..1 MiB, then 2 MiB..2 MiB + 0x1020 (a region whose end is not 64-byte aligned).
const MEM_SIZE: u64 = 0x10_0000;
const ODD_REGION: u64 = 0x20_0000;
const ODD_REGION_SIZE: u64 = 0x1020;
/// Where the guest keeps its request block.
const BLOCK: u64 = 0x1000;

const IOAPIC_ID: u8 = 2;
const RID_A: u16 = 0x0008;
const RID_B: u16 = 0x0010;
const APIC_IDS: [u32; 3] = [0, 1, 0x1_2345];

fn config(max_handles: u16) -> PvIrqConfig {
    PvIrqConfig {
        ioapic_id: IOAPIC_ID,
        ioapic_pins: 24,
        pci_requesters: vec![RID_A, RID_B],
        apic_ids: APIC_IDS.to_vec(),
        max_handles,
    }
}

fn pin(pin: u8) -> PvSource {
    PvSource::IoapicPin {
        ioapic_id: IOAPIC_ID,
        pin,
    }
}

fn pci(requester_id: u16) -> PvSource {
    PvSource::Pci {
        segment: 0,
        requester_id,
    }
}

/// A request block under construction.
#[derive(Clone, Copy)]
struct Req([u8; 64]);

impl Req {
    fn op(op: u16) -> Req {
        let mut r = Req([0; 64]);
        r.0[0..2].copy_from_slice(&op.to_le_bytes());
        r
    }
    fn u8(mut self, at: usize, v: u8) -> Req {
        self.0[at] = v;
        self
    }
    fn u16(mut self, at: usize, v: u16) -> Req {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, at: usize, v: u32) -> Req {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn alloc(source_type: u8, count: u16, high: u16, low: u16) -> Req {
        Req::op(OP_ALLOC)
            .u8(req::SOURCE_TYPE, source_type)
            .u16(req::COUNT, count)
            .u16(req::SOURCE_HI, high)
            .u16(req::SOURCE_LO, low)
    }
    fn set(handle: u16, vector: u8, dest: u32) -> Req {
        Req::op(OP_SET)
            .u16(req::HANDLE, handle)
            .u8(req::VECTOR, vector)
            .u32(req::DEST, dest)
    }
    fn clear(handle: u16) -> Req {
        Req::op(OP_CLEAR).u16(req::HANDLE, handle)
    }
    fn free(handle: u16, count: u16) -> Req {
        Req::op(OP_FREE)
            .u16(req::HANDLE, handle)
            .u16(req::COUNT, count)
    }
}

/// What a request wrote back.
#[derive(Debug)]
struct Reply([u8; 64]);

impl Reply {
    fn status(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }
    fn handle(&self) -> u16 {
        u16::from_le_bytes([self.0[0xc], self.0[0xd]])
    }
    fn msg(&self) -> MsiMessage {
        let dword = |at: usize| u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap());
        MsiMessage {
            address: u64::from(dword(0x1c)) << 32 | u64::from(dword(0x18)),
            data: dword(0x20),
        }
    }
}

const OK: u16 = PvStatus::Ok as u16;
const BAD_OP: u16 = PvStatus::BadOp as u16;
const BAD_SOURCE: u16 = PvStatus::BadSource as u16;
const NO_SPACE: u16 = PvStatus::NoSpace as u16;
const BAD_HANDLE: u16 = PvStatus::BadHandle as u16;
const BAD_VECTOR: u16 = PvStatus::BadVector as u16;
const BAD_DEST: u16 = PvStatus::BadDest as u16;
const BAD_COUNT: u16 = PvStatus::BadCount as u16;

struct Guest {
    mem: GuestMemoryMmap,
    pv: PvIrq,
    sink: RecordingPvSink,
}

impl Guest {
    fn new(max_handles: u16) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), MEM_SIZE as usize),
            (GuestAddress(ODD_REGION), ODD_REGION_SIZE as usize),
        ])
        .unwrap();
        let pv = PvIrq::new(config(max_handles), mem.clone());
        Guest {
            mem,
            pv,
            sink: RecordingPvSink::default(),
        }
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.pv.read(offset, &mut data);
        u32::from_le_bytes(data)
    }
    fn r64(&mut self, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        self.pv.read(offset, &mut data);
        u64::from_le_bytes(data)
    }
    fn w32(&mut self, offset: u64, v: u32) {
        self.pv.write(offset, &v.to_le_bytes(), &mut self.sink);
    }
    fn w64(&mut self, offset: u64, v: u64) {
        self.pv.write(offset, &v.to_le_bytes(), &mut self.sink);
    }

    /// Writes `r` at `gpa` with status pre-set to 0xFFFF, writes REQUEST, returns the block.
    fn submit_at(&mut self, gpa: u64, r: Req) -> Reply {
        let block = r.u16(req::STATUS, 0xffff).0;
        self.mem.write_slice(&block, GuestAddress(gpa)).unwrap();
        self.w64(REG_REQUEST, gpa);
        let mut out = [0u8; 64];
        self.mem.read_slice(&mut out, GuestAddress(gpa)).unwrap();
        Reply(out)
    }
    fn submit(&mut self, r: Req) -> Reply {
        self.submit_at(BLOCK, r)
    }
    fn status(&mut self, r: Req) -> u16 {
        self.submit(r).status()
    }

    /// ALLOC that must succeed: (first handle, message).
    fn alloc(&mut self, source: PvSource, count: u16) -> (u16, MsiMessage) {
        let r = match source {
            PvSource::IoapicPin { ioapic_id, pin } => {
                Req::alloc(SOURCE_IOAPIC, count, ioapic_id.into(), pin.into())
            }
            PvSource::Pci {
                segment,
                requester_id,
            } => Req::alloc(SOURCE_PCI, count, segment, requester_id),
        };
        let reply = self.submit(r);
        assert_eq!(reply.status(), OK, "alloc {source:?} x{count}");
        (reply.handle(), reply.msg())
    }

    fn enable(&mut self) {
        self.w32(REG_CTRL, CTRL_ENABLE);
        self.sink.invalidations.clear();
    }

    fn take(&mut self) -> Vec<RouteInvalidation> {
        std::mem::take(&mut self.sink.invalidations)
    }
}

/// The invalidation of one range of handles.
fn indices(range: std::ops::Range<u32>) -> RouteInvalidation {
    RouteInvalidation::Indices(vec![range])
}

fn compat(dest: u32, vector: u8) -> MsiMessage {
    MsiMessage {
        address: u64::from(dest & 0xffff_ff00) << 32 | 0xfee0_0000 | u64::from(dest & 0xff) << 12,
        data: u32::from(vector),
    }
}

fn blocked(reason: PvBlockReason, index: Option<u32>) -> Result<MsiMessage, PvBlocked> {
    Err(PvBlocked { reason, index })
}

#[test]
fn identification_registers() {
    let mut g = Guest::new(64);
    assert_eq!(g.r32(REG_ID), 0x5249_5650);
    assert_eq!(&g.r32(REG_ID).to_le_bytes(), b"PVIR");
    assert_eq!(g.r32(REG_VERSION), 0x0001_0000);
    assert_eq!(g.r32(REG_FEATURES), 0xf);
    assert_eq!(g.r32(REG_MAX_HANDLES), 64);
    assert_eq!(g.r32(REG_CTRL), 0);
    assert_eq!(g.r32(REG_STATUS), 0);
    assert_eq!(g.r32(REG_FAULT_COUNT), 0);
    assert_eq!(g.r64(REG_LAST_FAULT), 0);
    assert_eq!(g.r64(REG_REQUEST), 0, "REQUEST is write-only");
    // Read-only registers ignore writes.
    g.w32(REG_ID, 0);
    g.w32(REG_MAX_HANDLES, 1);
    g.w32(REG_STATUS, 7);
    g.w32(REG_FAULT_COUNT, 5);
    assert_eq!(g.r32(REG_ID), PVIR_ID);
    assert_eq!(g.r32(REG_MAX_HANDLES), 64);
    assert_eq!(g.r32(REG_STATUS), 0);
    assert_eq!(g.r32(REG_FAULT_COUNT), 0);
    assert!(g.take().is_empty());
}

#[test]
fn other_offsets_and_sizes_read_zero_and_ignore_writes() {
    let mut g = Guest::new(64);
    let before = g.pv.stats().ignored_accesses;
    // 8-byte read of a 4-byte register, 4-byte read of an 8-byte one, 1/2-byte reads,
    // misaligned and unknown offsets, the end of the page.
    for (offset, len) in [
        (REG_ID, 8),
        (REG_ID, 2),
        (REG_ID, 1),
        (REG_ID + 1, 4),
        (REG_LAST_FAULT, 4),
        (REG_LAST_FAULT + 4, 4),
        (0x24, 4),
        (0x30, 4),
        (0xffc, 4),
        (0xfff, 1),
        (0x1000, 4),
        (u64::MAX, 8),
    ] {
        let mut data = vec![0xaau8; len];
        g.pv.read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0), "{offset:#x}/{len}");
    }
    assert_eq!(g.pv.stats().ignored_accesses - before, 12);
    // A 4-byte write to REQUEST executes nothing; an 8-byte write to CTRL changes nothing;
    // a 2-byte CTRL write neither.
    g.mem
        .write_slice(&Req::clear(0).u16(2, 0xffff).0, GuestAddress(BLOCK))
        .unwrap();
    g.pv.write(REG_REQUEST, &(BLOCK as u32).to_le_bytes(), &mut g.sink);
    g.pv.write(REG_CTRL, &1u64.to_le_bytes(), &mut g.sink);
    g.pv.write(REG_CTRL, &1u16.to_le_bytes(), &mut g.sink);
    g.pv.write(REG_CTRL + 1, &1u32.to_le_bytes(), &mut g.sink);
    assert_eq!(g.r32(REG_CTRL), 0);
    assert_eq!(g.pv.stats().statuses.total(), 0);
    let status: u16 = g.mem.read_obj(GuestAddress(BLOCK + 2)).unwrap();
    assert_eq!(status, 0xffff);
    assert!(g.take().is_empty());
    let s = g.pv.stats();
    assert!(s.page_reads >= 12 && s.page_writes == 4);
}

#[test]
fn ctrl_enable_and_block_compat_invalidate_all_once_per_change() {
    let mut g = Guest::new(64);
    g.w32(REG_CTRL, CTRL_ENABLE);
    assert_eq!(g.take(), vec![RouteInvalidation::All]);
    assert_eq!(g.r32(REG_CTRL), 1);
    assert_eq!(g.r32(REG_STATUS), STATUS_ENABLED);
    // Same value: nothing changes, no invalidation. Reserved bits are ignored.
    g.w32(REG_CTRL, CTRL_ENABLE | 0x7fff_fffc);
    assert!(g.take().is_empty());
    assert_eq!(g.r32(REG_CTRL), 1);
    g.w32(REG_CTRL, CTRL_ENABLE | CTRL_BLOCK_COMPAT);
    assert_eq!(g.take(), vec![RouteInvalidation::All]);
    assert_eq!(g.r32(REG_STATUS), STATUS_ENABLED | STATUS_COMPAT_BLOCKED);
    g.w32(REG_CTRL, 0);
    assert_eq!(g.take(), vec![RouteInvalidation::All]);
    assert_eq!(g.r32(REG_STATUS), 0);
}

#[test]
fn alloc_ioapic_pin_returns_a_remappable_message_with_the_pin_as_data() {
    let mut g = Guest::new(64);
    let (h, msg) = g.alloc(pin(7), 1);
    assert_eq!(h, 0);
    assert_eq!(
        msg,
        MsiMessage {
            address: 0xfee0_0010,
            data: 7
        }
    );
    let (h, msg) = g.alloc(pin(9), 1);
    assert_eq!(h, 1);
    assert_eq!(msg.address, 0xfee0_0000 | 1 << 5 | 1 << 4);
    assert_eq!(msg.data, 9);
    // ALLOC changes nothing routable.
    assert!(g.take().is_empty());
    // The IOAPIC turns the remappable RTE Linux builds from it into a message whose index is
    // the handle (the pin in the vector byte is not a sub-handle).
    let rte = 1u64 << 48 | u64::from(h & 0x7fff) << 49 | u64::from(h >> 15) << 11 | 9;
    assert_eq!(remap_index(rte_to_msi(rte)), Some(u32::from(h)));
    assert_eq!(remap_index(msg), Some(1));
    assert_eq!(g.pv.stats().live_handles, 2);
    assert_eq!(g.pv.stats().requests.alloc, 2);
    assert_eq!(g.pv.stats().statuses.ok, 2);
}

#[test]
fn alloc_pci_sets_shv_and_data_zero() {
    let mut g = Guest::new(64);
    let (h, msg) = g.alloc(pci(RID_A), 1);
    assert_eq!(h, 0);
    assert_eq!(
        msg,
        MsiMessage {
            address: 0xfee0_0018,
            data: 0
        }
    );
    let (h, msg) = g.alloc(pci(RID_A), 4);
    assert_eq!(h, 4, "a 4-block is 4-aligned");
    assert_eq!(msg.address, 0xfee0_0000 | 4 << 5 | 1 << 4 | 1 << 3);
    assert_eq!(msg.data, 0);
    for i in 0..4u32 {
        let vector_msg = MsiMessage {
            data: msg.data + i,
            ..msg
        };
        assert_eq!(remap_index(vector_msg), Some(4 + i));
    }
}

#[test]
fn high_handles_use_address_bit_2() {
    let mut g = Guest::new(0x8000 + 64);
    // 1024 blocks of 32 fill handles 0..0x8000.
    for i in 0..1024u16 {
        assert_eq!(g.alloc(pci(RID_A), 32).0, i * 32);
    }
    let (h, msg) = g.alloc(pci(RID_B), 1);
    assert_eq!(h, 0x8000);
    assert_eq!(msg.address, 0xfee0_0000 | 1 << 4 | 1 << 3 | 1 << 2);
    assert_eq!(remap_index(msg), Some(0x8000));
    let (h, msg) = g.alloc(pin(3), 1);
    assert_eq!(h, 0x8001);
    assert_eq!(msg.address, 0xfee0_0000 | 1 << 5 | 1 << 4 | 1 << 2);
    g.enable();
    assert_eq!(g.status(Req::set(0x8001, 0x40, 1)), OK);
    assert_eq!(g.pv.translate(msg, pin(3)), Ok(compat(1, 0x40)));
}

#[test]
fn alloc_statuses() {
    let mut g = Guest::new(64);
    let id = u16::from(IOAPIC_ID);
    let cases: &[(Req, u16)] = &[
        // Unknown source types.
        (Req::alloc(0, 1, id, 0), BAD_SOURCE),
        (Req::alloc(3, 1, id, 0), BAD_SOURCE),
        (Req::alloc(0xff, 1, id, 0), BAD_SOURCE),
        // IOAPIC ID not ours, pin out of range, values beyond 8 bits, multi-MSI.
        (Req::alloc(SOURCE_IOAPIC, 1, id + 1, 0), BAD_SOURCE),
        (Req::alloc(SOURCE_IOAPIC, 1, 0x100 | id, 0), BAD_SOURCE),
        (Req::alloc(SOURCE_IOAPIC, 1, id, 24), BAD_SOURCE),
        (Req::alloc(SOURCE_IOAPIC, 1, id, 0x100), BAD_SOURCE),
        (Req::alloc(SOURCE_IOAPIC, 2, id, 0), BAD_SOURCE),
        (Req::alloc(SOURCE_IOAPIC, 32, id, 0), BAD_SOURCE),
        // Segment not 0, unknown requester.
        (Req::alloc(SOURCE_PCI, 1, 1, RID_A), BAD_SOURCE),
        (Req::alloc(SOURCE_PCI, 1, 0, 0x0018), BAD_SOURCE),
        // Counts.
        (Req::alloc(SOURCE_PCI, 0, 0, RID_A), BAD_COUNT),
        (Req::alloc(SOURCE_PCI, 3, 0, RID_A), BAD_COUNT),
        (Req::alloc(SOURCE_PCI, 33, 0, RID_A), BAD_COUNT),
        (Req::alloc(SOURCE_PCI, 64, 0, RID_A), BAD_COUNT),
        (Req::alloc(SOURCE_PCI, 0xffff, 0, RID_A), BAD_COUNT),
        (Req::alloc(SOURCE_IOAPIC, 0, id, 0), BAD_COUNT),
        // Reserved bytes and fields ALLOC does not use.
        (Req::alloc(SOURCE_PCI, 1, 0, RID_A).u8(0x05, 1), BAD_OP),
        (Req::alloc(SOURCE_PCI, 1, 0, RID_A).u16(0x0e, 1), BAD_OP),
        (
            Req::alloc(SOURCE_PCI, 1, 0, RID_A).u32(req::DEST, 1),
            BAD_OP,
        ),
        (
            Req::alloc(SOURCE_PCI, 1, 0, RID_A).u8(req::VECTOR, 0x30),
            BAD_OP,
        ),
        (Req::alloc(SOURCE_PCI, 1, 0, RID_A).u8(0x17, 1), BAD_OP),
        (Req::alloc(SOURCE_PCI, 1, 0, RID_A).u8(0x24, 1), BAD_OP),
        (Req::alloc(SOURCE_PCI, 1, 0, RID_A).u8(0x3f, 0x80), BAD_OP),
    ];
    for (i, (r, want)) in cases.iter().enumerate() {
        let reply = g.submit(*r);
        assert_eq!(reply.status(), *want, "case {i}");
        // A failed request writes back only the status.
        let mut expected = r.u16(req::STATUS, *want).0;
        expected[2..4].copy_from_slice(&want.to_le_bytes());
        assert_eq!(reply.0, expected, "case {i}: only the status is written");
    }
    assert_eq!(g.pv.stats().live_handles, 0);
    assert!(g.take().is_empty(), "failed requests invalidate nothing");
    // The pre-set handle and message fields are outputs: overwritten, not checked.
    let reply = g.submit(
        Req::alloc(SOURCE_PCI, 1, 0, RID_B)
            .u16(req::HANDLE, 0x1234)
            .u32(req::ADDRESS_LO, 0xdead_beef)
            .u32(req::DATA, 7),
    );
    assert_eq!(reply.status(), OK);
    assert_eq!(reply.handle(), 0);
    assert_eq!(
        reply.msg(),
        MsiMessage {
            address: 0xfee0_0018,
            data: 0
        }
    );
    let s = g.pv.stats();
    assert_eq!(s.statuses.bad_source, 11);
    assert_eq!(s.statuses.bad_count, 6);
    assert_eq!(s.statuses.bad_op, 7);
    assert_eq!(s.statuses.ok, 1);
    assert_eq!(s.requests.alloc, cases.len() as u64 + 1);
}

#[test]
fn set_statuses() {
    let mut g = Guest::new(64);
    let (h, _) = g.alloc(pci(RID_A), 1);
    let cases: &[(Req, u16)] = &[
        (Req::set(h + 1, 0x30, 0), BAD_HANDLE),
        (Req::set(64, 0x30, 0), BAD_HANDLE),
        (Req::set(0xffff, 0x30, 0), BAD_HANDLE),
        (Req::set(h, 0x0f, 0), BAD_VECTOR),
        (Req::set(h, 0, 0), BAD_VECTOR),
        (Req::set(h, 0x30, 2), BAD_DEST),
        (Req::set(h, 0x30, 0xffff_ffff), BAD_DEST),
        // Handle checked before vector, vector before dest.
        (Req::set(h + 1, 0, 2), BAD_HANDLE),
        (Req::set(h, 0, 2), BAD_VECTOR),
        // Unused and reserved fields.
        (Req::set(h, 0x30, 0).u8(req::SOURCE_TYPE, 2), BAD_OP),
        (Req::set(h, 0x30, 0).u16(req::COUNT, 1), BAD_OP),
        (Req::set(h, 0x30, 0).u16(req::SOURCE_HI, 1), BAD_OP),
        (Req::set(h, 0x30, 0).u16(req::SOURCE_LO, 1), BAD_OP),
        (Req::set(h, 0x30, 0).u8(0x15, 1), BAD_OP),
        (
            Req::set(h, 0x30, 0).u32(req::ADDRESS_LO, 0xfee0_0000),
            BAD_OP,
        ),
        (Req::set(h, 0x30, 0).u32(req::ADDRESS_HI, 1), BAD_OP),
        (Req::set(h, 0x30, 0).u32(req::DATA, 1), BAD_OP),
        (Req::set(h, 0x30, 0).u8(0x30, 1), BAD_OP),
    ];
    for (i, (r, want)) in cases.iter().enumerate() {
        assert_eq!(g.status(*r), *want, "case {i}");
    }
    assert!(g.take().is_empty());
    for (vector, dest) in [(0x10, 0), (0xff, 1), (0x41, 0x1_2345)] {
        assert_eq!(g.status(Req::set(h, vector, dest)), OK);
        assert_eq!(g.take(), vec![indices(0..1)]);
    }
    assert_eq!(g.pv.stats().requests.set, cases.len() as u64 + 3);
    assert_eq!(g.pv.stats().statuses.bad_dest, 2);
    assert_eq!(g.pv.stats().statuses.bad_vector, 3);
}

#[test]
fn clear_statuses() {
    let mut g = Guest::new(64);
    g.alloc(pci(RID_A), 2);
    assert_eq!(g.status(Req::clear(2)), BAD_HANDLE);
    assert_eq!(g.status(Req::clear(64)), BAD_HANDLE);
    assert_eq!(g.status(Req::clear(1).u8(req::VECTOR, 0x30)), BAD_OP);
    assert_eq!(g.status(Req::clear(1).u32(req::DEST, 1)), BAD_OP);
    assert_eq!(g.status(Req::clear(1).u16(req::COUNT, 1)), BAD_OP);
    assert!(g.take().is_empty());
    // The second handle of a block can be cleared on its own.
    assert_eq!(g.status(Req::clear(1)), OK);
    assert_eq!(g.take(), vec![indices(1..2)]);
    assert_eq!(g.pv.stats().requests.clear, 6);
}

#[test]
fn free_statuses() {
    let mut g = Guest::new(64);
    let (h, _) = g.alloc(pci(RID_A), 8);
    assert_eq!(h, 0);
    let cases: &[(Req, u16)] = &[
        (Req::free(8, 1), BAD_HANDLE),
        (Req::free(64, 1), BAD_HANDLE),
        (Req::free(1, 8), BAD_HANDLE),
        (Req::free(4, 4), BAD_HANDLE),
        (Req::free(0, 4), BAD_HANDLE),
        (Req::free(0, 16), BAD_HANDLE),
        (Req::free(0, 0), BAD_COUNT),
        (Req::free(0, 6), BAD_COUNT),
        (Req::free(0, 64), BAD_COUNT),
        (Req::free(0, 8).u8(req::SOURCE_TYPE, 2), BAD_OP),
        (Req::free(0, 8).u8(req::VECTOR, 0x30), BAD_OP),
        (Req::free(0, 8).u8(0x0e, 1), BAD_OP),
    ];
    for (i, (r, want)) in cases.iter().enumerate() {
        assert_eq!(g.status(*r), *want, "case {i}");
    }
    assert!(g.take().is_empty());
    assert_eq!(g.pv.stats().live_handles, 8);
    assert_eq!(g.status(Req::free(0, 8)), OK);
    assert_eq!(g.take(), vec![indices(0..8)]);
    assert_eq!(g.pv.stats().live_handles, 0);
    assert_eq!(g.status(Req::free(0, 8)), BAD_HANDLE, "already free");
}

#[test]
fn unknown_ops_are_bad_op() {
    let mut g = Guest::new(64);
    for op in [0u16, 5, 0x100, 0xffff] {
        assert_eq!(g.status(Req::op(op)), BAD_OP, "op {op}");
    }
    let s = g.pv.stats();
    assert_eq!(s.requests.bad_op, 4);
    assert_eq!(s.statuses.bad_op, 4);
}

#[test]
fn allocator_fills_to_max_handles_then_no_space() {
    let mut g = Guest::new(40);
    for i in 0..40u16 {
        assert_eq!(g.alloc(pin((i % 24) as u8), 1).0, i);
    }
    assert_eq!(g.pv.stats().live_handles, 40);
    assert_eq!(
        g.submit(Req::alloc(SOURCE_PCI, 1, 0, RID_A)).status(),
        NO_SPACE
    );
    assert_eq!(g.pv.stats().statuses.no_space, 1);
    // Free one, get exactly that one back.
    assert_eq!(g.status(Req::free(17, 1)), OK);
    assert_eq!(g.alloc(pci(RID_A), 1).0, 17);
}

#[test]
fn allocator_aligns_blocks_and_reuses_freed_ones() {
    let mut g = Guest::new(100);
    assert_eq!(g.alloc(pci(RID_A), 1).0, 0);
    // A 32-block skips to 32; the next one to 64; a third does not fit (96 + 32 > 100).
    assert_eq!(g.alloc(pci(RID_A), 32).0, 32);
    assert_eq!(g.alloc(pci(RID_B), 32).0, 64);
    assert_eq!(
        g.submit(Req::alloc(SOURCE_PCI, 32, 0, RID_A)).status(),
        NO_SPACE
    );
    // Small blocks still fit below and above.
    assert_eq!(g.alloc(pci(RID_A), 2).0, 2);
    assert_eq!(g.alloc(pci(RID_A), 16).0, 16);
    assert_eq!(g.alloc(pci(RID_A), 4).0, 4);
    assert_eq!(g.alloc(pci(RID_A), 1).0, 1);
    assert_eq!(g.alloc(pci(RID_A), 2).0, 8, "the first free aligned pair");
    // Freeing the first 32-block makes room for another 32-block there.
    assert_eq!(g.status(Req::free(32, 32)), OK);
    assert_eq!(g.alloc(pci(RID_B), 32).0, 32);
    assert_eq!(g.pv.stats().live_handles, 1 + 32 + 32 + 2 + 16 + 4 + 1 + 2);
    // A whole block is needed: freeing part of one is refused.
    assert_eq!(g.status(Req::free(32, 16)), BAD_HANDLE);
}

#[test]
fn zero_handles_means_no_space() {
    let mut g = Guest::new(0);
    assert_eq!(g.r32(REG_MAX_HANDLES), 0);
    assert_eq!(
        g.submit(Req::alloc(SOURCE_PCI, 1, 0, RID_A)).status(),
        NO_SPACE
    );
    assert_eq!(g.status(Req::set(0, 0x30, 0)), BAD_HANDLE);
}

#[test]
fn translate_checks_the_handle_and_its_source() {
    let mut g = Guest::new(64);
    let (h7, m7) = g.alloc(pin(7), 1);
    let (h8, m8) = g.alloc(pin(8), 1);
    let (ha, ma) = g.alloc(pci(RID_A), 1);
    let (_, mb) = g.alloc(pci(RID_B), 1);
    let compat_msg = compat(1, 0x55);

    // Disabled: remappable blocked (reason 5), compatibility format passes.
    assert_eq!(
        g.pv.translate(m7, pin(7)),
        blocked(PvBlockReason::Disabled, Some(u32::from(h7)))
    );
    assert_eq!(g.pv.translate(compat_msg, pin(7)), Ok(compat_msg));
    g.enable();
    // Allocated, not present.
    assert_eq!(
        g.pv.translate(m7, pin(7)),
        blocked(PvBlockReason::NotPresent, Some(u32::from(h7)))
    );
    for (h, v, d) in [(h7, 0x31, 0), (h8, 0x32, 1), (ha, 0x33, 0x1_2345)] {
        assert_eq!(g.status(Req::set(h, v, d)), OK);
    }
    assert_eq!(g.pv.translate(m7, pin(7)), Ok(compat(0, 0x31)));
    assert_eq!(g.pv.translate(m8, pin(8)), Ok(compat(1, 0x32)));
    // x2APIC destination above 255: bits 31:8 in address_hi (KVM layout).
    let out = g.pv.translate(ma, pci(RID_A)).unwrap();
    assert_eq!(out.address, 0x1_2300 << 32 | 0xfee4_5000);
    assert_eq!(out.data, 0x33, "Fixed, edge");
    // Pin 8 sending pin 7's handle; the same pin on another IOAPIC; a PCI function.
    assert_eq!(
        g.pv.translate(m7, pin(8)),
        blocked(PvBlockReason::NotOwner, Some(u32::from(h7)))
    );
    let other_ioapic = PvSource::IoapicPin {
        ioapic_id: IOAPIC_ID + 1,
        pin: 7,
    };
    assert_eq!(
        g.pv.translate(m7, other_ioapic).unwrap_err().reason,
        PvBlockReason::NotOwner
    );
    assert_eq!(
        g.pv.translate(m7, pci(RID_A)).unwrap_err().reason,
        PvBlockReason::NotOwner
    );
    // RID B sending RID A's handle; A on another segment.
    assert_eq!(
        g.pv.translate(ma, pci(RID_B)),
        blocked(PvBlockReason::NotOwner, Some(u32::from(ha)))
    );
    let other_segment = PvSource::Pci {
        segment: 1,
        requester_id: RID_A,
    };
    assert_eq!(
        g.pv.translate(ma, other_segment).unwrap_err().reason,
        PvBlockReason::NotOwner
    );
    // RID B's own handle, not SET.
    assert_eq!(
        g.pv.translate(mb, pci(RID_B)).unwrap_err().reason,
        PvBlockReason::NotPresent
    );
    // Unallocated handle, beyond MAX_HANDLES, beyond 16 bits.
    let named = |index: u32| MsiMessage {
        address: 0xfee0_0010 | u64::from(index & 0x7fff) << 5 | u64::from(index >> 15 & 1) << 2,
        data: 0,
    };
    assert_eq!(
        g.pv.translate(named(10), pin(7)),
        blocked(PvBlockReason::NotAllocated, Some(10))
    );
    assert_eq!(
        g.pv.translate(named(64), pin(7)),
        blocked(PvBlockReason::NotAllocated, Some(64))
    );
    assert_eq!(
        g.pv.translate(named(0xffff), pin(7)),
        blocked(PvBlockReason::NotAllocated, Some(0xffff))
    );
    let huge = MsiMessage {
        address: named(0xffff).address | 1 << 3,
        data: 0xffff,
    };
    assert_eq!(
        g.pv.translate(huge, pci(RID_A)),
        blocked(PvBlockReason::NotAllocated, Some(0x1_fffe))
    );
    // CLEAR makes it not present again.
    assert_eq!(g.status(Req::clear(h7)), OK);
    assert_eq!(
        g.pv.translate(m7, pin(7)).unwrap_err().reason,
        PvBlockReason::NotPresent
    );
    // FREE makes it unallocated.
    assert_eq!(g.status(Req::free(h8, 1)), OK);
    assert_eq!(
        g.pv.translate(m8, pin(8)).unwrap_err().reason,
        PvBlockReason::NotAllocated
    );
    // Compatibility format: passes until BLOCK_COMPAT.
    assert_eq!(g.pv.translate(compat_msg, pci(RID_A)), Ok(compat_msg));
    g.w32(REG_CTRL, CTRL_ENABLE | CTRL_BLOCK_COMPAT);
    assert_eq!(
        g.pv.translate(compat_msg, pci(RID_A)),
        blocked(PvBlockReason::CompatibilityBlocked, None)
    );
    assert_eq!(g.pv.translate(ma, pci(RID_A)).unwrap().data, 0x33);
    // BLOCK_COMPAT without ENABLE: both formats blocked.
    g.w32(REG_CTRL, CTRL_BLOCK_COMPAT);
    assert_eq!(
        g.pv.translate(compat_msg, pin(1)).unwrap_err().reason,
        PvBlockReason::CompatibilityBlocked
    );
    assert_eq!(
        g.pv.translate(ma, pci(RID_A)).unwrap_err().reason,
        PvBlockReason::Disabled
    );
    let s = g.pv.stats();
    assert_eq!(s.translations, 4);
    assert_eq!(s.passthrough, 2);
}

#[test]
fn multi_msi_subhandles_select_handles_of_the_block() {
    let mut g = Guest::new(64);
    g.alloc(pci(RID_B), 1);
    let (h, msg) = g.alloc(pci(RID_A), 8);
    assert_eq!(h, 8);
    g.enable();
    for i in 0..8u16 {
        assert_eq!(g.status(Req::set(h + i, 0x40 + i as u8, 1)), OK);
        assert_eq!(
            g.take(),
            vec![indices(u32::from(h + i)..u32::from(h + i) + 1)]
        );
    }
    for i in 0..8u32 {
        let vector_msg = MsiMessage {
            data: msg.data + i,
            ..msg
        };
        assert_eq!(
            g.pv.translate(vector_msg, pci(RID_A)),
            Ok(compat(1, 0x40 + i as u8))
        );
    }
    // A sub-handle past the block lands on a handle that is not allocated.
    let past = MsiMessage { data: 8, ..msg };
    assert_eq!(
        g.pv.translate(past, pci(RID_A)).unwrap_err().reason,
        PvBlockReason::NotAllocated
    );
    // Handle 0 is RID B's: RID A cannot use it.
    let back = MsiMessage {
        address: 0xfee0_0018,
        data: 0,
    };
    assert_eq!(
        g.pv.translate(back, pci(RID_A)).unwrap_err().reason,
        PvBlockReason::NotOwner
    );
    assert_eq!(g.status(Req::free(h, 8)), OK);
    assert_eq!(g.take(), vec![indices(8..16)]);
}

#[test]
fn reset_frees_everything_and_clears_faults() {
    let mut g = Guest::new(64);
    let (h, msg) = g.alloc(pci(RID_A), 4);
    g.w32(REG_CTRL, CTRL_ENABLE | CTRL_BLOCK_COMPAT);
    assert_eq!(g.status(Req::set(h, 0x30, 0)), OK);
    let b =
        g.pv.translate(MsiMessage { data: 1, ..msg }, pci(RID_A))
            .unwrap_err();
    g.pv.request_blocked(&b, pci(RID_A), 3);
    g.take();
    assert_eq!(g.r32(REG_FAULT_COUNT), 3);
    // RESET wins over ENABLE/BLOCK_COMPAT written together with it.
    g.w32(REG_CTRL, CTRL_RESET | CTRL_ENABLE | CTRL_BLOCK_COMPAT);
    assert_eq!(g.take(), vec![RouteInvalidation::All]);
    assert_eq!(g.r32(REG_CTRL), 0);
    assert_eq!(g.r32(REG_STATUS), 0);
    assert_eq!(g.r32(REG_FAULT_COUNT), 0);
    assert_eq!(g.r64(REG_LAST_FAULT), 0);
    let s = g.pv.stats();
    assert_eq!(s.live_handles, 0);
    assert_eq!(s.resets, 1);
    assert_eq!(
        g.pv.translate(msg, pci(RID_A)).unwrap_err().reason,
        PvBlockReason::Disabled
    );
    g.enable();
    assert_eq!(
        g.pv.translate(msg, pci(RID_A)).unwrap_err().reason,
        PvBlockReason::NotAllocated
    );
    assert_eq!(g.status(Req::set(h, 0x30, 0)), BAD_HANDLE);
    // Everything can be allocated again; a reset of a reset unit still invalidates.
    assert_eq!(g.alloc(pci(RID_B), 32).0, 0);
    g.w32(REG_CTRL, CTRL_RESET);
    g.w32(REG_CTRL, CTRL_RESET);
    assert_eq!(
        g.take(),
        vec![RouteInvalidation::All, RouteInvalidation::All]
    );
    assert_eq!(g.pv.stats().live_handles, 0);
}

#[test]
fn bad_request_addresses_are_ignored_and_counted() {
    let mut g = Guest::new(64);
    // Misaligned: nothing executed, nothing written.
    for gpa in [BLOCK + 1, BLOCK + 8, BLOCK + 32, BLOCK + 63] {
        let block = Req::alloc(SOURCE_PCI, 1, 0, RID_A).u16(2, 0xffff).0;
        g.mem.write_slice(&block, GuestAddress(gpa)).unwrap();
        g.w64(REG_REQUEST, gpa);
        let mut out = [0u8; 64];
        g.mem.read_slice(&mut out, GuestAddress(gpa)).unwrap();
        assert_eq!(out, block, "{gpa:#x}");
    }
    // Not RAM: the hole, past the end, the top of the address space, and a block whose
    // last 32 bytes are past the end of a region.
    for gpa in [MEM_SIZE, ODD_REGION + ODD_REGION_SIZE + 0x1000, !63] {
        g.w64(REG_REQUEST, gpa);
    }
    let partial = ODD_REGION + 0x1000;
    let head = Req::alloc(SOURCE_PCI, 1, 0, RID_A).u16(2, 0xffff).0;
    g.mem
        .write_slice(&head[..32], GuestAddress(partial))
        .unwrap();
    g.w64(REG_REQUEST, partial);
    let mut out = [0u8; 32];
    g.mem.read_slice(&mut out, GuestAddress(partial)).unwrap();
    assert_eq!(out, head[..32], "nothing written back");
    let s = g.pv.stats();
    assert_eq!(s.bad_request_gpa, 8);
    assert_eq!(s.statuses.total(), 0);
    assert_eq!(s.live_handles, 0);
    assert!(g.take().is_empty());
    // The last whole block of the odd region works.
    assert_eq!(
        g.submit_at(ODD_REGION + 0xfc0, Req::alloc(SOURCE_PCI, 1, 0, RID_A))
            .status(),
        OK
    );
    assert_eq!(g.submit_at(0, Req::clear(0)).status(), OK);
}

#[test]
fn alloc_writes_back_status_handle_and_message_only() {
    let mut g = Guest::new(64);
    g.alloc(pin(0), 1);
    // Surround the block with canaries.
    g.mem
        .write_slice(&[0x5a; 64], GuestAddress(BLOCK - 64))
        .unwrap();
    g.mem
        .write_slice(&[0x5a; 64], GuestAddress(BLOCK + 64))
        .unwrap();
    let reply = g.submit(Req::alloc(SOURCE_IOAPIC, 1, IOAPIC_ID.into(), 5));
    let mut expected = Req::alloc(SOURCE_IOAPIC, 1, IOAPIC_ID.into(), 5).0;
    expected[0x0c..0x0e].copy_from_slice(&1u16.to_le_bytes());
    expected[0x18..0x1c].copy_from_slice(&0xfee0_0030u32.to_le_bytes());
    expected[0x20..0x24].copy_from_slice(&5u32.to_le_bytes());
    assert_eq!(reply.0, expected);
    let mut canary = [0u8; 64];
    for at in [BLOCK - 64, BLOCK + 64] {
        g.mem.read_slice(&mut canary, GuestAddress(at)).unwrap();
        assert_eq!(canary, [0x5a; 64]);
    }
}

#[test]
fn sink_gets_the_changed_ranges_during_the_write() {
    /// A sink that re-translates the invalidated route, as the VMM does.
    struct Retranslate {
        msg: MsiMessage,
        seen: Vec<(RouteInvalidation, Result<MsiMessage, PvBlocked>)>,
    }
    impl PvIrqSink for Retranslate {
        fn invalidate(&mut self, pv: &mut PvIrq, inv: RouteInvalidation) {
            let result = pv.translate(self.msg, pci(RID_A));
            self.seen.push((inv, result));
        }
    }
    let mut g = Guest::new(64);
    let (h, msg) = g.alloc(pci(RID_A), 2);
    let mut sink = Retranslate { msg, seen: vec![] };
    g.pv.write(REG_CTRL, &CTRL_ENABLE.to_le_bytes(), &mut sink);
    let block = Req::set(h, 0x77, 1).u16(2, 0xffff).0;
    g.mem.write_slice(&block, GuestAddress(BLOCK)).unwrap();
    g.pv.write(REG_REQUEST, &BLOCK.to_le_bytes(), &mut sink);
    assert_eq!(
        sink.seen,
        vec![
            (
                RouteInvalidation::All,
                blocked(PvBlockReason::NotPresent, Some(u32::from(h)))
            ),
            (indices(u32::from(h)..u32::from(h) + 1), Ok(compat(1, 0x77))),
        ]
    );
}

#[test]
fn fault_count_and_last_fault() {
    let mut g = Guest::new(64);
    let (h, msg) = g.alloc(pin(5), 1);
    let b = g.pv.translate(msg, pin(5)).unwrap_err();
    assert_eq!(b.reason, PvBlockReason::Disabled);
    g.pv.request_blocked(&b, pin(5), 0);
    assert_eq!(g.r32(REG_FAULT_COUNT), 0, "count 0 records nothing");
    assert_eq!(g.r32(REG_STATUS), 0);
    g.pv.request_blocked(&b, pin(5), 2);
    assert_eq!(g.r32(REG_FAULT_COUNT), 2);
    assert_eq!(g.r32(REG_STATUS), STATUS_FAULT_VALID);
    let fault = g.r64(REG_LAST_FAULT);
    assert_eq!(fault, 1 << 63 | 5 << 32 | 5 << 16 | u64::from(h));
    // The newest fault wins; PCI sets bit 40.
    let (ha, ma) = g.alloc(pci(RID_B), 1);
    g.enable();
    let b = g.pv.translate(ma, pci(RID_A)).unwrap_err();
    assert_eq!(b.reason, PvBlockReason::NotOwner);
    g.pv.request_blocked(&b, pci(RID_A), 1);
    assert_eq!(
        g.r64(REG_LAST_FAULT),
        1 << 63 | 1 << 40 | 2 << 32 | u64::from(RID_A) << 16 | u64::from(ha)
    );
    // W1C of bit 63 only: writing 0 or other bits changes nothing; 4-byte writes are ignored.
    g.w64(REG_LAST_FAULT, !(1 << 63));
    g.w32(REG_LAST_FAULT + 4, 0x8000_0000);
    assert_eq!(g.r32(REG_STATUS) & STATUS_FAULT_VALID, STATUS_FAULT_VALID);
    g.w64(REG_LAST_FAULT, 1 << 63);
    assert_eq!(g.r64(REG_LAST_FAULT) & 1 << 63, 0);
    assert_eq!(g.r32(REG_STATUS) & STATUS_FAULT_VALID, 0);
    assert_eq!(g.r32(REG_FAULT_COUNT), 3, "W1C does not clear the count");
    // Compatibility format: handle field 0; index beyond 16 bits is truncated.
    g.w32(REG_CTRL, CTRL_ENABLE | CTRL_BLOCK_COMPAT);
    let b = g.pv.translate(compat(0, 0x30), pin(3)).unwrap_err();
    g.pv.request_blocked(&b, pin(3), 1);
    assert_eq!(g.r64(REG_LAST_FAULT), 1 << 63 | 3 << 32 | 3 << 16);
    let wide = PvBlocked {
        reason: PvBlockReason::NotAllocated,
        index: Some(0x1_fffe),
    };
    g.pv.request_blocked(&wide, pci(0xffff), 1);
    assert_eq!(
        g.r64(REG_LAST_FAULT),
        1 << 63 | 1 << 40 | 4 << 32 | 0xffff << 16 | 0xfffe
    );
    // FAULT_COUNT saturates.
    g.pv.request_blocked(&wide, pci(RID_A), u64::MAX);
    assert_eq!(g.r32(REG_FAULT_COUNT), u32::MAX);
    g.pv.request_blocked(&wide, pci(RID_A), 1);
    assert_eq!(g.r32(REG_FAULT_COUNT), u32::MAX);
    let s = g.pv.stats().blocked;
    assert_eq!(s.disabled, 2);
    assert_eq!(s.not_owner, 1);
    assert_eq!(s.compatibility_blocked, 1);
    assert_eq!(s.not_allocated, u64::MAX);
    assert_eq!(s.total(), u64::MAX);
}

#[test]
fn block_reason_codes_are_the_spec_numbers() {
    assert_eq!(PvBlockReason::NotPresent.code(), 1);
    assert_eq!(PvBlockReason::NotOwner.code(), 2);
    assert_eq!(PvBlockReason::CompatibilityBlocked.code(), 3);
    assert_eq!(PvBlockReason::NotAllocated.code(), 4);
    assert_eq!(PvBlockReason::Disabled.code(), 5);
}

#[test]
fn stats_serialize() {
    fn assert_serialize<T: serde::Serialize + Copy>() {}
    assert_serialize::<PvIrqStats>();
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PvIrq>();
}

#[test]
fn ioapic_rte_built_from_the_alloc_message_translates() {
    let mut g = Guest::new(64);
    g.alloc(pci(RID_A), 1);
    let (h, msg) = g.alloc(pin(4), 1);
    g.enable();
    assert_eq!(g.status(Req::set(h, 0x61, 0x1_2345)), OK);
    // Linux's IOAPIC driver with IR: format bit, index from the address, the data byte as
    // vector, here with level trigger (which the remappable RTE carries but the route drops).
    let index = remap_index(msg).unwrap();
    let rte = 1u64 << 48
        | u64::from(index & 0x7fff) << 49
        | u64::from(index >> 15) << 11
        | 1 << 15
        | u64::from(msg.data & 0xff);
    let out = g.pv.translate(rte_to_msi(rte), pin(4)).unwrap();
    assert_eq!(out, compat(0x1_2345, 0x61));
    assert_eq!(
        g.pv.translate(rte_to_msi(rte), pin(5)).unwrap_err().reason,
        PvBlockReason::NotOwner
    );
}

#[test]
fn vmm_reset_frees_everything_and_invalidates_all() {
    let mut g = Guest::new(64);
    g.alloc(pin(1), 1);
    g.enable();
    let mut sink = RecordingPvSink::default();
    g.pv.reset(&mut sink);
    assert_eq!(sink.invalidations, vec![RouteInvalidation::All]);
    assert_eq!(g.pv.stats().live_handles, 0);
    assert!(!g.pv.enabled());
}
