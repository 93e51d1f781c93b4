//! Interrupt-remapping slow path, measured on real KVM: the time from the guest's write of the
//! invalidation-queue tail register (carrying an index-selective Interrupt Entry Cache
//! invalidation and a wait descriptor, as Linux's `modify_irte` → `qi_flush_iec` sends after
//! changing an IRTE) to the rebuilt route being in KVM (`KVM_SET_GSI_ROUTING` returned).
//!
//! The register writes go through the same bus devices the vCPU threads call, so this covers
//! descriptor processing, the IRTE read, the translation, the route table and the ioctl.
//! Run: `cargo bench -p vmm --bench remap_latency [-- ITERATIONS]`. Prints a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/remap.rs"]
mod remap_setup;

use devices::remap::regs::DMAR_IQT_REG;
use devices::remap::RemapUnit;
use devices::Ioapic;
use kvm_ioctls::Kvm;
use remap_setup::{enable_remapping, irte, w32, w64};
use vm_memory::{Bytes, GuestAddress};
use vmm::interrupts::InterruptManager;
use vmm::irq_routing::{IoapicBus, IrqRouter, RemapBus};

const IRT_BASE: u64 = 0x10_0000;
const IQ_BASE: u64 = 0x20_0000;
const STATUS_ADDR: u64 = 0x30_0000;
/// The IOAPIC pin whose route is rebuilt, and its IRTE index.
const PIN: u32 = 4;
const INDEX: u64 = 7;

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let kvm = Kvm::new().expect("this benchmark needs /dev/kvm");
    let vm = Arc::new(vmm::vm::create_vm(&kvm).expect("VM"));
    let mem = vmm::vm::create_memory(&vm, 64 << 20).expect("memory");
    let im = Arc::new(InterruptManager::new(vm.clone(), 24, (24, 1023)));
    im.init_routing().unwrap();
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
    for (reg, val) in [
        (0x10 + 2 * PIN, rte as u32),
        (0x11 + 2 * PIN, (rte >> 32) as u32),
    ] {
        w32(&mut ioapic_bus, 0x00, reg);
        w32(&mut ioapic_bus, 0x10, val);
    }
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
    let after = im.counters();
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("\n| measurement | n | min (µs) | median (µs) | p90 (µs) | p99 (µs) | max (µs) |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| IQT write → route in KVM (1 IEC + 1 wait) | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        samples.len(),
        us(samples[0]),
        us(pct(0.5)),
        us(pct(0.9)),
        us(pct(0.99)),
        us(samples[samples.len() - 1])
    );
    println!(
        "\nroutes rebuilt per invalidation: {:.2}; KVM_SET_GSI_ROUTING calls per invalidation: {:.2}; KVM_SIGNAL_MSI injections: {}",
        (after.routes_rebuilt - before.routes_rebuilt) as f64 / iterations as f64,
        (after.routing_updates - before.routing_updates) as f64 / iterations as f64,
        after.signal_msi
    );
}
