// SPDX-License-Identifier: Apache-2.0

//! Device-level tests: real descriptor chains through virtio-queue's mock driver, and endpoint
//! translation through `IommuMemory`.

use std::mem::size_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Le32, Le64, Permissions,
};

use super::device::*;
use super::protocol::*;
use super::*;
use crate::interrupt::CountingLine;
use crate::virtio::{device_memory, DeviceMemory, VirtioDevice, VirtioInterrupt};

const MEM_SIZE: usize = 0x100_0000;
const REQ_QUEUE: GuestAddress = GuestAddress(0);
const EVT_QUEUE: GuestAddress = GuestAddress(0x4_0000);
const QUEUE_LEN: u16 = 64;
/// Where the used rings really are, from each queue's base. virtio-queue 0.18's mock places
/// the used ring right after `len` *bytes* of the available ring instead of `len` entries
/// (`SplitQueueRing::end`), so with more than a few chains in flight its used ring overwrites
/// available-ring entries. The harness moves the device's used ring past the mock's rings
/// and reads it directly.
const USED_RING_OFFSET: u64 = 0x1000;
/// Device-readable request buffer.
const REQ_BUF: u64 = 0x10_0000;
/// Device-writable reply buffer.
const RESP_BUF: u64 = 0x20_0000;
/// Event buffers, 0x100 apart.
const EVT_BUF: u64 = 0x30_0000;
/// Endpoint data lives in physical pages from here.
const DATA: u64 = 0x80_0000;
/// Outside guest memory.
const NOWHERE: u64 = 0x10_0000_0000;

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// One descriptor: guest address, length, device-writable.
type Desc = (u64, u32, bool);

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    dev: VirtioIommu,
    line: Arc<CountingLine>,
    /// Driver side of the request and event queues. Created once: creating a mock
    /// initialises its rings.
    queues: [MockSplitQueue<'a, GuestMemoryMmap>; 2],
    /// Used-ring entries consumed so far, per queue.
    used: [u16; 2],
}

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

fn request<T: ByteValued>(type_: u8, body: T) -> Vec<u8> {
    let mut v = VirtioIommuReqHead {
        type_,
        reserved: [0; 3],
    }
    .as_slice()
    .to_vec();
    v.extend_from_slice(body.as_slice());
    v
}

fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    request(
        VIRTIO_IOMMU_T_ATTACH,
        VirtioIommuReqAttach {
            domain: domain.into(),
            endpoint: endpoint.into(),
            flags: flags.into(),
            reserved: [0; 4],
        },
    )
}

fn detach_req(domain: u32, endpoint: u32) -> Vec<u8> {
    request(
        VIRTIO_IOMMU_T_DETACH,
        VirtioIommuReqDetach {
            domain: domain.into(),
            endpoint: endpoint.into(),
            reserved: [0; 8],
        },
    )
}

fn map_req(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    request(
        VIRTIO_IOMMU_T_MAP,
        VirtioIommuReqMap {
            domain: domain.into(),
            virt_start: start.into(),
            virt_end: end.into(),
            phys_start: phys.into(),
            flags: flags.into(),
        },
    )
}

fn unmap_req(domain: u32, start: u64, end: u64) -> Vec<u8> {
    request(
        VIRTIO_IOMMU_T_UNMAP,
        VirtioIommuReqUnmap {
            domain: domain.into(),
            virt_start: start.into(),
            virt_end: end.into(),
            reserved: [0; 4],
        },
    )
}

fn probe_req(endpoint: u32) -> Vec<u8> {
    request(
        VIRTIO_IOMMU_T_PROBE,
        VirtioIommuReqProbe {
            endpoint: endpoint.into(),
            reserved: [0; 64],
        },
    )
}

/// Raw descriptors for one chain, linked with NEXT, starting at table index `first`.
fn chain(descs: &[Desc], first: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            let last = i + 1 == descs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect()
}

impl<'a> Harness<'a> {
    /// Endpoints 1 and 2 registered; every offered feature negotiated; activated.
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with_features(mem, AVAIL_FEATURES)
    }

    fn with_features(mem: &'a GuestMemoryMmap, features: u64) -> Self {
        let mut dev = VirtioIommu::new().expect("device");
        dev.endpoint(1);
        dev.endpoint(2);
        dev.ack_features(features);
        let line = Arc::new(CountingLine::new());
        let queues = [
            MockSplitQueue::create(mem, REQ_QUEUE, QUEUE_LEN),
            MockSplitQueue::create(mem, EVT_QUEUE, QUEUE_LEN),
        ];
        dev.activate(
            device_memory(mem.clone(), None),
            queues
                .iter()
                .map(|q| {
                    let mut queue: Queue = q.create_queue().expect("queue");
                    queue
                        .try_set_used_ring_address(q.start().unchecked_add(USED_RING_OFFSET))
                        .expect("used ring address");
                    queue
                })
                .collect(),
            Arc::new(VirtioInterrupt::new(line.clone())),
        )
        .expect("activate");
        Harness {
            mem,
            dev,
            line,
            queues,
            used: [0; 2],
        }
    }

    fn mock(&self, queue: usize) -> &MockSplitQueue<'a, GuestMemoryMmap> {
        &self.queues[queue]
    }

    /// Pops the next used element of `queue`: (head, len).
    fn next_used(&mut self, queue: usize) -> Option<(u32, u32)> {
        let used = self.mock(queue).start().unchecked_add(USED_RING_OFFSET);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        if idx == self.used[queue] {
            return None;
        }
        let slot = u64::from(self.used[queue] % QUEUE_LEN);
        let elem = used.unchecked_add(4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).unwrap();
        let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        self.used[queue] = self.used[queue].wrapping_add(1);
        Some((id, len))
    }

    /// Submits one request chain and returns its used length.
    fn submit(&mut self, descs: &[Desc]) -> u32 {
        self.mock(0)
            .add_desc_chains(&chain(descs, 0), 0)
            .expect("add chain");
        self.dev.process_queue(REQUEST_QUEUE);
        let (head, len) = self.next_used(0).expect("request completed");
        assert_eq!(head, 0);
        assert!(self.next_used(0).is_none());
        len
    }

    /// Sends `req` (readable) with `writable` reply bytes, pre-filled with 0xaa; returns the
    /// used length and the reply buffer.
    fn send(&mut self, req: &[u8], writable: u32) -> (u32, Vec<u8>) {
        self.mem.write_slice(req, GuestAddress(REQ_BUF)).unwrap();
        let mut reply = vec![0xaa; writable as usize];
        self.mem
            .write_slice(&reply, GuestAddress(RESP_BUF))
            .unwrap();
        let len = self.submit(&[
            (REQ_BUF, req.len() as u32, false),
            (RESP_BUF, writable, true),
        ]);
        self.mem
            .read_slice(&mut reply, GuestAddress(RESP_BUF))
            .unwrap();
        (len, reply)
    }

    /// Sends a request with a 4-byte tail; checks the used length and the tail's reserved
    /// bytes, returns the status.
    fn status(&mut self, req: &[u8]) -> u8 {
        let (len, reply) = self.send(req, 4);
        assert_eq!(len, 4, "used length of a well-formed reply");
        assert_eq!(&reply[1..], &[0, 0, 0], "tail reserved bytes");
        reply[0]
    }

    fn ep_mem(&self, id: u32) -> DeviceMemory {
        device_memory(self.mem.clone(), Some(self.dev.endpoint(id)))
    }

    /// Adds `n` 24-byte buffers to the event queue and processes it.
    fn give_event_buffers(&mut self, n: u16) {
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    EVT_BUF + u64::from(i) * 0x100,
                    24,
                    VRING_DESC_F_WRITE,
                    0,
                ))
            })
            .collect();
        self.mock(1)
            .add_desc_chains(&descs, 0)
            .expect("event buffers");
        self.dev.process_queue(EVENT_QUEUE);
    }

    fn write_bypass(&mut self, value: u8) {
        self.dev
            .write_config(VIRTIO_IOMMU_CONFIG_BYPASS_OFFSET as u64, &[value]);
    }
}

