// SPDX-License-Identifier: Apache-2.0

//! A guest that floods the devices with garbage does not flood the VMM's log: every
//! guest-triggerable line (the devices' own and virtio-queue's `error!`s, through
//! [`GuestLogFilter`]) shares one token bucket. The logger here accepts every level, so nothing
//! is dropped for its level: what is bounded is the rate.
//!
//! One test per binary: the logger and the bucket are process-wide.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::BusDevice;
use devices::ratelimit::{GuestLogFilter, BURST, REFILL_PER_SEC};
use devices::virtio::block::Block;
use devices::virtio::driver_ring::DriverRing;
use devices::virtio::iommu::device::AVAIL_FEATURES;
use devices::virtio::iommu::protocol::*;
use devices::virtio::iommu::VirtioIommu;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{device_memory, VirtioDevice, VirtioInterrupt};
use devices::CountingLine;
use log::{LevelFilter, Log, Metadata, Record};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// Records that reached the logger's output.
static LOGGED: AtomicUsize = AtomicUsize::new(0);
/// Records offered to the filter (dependencies' records included, before rate limiting).
static OFFERED: AtomicUsize = AtomicUsize::new(0);

struct Counting;

impl Log for Counting {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn log(&self, _: &Record<'_>) {
        LOGGED.fetch_add(1, Ordering::Relaxed);
    }
    fn flush(&self) {}
}

/// Counts what reaches the filter, then passes it on.
struct Offered(GuestLogFilter<Counting>);

impl Log for Offered {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn log(&self, r: &Record<'_>) {
        OFFERED.fetch_add(1, Ordering::Relaxed);
        self.0.log(r);
    }
    fn flush(&self) {}
}

const MEM_SIZE: usize = 16 << 20;
const BLK_RING: u64 = 0x10_0000;
const IOMMU_RING: u64 = 0x20_0000;
const REQ: u64 = 0x40_0000;
const RESP: u64 = 0x50_0000;
const CHAINS: usize = 10_000;
const RING_SIZE: u16 = 256;
const PER_KICK: usize = 128;

fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new())))
}

#[test]
fn garbage_from_the_guest_is_processed_but_its_log_lines_are_rate_limited() {
    let logger: &'static Offered = Box::leak(Box::new(Offered(GuestLogFilter::new(
        Counting,
        LevelFilter::Trace,
    ))));
    log::set_logger(logger).unwrap();
    log::set_max_level(LevelFilter::Trace);
    let start = Instant::now();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();

    // virtio-blk: 10 000 chains whose header is device-writable (IOERR each).
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();
    let file = image.as_file().try_clone().unwrap();
    let mut block = Block::new(file, false, "flood".into(), false).unwrap();
    let mut ring = DriverRing::new(BLK_RING, RING_SIZE);
    block
        .activate(
            device_memory(mem.clone(), None),
            vec![ring.queue()],
            interrupt(),
        )
        .unwrap();
    for done in (0..CHAINS).step_by(PER_KICK) {
        for _ in done..(done + PER_KICK).min(CHAINS) {
            ring.push(&mem, &[(REQ, 16, true), (RESP, 1, true)]);
        }
        block.process_queue(0);
    }
    assert_eq!(block.stats().errors, CHAINS as u64, "every chain answered");
    assert_eq!(ring.used_idx(&mem), CHAINS as u16);

    // virtio-queue itself: an available index that runs ahead of the ring by more than its
    // size is an `error!` in virtio-queue on every pop.
    ring.publish(&mem, ring.avail_idx.wrapping_add(RING_SIZE + 1));
    let offered_before = OFFERED.load(Ordering::Relaxed);
    for _ in 0..CHAINS {
        block.process_queue(0);
    }
    assert!(
        OFFERED.load(Ordering::Relaxed) - offered_before >= CHAINS,
        "virtio-queue logged its errors"
    );

    // virtio-iommu: 10 000 MAPs to a domain that does not exist (NOENT, a `warn!` each,
    // since Linux ignores MAP statuses).
    let mut iommu = VirtioIommu::new().unwrap();
    iommu.ack_features(AVAIL_FEATURES);
    let mut iring = DriverRing::new(IOMMU_RING, RING_SIZE);
    let event = DriverRing::new(IOMMU_RING + 0x4000, 16);
    iommu
        .activate(
            device_memory(mem.clone(), None),
            vec![iring.queue(), event.queue()],
            interrupt(),
        )
        .unwrap();
    let head = VirtioIommuReqHead {
        type_: VIRTIO_IOMMU_T_MAP,
        reserved: [0; 3],
    };
    let body = VirtioIommuReqMap {
        domain: 77.into(),
        virt_start: 0.into(),
        virt_end: 0xfff.into(),
        phys_start: 0.into(),
        flags: VIRTIO_IOMMU_MAP_F_READ.into(),
    };
    mem.write_slice(head.as_slice(), GuestAddress(REQ)).unwrap();
    mem.write_slice(body.as_slice(), GuestAddress(REQ + 4))
        .unwrap();
    let len = 4 + std::mem::size_of::<VirtioIommuReqMap>() as u32;
    for done in (0..CHAINS).step_by(PER_KICK) {
        for _ in done..(done + PER_KICK).min(CHAINS) {
            iring.push(&mem, &[(REQ, len, false), (RESP, 4, true)]);
        }
        iommu.process_queue(0);
    }
    let stats = iommu.stats();
    assert_eq!(
        stats.requests_with(VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_S_NOENT.into()),
        CHAINS as u64
    );

    // The transport: a few thousand writes to read-only and unknown registers.
    let dev = Arc::new(Mutex::new(VirtioIommu::new().unwrap()));
    let mut transport = MmioTransport::new(dev, device_memory(mem.clone(), None), interrupt());
    for i in 0..3000u64 {
        transport.write(0x0f0 + (i % 2) * 4, &1u32.to_le_bytes());
        transport.write(0x1, &[0]);
    }

    let elapsed = start.elapsed().as_secs_f64();
    let logged = LOGGED.load(Ordering::Relaxed) as f64;
    // A few lines are not guest-triggered (virtio-blk's setup `info!`).
    let bound = BURST as f64 + REFILL_PER_SEC as f64 * elapsed.ceil() + 5.0;
    eprintln!(
        "{} records offered, {logged} logged in {elapsed:.2} s (bound {bound})",
        OFFERED.load(Ordering::Relaxed)
    );
    assert!(
        logged <= bound,
        "{logged} lines logged in {elapsed:.2} s; at most {bound} allowed"
    );
}
