//! Everything the guest writes is hostile input: random register accesses (any offset, any
//! width, any value) and garbage in guest memory (virtqueue rings, descriptors, requests,
//! invalidation-queue descriptors, remapping tables) must never panic a device model.
//! Deterministic pseudo-random sequences, so a failure reproduces.

use std::sync::{Arc, Mutex};

use devices::pvirq::{PvIrq, PvIrqConfig, PvIrqSink, PvSource, PVIR_PAGE_SIZE};
use devices::remap::{RecordingSink, RouteInvalidation};
use devices::virtio::block::Block;
use devices::virtio::iommu::VirtioIommu;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{device_memory, VirtioDevice, VirtioInterrupt};
use devices::{
    BusDevice, ChangedPins, CountingLine, ExitSignal, Ioapic, MsiMessage, RemapUnit, Serial,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 16 << 20;

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A value that is often interesting: small, all-ones, a guest address, or anything.
    fn value(&mut self) -> u64 {
        match self.below(6) {
            0 => self.below(16),
            1 => u64::MAX,
            2 => self.below(MEM_SIZE) & !0xf,
            3 => 1 << self.below(64),
            _ => self.next(),
        }
    }
}

/// Guest memory full of garbage.
fn garbage_memory(rng: &mut Rng) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let mut chunk = vec![0u8; 1 << 16];
    for base in (0..MEM_SIZE).step_by(chunk.len()) {
        for b in chunk.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            b.copy_from_slice(&v[..b.len()]);
        }
        mem.write_slice(&chunk, GuestAddress(base)).unwrap();
    }
    mem
}

/// Random accesses at random offsets below `span`, of width 1, 2, 4 or 8.
fn poke(dev: &mut dyn BusDevice, rng: &mut Rng, span: u64, ops: usize) {
    for _ in 0..ops {
        let width = 1usize << rng.below(4);
        let offset = rng.below(span);
        if rng.below(3) == 0 {
            let mut data = vec![0u8; width];
            dev.read(offset, &mut data);
        } else {
            let v = rng.value().to_le_bytes();
            dev.write(offset, &v[..width]);
        }
    }
}

fn w32(dev: &mut dyn BusDevice, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// Brings a virtio-mmio device to DRIVER_OK with queues at random (often garbage) addresses,
/// then notifies random queues, then pokes the register file at random.
fn drive_virtio(transport: &mut MmioTransport, mem: &GuestMemoryMmap, rng: &mut Rng, queues: u32) {
    w32(transport, 0x70, 0); // reset
    for status in [1, 3] {
        w32(transport, 0x70, status);
    }
    // Accept a random subset of what the device offers, always VERSION_1 (bit 32) and, when
    // offered, ACCESS_PLATFORM (bit 33: a device behind the IOMMU refuses drivers without it).
    for sel in 0..2 {
        w32(transport, 0x14, sel);
        let mut offered = [0u8; 4];
        transport.read(0x10, &mut offered);
        let offered = u32::from_le_bytes(offered);
        w32(transport, 0x24, sel);
        w32(
            transport,
            0x20,
            (rng.next() as u32 & offered) | if sel == 1 { 1 | (offered & 2) } else { 0 },
        );
    }
    w32(transport, 0x70, 0xb); // FEATURES_OK
    for q in 0..queues {
        w32(transport, 0x30, q);
        let size = 1u16 << rng.below(9);
        w32(transport, 0x38, u32::from(size));
        let mut rings = [0u64; 3];
        for (i, reg) in [0x80, 0x90, 0xa0].into_iter().enumerate() {
            rings[i] = rng.below(MEM_SIZE) & !0xfff;
            w32(transport, reg, rings[i] as u32);
            w32(
                transport,
                reg + 4,
                if rng.below(8) == 0 {
                    rng.next() as u32
                } else {
                    0
                },
            );
        }
        // A plausible available ring (flags 0, a few entries) over a garbage descriptor
        // table, so chain parsing itself meets the garbage.
        let avail = GuestAddress(rings[1]);
        let _ = mem.write_obj(0u16, avail);
        let _ = mem.write_obj(
            1 + rng.below(u64::from(size)) as u16,
            GuestAddress(rings[1] + 2),
        );
        for i in 0..u64::from(size) {
            let _ = mem.write_obj(
                rng.below(u64::from(size)) as u16,
                GuestAddress(rings[1] + 4 + 2 * i),
            );
        }
        w32(transport, 0x44, 1);
    }
    w32(transport, 0x70, 0xf); // DRIVER_OK
    for _ in 0..64 {
        w32(transport, 0x50, rng.below(u64::from(queues) + 2) as u32);
    }
    poke(transport, rng, 0x200, 2000);
}

/// The IOAPIC on a bus, its changes pushed into a recorder.
struct IoapicDev(Ioapic, ChangedPins);

impl BusDevice for IoapicDev {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data, &mut self.1);
    }
}

