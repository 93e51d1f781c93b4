//! PCI configuration space through the root complex: a type-0 header laid out from the input
//! (IDs, up to six BARs of any size and width, a capability list with input bodies and write
//! masks, errors included) next to a real virtio-pci function, both on a [`PciRoot`] reached
//! through ECAM and the 0xCF8/0xCFC mechanism at any offset and width. Biased towards what a
//! driver does: BAR sizing (all-ones, read back, restore), Command/Status (RW1C) writes and
//! capability walks. Checks the invariants a guest relies on after every access: IDs and
//! the capability chain are read-only, BAR addresses stay aligned to their size, Command
//! only has its writable bits.

use std::sync::{Arc, Mutex};

use devices::pci::msix::{MsixVectors, NullSink};
use devices::pci::root::{PciConfigIo, PciEcam, PciRoot};
use devices::pci::{regs, BarInfo, PciConfig, PciFunction};
use devices::virtio::block::Block;
use devices::virtio::device_memory;
use devices::virtio::pci::VirtioPciTransport;
use devices::{BusDevice, CountingLine, InterruptLine};

use crate::virtio_blk::MemDisk;
use crate::{fresh_guest_memory, Input};

/// A function that is nothing but its configuration space (as `root.rs`'s tests use).
struct ConfigOnly(PciConfig);

impl PciFunction for ConfigOnly {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn bars(&self) -> Vec<(usize, BarInfo, u64)> {
        (0..regs::NUM_BARS)
            .filter_map(|i| Some((i, self.0.bar(i)?, self.0.bar_address(i)?)))
            .collect()
    }
}

/// The input's header: IDs, BARs, capabilities (layout errors are part of the game).
fn layout(input: &mut Input<'_>) -> PciConfig {
    let mut c = PciConfig::new(
        input.u16(),
        input.u16(),
        input.u32(),
        input.u16(),
        input.u16(),
    );
    let nbars = input.u8() % 8;
    for _ in 0..nbars {
        let index = usize::from(input.u8() % 8);
        let flags = input.u8();
        let size = match flags % 4 {
            0 => 1u64 << (input.u8() % 64),
            1 => 16u64 << (input.u8() % 20),
            _ => u64::from(input.u32()),
        };
        let info = BarInfo {
            size,
            is_64bit: flags & 4 != 0,
            prefetchable: flags & 8 != 0,
        };
        if c.add_bar(index, info).is_ok() && flags & 16 != 0 {
            // Firmware assigns naturally aligned addresses.
            c.set_bar_address(index, input.u64() & !(size - 1));
        }
    }
    let ncaps = input.u8() % 8;
    for _ in 0..ncaps {
        let len = usize::from(input.u8() % 64);
        let body = input.bytes(len).to_vec();
        let mlen = usize::from(input.u8()) % (len + 2);
        let wmask = input.bytes(mlen).to_vec();
        let _ = c.add_capability(&body, &wmask);
    }
    c
}

/// A virtio-blk PCI function (the real guest-facing config space with side effects).
fn virtio_function() -> Arc<Mutex<VirtioPciTransport>> {
    let blk = Block::with_backend(Box::new(MemDisk::new(4096)), false, "fuzz".into(), false)
        .expect("in-memory disk");
    let lines = (0..VirtioPciTransport::vector_count(1))
        .map(|_| Arc::new(CountingLine::new()) as Arc<dyn InterruptLine>)
        .collect();
    let t = VirtioPciTransport::new(
        Arc::new(Mutex::new(blk)),
        device_memory(fresh_guest_memory(), None),
        MsixVectors::new(lines),
        Arc::new(NullSink),
        0xc000_0000,
    )
    .expect("virtio-pci layout");
    Arc::new(Mutex::new(t))
}

/// What the guest must never be able to change, checked after every access.
struct Invariants {
    ids: [u32; 2],
    caps: Vec<(usize, u8)>,
}

impl Invariants {
    fn of(c: &PciConfig) -> Self {
        Invariants {
            ids: [c.read_u32(0), c.read_u32(8)],
            caps: c.capabilities(),
        }
    }

    fn check(&self, c: &PciConfig) {
        assert_eq!(
            [c.read_u32(0), c.read_u32(8)],
            self.ids,
            "IDs are read-only"
        );
        assert_eq!(c.capabilities(), self.caps, "capability list is read-only");
        let writable =
            regs::CMD_IO | regs::CMD_MEMORY | regs::CMD_BUS_MASTER | regs::CMD_INTX_DISABLE;
        assert_eq!(c.command() & !writable, 0, "Command: only writable bits");
        for i in 0..regs::NUM_BARS {
            if let (Some(b), Some(a)) = (c.bar(i), c.bar_address(i)) {
                assert_eq!(a % b.size, 0, "BAR {i} address aligned to its size");
            }
        }
    }
}

