//! The virtio-pci modern transport over a real device (virtio-blk on an in-memory disk with
//! one or more queues, or the virtio-iommu): BAR 0 accesses of any width to the common,
//! notify, ISR and device configuration structures and the MSI-X table/PBA (and anywhere
//! else in and past the BAR), config space writes (Command, MSI-X Message Control, the
//! `VIRTIO_PCI_CAP_PCI_CFG` window both ways), biased towards a driver's bring-up, with queue
//! addresses and ring contents in guest memory from the input, so DRIVER_OK activates the
//! device on fuzzed queues and a notify processes them on the calling thread (no worker).

use std::sync::{Arc, Mutex};

use devices::pci::msix::{MsixSink, MsixVectorUpdate, MsixVectors, MSIX_CTRL_ENABLE};
use devices::pci::{regs, PciFunction};
use devices::virtio::block::Block;
use devices::virtio::iommu::VirtioIommu;
use devices::virtio::pci::{
    VirtioPciTransport, BAR_SIZE, DEVICE_OFFSET, ISR_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
};
use devices::virtio::{device_memory, VirtioDevice};
use devices::{CountingLine, InterruptLine};
use vm_memory::{Bytes, GuestAddress};

use crate::virtio_blk::MemDisk;
use crate::{fresh_guest_memory, Input, MEM_SIZE};

const BAR: u64 = 0xc000_0000;

/// The common configuration fields (offset, width) a driver touches.
const COMMON: [(u64, usize); 20] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 4),
    (0x24, 4),
    (0x28, 4),
    (0x2c, 4),
    (0x30, 4),
    (0x34, 4),
    (0x20, 8),
];

/// Checks what a sink can check: one batch per write, each vector at most once, in range.
struct CheckingSink(usize);

impl MsixSink for CheckingSink {
    fn vectors_changed(&self, updates: &[MsixVectorUpdate]) {
        assert!(!updates.is_empty(), "empty MSI-X batch");
        for (i, u) in updates.iter().enumerate() {
            assert!(usize::from(u.vector) < self.0, "vector out of range");
            assert!(
                updates[..i].iter().all(|p| p.vector != u.vector),
                "vector twice in a batch"
            );
        }
    }
}

fn bar_w(t: &mut VirtioPciTransport, off: u64, v: u64, width: usize) {
    t.bar_write(0, off, &v.to_le_bytes()[..width]);
}

fn bar_r(t: &mut VirtioPciTransport, off: u64, width: usize) -> u64 {
    let mut b = [0u8; 8];
    t.bar_read(0, off, &mut b[..width]);
    u64::from_le_bytes(b)
}