#[test]
fn ioapic_survives_random_register_traffic() {
    let (mut rte_writes, mut changed) = (0, 0);
    for seed in 1..=4 {
        let mut rng = Rng(seed * 0x9e37_79b9);
        let mut ioapic = IoapicDev(Ioapic::new(0), ChangedPins::default());
        for _ in 0..20 {
            // Select a register, then hit the window, like a driver would (and garbage).
            w32(&mut ioapic, 0, rng.below(0x40) as u32);
            poke(&mut ioapic, &mut rng, 0x100, 200);
            for pin in 0..30 {
                let _ = ioapic.0.pin_msi(pin);
            }
            ioapic.0.end_of_interrupt(rng.next() as u8);
        }
        rte_writes += ioapic.0.stats().rte_writes;
        changed |= ioapic.1 .0;
    }
    // Not vacuous: redirection entries were written and changes pushed.
    assert!(rte_writes > 0);
    assert_ne!(changed, 0, "no pin change was pushed");
}

/// The remapping unit on a bus, everything it pushes recorded.
struct UnitDev(RemapUnit, RecordingSink);

impl BusDevice for UnitDev {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data, &mut self.1);
    }
}

#[test]
fn legacy_devices_survive_random_port_traffic() {
    let mut rng = Rng(7);
    let mut serial = Serial::new(Arc::new(CountingLine::new()), Box::new(std::io::sink()));
    poke(&mut serial, &mut rng, 16, 20_000);
    let _ = serial.enqueue_input(&[0x41; 4096]);
    let exit = ExitSignal::new().unwrap();
    poke(&mut devices::AcpiPm::new(exit.clone()), &mut rng, 8, 5000);
    poke(&mut devices::I8042::new(exit.clone()), &mut rng, 8, 5000);
    let _ = exit.take();
    // The MMIO power-off register: anywhere in (and past) its page, any width and value.
    let mut poweroff = devices::PowerOff::new(exit.clone());
    poke(&mut poweroff, &mut rng, 0x2000, 20_000);
    for offset in [0, 1, 3, 4, 0xffc, 0xfff, u64::MAX - 3, u64::MAX] {
        for width in [0, 1, 2, 3, 4, 8, 16] {
            poweroff.write(offset, &vec![0x01; width]);
            let mut data = vec![0xff; width];
            poweroff.read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "reads are always 0");
        }
    }
    let _ = exit.take();
}