/// A config space offset, usually a dword of the header or a capability.
fn register(input: &mut Input<'_>, caps: &[(usize, u8)]) -> u64 {
    match input.u8() % 8 {
        0..=2 => u64::from(input.u8() % 0x40) & !3,
        3 | 4 if !caps.is_empty() => {
            let (off, _) = caps[usize::from(input.u8()) % caps.len()];
            off as u64 + u64::from(input.u8() % 24)
        }
        5 => u64::from(input.u8()),
        _ => u64::from(input.u16() % 0x1000),
    }
}

/// A value to write: all-ones (BAR sizing), zero, or from the input.
fn value(input: &mut Input<'_>, width: usize) -> Vec<u8> {
    let v = match input.u8() % 4 {
        0 => u64::MAX,
        1 => 0,
        _ => input.u64(),
    };
    let mut b = v.to_le_bytes().to_vec();
    b.resize(width, 0);
    b
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let plain = Arc::new(Mutex::new(ConfigOnly(layout(&mut input))));
    let virtio = virtio_function();
    let plain_slot = 1 + u64::from(input.u8() % 31);
    let virtio_slot = if plain_slot == 31 { 30 } else { plain_slot + 1 };
    let mut root = PciRoot::new();
    root.add(plain_slot as usize, plain.clone())
        .expect("free slot");
    root.add(virtio_slot as usize, virtio.clone())
        .expect("free slot");
    let root = Arc::new(root);
    let mut ecam = PciEcam(root.clone());
    let mut io = PciConfigIo::new(root);

    let inv_plain = Invariants::of(&plain.lock().unwrap().0);
    let inv_virtio = Invariants::of(virtio.lock().unwrap().pci_config());
    let caps_plain = inv_plain.caps.clone();
    let caps_virtio = inv_virtio.caps.clone();

    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        let sel = input.u8();
        let (slot, caps) = if sel & 0x80 != 0 {
            (virtio_slot, &caps_virtio)
        } else {
            (plain_slot, &caps_plain)
        };
        match sel % 8 {
            0..=2 => {
                // ECAM, usually the function's own 4 KiB, sometimes another slot/bus/function.
                let reg = register(&mut input, caps);
                let base = if input.u8() % 8 == 0 {
                    u64::from(input.u32()) & 0x0fff_f000
                } else {
                    slot << 15
                };
                let width = input.width();
                if sel & 0x40 != 0 {
                    let v = value(&mut input, width);
                    ecam.write(base | reg, &v);
                } else {
                    let mut out = vec![0u8; width];
                    ecam.read(base | reg, &mut out);
                }
            }
            3 | 4 => {
                // Mechanism #1: address then data, at any data port and width.
                let reg = register(&mut input, caps);
                let addr = if input.u8() % 8 == 0 {
                    input.u32()
                } else {
                    0x8000_0000 | (slot as u32) << 11 | (reg as u32 & 0xfc)
                };
                io.write(0, &addr.to_le_bytes());
                let port = 4 + (reg & 3);
                let width = input.width();
                if sel & 0x40 != 0 {
                    let v = value(&mut input, width);
                    io.write(port, &v);
                } else {
                    let mut out = vec![0u8; width];
                    io.read(port, &mut out);
                }
            }
            5 => {
                // BAR sizing the way firmware does it: save, all-ones, read, restore.
                let bar = 0x10 + 4 * u64::from(input.u8() % 6);
                let at = slot << 15 | bar;
                let mut saved = [0u8; 4];
                ecam.read(at, &mut saved);
                ecam.write(at, &[0xff; 4]);
                let mut mask = [0u8; 4];
                ecam.read(at, &mut mask);
                ecam.write(at, &saved);
            }
            6 => {
                // Raw port accesses (address register at odd widths, ports past the data).
                let off = u64::from(input.u8() % 10);
                let width = input.width();
                if sel & 0x40 != 0 {
                    let v = value(&mut input, width);
                    io.write(off, &v);
                } else {
                    let mut out = vec![0u8; width];
                    io.read(off, &mut out);
                }
            }
            _ => {
                // The VMM's view: BAR list, and BAR accesses (decode or all-ones).
                let p = plain.lock().unwrap();
                let _ = p.bars();
                drop(p);
                let mut v = virtio.lock().unwrap();
                let _ = v.bars();
                let mut out = vec![0u8; input.width()];
                let off = u64::from(input.u16() % 0x8000);
                v.bar_read(usize::from(input.u8() % 7), off, &mut out);
            }
        }
        // Reads change no config space state: check after writes (and at the end).
        if sel & 0x40 != 0 || sel % 8 == 5 {
            inv_plain.check(&plain.lock().unwrap().0);
            inv_virtio.check(virtio.lock().unwrap().pci_config());
        }
    }
    inv_plain.check(&plain.lock().unwrap().0);
    inv_virtio.check(virtio.lock().unwrap().pci_config());
}
