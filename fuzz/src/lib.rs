//! Fuzz targets for the device models that parse guest-controlled data. Each module has one
//! `run(data)` that builds guest memory and a device from the fuzz input and drives the real
//! device model through its public interface; `fuzz_targets/NAME.rs` hands libFuzzer's input
//! to it, and `tests/corpus.rs` replays the committed corpora through the same function.
//!
//! Adding a target is one module here, one three-line file in `fuzz_targets/`, a `[[bin]]` entry in
//! `Cargo.toml` and a `corpus/NAME/` directory; `scripts/fuzz.sh` finds it by itself.
//!
//! Inputs are read with [`Input`]: every read succeeds (zeros once the data runs out), so any
//! byte string is a valid program and the fuzzer never wastes executions on parse failures.

#![forbid(unsafe_code)]
// `input.u8() % n == 0` reads as "one time in n"; clearer here than `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

pub mod ioapic;
pub mod msix;
pub mod pci_config;
pub mod pvirq;
pub mod remap_unit;
pub mod virtio_blk;
pub mod virtio_iommu;
pub mod virtio_mmio;
pub mod virtio_pci;

pub mod queue;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by name (`fuzz_targets/NAME.rs`, `corpus/NAME/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_iommu", virtio_iommu::run),
    ("virtio_blk", virtio_blk::run),
    ("remap_unit", remap_unit::run),
    ("ioapic", ioapic::run),
    ("virtio_mmio", virtio_mmio::run),
    ("pci_config", pci_config::run),
    ("virtio_pci", virtio_pci::run),
    ("msix", msix::run),
    ("pvirq", pvirq::run),
];

/// Guest RAM size in the targets: small, so building it per execution is cheap.
pub const MEM_SIZE: u64 = 64 << 10;

/// A cursor over the fuzz input; reads past the end return zeros.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A bool.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        u32::from(self.u16()) % n
    }

    /// A guest address that is usually inside guest RAM, sometimes anywhere: one tag byte
    /// picks in RAM (page-aligned or not), near the end of RAM, or any 64-bit value.
    pub fn address(&mut self) -> u64 {
        match self.u8() % 8 {
            0..=3 => u64::from(self.u16()) % MEM_SIZE,
            4 => (u64::from(self.u16()) % MEM_SIZE) & !0xfff,
            5 => MEM_SIZE - 1 - u64::from(self.u8()),
            6 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }

    /// A length that is usually small, sometimes huge.
    pub fn length(&mut self) -> u32 {
        match self.u8() % 4 {
            0 | 1 => u32::from(self.u8()),
            2 => u32::from(self.u16()),
            _ => self.u32(),
        }
    }

    /// A register access width: 1, 2, 4 or 8 bytes, rarely 0, 3 or 16.
    pub fn width(&mut self) -> usize {
        match self.u8() % 16 {
            0..=2 => 1,
            3..=5 => 2,
            6..=11 => 4,
            12..=13 => 8,
            14 => 3,
            _ => [0, 16][usize::from(self.u8() & 1)],
        }
    }
}

/// Guest RAM of [`MEM_SIZE`] bytes at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("a small anonymous mapping")
}

thread_local! {
    /// This thread's guest RAM, mapped once: see [`fresh_guest_memory`].
    static GUEST_MEMORY: GuestMemoryMmap = guest_memory();
}

/// All zeros, to wipe guest RAM with.
static ZEROS: [u8; MEM_SIZE as usize] = [0; MEM_SIZE as usize];

/// Guest RAM of [`MEM_SIZE`] bytes at address 0, all zeros, as [`guest_memory`] gives, but
/// mapped once per thread and wiped on every call (an mmap/munmap pair and 16 page faults per
/// execution cost more than the target). Every execution sees the same memory, so a crash
/// reproduces from its input alone; the previous execution's handle must be dropped (the
/// targets drop everything they built before returning).
pub fn fresh_guest_memory() -> GuestMemoryMmap {
    GUEST_MEMORY.with(|m| {
        m.write_slice(&ZEROS, GuestAddress(0))
            .expect("wipe guest memory");
        m.clone()
    })
}