#[test]
fn remap_unit_survives_random_registers_and_garbage_tables() {
    for seed in 1..=3 {
        let mut rng = Rng(seed * 0x5851_f42d);
        let mem = garbage_memory(&mut rng);
        let mut unit = UnitDev(RemapUnit::new(mem), RecordingSink::default());
        for _ in 0..200 {
            // Queue and table somewhere in (garbage) memory, queued invalidation and
            // remapping on, then a random tail: the unit chews through garbage descriptors.
            BusDevice::write(
                &mut unit,
                0x90,
                &(rng.below(MEM_SIZE) & !0xfff | rng.below(4)).to_le_bytes(),
            );
            BusDevice::write(
                &mut unit,
                0xb8,
                &(rng.below(MEM_SIZE) & !0xfff | rng.below(16) | rng.below(2) << 11).to_le_bytes(),
            );
            // Disable QI (resets the head), clear a pending queue error, enable again.
            w32(&mut unit, 0x18, 0);
            w32(&mut unit, 0x34, 0x7f);
            w32(&mut unit, 0x18, 1 << 26);
            w32(&mut unit, 0x18, 1 << 26 | 1 << 24);
            w32(
                &mut unit,
                0x18,
                1 << 26 | 1 << 25 | (rng.below(2) as u32) << 23,
            );
            BusDevice::write(&mut unit, 0x88, &(rng.below(1 << 16) & !0xf).to_le_bytes());
            poke(&mut unit, &mut rng, 0x1000, 50);
            for _ in 0..20 {
                let msg = MsiMessage {
                    address: 0xfee0_0000 | (rng.next() & 0xf_fff0) | 0x10,
                    data: rng.next() as u32,
                };
                let sid = rng.next() as u16;
                if let Err(blocked) = unit.0.translate(msg, sid) {
                    // The source fired while parked.
                    unit.0.request_blocked(&blocked, sid, &mut unit.1);
                }
            }
            let _ = unit.1.take_invalidation();
            let _ = unit.1.take_msis();
        }
        // Not vacuous: garbage descriptors were fetched and rejected or handled.
        let st = unit.0.stats();
        eprintln!("seed {seed}: remap {st:?}");
        assert!(
            st.queue_errors
                + st.iec_global
                + st.iec_selective
                + st.wait_descriptors
                + st.ignored_descriptors
                > 0
        );
    }
}

/// APIC IDs of the PV-IR tests' vCPUs (one above 255).
const PV_APIC_IDS: [u32; 3] = [0, 1, 300];

/// Checks what a PV-IR translation gave KVM: only Fixed, edge, physical-destination
/// compatibility-format messages to an existing CPU, or the message itself when it was
/// already compatibility format.
fn check_pv_route(msg: MsiMessage, out: MsiMessage) {
    if !msg.is_remappable() {
        assert_eq!(out, msg, "compatibility format passes unchanged");
        return;
    }
    assert!(!out.is_remappable());
    let lo = out.address & 0xffff_ffff;
    assert_eq!(
        lo & 0xfff0_0fff,
        0xfee0_0000,
        "no RH/DM/format bits: {out:x?}"
    );
    assert_eq!(out.data & !0xff, 0, "Fixed, edge: {out:x?}");
    assert!(out.data >= 0x10);
    let dest = (out.address >> 32) as u32 & 0xffff_ff00 | ((lo >> 12) & 0xff) as u32;
    assert!(PV_APIC_IDS.contains(&dest), "dest {dest:#x}");
}

/// A sink that re-translates a few messages, as the VMM's router would, and checks them.
#[derive(Default)]
struct PvChecker {
    msgs: Vec<(MsiMessage, PvSource)>,
    invalidations: u64,
}

impl PvIrqSink for PvChecker {
    fn invalidate(&mut self, pv: &mut PvIrq, inv: RouteInvalidation) {
        self.invalidations += 1;
        if let RouteInvalidation::Indices(ranges) = &inv {
            assert!(ranges.iter().all(|r| !r.is_empty() && r.len() <= 32));
        }
        for &(msg, source) in &self.msgs {
            if let Ok(out) = pv.translate(msg, source) {
                check_pv_route(msg, out);
            }
        }
    }
}

