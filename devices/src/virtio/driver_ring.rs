// SPDX-License-Identifier: Apache-2.0

//! The driver's side of a split virtqueue, for tests and benchmarks (feature `test-utils`):
//! writes descriptor chains and the available ring into guest memory the way a guest driver
//! does, and reads the used index back.
//!
//! Layout: descriptor table at `base`, available ring at `base + 0x1000`, used ring at
//! `base + 0x2000` (so `size` ≤ 256 fits in 4 KiB each).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use virtio_queue::{Queue, QueueT};

/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const F_WRITE: u16 = 2;

/// A driver-side split ring; see the [module documentation](self).
#[derive(Debug)]
pub struct DriverRing {
    /// Guest address of the descriptor table.
    pub base: u64,
    /// Queue size.
    pub size: u16,
    next_desc: u16,
    /// The driver's available index (next slot to fill).
    pub avail_idx: u16,
}

impl DriverRing {
    /// A ring of `size` entries at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        DriverRing {
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue, ready, pointing at this ring.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("valid queue size");
        q.try_set_desc_table_address(GuestAddress(self.base))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(self.base + 0x1000))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(self.base + 0x2000))
            .expect("aligned");
        q.set_ready(true);
        q
    }

    /// Adds a chain of `(address, length, device-writable)` buffers and publishes it.
    pub fn push(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let d = GuestAddress(self.base + 16 * u64::from(idx));
            mem.write_obj(addr, d).expect("descriptor in memory");
            mem.write_obj(len, d.unchecked_add(8))
                .expect("descriptor in memory");
            mem.write_obj(flags, d.unchecked_add(12))
                .expect("descriptor in memory");
            let next = if last { 0 } else { (idx + 1) % self.size };
            mem.write_obj(next, d.unchecked_add(14))
                .expect("descriptor in memory");
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        let slot = GuestAddress(self.base + 0x1000 + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head, slot).expect("available ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish(mem, self.avail_idx);
    }

    /// Writes the available index (a hostile driver may write one that lies).
    pub fn publish(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.base + 0x1000 + 2))
            .expect("available ring in memory");
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.base + 0x2000 + 2))
            .expect("used ring in memory")
    }
}