/// A BAR 0 offset: usually a field of one of the structures, sometimes anywhere.
fn bar_offset(input: &mut Input<'_>, queues: usize) -> (u64, usize) {
    match input.u8() % 8 {
        0..=2 => COMMON[usize::from(input.u8()) % COMMON.len()],
        3 => (
            NOTIFY_OFFSET + 4 * u64::from(input.u8()) % (4 * queues as u64 + 8),
            [2, 4][usize::from(input.u8() & 1)],
        ),
        4 => (DEVICE_OFFSET + u64::from(input.u8() % 0x40), input.width()),
        5 => (
            MSIX_TABLE_OFFSET + 4 * u64::from(input.u8() % 48),
            [4, 8][usize::from(input.u8() & 1)],
        ),
        6 => (
            [ISR_OFFSET, MSIX_PBA_OFFSET][usize::from(input.u8() & 1)],
            input.width(),
        ),
        _ => (u64::from(input.u16()) % (BAR_SIZE + 0x100), input.width()),
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = fresh_guest_memory();
    let kind = input.u8();
    let image = input.bytes(usize::from(input.clone().u16() % 8192));
    let _ = mem.write_slice(image, GuestAddress(u64::from(input.u16()) % MEM_SIZE));
    let dev: Arc<Mutex<dyn VirtioDevice>> = if kind & 1 == 0 {
        let blk = Block::with_backend(
            Box::new(MemDisk::new(8192)),
            kind & 2 == 2,
            "fuzz".into(),
            kind & 4 == 4,
        )
        .expect("in-memory disk")
        .with_queues(1 + u16::from(kind >> 5));
        Arc::new(Mutex::new(blk))
    } else {
        let iommu = VirtioIommu::new().expect("eventfd");
        iommu.endpoint(1);
        Arc::new(Mutex::new(iommu))
    };
    let queues = dev.lock().unwrap().queue_max_sizes().len();
    let nvec = VirtioPciTransport::vector_count(queues);
    let lines: Vec<Arc<CountingLine>> = (0..nvec).map(|_| Arc::new(CountingLine::new())).collect();
    let vectors = MsixVectors::new(
        lines
            .iter()
            .map(|l| l.clone() as Arc<dyn InterruptLine>)
            .collect(),
    );
    let mut t = VirtioPciTransport::new(
        dev,
        device_memory(mem.clone(), None),
        vectors,
        Arc::new(CheckingSink(nvec)),
        BAR,
    )
    .expect("virtio-pci layout");
    let caps = t.pci_config().capabilities();
    let msix_cap = caps
        .iter()
        .find(|c| c.1 == regs::CAP_ID_MSIX)
        .map_or(0, |c| c.0 as u64);
    // The PCI_CFG access capability is the last vendor capability.
    let cfg_cap = caps
        .iter()
        .rfind(|c| c.1 == regs::CAP_ID_VENDOR)
        .map_or(0, |c| c.0 as u64);

    // A driver's bring-up first, unless the input skips it.
    let init = input.u8();
    if init % 4 != 0 {
        let cmd = regs::CMD_MEMORY
            | if init & 4 == 0 {
                regs::CMD_BUS_MASTER
            } else {
                0
            };
        t.config_write(4, &cmd.to_le_bytes());
        if init & 8 == 0 {
            t.config_write(msix_cap + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
            for v in 0..nvec as u64 {
                let e = MSIX_TABLE_OFFSET + 16 * v;
                bar_w(&mut t, e, 0xfee0_0000, 4);
                bar_w(&mut t, e + 8, 0x30 + v, 4);
                bar_w(&mut t, e + 12, u64::from(input.u8() % 4 == 0), 4);
            }
        }
        bar_w(&mut t, 0x14, 1, 1);
        bar_w(&mut t, 0x14, 3, 1);
        for sel in 0..2 {
            bar_w(&mut t, 0x00, sel, 4);
            let offered = bar_r(&mut t, 0x04, 4);
            bar_w(&mut t, 0x08, sel, 4);
            let v = offered & if input.bool() { u64::MAX } else { input.u64() };
            bar_w(&mut t, 0x0c, v, 4);
        }
        bar_w(&mut t, 0x14, 0xb, 1);
        bar_w(&mut t, 0x10, u64::from(input.u8()) % (nvec as u64 + 1), 2);
        for q in 0..queues.min(2) as u64 {
            bar_w(&mut t, 0x16, q, 2);
            bar_w(&mut t, 0x18, 1 << (input.u8() % 9), 2);
            for reg in [0x20, 0x28, 0x30] {
                let a = (u64::from(input.u16()) % MEM_SIZE) & !0xf;
                bar_w(&mut t, reg, a, 8);
            }
            bar_w(&mut t, 0x1a, q + 1, 2);
            bar_w(&mut t, 0x1c, 1, 2);
        }
        bar_w(&mut t, 0x14, 0xf, 1);
    }

    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 10 {
            0..=3 => {
                let (off, width) = bar_offset(&mut input, queues);
                let v = match input.u8() % 4 {
                    0 => input.u64(),
                    _ => u64::from(input.u8() % 16),
                };
                let mut b = v.to_le_bytes().to_vec();
                b.resize(width, 0);
                t.bar_write(0, off, &b);
            }
            4 => {
                let (off, width) = bar_offset(&mut input, queues);
                let mut out = vec![0u8; width];
                let bar = if input.u8() % 16 == 0 { 1 } else { 0 };
                t.bar_read(bar, off, &mut out);
            }
            5 => {
                // Config space: Command, Message Control, anywhere in a capability.
                let off = match input.u8() % 4 {
                    0 => 4,
                    1 => msix_cap + 2,
                    2 => {
                        caps[usize::from(input.u8()) % caps.len()].0 as u64
                            + u64::from(input.u8() % 20)
                    }
                    _ => u64::from(input.u8()),
                };
                let width = input.width();
                let v = input.u32().to_le_bytes();
                let mut b = v.to_vec();
                b.resize(width, 0);
                if input.bool() {
                    t.config_write(off, &b);
                } else {
                    t.config_read(off, &mut b);
                }
            }
            6 => {
                // The PCI_CFG window: bar, offset, length, then data both ways.
                let (off, width) = bar_offset(&mut input, queues);
                let bar = if input.u8() % 16 == 0 { input.u8() } else { 0 };
                let len = if input.u8() % 8 == 0 {
                    input.u32()
                } else {
                    width as u32
                };
                t.config_write(cfg_cap + 4, &[bar]);
                t.config_write(cfg_cap + 8, &(off as u32).to_le_bytes());
                t.config_write(cfg_cap + 12, &len.to_le_bytes());
                let mut d = input.u32().to_le_bytes();
                if input.bool() {
                    t.config_write(cfg_cap + 16, &d);
                } else {
                    t.config_read(cfg_cap + 16, &mut d);
                }
            }
            7 => {
                // The driver edits guest memory (rings, descriptors) between accesses.
                let at = u64::from(input.u16()) % MEM_SIZE;
                let n = usize::from(input.u8() % 32);
                let bytes = input.bytes(n);
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            8 => {
                // The device side: interrupts for every queue, a config change.
                let v = input.u16() % (nvec as u16 + 2);
                t.vectors().trigger(v);
                let _ = t.vectors().is_pending(v);
                let _ = t.is_activated();
                let _ = t.status();
            }
            _ => {
                // BAR moves and memory decode toggles (the BAR stops decoding).
                let v = if input.bool() {
                    input.u32()
                } else {
                    BAR as u32
                };
                t.config_write(0x10, &v.to_le_bytes());
            }
        }
    }
}