fn fault_of(endpoint: u32, reason: u8, flags: u32, address: u64) -> VirtioIommuFault {
    VirtioIommuFault {
        reason,
        reserved: [0; 3],
        flags: Le32::from(flags),
        endpoint: Le32::from(endpoint),
        reserved1: Le32::from(0),
        address: Le64::from(address),
    }
}

// ---- Device identity, features, configuration ----

#[test]
fn device_offers_iommu_type_queues_and_features() {
    let dev = VirtioIommu::new().unwrap();
    assert_eq!(dev.device_type(), 23);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let f = dev.features();
    for bit in [32, 0, 1, 2, 4, 6] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << 33), 0, "no ACCESS_PLATFORM for the IOMMU itself");
    assert_eq!(
        f & (1 << VIRTIO_IOMMU_F_BYPASS),
        0,
        "legacy BYPASS not offered"
    );
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_MMIO), 0);
}

#[test]
fn config_space_has_spec_layout() {
    let dev = VirtioIommu::new().unwrap();
    let mut c = [0xffu8; 40];
    dev.read_config(0, &mut c);
    let u64_at = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(u64_at(0), 0x1000 | 0x20_0000 | 0x4000_0000);
    assert_eq!(u64_at(8), 0);
    assert_eq!(u64_at(16), (1 << 48) - 1);
    assert_eq!(u32_at(24), 0);
    assert_eq!(u32_at(28), 0xffff);
    assert_eq!(u32_at(32), 512);
    assert_eq!(c[36], 1, "bypass starts at 1");
    assert_eq!(&c[37..], &[0, 0, 0]);
    // Partial and out-of-range reads.
    let mut b = [0xffu8; 4];
    dev.read_config(36, &mut b);
    assert_eq!(b, [1, 0, 0, 0]);
    dev.read_config(38, &mut b);
    assert_eq!(b, [0; 4]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn config_only_bypass_is_writable_and_only_with_bypass_config() {
    let mem = guest();
    let mut h = Harness::with_features(&mem, AVAIL_FEATURES & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    h.write_bypass(0);
    assert_eq!(h.dev.config().bypass, 1, "ignored without BYPASS_CONFIG");

    let mem = guest();

    let mut h = Harness::new(&mem);
    h.dev.write_config(0, &[0; 36]);
    let mut c = [0u8; 8];
    h.dev.read_config(0, &mut c);
    assert_eq!(
        u64::from_le_bytes(c),
        PAGE_SIZE_MASK,
        "read-only fields keep their value"
    );
    h.write_bypass(2);
    assert_eq!(h.dev.config().bypass, 1, "values other than 0/1 ignored");
    h.dev.write_config(36, &[0, 0xff, 0xff, 0xff]);
    assert_eq!(h.dev.config().bypass, 0);
    h.write_bypass(1);
    assert_eq!(h.dev.config().bypass, 1);
}

// ---- Requests ----

#[test]
fn attach_succeeds_and_interrupts() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let before = h.line.triggers();
    assert_eq!(h.status(&attach_req(1, 1, 0)), VIRTIO_IOMMU_S_OK);
    assert!(h.line.triggers() > before);
    assert_eq!(h.dev.stats().domains, 1);
}

#[test]
fn attach_unknown_endpoint_is_noent() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    assert_eq!(h.status(&attach_req(1, 99, 0)), VIRTIO_IOMMU_S_NOENT);
}

#[test]
fn attach_domain_outside_range_is_range() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    assert_eq!(h.status(&attach_req(0x1_0000, 1, 0)), VIRTIO_IOMMU_S_RANGE);
}

#[test]
fn attach_with_reserved_or_unknown_flags_is_inval() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let mut req = attach_req(1, 1, 0);
    req[4 + 12] = 1; // reserved[0]
    assert_eq!(h.status(&req), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(h.status(&attach_req(1, 1, 0x10)), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(h.dev.stats().domains, 0);
}

#[test]
fn detach_from_wrong_domain_is_inval_and_unknown_endpoint_noent() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    assert_eq!(h.status(&attach_req(1, 1, 0)), VIRTIO_IOMMU_S_OK);
    assert_eq!(h.status(&detach_req(2, 1)), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(h.status(&detach_req(1, 99)), VIRTIO_IOMMU_S_NOENT);
    assert_eq!(h.status(&detach_req(1, 1)), VIRTIO_IOMMU_S_OK);
    assert_eq!(h.dev.stats().domains, 0);
}

#[test]
fn map_statuses() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    assert_eq!(
        h.status(&map_req(1, 0x1000, 0x1fff, DATA, RW)),
        VIRTIO_IOMMU_S_NOENT,
        "no such domain"
    );
    h.status(&attach_req(1, 1, 0));
    assert_eq!(
        h.status(&map_req(1, 0x1000, 0x2fff, DATA, RW)),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(
        h.status(&map_req(1, 0x2000, 0x3fff, DATA, RW)),
        VIRTIO_IOMMU_S_INVAL,
        "overlap"
    );
    assert_eq!(
        h.status(&map_req(1, 0x4800, 0x57ff, DATA, RW)),
        VIRTIO_IOMMU_S_RANGE,
        "unaligned (spec: RANGE)"
    );
    assert_eq!(
        h.status(&map_req(1, 0x4000, 0x4fff, DATA, 0)),
        VIRTIO_IOMMU_S_INVAL,
        "no permission flag"
    );
    assert_eq!(
        h.status(&map_req(1, 1 << 48, (1 << 48) + 0xfff, DATA, RW)),
        VIRTIO_IOMMU_S_RANGE,
        "beyond input range"
    );
    assert_eq!(h.dev.stats().mappings, 1);
}

#[test]
fn map_and_unmap_need_map_unmap_feature() {
    let mem = guest();
    let mut h = Harness::with_features(&mem, AVAIL_FEATURES & !(1 << VIRTIO_IOMMU_F_MAP_UNMAP));
    h.status(&attach_req(1, 1, 0));
    assert_eq!(
        h.status(&map_req(1, 0, 0xfff, DATA, RW)),
        VIRTIO_IOMMU_S_UNSUPP
    );
    assert_eq!(h.status(&unmap_req(1, 0, 0xfff)), VIRTIO_IOMMU_S_UNSUPP);
}

#[test]
fn unmap_partial_range_is_range_and_removes_nothing() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x0, 0x9fff, DATA, RW));
    assert_eq!(h.status(&unmap_req(1, 0x0, 0x4fff)), VIRTIO_IOMMU_S_RANGE);
    assert_eq!(h.dev.stats().mappings, 1);
}

#[test]
fn unmap_empty_range_is_ok() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    assert_eq!(h.status(&unmap_req(1, 0x0, 0x4fff)), VIRTIO_IOMMU_S_OK);
}

