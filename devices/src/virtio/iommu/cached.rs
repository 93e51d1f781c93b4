// SPDX-License-Identifier: Apache-2.0

//! [`CachedMemory`]: a device model's [`DeviceMemory`] that remembers the IOTLB entries it
//! used recently, so that the ring, header and buffer accesses of a batch of requests do not
//! each pay `vm_memory::Iotlb`'s lookup.
//!
//! Correctness rests on three things:
//! - it only remembers entries the endpoint's IOTLB holds (copied out under the IOTLB lock,
//!   no fill, no fault), and checks each access against the entry's bounds and permissions;
//! - every remembered entry is tagged with the endpoint's invalidation generation, read
//!   before the IOTLB was consulted; any invalidation (UNMAP, DETACH, ATTACH, bypass, reset)
//!   bumps it under the IOTLB write lock, and a changed generation makes every remembered
//!   entry useless before the next access;
//! - accesses happen only under a request guard (the
//!   [request-guard contract](super#request-guard-contract-for-device-models)): an
//!   invalidation that lands after the generation check waits for the guard, exactly as it
//!   waits for slices handed out by `IommuMemory`.
//!
//! Anything else (an IOTLB miss, a fault, an access spanning entries) goes through
//! `IommuMemory` unchanged, with its fault reporting and IOTLB fills.

use std::cell::Cell;
use std::iter::FusedIterator;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemorySliceIterator, Result as GuestMemoryResult};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions, VolatileSlice,
};

use crate::virtio::DeviceMemory;

/// IOTLB entries remembered at once (rings, request headers, data buffers).
const RANGES: usize = 8;

/// A remembered IOTLB entry: `[iova, iova + len)` maps to `phys`.
#[derive(Clone, Copy, Debug)]
struct Range {
    iova: u64,
    /// 0 for an empty slot.
    len: u64,
    phys: u64,
    /// What the entry allows.
    access: Permissions,
    /// The endpoint's invalidation generation read before the lookup.
    generation: u64,
}

const EMPTY: Range = Range {
    iova: 0,
    len: 0,
    phys: 0,
    access: Permissions::No,
    generation: 0,
};

impl Range {
    /// The guest-physical address of `[addr, addr + count)` if the range holds all of it with
    /// `access`, under `generation`.
    fn translate(
        &self,
        addr: u64,
        count: u64,
        access: Permissions,
        generation: u64,
    ) -> Option<u64> {
        let (have, want) = (self.access as u8, access as u8);
        let offset = addr.checked_sub(self.iova)?;
        // `offset < len` first, so `len - offset` does not wrap.
        (offset < self.len
            && count <= self.len - offset
            && have & want == want
            && self.generation == generation)
            .then(|| self.phys.wrapping_add(offset))
    }
}

/// A [`DeviceMemory`] that remembers IOTLB entries; see the [module docs](self). Use one per
/// worker pass over a queue, only while holding a request guard for every access.
#[derive(Debug)]
pub struct CachedMemory<'a> {
    mem: &'a DeviceMemory,
    ranges: [Cell<Range>; RANGES],
    /// The slot that hit last (checked first), and the one to fill next (round-robin).
    last: Cell<usize>,
    next: Cell<usize>,
}

impl<'a> CachedMemory<'a> {
    /// Wraps `mem`, remembering nothing yet.
    pub fn new(mem: &'a DeviceMemory) -> Self {
        CachedMemory {
            mem,
            ranges: [const { Cell::new(EMPTY) }; RANGES],
            last: Cell::new(0),
            next: Cell::new(0),
        }
    }

    /// The memory behind.
    pub fn inner(&self) -> &'a DeviceMemory {
        self.mem
    }

    /// The guest-physical address of `[addr, addr + count)` if one remembered (or now
    /// remembered) IOTLB entry holds it with `access`.
    fn translate(&self, addr: GuestAddress, count: usize, access: Permissions) -> Option<u64> {
        if !self.mem.get_iommu_enabled() || count == 0 {
            return None;
        }
        let (addr, count) = (addr.0, count as u64);
        let iommu = self.mem.iommu();
        // Any invalidation since an entry was remembered makes it useless.
        let generation = iommu.generation();
        let last = self.last.get();
        if let Some(phys) = self.ranges[last]
            .get()
            .translate(addr, count, access, generation)
        {
            return Some(phys);
        }
        for (i, slot) in self.ranges.iter().enumerate() {
            if let Some(phys) = slot.get().translate(addr, count, access, generation) {
                self.last.set(i);
                return Some(phys);
            }
        }
        let e = iommu.cached_entry(addr)?;
        let range = Range {
            iova: e.iova,
            len: e.len,
            phys: e.phys,
            access: e.perm,
            generation,
        };
        // Only if it serves this access; else (a fault, or a split) `IommuMemory` handles it.
        let phys = range.translate(addr, count, access, generation)?;
        let slot = self.next.get();
        self.next.set((slot + 1) % RANGES);
        self.ranges[slot].set(range);
        self.last.set(slot);
        Some(phys)
    }
}

/// Slices of either a remembered page or `IommuMemory`.
pub enum CachedSlices<A, B> {
    /// Straight from guest RAM.
    Phys(A),
    /// Through `IommuMemory`.
    Iommu(B),
}

impl<'a, A, B> Iterator for CachedSlices<A, B>
where
    A: Iterator<Item = GuestMemoryResult<VolatileSlice<'a, ()>>>,
    B: Iterator<Item = GuestMemoryResult<VolatileSlice<'a, ()>>>,
{
    type Item = GuestMemoryResult<VolatileSlice<'a, ()>>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            CachedSlices::Phys(a) => a.next(),
            CachedSlices::Iommu(b) => b.next(),
        }
    }
}

impl<'a, A, B> FusedIterator for CachedSlices<A, B>
where
    A: FusedIterator<Item = GuestMemoryResult<VolatileSlice<'a, ()>>>,
    B: FusedIterator<Item = GuestMemoryResult<VolatileSlice<'a, ()>>>,
{
}

impl<'a, A, B> GuestMemorySliceIterator<'a, ()> for CachedSlices<A, B>
where
    A: FusedIterator<Item = GuestMemoryResult<VolatileSlice<'a, ()>>>,
    B: FusedIterator<Item = GuestMemoryResult<VolatileSlice<'a, ()>>>,
{
}

impl GuestMemory for CachedMemory<'_> {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        match self.translate(addr, count, access) {
            Some(phys) => {
                GuestMemoryBackend::check_range(self.mem.get_backend(), GuestAddress(phys), count)
            }
            None => self.mem.check_range(addr, count, access),
        }
    }

    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'b, BS<'b, ()>>> {
        Ok(match self.translate(addr, count, access) {
            Some(phys) => CachedSlices::Phys(GuestMemoryBackend::get_slices(
                self.mem.get_backend(),
                GuestAddress(phys),
                count,
            )),
            None => CachedSlices::Iommu(self.mem.get_slices(addr, count, access)?),
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        self.mem.physical_memory()
    }
}
