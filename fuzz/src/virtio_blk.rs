//! virtio-blk requests (IN, OUT, FLUSH, GET_ID and unknown types; any sector, segment count
//! and length; wrong descriptor directions; raw chains) against an in-memory disk, straight
//! on guest memory or behind a virtio-iommu whose domain the input programs with MAP/UNMAP
//! requests (before and between the disk's requests).

use std::io;
use std::sync::{Arc, Mutex};

use devices::virtio::block::{
    Block, DiskBackend, QUEUE_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use devices::virtio::iommu::device::REQUEST_QUEUE;
use devices::virtio::iommu::protocol::*;
use devices::virtio::iommu::VirtioIommu;
use devices::virtio::{
    device_memory, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use devices::CountingLine;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::queue::{Buffers, Desc, Driver, F_WRITE};
use crate::{fresh_guest_memory, Input, MEM_SIZE};

/// A disk image in memory (no syscalls, so the fuzzer stays fast).
#[derive(Debug)]
pub struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    /// A zeroed image of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemDisk(Mutex::new(vec![0; size]))
    }
}

fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
    let end = start
        .checked_add(n)
        .filter(|&e| e <= len)
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    Ok(start..end)
}

impl DiskBackend for MemDisk {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.lock().expect("disk").len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut VolatileSlice<'_>) -> io::Result<()> {
        let d = self.0.lock().expect("disk");
        let r = range(d.len(), offset, buf.len())?;
        buf.copy_from(&d[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        let mut d = self.0.lock().expect("disk");
        let r = range(d.len(), offset, buf.len())?;
        buf.copy_to(&mut d[r]);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends one IOMMU request (a MAP, UNMAP or ATTACH built from the input) and processes it.
fn iommu_request(
    iommu: &mut VirtioIommu,
    q: &mut Driver,
    mem: &GuestMemoryMmap,
    bufs: &mut Buffers,
    req: &[u8],
) {
    let at = bufs.take(req.len() as u64);
    let _ = mem.write_slice(req, GuestAddress(at));
    let tail = bufs.take(4);
    q.add_chain(mem, &[(at, req.len() as u32, 0), (tail, 4, F_WRITE)]);
    iommu.process_queue(REQUEST_QUEUE);
}

fn map_req(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut b = vec![VIRTIO_IOMMU_T_MAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&end.to_le_bytes());
    b.extend_from_slice(&phys.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

fn unmap_req(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut b = vec![VIRTIO_IOMMU_T_UNMAP, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&end.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut b = vec![VIRTIO_IOMMU_T_ATTACH, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&endpoint.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// A MAP or UNMAP of some of guest RAM, from the input.
fn remap_req(input: &mut Input<'_>) -> Vec<u8> {
    let page = u64::from(input.u8() % (MEM_SIZE >> 12) as u8) << 12;
    let pages = u64::from(input.u8() % 4) + 1;
    let iova = if input.bool() {
        page
    } else {
        u64::from(input.u16()) << 12
    };
    if input.u8() % 4 == 0 {
        unmap_req(1, iova, iova + (pages << 12) - 1)
    } else {
        map_req(
            1,
            iova,
            iova + (pages << 12) - 1,
            page,
            u32::from(input.u8() % 4),
        )
    }
}

/// One block request, laid out from the input.
fn blk_request(
    input: &mut Input<'_>,
    mem: &GuestMemoryMmap,
    bufs: &mut Buffers,
    sectors: u64,
) -> Vec<Desc> {
    let type_ = match input.u8() % 8 {
        0 | 1 => VIRTIO_BLK_T_IN,
        2 | 3 => VIRTIO_BLK_T_OUT,
        4 => VIRTIO_BLK_T_FLUSH,
        5 => VIRTIO_BLK_T_GET_ID,
        _ => input.u32(),
    };
    let sector = match input.u8() % 4 {
        0 => input.u64(),
        1 => sectors.saturating_sub(u64::from(input.u8() % 4)),
        _ => u64::from(input.u8()) % sectors.max(1),
    };
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&type_.to_le_bytes());
    if input.u8() % 16 == 0 {
        header[4..8].copy_from_slice(&input.u32().to_le_bytes());
    }
    header[8..].copy_from_slice(&sector.to_le_bytes());
    let hlen = if input.u8() % 16 == 0 {
        u32::from(input.u8() % 20)
    } else {
        16
    };
    let at = bufs.take(16);
    let _ = mem.write_slice(&header, GuestAddress(at));
    let mut chain = vec![(at, hlen, 0)];
    let data_flags = if type_ == VIRTIO_BLK_T_OUT {
        0
    } else {
        F_WRITE
    };
    for _ in 0..input.u8() % 4 {
        let len = match input.u8() % 4 {
            0 => input.length(),
            1 => 20,
            _ => (u32::from(input.u8() % 8) + 1) * 512,
        };
        let addr = if input.u8() % 8 == 0 {
            input.address()
        } else {
            bufs.take(u64::from(len))
        };
        let flip = if input.u8() % 16 == 0 { F_WRITE } else { 0 };
        chain.push((addr, len, data_flags ^ flip));
    }
    let status = bufs.take(1);
    let slen = if input.u8() % 16 == 0 {
        u32::from(input.u8() % 4)
    } else {
        1
    };
    chain.push((status, slen, F_WRITE));
    chain
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let behind_iommu = mode & 1 == 1;
    let read_only = mode & 2 == 2;
    let mem = fresh_guest_memory();
    let sectors = u64::from(input.u8() % 64) + 1;
    let size = (sectors * 512) as usize + usize::from(mode >> 7) * 100;
    let line = Arc::new(CountingLine::new());

    // The IOMMU in front: domain 1 with endpoint 1, the rings identity-mapped (unless the
    // input says otherwise), then whatever MAPs the input asks for.
    let mut iommu_q = Driver::new(1, 16);
    let mut bufs = Buffers::default();
    let mut iommu = None;
    let dmem = if behind_iommu {
        let mut dev = VirtioIommu::new().expect("eventfd");
        let ep = dev.endpoint(1);
        dev.ack_features(dev.features());
        let evt_q = Driver::new(0, 1);
        if dev
            .activate(
                device_memory(mem.clone(), None),
                vec![iommu_q.queue(64), evt_q.queue(64)],
                Arc::new(VirtioInterrupt::new(line.clone())),
            )
            .is_err()
        {
            return;
        }
        iommu_request(
            &mut dev,
            &mut iommu_q,
            &mem,
            &mut bufs,
            &attach_req(1, 1, 0),
        );
        if input.u8() % 8 != 0 {
            let req = map_req(1, 0, crate::queue::BUF_START - 1, 0, 3);
            iommu_request(&mut dev, &mut iommu_q, &mem, &mut bufs, &req);
        }
        for _ in 0..input.u8() % 8 {
            let req = remap_req(&mut input);
            iommu_request(&mut dev, &mut iommu_q, &mem, &mut bufs, &req);
        }
        iommu = Some(dev);
        device_memory(mem.clone(), Some(ep))
    } else {
        device_memory(mem.clone(), None)
    };

    let mut blk = Block::with_backend(
        Box::new(MemDisk::new(size)),
        read_only,
        "fuzz-disk".into(),
        behind_iommu,
    )
    .expect("in-memory disk");
    let mut features = blk.features();
    if input.u8() % 8 == 0 {
        features &= input.u64();
    }
    features |= 1 << VIRTIO_F_VERSION_1;
    if behind_iommu {
        features |= 1 << VIRTIO_F_ACCESS_PLATFORM;
    }
    if !blk.ack_features(features) {
        return;
    }
    let mut q = Driver::new(0, Driver::size_from(&mut input).min(QUEUE_SIZE));
    if blk
        .activate(
            dmem,
            vec![q.queue(QUEUE_SIZE)],
            Arc::new(VirtioInterrupt::new(line)),
        )
        .is_err()
    {
        return;
    }
    let mut ops = 0;
    while !input.is_empty() && ops < 128 {
        ops += 1;
        match input.u8() % 16 {
            0..=9 => {
                let chain = blk_request(&mut input, &mem, &mut bufs, sectors);
                q.add_chain(&mem, &chain);
                if input.u8() % 4 != 0 {
                    blk.process_queue(0);
                }
            }
            10 => {
                q.add_raw_chain(&mem, &mut input);
                blk.process_queue(0);
            }
            11 => {
                let idx = input.u16();
                q.set_avail_idx(&mem, idx);
                blk.process_queue(0);
            }
            12 | 13 => {
                if let Some(dev) = iommu.as_mut() {
                    let req = remap_req(&mut input);
                    iommu_request(dev, &mut iommu_q, &mem, &mut bufs, &req);
                }
            }
            14 => {
                let mut out = [0u8; 8];
                let n = input.width().min(8);
                blk.read_config(u64::from(input.u8()), &mut out[..n]);
            }
            _ => {
                if input.u8() % 8 == 0 {
                    blk.reset();
                    return;
                }
            }
        }
    }
    blk.process_queue(0);
}