#[test]
fn unmap_removes_several_whole_mappings() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x0000, 0x4fff, DATA, RW));
    h.status(&map_req(1, 0x5000, 0x9fff, DATA, RW));
    h.status(&map_req(1, 0xf000, 0xffff, DATA, RW));
    h.status(&map_req(1, 0x20000, 0x20fff, DATA, RW));
    assert_eq!(h.dev.stats().mappings, 4);
    assert_eq!(h.status(&unmap_req(1, 0x0, 0x1ffff)), VIRTIO_IOMMU_S_OK);
    assert_eq!(h.dev.stats().mappings, 1);
}

#[test]
fn unmap_with_reserved_bytes_is_inval_and_keeps_mappings() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x0, 0xfff, DATA, RW));
    let mut req = unmap_req(1, 0, 0xfff);
    req[4 + 20] = 1;
    assert_eq!(h.status(&req), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(h.dev.stats().mappings, 1);
}

#[test]
fn probe_reports_msi_window_then_zeros() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let (len, reply) = h.send(&probe_req(1), PROBE_SIZE + 4);
    assert_eq!(len, PROBE_SIZE + 4);
    let mut expected = [0u8; 24];
    expected[0..2].copy_from_slice(&1u16.to_le_bytes()); // type RESV_MEM
    expected[2..4].copy_from_slice(&20u16.to_le_bytes()); // length after the header
    expected[4] = 1; // subtype MSI
    expected[8..16].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
    expected[16..24].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
    assert_eq!(&reply[..24], &expected[..]);
    assert!(
        reply[24..PROBE_SIZE as usize].iter().all(|&b| b == 0),
        "rest of the properties is NONE"
    );
    assert_eq!(&reply[PROBE_SIZE as usize..], &[VIRTIO_IOMMU_S_OK, 0, 0, 0]);
}

#[test]
fn probe_with_small_buffer_is_inval_without_properties() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let (len, reply) = h.send(&probe_req(1), 100);
    assert_eq!(len, 100);
    assert!(reply[..96].iter().all(|&b| b == 0), "no property written");
    assert_eq!(&reply[96..], &[VIRTIO_IOMMU_S_INVAL, 0, 0, 0]);
}

#[test]
fn probe_with_large_buffer_is_inval_with_tail_after_probe_size() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let (len, reply) = h.send(&probe_req(1), PROBE_SIZE + 4 + 64);
    assert_eq!(len, PROBE_SIZE + 4);
    let tail = PROBE_SIZE as usize;
    assert_eq!(reply[tail], VIRTIO_IOMMU_S_INVAL);
    assert!(
        reply[tail + 4..].iter().all(|&b| b == 0xaa),
        "nothing past the tail"
    );
}

#[test]
fn probe_unknown_endpoint_is_noent() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let (len, reply) = h.send(&probe_req(7), PROBE_SIZE + 4);
    assert_eq!(len, PROBE_SIZE + 4);
    assert_eq!(reply[PROBE_SIZE as usize], VIRTIO_IOMMU_S_NOENT);
}

// ---- Malformed chains ----

#[test]
fn request_shorter_than_head_is_deverr() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    assert_eq!(h.status(&[VIRTIO_IOMMU_T_ATTACH, 0]), VIRTIO_IOMMU_S_DEVERR);
}

#[test]
fn truncated_body_is_inval() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let req = attach_req(1, 1, 0);
    assert_eq!(h.status(&req[..12]), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(h.dev.stats().domains, 0);
}

#[test]
fn oversized_request_is_inval() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let mut req = attach_req(1, 1, 0);
    req.extend_from_slice(&[0; 4]);
    assert_eq!(h.status(&req), VIRTIO_IOMMU_S_INVAL);
    assert_eq!(h.dev.stats().domains, 0);
}

#[test]
fn oversized_writable_part_gets_tail_at_layout_position() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let (len, reply) = h.send(&attach_req(1, 1, 0), 16);
    assert_eq!(len, 4);
    assert_eq!(&reply[..4], &[VIRTIO_IOMMU_S_OK, 0, 0, 0]);
    assert!(reply[4..].iter().all(|&b| b == 0xaa));
}

#[test]
fn unknown_type_is_returned_unwritten() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let mut req = attach_req(1, 1, 0);
    req[0] = 42;
    let (len, reply) = h.send(&req, 4);
    assert_eq!(len, 0);
    assert_eq!(reply, vec![0xaa; 4]);
    assert_eq!(h.dev.stats().requests_with(0, STATS_NO_STATUS), 1);
}

#[test]
fn request_entirely_in_writable_descriptor_is_deverr() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.mem
        .write_slice(&attach_req(1, 1, 0), GuestAddress(RESP_BUF))
        .unwrap();
    let len = h.submit(&[(RESP_BUF, 24, true)]);
    assert_eq!(len, 4);
    let status: u8 = h.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!(status, VIRTIO_IOMMU_S_DEVERR);
    assert_eq!(h.dev.stats().domains, 0);
}

#[test]
fn chain_without_writable_descriptor_is_returned_unwritten() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let req = attach_req(1, 1, 0);
    h.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    h.mem
        .write_slice(&[0xaa; 4], GuestAddress(RESP_BUF))
        .unwrap();
    let len = h.submit(&[(REQ_BUF, req.len() as u32, false), (RESP_BUF, 4, false)]);
    assert_eq!(len, 0);
    let tail: [u8; 4] = h.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!(tail, [0xaa; 4]);
}

#[test]
fn writable_part_shorter_than_tail_is_returned_unwritten() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let (len, reply) = h.send(&attach_req(1, 1, 0), 3);
    assert_eq!(len, 0);
    assert_eq!(reply, vec![0xaa; 3]);
}

#[test]
fn readable_descriptor_after_writable_is_deverr() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let req = attach_req(1, 1, 0);
    h.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    let len = h.submit(&[
        (REQ_BUF, 8, false),
        (RESP_BUF, 4, true),
        (REQ_BUF + 8, req.len() as u32 - 8, false),
    ]);
    assert_eq!(len, 4);
    let status: u8 = h.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!(status, VIRTIO_IOMMU_S_DEVERR);
    assert_eq!(h.dev.stats().domains, 0);
}

#[test]
fn readable_descriptor_outside_memory_is_deverr() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let len = h.submit(&[(NOWHERE, 24, false), (RESP_BUF, 4, true)]);
    assert_eq!(len, 4);
    let status: u8 = h.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!(status, VIRTIO_IOMMU_S_DEVERR);
}

#[test]
fn writable_descriptor_outside_memory_is_returned_unwritten() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let req = attach_req(1, 1, 0);
    h.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    let len = h.submit(&[(REQ_BUF, 20, false), (NOWHERE, 4, true)]);
    assert_eq!(len, 0);
    // Straddling the end of guest memory is no better.
    let end = MEM_SIZE as u64 - 2;
    let len = h.submit(&[(REQ_BUF, 20, false), (end, 4, true)]);
    assert_eq!(len, 0);
}

