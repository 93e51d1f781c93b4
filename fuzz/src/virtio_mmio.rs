//! The virtio-mmio transport's register file over a real device (virtio-blk on an in-memory
//! disk, or the virtio-iommu): accesses of any width to any offset in (and past) the window,
//! biased towards a driver's init sequence, with queue addresses and ring contents from the
//! input, so DRIVER_OK activates the device on fuzzed queues and QueueNotify processes them
//! on the calling thread (no worker).

use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use devices::virtio::iommu::VirtioIommu;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{device_memory, VirtioDevice, VirtioInterrupt};
use devices::{BusDevice, CountingLine};
use vm_memory::{Bytes, GuestAddress};

use crate::virtio_blk::MemDisk;
use crate::{fresh_guest_memory, Input, MEM_SIZE};

/// The virtio-mmio registers a driver touches.
const REGS: [u64; 26] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0fc, 0x100,
];

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = fresh_guest_memory();
    let kind = input.u8();
    let image = input.bytes(usize::from(input.clone().u16() % 8192));
    let _ = mem.write_slice(image, GuestAddress(u64::from(input.u16()) % MEM_SIZE));
    let line = Arc::new(CountingLine::new());
    let interrupt = Arc::new(VirtioInterrupt::new(line));
    let (dev, dmem): (Arc<Mutex<dyn VirtioDevice>>, _) = if kind & 1 == 0 {
        let blk = Block::with_backend(
            Box::new(MemDisk::new(8192)),
            kind & 2 == 2,
            "fuzz".into(),
            false,
        )
        .expect("in-memory disk");
        (Arc::new(Mutex::new(blk)), device_memory(mem.clone(), None))
    } else {
        let iommu = VirtioIommu::new().expect("eventfd");
        iommu.endpoint(1);
        (
            Arc::new(Mutex::new(iommu)),
            device_memory(mem.clone(), None),
        )
    };
    let mut t = MmioTransport::new(dev, dmem, interrupt.clone());

    // The usual init sequence first, unless the input skips it.
    if input.u8() % 4 != 0 {
        w32(&mut t, 0x70, 0);
        w32(&mut t, 0x70, 1);
        w32(&mut t, 0x70, 3);
        for sel in 0..2 {
            w32(&mut t, 0x14, sel);
            let mut offered = [0u8; 4];
            t.read(0x10, &mut offered);
            w32(&mut t, 0x24, sel);
            let v = u32::from_le_bytes(offered) & if input.bool() { u32::MAX } else { input.u32() };
            w32(&mut t, 0x20, v);
        }
        w32(&mut t, 0x70, 0xb);
        for q in 0..2 {
            w32(&mut t, 0x30, q);
            w32(&mut t, 0x38, 1 << (input.u8() % 9));
            for reg in [0x80, 0x90, 0xa0] {
                w32(
                    &mut t,
                    reg,
                    (u32::from(input.u16()) % MEM_SIZE as u32) & !0xf,
                );
                w32(&mut t, reg + 4, 0);
            }
            w32(&mut t, 0x44, 1);
        }
        w32(&mut t, 0x70, 0xf);
    }
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 8 {
            0..=3 => {
                let off = REGS[usize::from(input.u8()) % REGS.len()];
                let v = match input.u8() % 4 {
                    0 => input.u32(),
                    _ => u32::from(input.u8() % 16),
                };
                w32(&mut t, off, v);
            }
            4 => {
                let off = u64::from(input.u16()) % 0x1100;
                let n = input.width();
                let v = input.u64().to_le_bytes();
                let mut data = v.to_vec();
                data.resize(n, 0);
                t.write(off, &data);
            }
            5 => {
                let off = if input.bool() {
                    REGS[usize::from(input.u8()) % REGS.len()]
                } else {
                    u64::from(input.u16()) % 0x1100
                };
                let mut out = vec![0u8; input.width()];
                t.read(off, &mut out);
            }
            6 => {
                // The driver edits guest memory (rings, descriptors) between accesses.
                let at = u64::from(input.u16()) % MEM_SIZE;
                let n = usize::from(input.u8() % 32);
                let bytes = input.bytes(n);
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            _ => {
                interrupt.ack(input.u32());
                let _ = t.status();
                let _ = t.is_activated();
                if input.u8() % 32 == 0 {
                    t.config_changed();
                }
            }
        }
    }
}
