//! Interrupt-remapping slow path, measured on real KVM, for both remappers in one run:
//!
//! - VT-d: the time from the guest's write of the invalidation-queue tail register (carrying
//!   an index-selective Interrupt Entry Cache invalidation and a wait descriptor, as Linux's
//!   `modify_irte` → `qi_flush_iec` sends after changing an IRTE) to the rebuilt route being
//!   in KVM (`KVM_SET_GSI_ROUTING` returned);
//! - PV-IR: the time from the guest's `REQUEST` register write (a `SET` request block that
//!   moves a live handle to another vector / CPU, docs/pv-irq-remap.md) to the rebuilt route
//!   being in KVM.
//!
//! The register writes go through the same bus devices the vCPU threads call, so this covers
//! descriptor / request processing, the guest-memory reads, the translation, the route table
//! and the ioctl. Run: `cargo bench -p vmm --bench remap_latency [-- ITERATIONS]`. Prints one
//! table with both rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/pvirq.rs"]
mod pvirq_setup;
#[path = "../tests/common/remap.rs"]
mod remap_setup;

use devices::remap::regs::DMAR_IQT_REG;
use devices::remap::RemapUnit;
use devices::{Ioapic, PvIrq, PvIrqConfig};
use kvm_ioctls::Kvm;
use pvirq_setup::{program_pin, rte_for, PvDriver};
use remap_setup::{enable_remapping, irte, w64};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::interrupts::{InterruptCounters, InterruptManager};
use vmm::irq_routing::{IoapicBus, IrqRouter, RemapBus};
use vmm::remapper::InterruptRemapper;

const IRT_BASE: u64 = 0x10_0000;
const IQ_BASE: u64 = 0x20_0000;
const STATUS_ADDR: u64 = 0x30_0000;
const BLOCK: u64 = 0x30_1000;
/// The IOAPIC pin whose route is rebuilt, and its IRTE index.
const PIN: u32 = 4;
const INDEX: u64 = 7;
/// vCPUs the PV SETs alternate between (APIC IDs; routes to absent CPUs are fine for KVM).
const CPUS: u32 = 2;

/// One measured path: sorted samples and the counters around them.
struct Run {
    name: &'static str,
    samples: Vec<Duration>,
    before: InterruptCounters,
    after: InterruptCounters,
}

/// A fresh VM with its memory and interrupt manager (one per path, so neither sees the
/// other's routes).
fn vm(
    kvm: &Kvm,
) -> (
    Arc<kvm_ioctls::VmFd>,
    GuestMemoryMmap,
    Arc<InterruptManager>,
) {
    let vm = Arc::new(vmm::vm::create_vm(kvm).expect("VM"));
    let mem = vmm::vm::create_memory(&vm, 64 << 20).expect("memory");
    let im = Arc::new(InterruptManager::new(vm.clone(), 24, (24, 1023)));
    im.init_routing().unwrap();
    (vm, mem, im)
}

fn vtd(kvm: &Kvm, iterations: usize) -> Run {
    let (_vm, mem, im) = vm(kvm);
    let router = IrqRouter::new(
        Ioapic::new(0),
        Some(RemapUnit::new(mem.clone())),
        im.clone(),
        0xff00,
    );
    let mut remap = RemapBus(router.clone());
    let mut ioapic_bus = IoapicBus(router);

    // Linux's bring-up: queued invalidation on, table pointer set (x2APIC format, 256
    // entries), remapping on.
    enable_remapping(&mut remap, IRT_BASE, IQ_BASE);
    mem.write_obj(irte(0x30), GuestAddress(IRT_BASE + 16 * INDEX))
        .unwrap();
    // IOAPIC pin: remappable format (bit 48), handle = INDEX (bits 63:49), vector field = pin.
    let rte: u64 = (INDEX << 49) | (1 << 48) | u64::from(PIN);
    program_pin(&mut ioapic_bus, PIN, rte);
    assert_eq!(
        im.route(PIN).map(|m| m.data & 0xff),
        Some(0x30),
        "initial route"
    );

    let queue_bytes = 4096u64;
    let mut tail = 0u64;
    let mut samples = Vec::with_capacity(iterations);
    let before = im.counters();
    for i in 0..iterations {
        let vector = 0x30 + (i % 64) as u8 + 1;
        mem.write_obj(irte(vector), GuestAddress(IRT_BASE + 16 * INDEX))
            .unwrap();
        // IEC, index-selective (granularity bit 4), IIDX = INDEX, IM = 0.
        let iec = [4u64 | 1 << 4 | INDEX << 32, 0];
        // Wait with status write: data 2 (QI_DONE) to STATUS_ADDR.
        let wait = [5u64 | 1 << 5 | 2 << 32, STATUS_ADDR];
        for desc in [iec, wait] {
            mem.write_obj(desc[0], GuestAddress(IQ_BASE + tail))
                .unwrap();
            mem.write_obj(desc[1], GuestAddress(IQ_BASE + tail + 8))
                .unwrap();
            tail = (tail + 16) % queue_bytes;
        }
        mem.write_obj(0u32, GuestAddress(STATUS_ADDR)).unwrap();
        let start = Instant::now();
        w64(&mut remap, DMAR_IQT_REG, tail);
        samples.push(start.elapsed());
        assert_eq!(
            im.route(PIN).map(|m| m.data & 0xff),
            Some(u32::from(vector))
        );
        assert_eq!(mem.read_obj::<u32>(GuestAddress(STATUS_ADDR)).unwrap(), 2);
    }
    Run {
        name: "VT-d: IQT write → route in KVM (1 IEC + 1 wait)",
        samples,
        before,
        after: im.counters(),
    }
}