#[test]
fn split_descriptors_are_reassembled() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let req = map_req(1, 0, 0xfff, DATA, RW);
    h.status(&attach_req(1, 1, 0));
    h.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    let len = h.submit(&[
        (REQ_BUF, 3, false),
        (REQ_BUF + 3, 10, false),
        (REQ_BUF + 13, 23, false),
        (RESP_BUF, 1, true),
        (RESP_BUF + 1, 3, true),
    ]);
    assert_eq!(len, 4);
    let status: u8 = h.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!(status, VIRTIO_IOMMU_S_OK);
    assert_eq!(h.dev.stats().mappings, 1);
}

/// Four descriptors: parsed on the stack (the five above take the general path).
#[test]
fn short_split_chain_is_reassembled() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let req = map_req(1, 0, 0xfff, DATA, RW);
    h.status(&attach_req(1, 1, 0));
    h.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    h.mem
        .write_slice(&[0xaa; 4], GuestAddress(RESP_BUF))
        .unwrap();
    let len = h.submit(&[
        (REQ_BUF, 3, false),
        (REQ_BUF + 3, 33, false),
        (RESP_BUF, 1, true),
        (RESP_BUF + 1, 3, true),
    ]);
    assert_eq!(len, 4);
    let tail: [u8; 4] = h.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
    assert_eq!(tail, [VIRTIO_IOMMU_S_OK, 0, 0, 0]);
    assert_eq!(h.dev.stats().mappings, 1);
}

#[test]
fn stats_count_requests_by_type_and_status() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&attach_req(1, 99, 0));
    h.status(&map_req(1, 0, 0xfff, DATA, RW));
    h.status(&map_req(1, 0, 0xfff, DATA, RW));
    let s = h.dev.stats();
    assert_eq!(s.requests_with(VIRTIO_IOMMU_T_ATTACH, 0), 1);
    assert_eq!(
        s.requests_with(VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_S_NOENT.into()),
        1
    );
    assert_eq!(
        s.requests_with(VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_S_INVAL.into()),
        1
    );
    assert_eq!(s.requests_of(VIRTIO_IOMMU_T_MAP), 2);
    assert_eq!(s.mappings, 1);
}

#[test]
fn queue_notified_before_activation_is_ignored() {
    let mem = guest();
    let mut dev = VirtioIommu::new().unwrap();
    dev.endpoint(1);
    dev.ack_features(AVAIL_FEATURES);
    let vq = MockSplitQueue::create(&mem, REQ_QUEUE, QUEUE_LEN);
    let req = attach_req(1, 1, 0);
    mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    vq.add_desc_chains(
        &chain(
            &[(REQ_BUF, req.len() as u32, false), (RESP_BUF, 4, true)],
            0,
        ),
        0,
    )
    .unwrap();
    dev.process_queue(REQUEST_QUEUE);
    dev.process_queue(EVENT_QUEUE);
    dev.process_queue(7);
    assert_eq!(vq.used().idx().load(), 0, "no used-ring write");
    assert_eq!(dev.stats().requests_of(VIRTIO_IOMMU_T_ATTACH), 0);

    // Activated, the same chain is served and interrupts: the check above can fail.
    let line = Arc::new(CountingLine::new());
    dev.activate(
        device_memory(mem.clone(), None),
        vec![
            vq.create_queue::<Queue>().unwrap(),
            MockSplitQueue::create(&mem, EVT_QUEUE, QUEUE_LEN)
                .create_queue::<Queue>()
                .unwrap(),
        ],
        Arc::new(VirtioInterrupt::new(line.clone())),
    )
    .unwrap();
    assert_eq!(line.triggers(), 0, "no interrupt before activation");
    dev.process_queue(REQUEST_QUEUE);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(line.triggers(), 1);
}

#[test]
fn probe_without_probe_feature_is_unsupp() {
    let mem = guest();
    let mut h = Harness::with_features(&mem, AVAIL_FEATURES & !(1 << VIRTIO_IOMMU_F_PROBE));
    let (len, reply) = h.send(&probe_req(1), PROBE_SIZE + 4);
    assert_eq!(len, PROBE_SIZE + 4);
    assert!(
        reply[..PROBE_SIZE as usize].iter().all(|&b| b == 0),
        "no property"
    );
    assert_eq!(reply[PROBE_SIZE as usize], VIRTIO_IOMMU_S_UNSUPP);
}

/// PROBE reports 0xfee00000-0xfeefffff as RESV_MEM/MSI, "translated 1:1": an attached
/// endpoint's DMA there reaches the same address without a mapping and without a fault.
#[test]
fn dma_to_msi_window_is_identity_translated_for_attached_endpoints() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM_SIZE),
        (GuestAddress(super::mapping::MSI_IOVA_START), 0x1000),
    ])
    .unwrap();
    let mut h = Harness::new(&mem);
    assert_eq!(h.status(&attach_req(1, 1, 0)), VIRTIO_IOMMU_S_OK);
    let ep = h.ep_mem(1);
    let doorbell = GuestAddress(super::mapping::MSI_IOVA_START + 0x40);
    ep.write_obj(0x4321u32, doorbell).unwrap();
    assert_eq!(mem.read_obj::<u32>(doorbell).unwrap(), 0x4321);
    assert_eq!(h.dev.stats().faults, 0);
    // Outside the window the domain (with no mappings) still faults.
    assert!(ep.write_obj(0u32, GuestAddress(DATA)).is_err());
    assert_eq!(h.dev.stats().faults, 1);
}

#[test]
fn activation_checks_queue_count() {
    let mem = guest();
    let mut dev = VirtioIommu::new().unwrap();
    let err = dev
        .activate(
            device_memory(mem, None),
            vec![],
            Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new()))),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        crate::virtio::ActivateError::QueueCount {
            expected: 2,
            got: 0
        }
    ));
}

// ---- Translation through IommuMemory ----

#[test]
fn unattached_endpoint_bypasses_until_bypass_cleared() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let ep = h.ep_mem(1);
    ep.write_obj(0x1122_3344u32, GuestAddress(DATA)).unwrap();
    assert_eq!(
        h.mem.read_obj::<u32>(GuestAddress(DATA)).unwrap(),
        0x1122_3344
    );

    h.write_bypass(0);
    let err = ep.read_obj::<u32>(GuestAddress(DATA));
    assert!(err.is_err(), "identity IOTLB entry dropped with bypass");
    h.give_event_buffers(1);
    let f: VirtioIommuFault = h.mem.read_obj(GuestAddress(EVT_BUF)).unwrap();
    assert_eq!(
        f,
        fault_of(
            1,
            VIRTIO_IOMMU_FAULT_R_DOMAIN,
            VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            DATA
        )
    );

    h.write_bypass(1);
    assert_eq!(ep.read_obj::<u32>(GuestAddress(DATA)).unwrap(), 0x1122_3344);
}

#[test]
fn mapped_accesses_land_at_physical_address() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x10_0000, 0x10_1fff, DATA + 0x5000, RW));
    let ep = h.ep_mem(1);
    ep.write_obj(0xdead_beefu32, GuestAddress(0x10_0ffe))
        .unwrap();
    // The write straddles the two pages of the mapping; both land at DATA + 0x5ffe.
    assert_eq!(
        h.mem.read_obj::<u32>(GuestAddress(DATA + 0x5ffe)).unwrap(),
        0xdead_beef
    );
    h.mem
        .write_obj(0x55u8, GuestAddress(DATA + 0x6000))
        .unwrap();
    assert_eq!(ep.read_obj::<u8>(GuestAddress(0x10_1000)).unwrap(), 0x55);
    let s = h.dev.stats();
    assert_eq!(s.iotlb_fills, 1, "one fill covers the whole mapping");
    assert!(s.iotlb_lookups >= 2);
    assert_eq!(s.faults, 0);
}