/// A random request block: often a well-formed request with random values, sometimes
/// garbage.
fn random_block(rng: &mut Rng, handles: u16) -> [u8; 64] {
    let mut block = [0u8; 64];
    if rng.below(4) == 0 {
        for b in block.chunks_mut(8) {
            b.copy_from_slice(&rng.next().to_le_bytes());
        }
        return block;
    }
    let op = rng.below(6) as u16;
    block[0..2].copy_from_slice(&op.to_le_bytes());
    block[2..4].copy_from_slice(&0xffffu16.to_le_bytes());
    // Mostly small values (handles: mostly the low ones, where the allocator starts).
    let pick16 = |rng: &mut Rng, small: u64| -> u16 {
        match rng.below(8) {
            0 => rng.next() as u16,
            1 => rng.below(small) as u16,
            _ => rng.below(small.min(64)) as u16,
        }
    };
    match op {
        1 => {
            let ty = [1u8, 2, 2, 0, 3][rng.below(5) as usize];
            block[4] = ty;
            let count = if ty == 1 && rng.below(2) == 0 {
                1
            } else {
                1u16 << rng.below(7)
            };
            block[6..8].copy_from_slice(&count.to_le_bytes());
            let high = if rng.below(8) == 0 { pick16(rng, 4) } else { 0 };
            block[8..10].copy_from_slice(&high.to_le_bytes());
            let low = match (ty, rng.below(8)) {
                (_, 0) => rng.next() as u16,
                (1, _) => rng.below(26) as u16,
                _ => [0x0008, 0x0010, 0x0018, 0x0020][rng.below(4) as usize],
            };
            block[10..12].copy_from_slice(&low.to_le_bytes());
        }
        2 => {
            block[0xc..0xe].copy_from_slice(&pick16(rng, u64::from(handles) + 2).to_le_bytes());
            let dest = PV_APIC_IDS[rng.below(3) as usize] + u32::from(rng.below(8) == 0);
            block[0x10..0x14].copy_from_slice(&dest.to_le_bytes());
            block[0x14] = rng.next() as u8;
        }
        3 | 4 => {
            if op == 4 {
                block[6..8].copy_from_slice(&(1u16 << rng.below(6)).to_le_bytes());
            }
            block[0xc..0xe].copy_from_slice(&pick16(rng, u64::from(handles) + 2).to_le_bytes());
        }
        _ => {}
    }
    if rng.below(10) == 0 {
        // One stray byte somewhere.
        block[rng.below(64) as usize] ^= 1 << rng.below(8);
    }
    block
}