fn pv(kvm: &Kvm, iterations: usize) -> Run {
    let (_vm, mem, im) = vm(kvm);
    let pv = PvIrq::new(
        PvIrqConfig {
            ioapic_id: 0,
            ioapic_pins: 24,
            pci_requesters: vec![],
            apic_ids: (0..CPUS).collect(),
            max_handles: 256,
        },
        mem.clone(),
    );
    let router = IrqRouter::with_remapper(
        Ioapic::new(0),
        Some(Box::new(pv) as Box<dyn InterruptRemapper>),
        im.clone(),
        0xff00,
    );
    let mut regs = RemapBus(router.clone());
    let mut ioapic_bus = IoapicBus(router);
    let mut drv = PvDriver {
        regs: &mut regs,
        mem: &mem,
        block: BLOCK,
    };
    // The driver's bring-up: enable, one handle for the pin, SET, then the IOAPIC entry.
    drv.enable();
    let (status, handle, msg) = drv.alloc_pin(0, PIN as u8);
    assert_eq!(status, 0, "ALLOC");
    assert_eq!(drv.set(handle, 0x30, 0), 0, "SET");
    program_pin(&mut ioapic_bus, PIN, rte_for(msg));
    assert_eq!(
        im.route(PIN).map(|m| m.data & 0xff),
        Some(0x30),
        "initial route"
    );

    let mut samples = Vec::with_capacity(iterations);
    let before = im.counters();
    for i in 0..iterations {
        let vector = 0x30 + (i % 64) as u8 + 1;
        let dest = (i as u32 + 1) % CPUS;
        // The request block is written first (guest memory), then the timed REQUEST write.
        drv.set_block(handle, vector, dest);
        let start = Instant::now();
        drv.kick();
        samples.push(start.elapsed());
        assert_eq!(drv.status(), 0);
        assert_eq!(
            im.route(PIN)
                .map(|m| (m.data & 0xff, (m.address >> 12) & 0xff)),
            Some((u32::from(vector), u64::from(dest)))
        );
    }
    Run {
        name: "PV-IR: REQUEST write (SET: new vector/CPU) → route in KVM",
        samples,
        before,
        after: im.counters(),
    }
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let kvm = Kvm::new().expect("this benchmark needs /dev/kvm");
    let mut runs = [vtd(&kvm, iterations), pv(&kvm, iterations)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("\n| measurement | n | min (µs) | median (µs) | p90 (µs) | p99 (µs) | max (µs) | routes rebuilt / op | KVM_SET_GSI_ROUTING / op |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &mut runs {
        r.samples.sort();
        let s = &r.samples;
        let pct = |p: f64| s[((s.len() - 1) as f64 * p) as usize];
        let n = s.len() as f64;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.name,
            s.len(),
            us(s[0]),
            us(pct(0.5)),
            us(pct(0.9)),
            us(pct(0.99)),
            us(s[s.len() - 1]),
            (r.after.routes_rebuilt - r.before.routes_rebuilt) as f64 / n,
            (r.after.routing_updates - r.before.routing_updates) as f64 / n,
        );
    }
    println!(
        "\nKVM_SIGNAL_MSI injections: VT-d {}, PV-IR {}",
        runs[0].after.signal_msi, runs[1].after.signal_msi
    );
}