#[test]
fn access_spanning_two_mappings_is_split() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x1000, 0x1fff, DATA + 0x3000, RW));
    h.status(&map_req(1, 0x2000, 0x2fff, DATA + 0x1000, RW));
    let ep = h.ep_mem(1);
    ep.write_slice(&[1, 2, 3, 4], GuestAddress(0x1ffe)).unwrap();
    let mut a = [0u8; 2];
    h.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x3ffe))
        .unwrap();
    assert_eq!(a, [1, 2]);
    h.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(a, [3, 4]);
}

#[test]
fn write_to_read_only_mapping_faults_with_write_and_address() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x4000, 0x4fff, DATA, R));
    let ep = h.ep_mem(1);
    assert!(ep.read_obj::<u32>(GuestAddress(0x4010)).is_ok());
    assert!(ep.write_obj(7u32, GuestAddress(0x4010)).is_err());
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(DATA + 0x10)).unwrap(), 0);
    assert_eq!(h.dev.stats().faults, 1);
    assert_eq!(h.dev.fault_eventfd().read().unwrap(), 1);

    h.give_event_buffers(1);
    assert_eq!(h.next_used(1), Some((0, 24)));
    let f: VirtioIommuFault = h.mem.read_obj(GuestAddress(EVT_BUF)).unwrap();
    assert_eq!(
        f,
        fault_of(
            1,
            VIRTIO_IOMMU_FAULT_R_MAPPING,
            VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            0x4010
        )
    );
    assert_eq!(h.dev.stats().events_delivered, 1);
}

#[test]
fn fault_event_bytes_match_spec_layout() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 2, 0));
    let ep = h.ep_mem(2);
    assert!(ep.read_obj::<u64>(GuestAddress(0x1234_5000)).is_err());
    h.give_event_buffers(1);
    let mut raw = [0u8; 24];
    h.mem.read_slice(&mut raw, GuestAddress(EVT_BUF)).unwrap();
    let mut expected = [0u8; 24];
    expected[0] = VIRTIO_IOMMU_FAULT_R_MAPPING;
    expected[4..8].copy_from_slice(&0x101u32.to_le_bytes()); // READ | ADDRESS
    expected[8..12].copy_from_slice(&2u32.to_le_bytes());
    expected[16..24].copy_from_slice(&0x1234_5000u64.to_le_bytes());
    assert_eq!(raw, expected);
}

#[test]
fn unmap_invalidates_iotlb() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x10_0000, 0x10_0fff, DATA, RW));
    let ep = h.ep_mem(1);
    ep.write_obj(1u32, GuestAddress(0x10_0010)).unwrap();
    assert_eq!(
        h.status(&unmap_req(1, 0x10_0000, 0x10_0fff)),
        VIRTIO_IOMMU_S_OK
    );
    assert!(ep.read_obj::<u32>(GuestAddress(0x10_0010)).is_err());
    assert_eq!(h.dev.stats().faults, 1);
    // Remapping elsewhere is picked up on the next miss.
    h.status(&map_req(1, 0x10_0000, 0x10_0fff, DATA + 0x1000, RW));
    ep.write_obj(2u32, GuestAddress(0x10_0010)).unwrap();
    assert_eq!(
        h.mem.read_obj::<u32>(GuestAddress(DATA + 0x1010)).unwrap(),
        2
    );
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(DATA + 0x10)).unwrap(), 1);
}

#[test]
fn unmap_invalidates_every_endpoint_in_domain() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&attach_req(1, 2, 0));
    h.status(&map_req(1, 0x0, 0xfff, DATA, RW));
    let (a, b) = (h.ep_mem(1), h.ep_mem(2));
    a.read_obj::<u8>(GuestAddress(0)).unwrap();
    b.read_obj::<u8>(GuestAddress(0)).unwrap();
    h.status(&unmap_req(1, 0x0, 0xfff));
    assert!(a.read_obj::<u8>(GuestAddress(0)).is_err());
    assert!(b.read_obj::<u8>(GuestAddress(0)).is_err());
}

#[test]
fn attach_away_and_detach_invalidate_iotlb() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let ep = h.ep_mem(1);
    // Bypass fills an identity entry; attaching must drop it.
    ep.read_obj::<u8>(GuestAddress(0x1000)).unwrap();
    h.status(&attach_req(1, 1, 0));
    assert!(ep.read_obj::<u8>(GuestAddress(0x1000)).is_err());
    h.status(&map_req(1, 0x1000, 0x1fff, DATA, RW));
    ep.read_obj::<u8>(GuestAddress(0x1000)).unwrap();
    // Moving to another domain drops the old domain's entries.
    h.status(&attach_req(2, 1, 0));
    assert!(ep.read_obj::<u8>(GuestAddress(0x1000)).is_err());
    // Detached with bypass off: DOMAIN fault.
    h.write_bypass(0);
    assert_eq!(h.status(&detach_req(2, 1)), VIRTIO_IOMMU_S_OK);
    assert!(ep.read_obj::<u8>(GuestAddress(0x1000)).is_err());
    h.give_event_buffers(3);
    let last: VirtioIommuFault = h.mem.read_obj(GuestAddress(EVT_BUF + 0x200)).unwrap();
    assert_eq!(last.reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
}

#[test]
fn bypass_domain_translates_identity() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.write_bypass(0);
    assert_eq!(
        h.status(&attach_req(5, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(h.status(&map_req(5, 0, 0xfff, 0, RW)), VIRTIO_IOMMU_S_INVAL);
    let ep = h.ep_mem(1);
    ep.write_obj(9u16, GuestAddress(DATA)).unwrap();
    assert_eq!(h.mem.read_obj::<u16>(GuestAddress(DATA)).unwrap(), 9);
}

#[test]
fn wrapping_access_faults_without_panicking() {
    let mem = guest();
    let h = Harness::new(&mem);
    let ep = h.ep_mem(1);
    assert!(ep.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
    assert_eq!(h.dev.stats().faults, 1);
}

#[test]
fn device_reset_detaches_endpoints_but_keeps_bypass() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x1000, 0x1fff, DATA, RW));
    let ep = h.ep_mem(1);
    ep.read_obj::<u8>(GuestAddress(0x1000)).unwrap();
    h.dev.reset();
    let s = h.dev.stats();
    assert_eq!((s.domains, s.mappings), (0, 0));
    assert_eq!(h.dev.config().bypass, 1);
    // Back to bypass: IOVA 0x1000 is now guest-physical 0x1000.
    h.mem.write_obj(0x77u8, GuestAddress(0x1000)).unwrap();
    assert_eq!(ep.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x77);
}

#[test]
fn pending_faults_are_bounded_and_drops_counted() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.write_bypass(0);
    let ep = h.ep_mem(1);
    let extra = 5;
    for i in 0..(MAX_PENDING_FAULTS + extra) as u64 {
        assert!(ep.read_obj::<u8>(GuestAddress(i * 0x1000)).is_err());
    }
    let s = h.dev.stats();
    assert_eq!(s.faults, (MAX_PENDING_FAULTS + extra) as u64);
    assert_eq!(s.events_dropped, extra as u64);

    // The queue holds 64 buffers; give them all, then the rest after they are used.
    h.give_event_buffers(QUEUE_LEN);
    let mut delivered = 0;
    while let Some((_, len)) = h.next_used(1) {
        assert_eq!(len, 24);
        delivered += 1;
    }
    assert_eq!(delivered, MAX_PENDING_FAULTS.min(QUEUE_LEN as usize));
    assert_eq!(h.dev.stats().events_delivered, delivered as u64);
    // Oldest first.
    let first: VirtioIommuFault = h.mem.read_obj(GuestAddress(EVT_BUF)).unwrap();
    assert_eq!(u64::from(first.address), 0);
}

