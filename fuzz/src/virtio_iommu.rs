//! virtio-iommu request queue: sequences of ATTACH, DETACH, MAP, UNMAP and PROBE requests
//! with fields from the input (laid out as a driver would, with the split between
//! descriptors and the writable part chosen by the input), raw descriptor chains, bypass
//! config writes, event-queue buffers, resets, and DMA through endpoint memory (IOTLB and
//! translation) between requests.

use std::sync::Arc;

use devices::virtio::iommu::device::{EVENT_QUEUE, PROBE_SIZE, REQUEST_QUEUE};
use devices::virtio::iommu::protocol::*;
use devices::virtio::iommu::VirtioIommu;
use devices::virtio::{device_memory, VirtioDevice, VirtioInterrupt};
use devices::CountingLine;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::queue::{Buffers, Desc, Driver, F_WRITE};
use crate::{fresh_guest_memory, Input};

/// The endpoints the device knows (requests may name others).
pub const ENDPOINTS: [u32; 3] = [1, 2, 3];

/// A request body as the driver lays it out: head, type-specific fields; the writable part
/// (tail, or PROBE's properties and tail) is sized separately.
pub fn request(input: &mut Input<'_>) -> (Vec<u8>, u32) {
    let kind = input.u8() % 8;
    let small = |input: &mut Input<'_>| match input.u8() % 4 {
        0 => input.u32(),
        _ => u32::from(input.u8() % 4),
    };
    let mut b = Vec::with_capacity(48);
    let type_ = match kind {
        0 => VIRTIO_IOMMU_T_ATTACH,
        1 => VIRTIO_IOMMU_T_DETACH,
        2 | 3 => VIRTIO_IOMMU_T_MAP,
        4 => VIRTIO_IOMMU_T_UNMAP,
        5 => VIRTIO_IOMMU_T_PROBE,
        _ => input.u8(),
    };
    b.push(type_);
    // Reserved head bytes: usually 0.
    if input.u8() % 16 == 0 {
        b.extend_from_slice(input.bytes(3));
        b.resize(4, 0);
    } else {
        b.extend_from_slice(&[0; 3]);
    }
    let page = |input: &mut Input<'_>| match input.u8() % 4 {
        0 => input.u64(),
        _ => u64::from(input.u16()) << 12,
    };
    let mut writable = 4;
    match type_ {
        VIRTIO_IOMMU_T_ATTACH => {
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&(input.u8() as u32 & 3).to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        VIRTIO_IOMMU_T_DETACH => {
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&[0; 8]);
        }
        VIRTIO_IOMMU_T_MAP => {
            let start = page(input);
            let end = match input.u8() % 4 {
                0 => input.u64(),
                _ => start
                    .wrapping_add((u64::from(input.u8()) + 1) << 12)
                    .wrapping_sub(1),
            };
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&start.to_le_bytes());
            b.extend_from_slice(&end.to_le_bytes());
            b.extend_from_slice(&page(input).to_le_bytes());
            b.extend_from_slice(&(input.u8() as u32 & 0xf).to_le_bytes());
        }
        VIRTIO_IOMMU_T_UNMAP => {
            let start = page(input);
            let end = match input.u8() % 4 {
                0 => input.u64(),
                1 => u64::MAX,
                _ => start
                    .wrapping_add((u64::from(input.u8()) + 1) << 12)
                    .wrapping_sub(1),
            };
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&start.to_le_bytes());
            b.extend_from_slice(&end.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        VIRTIO_IOMMU_T_PROBE => {
            b.extend_from_slice(&small(input).to_le_bytes());
            b.extend_from_slice(&[0; 64]);
            writable = match input.u8() % 4 {
                0 => u32::from(input.u16()) % 1024,
                _ => PROBE_SIZE + 4,
            };
        }
        _ => {
            let n = usize::from(input.u8() % 80);
            b.extend_from_slice(input.bytes(n));
        }
    }
    // Now and then a request that is too short or has trailing bytes.
    match input.u8() % 32 {
        0 => {
            let cut = usize::from(input.u8()) % (b.len() + 1);
            b.truncate(cut);
        }
        1 => b.extend_from_slice(input.bytes(8)),
        _ => {}
    }
    if input.u8() % 32 == 0 {
        writable = input.length() % 2048;
    }
    (b, writable)
}

