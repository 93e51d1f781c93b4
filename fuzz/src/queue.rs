//! The driver's side of a split virtqueue in guest memory: descriptor table, available ring
//! and used ring at fixed offsets from a base, chains written the way a driver would (or
//! garbage, when the input says so).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::Input;

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// Bytes from a queue's base to its available ring; the used ring follows 4 KiB later.
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;

/// Where the rings of the (at most two) queues of a target live: queue `i` at `i * 0x3000`.
pub fn queue_base(index: usize) -> u64 {
    index as u64 * 0x3000
}

/// Start of the buffer area, after two queues' rings.
pub const BUF_START: u64 = 0x6000;

/// One descriptor: guest address, length, flags besides NEXT.
pub type Desc = (u64, u32, u16);

/// The driver side of one queue.
#[derive(Debug)]
pub struct Driver {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// A queue of `size` entries (a power of two up to 256) at `queue_base(index)`.
    pub fn new(index: usize, size: u16) -> Self {
        Driver {
            base: queue_base(index),
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A queue size from the input: a power of two in 1..=256, mostly 16 or more.
    pub fn size_from(input: &mut Input<'_>) -> u16 {
        match input.u8() % 8 {
            0 => 1 << (input.u8() % 9),
            _ => 16 << (input.u8() % 5),
        }
    }

    /// The device's view: a ready `Queue` with this driver's addresses.
    pub fn queue(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).expect("valid maximum size");
        q.set_size(self.size.min(max_size));
        q.try_set_desc_table_address(GuestAddress(self.base))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(self.base + AVAIL_OFFSET))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(self.base + USED_OFFSET))
            .expect("aligned");
        q.set_ready(true);
        q
    }

    /// Writes `descs` as one chain and makes it available.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) {
        if descs.is_empty() {
            return;
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let next = (idx + 1) % self.size;
            let flags = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                flags & !F_NEXT
            };
            self.write_desc(mem, idx, addr, len, flags, next);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(mem, head);
    }

    /// Writes one descriptor at table index `idx`.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.base + 16 * u64::from(idx % self.size));
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&d, at);
    }

    /// Makes the chain at `head` available (any value: a garbage head is the device's
    /// problem).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let avail = self.base + AVAIL_OFFSET;
        let slot = avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(avail + 2));
    }

    /// Sets the available index to anything (a driver lying about how much it queued).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, GuestAddress(self.base + AVAIL_OFFSET + 2));
    }

    /// A chain straight from the input: up to 8 descriptors with input addresses, lengths,
    /// flags (INDIRECT included) and `next` fields, and a head from the input.
    pub fn add_raw_chain(&mut self, mem: &GuestMemoryMmap, input: &mut Input<'_>) {
        let n = 1 + input.u8() % 8;
        for _ in 0..n {
            let idx = input.u16();
            let addr = input.address();
            let len = input.length();
            let flags = input.u16() & 0x7;
            let next = input.u16();
            self.write_desc(mem, idx, addr, len, flags, next);
        }
        let head = input.u16();
        self.publish(mem, head);
    }
}

/// A buffer area allocator for one execution: hands out addresses in `[BUF_START, MEM_SIZE)`.
#[derive(Debug)]
pub struct Buffers {
    next: u64,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers { next: BUF_START }
    }
}

impl Buffers {
    /// Space for `len` bytes (wrapping around the buffer area; overlap is fine).
    pub fn take(&mut self, len: u64) -> u64 {
        let area = crate::MEM_SIZE - BUF_START;
        let len = len.min(area);
        if self.next + len > crate::MEM_SIZE {
            self.next = BUF_START;
        }
        let at = self.next;
        self.next += (len + 7) & !7;
        at
    }
}