#[test]
fn event_buffer_too_small_is_returned_empty_and_fault_kept() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.write_bypass(0);
    let ep = h.ep_mem(1);
    assert!(ep.read_obj::<u8>(GuestAddress(0)).is_err());
    let small = RawDescriptor::from(SplitDescriptor::new(EVT_BUF, 8, VRING_DESC_F_WRITE, 0));
    h.mock(1).add_desc_chains(&[small], 0).unwrap();
    h.dev.process_queue(EVENT_QUEUE);
    assert_eq!(h.next_used(1), Some((0, 0)));
    h.give_event_buffers(1);
    assert_eq!(h.next_used(1), Some((0, 24)));
}

#[test]
fn passthrough_handle_translates_identity() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let iommu = EndpointIommu::passthrough();
    assert_eq!(iommu.endpoint_id(), None);
    let m = vm_memory::IommuMemory::new(mem.clone(), iommu, true, ());
    m.write_obj(3u8, GuestAddress(0x20)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20)).unwrap(), 3);
}

#[test]
fn endpoint_handles_for_one_id_share_state() {
    let dev = VirtioIommu::new().unwrap();
    let a = dev.endpoint(4);
    let b = dev.endpoint(4);
    assert!(a.same_endpoint(&b));
    assert!(!a.same_endpoint(&dev.endpoint(5)));
    assert_eq!(a.endpoint_id(), Some(4));
}

// ---- Request guard ----

/// A virtio-blk endpoint (behind endpoint 1, through its MMIO transport) whose disk read is
/// stuck for up to 2 s. The old code held the endpoint's IOTLB lock across the read and took it
/// for invalidation under the global mapping-state mutex, inside the IOMMU's device lock:
/// anything after an UNMAP of endpoint 1 (other endpoints' ATTACH, MAP, UNMAP, DMA) waited the
/// whole 2 s. Now: registers of the stuck device, other endpoints' requests and the IOMMU's
/// own worker are not delayed; the UNMAP of the buffer in use is applied at once but returned
/// only after the read finished, and after it no DMA reaches the range.
#[test]
fn stuck_disk_read_delays_only_the_unmap_of_its_own_buffer() {
    use crate::virtio::block::tests::{driver_ok, SlowDisk};
    use crate::virtio::block::{Block, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use crate::virtio::mmio::*;
    use crate::virtio::{QueueProgress, VirtioDevice};
    use std::time::Instant;
    const QUICK: Duration = Duration::from_millis(200);
    // Rings, header and status in one mapping, the data buffer in another (identity IOVAs).
    const BLK_RING: u64 = 0xa0_0000;
    const BLK_HDR: u64 = 0xa8_0000;
    const BLK_STATUS: u64 = 0xa9_0000;
    const BLK_DATA: u64 = 0xb0_0000;

    let mem = guest();
    let mut h = Harness::new(&mem);
    assert_eq!(h.status(&attach_req(1, 1, 0)), VIRTIO_IOMMU_S_OK);
    assert_eq!(
        h.status(&map_req(1, BLK_RING, 0xaf_ffff, BLK_RING, RW)),
        VIRTIO_IOMMU_S_OK
    );
    assert_eq!(
        h.status(&map_req(1, BLK_DATA, BLK_DATA + 0xfff, BLK_DATA, RW)),
        VIRTIO_IOMMU_S_OK
    );

    let (slow, started, release) = SlowDisk::new(Duration::from_secs(2));
    let block = Block::with_backend(Box::new(slow), false, "slow".into(), true).unwrap();
    let block = Arc::new(std::sync::Mutex::new(block));
    let mut t = MmioTransport::new(
        block.clone(),
        h.ep_mem(1),
        Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new()))),
    );
    let vq = MockSplitQueue::create(&mem, GuestAddress(BLK_RING), 16);
    driver_ok(&mut t, &vq, 3);
    assert!(t.is_activated());
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(BLK_HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(BLK_STATUS)).unwrap();
    vq.add_desc_chains(
        &chain(
            &[
                (BLK_HDR, 16, false),
                (BLK_DATA, 512, true),
                (BLK_STATUS, 1, true),
            ],
            0,
        ),
        0,
    )
    .unwrap();
    let handler = crate::sync::lock(&block).queue_handler();
    let worker = thread::spawn(move || handler.process_queue(0));
    started
        .recv_timeout(Duration::from_secs(5))
        .expect("read started");
    assert_eq!(h.dev.endpoint(1).requests_in_flight(), 1);

    // The stuck device's registers.
    let t0 = Instant::now();
    let mut capacity = [0u8; 8];
    crate::bus::BusDevice::read(&mut t, VIRTIO_MMIO_CONFIG, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 2048);
    let mut word = [0u8; 4];
    crate::bus::BusDevice::read(&mut t, VIRTIO_MMIO_STATUS, &mut word);
    assert_eq!(u32::from_le_bytes(word), 0xf);
    crate::bus::BusDevice::read(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS, &mut word);
    crate::bus::BusDevice::write(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, &1u32.to_le_bytes());
    assert!(t0.elapsed() < QUICK, "registers took {:?}", t0.elapsed());

    // UNMAP of the buffer the read is filling: applied, not returned, worker not blocked.
    let unmap = unmap_req(1, BLK_DATA, BLK_DATA + 0xfff);
    let (unmap_req_at, unmap_resp) = (REQ_BUF + 0x1000, RESP_BUF + 0x1000);
    mem.write_slice(&unmap, GuestAddress(unmap_req_at)).unwrap();
    mem.write_slice(&[0xaa; 4], GuestAddress(unmap_resp))
        .unwrap();
    h.mock(0)
        .add_desc_chains(
            &chain(
                &[
                    (unmap_req_at, unmap.len() as u32, false),
                    (unmap_resp, 4, true),
                ],
                10,
            ),
            10,
        )
        .unwrap();
    let t0 = Instant::now();
    h.dev.process_queue(REQUEST_QUEUE);
    assert!(
        t0.elapsed() < QUICK,
        "UNMAP blocked the IOMMU for {:?}",
        t0.elapsed()
    );
    assert_eq!(
        h.next_used(0),
        None,
        "UNMAP returned while a read into the old mapping runs"
    );

    // Another endpoint meanwhile: ATTACH, MAP, DMA, UNMAP all at once.
    let t0 = Instant::now();
    assert_eq!(h.status(&attach_req(2, 2, 0)), VIRTIO_IOMMU_S_OK);
    assert_eq!(h.status(&map_req(2, 0, 0xfff, DATA, RW)), VIRTIO_IOMMU_S_OK);
    h.ep_mem(2).write_obj(7u8, GuestAddress(0x10)).unwrap();
    assert_eq!(h.status(&unmap_req(2, 0, 0xfff)), VIRTIO_IOMMU_S_OK);
    let _ = h.dev.config();
    assert!(
        t0.elapsed() < QUICK,
        "another endpoint's requests took {:?}",
        t0.elapsed()
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x10)).unwrap(), 7);
    assert_eq!(h.next_used(0), None, "the first UNMAP is still held");

    // The read ends (through slices resolved before the UNMAP) and completes OK.
    release.send(()).unwrap();
    assert_eq!(worker.join().unwrap(), QueueProgress::Idle);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(BLK_STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BLK_DATA)).unwrap(), 0x5a);
    // Its end woke the IOMMU's worker (the fault eventfd is its EVENT_QUEUE notifier), which
    // now returns the UNMAP.
    assert!(h.dev.fault_eventfd().read().is_ok(), "worker woken");
    h.dev.process_queue(EVENT_QUEUE);
    assert_eq!(h.next_used(0), Some((10, 4)));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(unmap_resp)).unwrap(),
        VIRTIO_IOMMU_S_OK
    );
    // The guarantee: after the UNMAP is returned, no DMA reaches the range.
    assert!(h.ep_mem(1).write_obj(0u8, GuestAddress(BLK_DATA)).is_err());
}