#[test]
fn pvirq_survives_random_pages_and_request_blocks() {
    for seed in 1..=3u64 {
        let mut rng = Rng(seed * 0x2545_f491);
        let mem = garbage_memory(&mut rng);
        let max_handles = [0u16, 40, 1000][(seed - 1) as usize];
        let cfg = PvIrqConfig {
            ioapic_id: 0,
            ioapic_pins: 24,
            pci_requesters: vec![0x0008, 0x0010, 0x0018],
            apic_ids: PV_APIC_IDS.to_vec(),
            max_handles,
        };
        let mut pv = PvIrq::new(cfg, mem.clone());
        let mut sink = PvChecker::default();
        pv.write(0x10, &1u32.to_le_bytes(), &mut sink);
        let mut requests = 0u64;
        for round in 0..3000 {
            match rng.below(10) {
                // Random page accesses (REQUEST at garbage addresses included).
                0 | 1 => {
                    for _ in 0..10 {
                        let width = 1usize << rng.below(4);
                        let offset = if rng.below(2) == 0 {
                            rng.below(0x40)
                        } else {
                            rng.below(PVIR_PAGE_SIZE + 0x10)
                        };
                        if rng.below(2) == 0 {
                            let mut data = vec![0u8; width];
                            pv.read(offset, &mut data);
                        } else {
                            let mut v = rng.value();
                            if offset == 0x10 && rng.below(4) != 0 {
                                // CTRL: mostly ENABLE/BLOCK_COMPAT, rarely RESET.
                                v &= 3;
                            }
                            pv.write(offset, &v.to_le_bytes()[..width], &mut sink);
                        }
                    }
                }
                // A request block, mostly aligned, somewhere in RAM or just past it.
                _ => {
                    let gpa = match rng.below(8) {
                        0 => rng.next(),
                        1 => MEM_SIZE - 64 + rng.below(2) * 64,
                        2 => rng.below(MEM_SIZE),
                        _ => rng.below(MEM_SIZE / 64) * 64,
                    };
                    let block = random_block(&mut rng, max_handles);
                    let in_ram = gpa.checked_add(64).is_some_and(|end| end <= MEM_SIZE);
                    // The 256 bytes around the block must not change.
                    let around = |mem: &GuestMemoryMmap| -> Option<Vec<u8>> {
                        let start = gpa.checked_sub(256)?;
                        let mut buf = vec![0u8; 64 + 512];
                        mem.read_slice(&mut buf, GuestAddress(start)).ok()?;
                        Some([&buf[..256], &buf[320..]].concat())
                    };
                    if in_ram {
                        mem.write_slice(&block, GuestAddress(gpa)).unwrap();
                    }
                    let before = around(&mem);
                    let executed = pv.stats().statuses.total();
                    pv.write(0x18, &gpa.to_le_bytes(), &mut sink);
                    requests += 1;
                    assert_eq!(before, around(&mem), "memory outside the block changed");
                    if in_ram && gpa % 64 == 0 {
                        assert_eq!(pv.stats().statuses.total(), executed + 1);
                        let mut out = [0u8; 64];
                        mem.read_slice(&mut out, GuestAddress(gpa)).unwrap();
                        let status = u16::from_le_bytes([out[2], out[3]]);
                        assert!(status <= 7, "status {status}");
                        // An ALLOC that worked: remember its message for re-translation.
                        if status == 0 && block[0..2] == [1, 0] {
                            let dword =
                                |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
                            let msg = MsiMessage {
                                address: u64::from(dword(0x18)),
                                data: dword(0x20),
                            };
                            let source = match block[4] {
                                1 => PvSource::IoapicPin {
                                    ioapic_id: block[8],
                                    pin: block[10],
                                },
                                _ => PvSource::Pci {
                                    segment: 0,
                                    requester_id: u16::from_le_bytes([block[10], block[11]]),
                                },
                            };
                            if sink.msgs.len() < 64 {
                                sink.msgs.push((msg, source));
                            } else {
                                let at = rng.below(64) as usize;
                                sink.msgs[at] = (msg, source);
                            }
                        }
                    } else {
                        assert_eq!(pv.stats().statuses.total(), executed, "ignored");
                    }
                }
            }
            // The messages ALLOC returned, from their own and from random sources.
            for i in 0..sink.msgs.len().min(4) {
                let (msg, source) =
                    sink.msgs[(rng.below(sink.msgs.len() as u64) as usize + i) % sink.msgs.len()];
                let msg = MsiMessage {
                    data: msg.data + rng.below(2) as u32,
                    ..msg
                };
                let source = if rng.below(4) == 0 {
                    sink.msgs[rng.below(sink.msgs.len() as u64) as usize].1
                } else {
                    source
                };
                match pv.translate(msg, source) {
                    Ok(out) => check_pv_route(msg, out),
                    Err(blocked) => pv.request_blocked(&blocked, source, 1),
                }
            }
            if rng.below(200) == 0 {
                // Now and then CTRL changes (rarely a reset).
                let ctrl = [1u32, 1, 3, 0, 1 << 31][rng.below(5) as usize];
                pv.write(0x10, &ctrl.to_le_bytes(), &mut sink);
            }
            // Random messages from random sources; blocked ones fire.
            for _ in 0..4 {
                let msg = MsiMessage {
                    address: 0xfee0_0000 | (rng.next() & 0xf_fffc),
                    data: rng.next() as u32,
                };
                let source = if rng.below(2) == 0 {
                    PvSource::IoapicPin {
                        ioapic_id: rng.below(2) as u8,
                        pin: rng.below(30) as u8,
                    }
                } else {
                    PvSource::Pci {
                        segment: rng.below(2) as u16,
                        requester_id: rng.below(0x20) as u16,
                    }
                };
                match pv.translate(msg, source) {
                    Ok(out) => check_pv_route(msg, out),
                    Err(blocked) => pv.request_blocked(&blocked, source, rng.below(3)),
                }
            }
            let st = pv.stats();
            assert!(st.live_handles <= u32::from(max_handles), "round {round}");
            let r = st.requests;
            assert_eq!(
                r.alloc + r.set + r.clear + r.free + r.bad_op,
                st.statuses.total()
            );
        }
        let st = pv.stats();
        eprintln!(
            "seed {seed}: pvirq {st:?}, {} invalidations",
            sink.invalidations
        );
        // Not vacuous: requests were executed, some worked, some were refused or ignored.
        assert!(requests > 1000);
        assert!(st.statuses.bad_op > 0 && st.bad_request_gpa > 0);
        if max_handles > 0 {
            assert!(st.statuses.ok > 50 && st.translations > 0, "{st:?}");
        }
    }
}