/// Places `req` and a writable area of `writable` bytes and returns the chain: each part in
/// one or two descriptors, flags occasionally wrong.
pub fn layout(
    mem: &GuestMemoryMmap,
    bufs: &mut Buffers,
    input: &mut Input<'_>,
    req: &[u8],
    writable: u32,
) -> Vec<Desc> {
    let at = bufs.take(req.len() as u64);
    let _ = mem.write_slice(req, GuestAddress(at));
    let out = bufs.take(u64::from(writable));
    let _ = mem.write_slice(&vec![0xaa; writable.min(4096) as usize], GuestAddress(out));
    let mut chain = Vec::new();
    let split = |input: &mut Input<'_>, len: u32| -> Option<u32> {
        (input.u8() % 4 == 0 && len > 1).then(|| 1 + u32::from(input.u16()) % (len - 1))
    };
    let rlen = req.len() as u32;
    match split(input, rlen) {
        Some(s) => {
            chain.push((at, s, 0));
            chain.push((at + u64::from(s), rlen - s, 0));
        }
        None => chain.push((at, rlen, 0)),
    }
    match split(input, writable) {
        Some(s) => {
            chain.push((out, s, F_WRITE));
            chain.push((out + u64::from(s), writable - s, F_WRITE));
        }
        None => chain.push((out, writable, F_WRITE)),
    }
    if input.u8() % 32 == 0 {
        let i = usize::from(input.u8()) % chain.len();
        chain[i].2 ^= F_WRITE;
    }
    chain
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = fresh_guest_memory();
    let mut dev = VirtioIommu::new().expect("eventfd");
    for ep in ENDPOINTS {
        dev.endpoint(ep);
    }
    let features = dev.features();
    let accepted = if input.u8() % 8 == 0 {
        input.u64() & features
    } else {
        features
    };
    if !dev.ack_features(accepted | 1 << devices::virtio::VIRTIO_F_VERSION_1) {
        return;
    }
    let max = dev.queue_max_sizes().to_vec();
    let mut req_q = Driver::new(REQUEST_QUEUE, Driver::size_from(&mut input).min(max[0]));
    let mut evt_q = Driver::new(EVENT_QUEUE, Driver::size_from(&mut input).min(max[1]));
    let line = Arc::new(CountingLine::new());
    let queues = vec![req_q.queue(max[0]), evt_q.queue(max[1])];
    if dev
        .activate(
            device_memory(mem.clone(), None),
            queues,
            Arc::new(VirtioInterrupt::new(line)),
        )
        .is_err()
    {
        return;
    }
    let mut bufs = Buffers::default();
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 16 {
            0..=8 => {
                let (req, writable) = request(&mut input);
                let chain = layout(&mem, &mut bufs, &mut input, &req, writable);
                req_q.add_chain(&mem, &chain);
                if input.u8() % 4 != 0 {
                    dev.process_queue(REQUEST_QUEUE);
                }
            }
            9 => {
                req_q.add_raw_chain(&mem, &mut input);
                dev.process_queue(REQUEST_QUEUE);
            }
            10 => {
                // Event buffers for fault reports (sometimes too small).
                for _ in 0..1 + input.u8() % 4 {
                    let len = if input.bool() {
                        24
                    } else {
                        input.length() % 64
                    };
                    let at = bufs.take(u64::from(len));
                    evt_q.add_chain(&mem, &[(at, len, F_WRITE)]);
                }
                dev.process_queue(EVENT_QUEUE);
            }
            11 => {
                let off = VIRTIO_IOMMU_CONFIG_BYPASS_OFFSET as u64;
                let off = if input.bool() {
                    off
                } else {
                    u64::from(input.u8())
                };
                let n = input.width();
                let v = input.u64().to_le_bytes();
                dev.write_config(off, &v[..n.min(8)]);
                let mut out = [0u8; 8];
                dev.read_config(u64::from(input.u8()), &mut out[..n.min(8)]);
            }
            12 | 13 => {
                // Endpoint DMA: translation, IOTLB, faults.
                let ep = ENDPOINTS[usize::from(input.u8()) % ENDPOINTS.len()];
                let dmem = device_memory(mem.clone(), Some(dev.endpoint(ep)));
                let iova = match input.u8() % 2 {
                    0 => u64::from(input.u16()) << 12 | u64::from(input.u16() & 0xfff),
                    _ => input.u64(),
                };
                let mut buf = vec![0u8; usize::from(input.u8()) * 16 + 1];
                if input.bool() {
                    let _ = dmem.read_slice(&mut buf, GuestAddress(iova));
                } else {
                    let _ = dmem.write_slice(&buf, GuestAddress(iova));
                }
            }
            14 => {
                let idx = input.u16();
                req_q.set_avail_idx(&mem, idx);
                dev.process_queue(REQUEST_QUEUE);
            }
            _ => {
                if input.u8() % 8 == 0 {
                    dev.reset();
                    return;
                }
                dev.process_queue(EVENT_QUEUE);
            }
        }
    }
    dev.process_queue(REQUEST_QUEUE);
    dev.process_queue(EVENT_QUEUE);
}