/// UNMAP's wait does not depend on lock fairness: an endpoint that starts request after
/// request (never idle) does not hold an UNMAP back; only requests begun before it do.
#[test]
fn unmap_waits_only_for_requests_begun_before_it() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x0, 0xfff, DATA, RW));
    let ep = h.dev.endpoint(1);
    let old = ep.begin_request();
    // Applied but held: `old` may still use the mapping.
    let unmap = unmap_req(1, 0x0, 0xfff);
    h.mem.write_slice(&unmap, GuestAddress(REQ_BUF)).unwrap();
    h.mock(0)
        .add_desc_chains(
            &chain(
                &[(REQ_BUF, unmap.len() as u32, false), (RESP_BUF, 4, true)],
                0,
            ),
            0,
        )
        .unwrap();
    h.dev.process_queue(REQUEST_QUEUE);
    assert_eq!(h.next_used(0), None);
    // A request begun after the UNMAP sees the invalidated IOTLB; it does not count.
    let new = ep.begin_request();
    drop(old);
    h.dev.process_queue(EVENT_QUEUE);
    assert_eq!(h.next_used(0), Some((0, 4)));
    drop(new);
}

/// Clearing `bypass` is a config write: it cannot be deferred, so it waits (on the writing
/// thread) for requests of unattached endpoints that may still use identity translations.
#[test]
fn clearing_bypass_waits_for_in_flight_requests() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    let ep = h.dev.endpoint(1);
    let (started_tx, started_rx) = mpsc::channel();
    let finished = Arc::new(AtomicBool::new(false));
    let worker = {
        let finished = finished.clone();
        thread::spawn(move || {
            let _guard = ep.begin_request();
            started_tx.send(()).unwrap();
            thread::sleep(Duration::from_millis(100));
            finished.store(true, Ordering::SeqCst);
        })
    };
    started_rx.recv().unwrap();
    h.write_bypass(0);
    assert!(
        finished.load(Ordering::SeqCst),
        "bypass cleared while a request using identity translations was in flight"
    );
    worker.join().unwrap();
    assert!(h.ep_mem(1).read_obj::<u8>(GuestAddress(DATA)).is_err());
}

#[test]
fn map_does_not_wait_for_in_flight_requests() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    let ep = h.dev.endpoint(1);
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let released = Arc::new(AtomicBool::new(false));
    let worker = {
        let released = released.clone();
        thread::spawn(move || {
            let guard = ep.begin_request();
            started_tx.send(()).unwrap();
            // Held until the main thread says so (or gives up, if MAP wrongly waits).
            let _ = release_rx.recv_timeout(Duration::from_secs(5));
            released.store(true, Ordering::SeqCst);
            drop(guard);
        })
    };
    started_rx.recv().unwrap();
    assert_eq!(
        h.status(&map_req(1, 0x0, 0xfff, DATA, RW)),
        VIRTIO_IOMMU_S_OK
    );
    assert!(
        !released.load(Ordering::SeqCst),
        "MAP waited for an in-flight request"
    );
    release_tx.send(()).unwrap();
    worker.join().unwrap();
}

#[test]
fn requests_of_other_endpoints_do_not_delay_unmap() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x0, 0xfff, DATA, RW));
    let other = h.dev.endpoint(2);
    let _guard = other.begin_request();
    // Would deadlock if UNMAP waited for endpoint 2, which is not in domain 1.
    assert_eq!(h.status(&unmap_req(1, 0x0, 0xfff)), VIRTIO_IOMMU_S_OK);
}

#[test]
fn fault_structs_have_expected_sizes() {
    assert_eq!(size_of::<VirtioIommuFault>(), 24);
}