#[test]
fn virtio_devices_survive_garbage_queues_and_registers() {
    for seed in 1..=3 {
        let mut rng = Rng(seed * 0x2545_f491);
        let mem = garbage_memory(&mut rng);
        let iommu = Arc::new(Mutex::new(VirtioIommu::new().unwrap()));
        let endpoint = iommu.lock().unwrap().endpoint(1);

        let path =
            std::env::temp_dir().join(format!("vmm-hostile-{}-{seed}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(file, false, "d".into(), true).unwrap(),
        ));

        let mut iommu_transport = MmioTransport::new(
            iommu.clone() as Arc<Mutex<dyn VirtioDevice>>,
            device_memory(mem.clone(), None),
            Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new()))),
        );
        let mut block_transport = MmioTransport::new(
            block.clone() as Arc<Mutex<dyn VirtioDevice>>,
            device_memory(mem.clone(), Some(endpoint)),
            Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new()))),
        );
        for round in 0..30 {
            // Turn bypass on and off through the config space now and then.
            if round % 7 == 0 {
                iommu_transport.write(0x100 + 36, &[rng.below(2) as u8]);
            }
            drive_virtio(&mut iommu_transport, &mem, &mut rng, 2);
            drive_virtio(&mut block_transport, &mem, &mut rng, 1);
            iommu.lock().unwrap().process_queue(1);
            block.lock().unwrap().process_queue(0);
        }
        // Not vacuous: the devices were activated and consumed garbage requests.
        let i = iommu.lock().unwrap().stats();
        let b = block.lock().unwrap().stats();
        let iommu_requests: u64 = i.requests.iter().flatten().sum();
        let block_requests = b.reads + b.writes + b.flushes + b.get_id + b.unsupported + b.errors;
        eprintln!("seed {seed}: iommu requests {iommu_requests}, block requests {block_requests}");
        assert!(iommu_requests > 0 && block_requests > 0);
        let _ = std::fs::remove_file(path);
    }
}