/// A virtio-blk endpoint behind the IOMMU: a read whose data buffer IOVA is mapped read-only
/// (the device would write guest memory) and a write whose data buffer IOVA is not mapped at all
/// each fail with `VIRTIO_BLK_S_IOERR`, leave guest memory untouched, and are reported on the
/// event queue as MAPPING faults with the right address and access flags.
#[test]
fn block_dma_to_unmapped_or_read_only_iova_fails_and_reports_fault() {
    use crate::virtio::block::{Block, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    const BLK_QUEUE: u64 = 0x50_0000;
    const BLK_BUF: u64 = 0x60_0000;
    const RO_IOVA: u64 = 0x4000;
    const UNMAPPED_IOVA: u64 = 0x9000_0000;

    let mem = guest();
    let mut h = Harness::new(&mem);
    // Endpoint 1 in domain 1: its rings and request headers identity-mapped, RO_IOVA mapped
    // read-only onto DATA, nothing at UNMAPPED_IOVA.
    assert_eq!(h.status(&attach_req(1, 1, 0)), VIRTIO_IOMMU_S_OK);
    for (start, phys, flags) in [
        (BLK_QUEUE, BLK_QUEUE, RW),
        (BLK_BUF, BLK_BUF, RW),
        (RO_IOVA, DATA, R),
    ] {
        assert_eq!(
            h.status(&map_req(1, start, start + 0xfff, phys, flags)),
            VIRTIO_IOMMU_S_OK
        );
    }

    let path = std::env::temp_dir().join(format!("vmm-blk-iommu-{}.img", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(64 * 512).unwrap();
    let mut block = Block::new(file, false, "d".into(), true).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(BLK_QUEUE), 16);
    block
        .activate(
            device_memory(mem.clone(), Some(h.dev.endpoint(1))),
            vec![vq.create_queue::<Queue>().unwrap()],
            Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new()))),
        )
        .unwrap();

    // Request 0: read sector 0 into RO_IOVA. Request 1: write sector 0 from UNMAPPED_IOVA.
    let header = |type_: u32| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&type_.to_le_bytes());
        b
    };
    mem.write_slice(&header(VIRTIO_BLK_T_IN), GuestAddress(BLK_BUF))
        .unwrap();
    mem.write_slice(&header(VIRTIO_BLK_T_OUT), GuestAddress(BLK_BUF + 0x20))
        .unwrap();
    mem.write_slice(&[0xee; 2], GuestAddress(BLK_BUF + 0x100))
        .unwrap();
    let reqs = [
        (BLK_BUF, RO_IOVA, true, BLK_BUF + 0x100),
        (BLK_BUF + 0x20, UNMAPPED_IOVA, false, BLK_BUF + 0x101),
    ];
    for (i, (hdr, data, device_writes, status)) in reqs.into_iter().enumerate() {
        let first = (i * 3) as u16;
        vq.add_desc_chains(
            &chain(
                &[
                    (hdr, 16, false),
                    (data, 512, device_writes),
                    (status, 1, true),
                ],
                first,
            ),
            first,
        )
        .unwrap();
    }
    mem.write_obj(0xabu8, GuestAddress(DATA)).unwrap();
    block.process_queue(0);

    let mut statuses = [0u8; 2];
    mem.read_slice(&mut statuses, GuestAddress(BLK_BUF + 0x100))
        .unwrap();
    assert_eq!(statuses, [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
        0xab,
        "read-only page written"
    );
    assert_eq!(block.stats().errors, 2);
    assert_eq!(h.dev.stats().faults, 2);

    h.give_event_buffers(2);
    let faults: Vec<VirtioIommuFault> = (0..2)
        .map(|i| mem.read_obj(GuestAddress(EVT_BUF + i * 0x100)).unwrap())
        .collect();
    assert_eq!(
        faults,
        vec![
            fault_of(
                1,
                VIRTIO_IOMMU_FAULT_R_MAPPING,
                VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                RO_IOVA
            ),
            fault_of(
                1,
                VIRTIO_IOMMU_FAULT_R_MAPPING,
                VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                UNMAPPED_IOVA
            ),
        ]
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn cached_memory_forgets_a_page_when_it_is_unmapped() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x4000, 0x4fff, DATA, RW));
    let ep = h.ep_mem(1);
    let cached = CachedMemory::new(&ep);
    // The first access fills the IOTLB; later ones hit the remembered page.
    cached.write_obj(7u32, GuestAddress(0x4010)).unwrap();
    assert_eq!(cached.read_obj::<u32>(GuestAddress(0x4010)).unwrap(), 7);
    assert_eq!(cached.read_obj::<u32>(GuestAddress(0x4ffc)).unwrap(), 0);
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(DATA + 0x10)).unwrap(), 7);
    assert_eq!(h.dev.stats().faults, 0);

    h.status(&unmap_req(1, 0x4000, 0x4fff));
    assert!(cached.read_obj::<u32>(GuestAddress(0x4010)).is_err());
    assert!(cached.write_obj(8u32, GuestAddress(0x4010)).is_err());
    assert!(!cached.check_range(GuestAddress(0x4010), 4, Permissions::Read));
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(DATA + 0x10)).unwrap(), 7);
    assert_eq!(h.dev.stats().faults, 3);

    // Mapped again elsewhere: the new translation, never the old one.
    h.status(&map_req(1, 0x4000, 0x4fff, DATA + 0x1000, RW));
    cached.write_obj(9u32, GuestAddress(0x4010)).unwrap();
    assert_eq!(
        h.mem.read_obj::<u32>(GuestAddress(DATA + 0x1010)).unwrap(),
        9
    );
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(DATA + 0x10)).unwrap(), 7);
}

#[test]
fn cached_memory_keeps_permissions_and_page_bounds() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x4000, 0x4fff, DATA, R));
    h.status(&map_req(1, 0x5000, 0x5fff, DATA + 0x3000, RW));
    let ep = h.ep_mem(1);
    let cached = CachedMemory::new(&ep);
    for _ in 0..2 {
        assert!(cached.read_obj::<u32>(GuestAddress(0x4010)).is_ok());
        assert!(cached.write_obj(7u32, GuestAddress(0x4010)).is_err());
        assert!(!cached.check_range(GuestAddress(0x4010), 4, Permissions::Write));
    }
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(DATA + 0x10)).unwrap(), 0);
    assert_eq!(h.dev.stats().faults, 4);
    // Across the page boundary into a mapping elsewhere: split like `IommuMemory` does.
    cached.read_obj::<u32>(GuestAddress(0x5000)).unwrap();
    cached
        .write_slice(&[1, 2, 3, 4], GuestAddress(0x4ffe))
        .unwrap_err();
    cached
        .write_slice(&[1, 2, 3, 4], GuestAddress(0x5ffe))
        .unwrap_err();
    cached.write_slice(&[1, 2], GuestAddress(0x5ffe)).unwrap();
    let mut a = [0u8; 2];
    h.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x3ffe))
        .unwrap();
    assert_eq!(a, [1, 2]);
    // Outside every mapping.
    assert!(cached.read_obj::<u8>(GuestAddress(0x6000)).is_err());
    assert!(cached.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
}

#[test]
fn cached_memory_follows_unmap_of_one_of_two_neighbours() {
    let mem = guest();
    let mut h = Harness::new(&mem);
    h.status(&attach_req(1, 1, 0));
    h.status(&map_req(1, 0x4000, 0x5fff, DATA, RW));
    h.status(&map_req(1, 0x6000, 0x6fff, DATA + 0x4000, R));
    let ep = h.ep_mem(1);
    let cached = CachedMemory::new(&ep);
    // A whole two-page mapping is remembered as one entry: a page-crossing access hits it.
    cached
        .write_obj(0x0102_0304u32, GuestAddress(0x4ffe))
        .unwrap();
    cached.read_obj::<u32>(GuestAddress(0x6000)).unwrap();
    // Spanning both mappings: split by `IommuMemory`, and the read-only part refuses writes.
    cached.read_obj::<u64>(GuestAddress(0x5ffc)).unwrap();
    assert!(cached.write_obj(0u64, GuestAddress(0x5ffc)).is_err());
    assert_eq!(h.dev.stats().faults, 1);

    h.status(&unmap_req(1, 0x6000, 0x6fff));
    assert!(cached.read_obj::<u32>(GuestAddress(0x6000)).is_err());
    assert_eq!(
        cached.read_obj::<u32>(GuestAddress(0x4ffe)).unwrap(),
        0x0102_0304
    );
    assert_eq!(h.dev.stats().faults, 2);
    h.status(&unmap_req(1, 0x4000, 0x5fff));
    assert!(cached.read_obj::<u32>(GuestAddress(0x4ffe)).is_err());
    assert_eq!(h.dev.stats().faults, 3);
}

#[test]
fn range_copy_of_the_iotlb_drops_whole_entries_it_overlaps() {
    let e = |iova, len| mapping::IotlbEntry {
        iova,
        phys: iova + 0x10_0000,
        len,
        perm: Permissions::ReadWrite,
    };
    let mut tlb = Tlb::default();
    EndpointIommu::fill(
        &mut tlb,
        &[e(0x1000, 0x2000), e(0x3000, 0x1000), e(0x8000, 0x1000)],
    )
    .unwrap();
    // Overlapping the first's tail only: the whole first goes, the second stays.
    tlb.drop_overlapping(0x2fff, 0x3000);
    let keys: Vec<u64> = tlb.entries.keys().copied().collect();
    assert_eq!(keys, [0x3000, 0x8000]);
    // A fill replaces what it overlaps.
    EndpointIommu::fill(&mut tlb, &[e(0x3800, 0x5000)]).unwrap();
    let keys: Vec<u64> = tlb.entries.keys().copied().collect();
    assert_eq!(keys, [0x3800]);
    EndpointIommu::fill(&mut tlb, &[mapping::IDENTITY]).unwrap();
    tlb.drop_overlapping(u64::MAX - 1, u64::MAX);
    assert!(tlb.entries.is_empty());
}