/// A virtio-pci function (2 queues, MSI-X) behind the root complex: random config space
/// traffic through ECAM and 0xCF8/0xCFC (BARs, Command, capabilities, MSI-X control), random
/// BAR 0 traffic (common config, notify, device config, MSI-X table and PBA), with a proper
/// bring-up to DRIVER_OK over garbage rings in between, never panics; and with bus mastering
/// off the device performs no DMA.
#[test]
fn virtio_pci_survives_random_config_bar_msix_and_notify_traffic() {
    use devices::pci::msix::{MsixVectors, NullSink};
    use devices::pci::root::{PciConfigIo, PciEcam, PciRoot};
    use devices::pci::{BarWindow, PciFunction};
    use devices::virtio::pci::{VirtioPciTransport, MSIX_TABLE_OFFSET, NOTIFY_OFFSET};
    use devices::InterruptLine;

    const BAR: u64 = 0xc000_0000;
    for seed in 1..=3u64 {
        let mut rng = Rng(seed * 0x9e37_79b9);
        let mem = garbage_memory(&mut rng);
        let path =
            std::env::temp_dir().join(format!("vmm-hostile-pci-{}-{seed}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(file, false, "d".into(), false)
                .unwrap()
                .with_queues(2),
        ));
        let lines: Vec<Arc<CountingLine>> = (0..3).map(|_| Arc::new(CountingLine::new())).collect();
        let vectors = MsixVectors::new(
            lines
                .iter()
                .map(|l| l.clone() as Arc<dyn InterruptLine>)
                .collect(),
        );
        let transport = VirtioPciTransport::new(
            block.clone() as Arc<Mutex<dyn VirtioDevice>>,
            device_memory(mem.clone(), None),
            vectors,
            Arc::new(NullSink),
            BAR,
        )
        .unwrap();
        let function: Arc<Mutex<dyn PciFunction>> = Arc::new(Mutex::new(transport));
        let mut root = PciRoot::new();
        root.add(1, function.clone()).unwrap();
        let root = Arc::new(root);
        let mut ecam = PciEcam(root.clone());
        let mut cf8 = PciConfigIo::new(root);
        let mut bar = BarWindow::new(function.clone(), 0);
        let slot1 = 1u64 << 15;

        for round in 0..40 {
            // Garbage config traffic, mostly at slot 1, sometimes anywhere.
            for _ in 0..50 {
                let width = 1usize << rng.below(4);
                let off = if rng.below(4) == 0 {
                    rng.below(1 << 20)
                } else {
                    slot1 + rng.below(0x1000)
                };
                let v = rng.value().to_le_bytes();
                if rng.below(3) == 0 {
                    let mut d = vec![0u8; width];
                    ecam.read(off, &mut d);
                } else {
                    ecam.write(off, &v[..width]);
                }
            }
            poke(&mut cf8, &mut rng, 8, 50);
            // Enable decoding, then garbage BAR traffic (with extra weight on the MSI-X table
            // and the notify area).
            ecam.write(slot1 + 0x10, &(BAR as u32).to_le_bytes());
            ecam.write(slot1 + 0x14, &0u32.to_le_bytes());
            let cmd: u16 = if round % 3 == 0 { 0x2 } else { 0x6 };
            ecam.write(slot1 + 4, &cmd.to_le_bytes());
            poke(&mut bar, &mut rng, 0x8000, 200);
            for _ in 0..30 {
                let off = MSIX_TABLE_OFFSET + rng.below(0x40);
                let v = rng.value().to_le_bytes();
                bar.write(off & !3, &v[..4]);
                bar.write(NOTIFY_OFFSET + 4 * rng.below(4), &v[..2]);
            }
            // A proper bring-up with queues at garbage addresses, then kicks.
            bar.write(0x14, &[0]);
            for s in [1u8, 3] {
                bar.write(0x14, &[s]);
            }
            bar.write(0x08, &1u32.to_le_bytes());
            bar.write(0x0c, &1u32.to_le_bytes());
            bar.write(0x14, &[0xb]);
            for q in 0..2u16 {
                bar.write(0x16, &q.to_le_bytes());
                bar.write(0x18, &8u16.to_le_bytes());
                let mut rings = [0u64; 3];
                for (i, reg) in [0x20u64, 0x28, 0x30].into_iter().enumerate() {
                    rings[i] = rng.below(MEM_SIZE) & !0xfff;
                    bar.write(reg, &rings[i].to_le_bytes());
                }
                // A plausible available ring over a garbage descriptor table.
                let _ = mem.write_obj(0u16, GuestAddress(rings[1]));
                let _ = mem.write_obj(1 + rng.below(8) as u16, GuestAddress(rings[1] + 2));
                for i in 0..8 {
                    let _ = mem.write_obj(rng.below(8) as u16, GuestAddress(rings[1] + 4 + 2 * i));
                }
                bar.write(0x1a, &(q + 1).to_le_bytes());
                bar.write(0x1c, &1u16.to_le_bytes());
            }
            bar.write(0x14, &[0xf]);
            let before = block.lock().unwrap().stats();
            for q in 0..2u64 {
                bar.write(NOTIFY_OFFSET + 4 * q, &(q as u16).to_le_bytes());
            }
            if cmd & 0x4 == 0 {
                let after = block.lock().unwrap().stats();
                assert_eq!(
                    before.reads + before.writes + before.errors + before.unsupported,
                    after.reads + after.writes + after.errors + after.unsupported,
                    "DMA with bus mastering off"
                );
            }
        }
        let b = block.lock().unwrap().stats();
        let requests = b.reads + b.writes + b.flushes + b.get_id + b.unsupported + b.errors;
        eprintln!("seed {seed}: block requests over PCI {requests}");
        assert!(requests > 0, "the garbage was never processed");
        let _ = std::fs::remove_file(path);
    }
}
