// SPDX-License-Identifier: Apache-2.0

//! [`CachedMemory`]: a device model's [`DeviceMemory`] with the page translations it used
//! recently remembered, so that the ring and header accesses of a batch of requests do not
//! each pay a full IOTLB lookup.
//!
//! Correctness rests on two things:
//! - every remembered translation is tagged with the endpoint's invalidation generation, read
//!   before the IOTLB was consulted; any invalidation (UNMAP, DETACH, ATTACH, bypass, reset)
//!   bumps it under the IOTLB write lock, and a changed generation drops every remembered
//!   page before the next access;
//! - accesses happen only under a request guard (the
//!   [request-guard contract](super#request-guard-contract-for-device-models)): an
//!   invalidation that lands after the generation check waits for the guard, exactly as it
//!   waits for slices handed out by `IommuMemory`.
//!
//! Only whole `GRANULE` pages that the IOTLB already holds, with the access's permission,
//! are remembered, for small accesses; anything else (a miss, a fault, an access crossing a
//! page, a data buffer) goes through `IommuMemory` unchanged, with its fault reporting and
//! IOTLB fills.

use std::cell::Cell;
use std::iter::FusedIterator;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemorySliceIterator, Result as GuestMemoryResult};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions, VolatileSlice,
};

use super::mapping::GRANULE;
use crate::virtio::DeviceMemory;

/// Pages remembered at once (rings, a request header page, a few spare).
const PAGES: usize = 8;
/// Largest access served from a remembered page.
const SMALL: usize = 256;

#[derive(Clone, Copy, Debug)]
struct Page {
    /// First IOVA of the page; [`NO_PAGE`] for an empty slot.
    iova: u64,
    /// Guest-physical address of `iova`.
    phys: u64,
    /// What the IOTLB allowed when the page was looked up.
    access: Permissions,
    /// The endpoint's invalidation generation read before the lookup.
    generation: u64,
}

/// Not a page address (pages are `GRANULE`-aligned).
const NO_PAGE: u64 = u64::MAX;

const EMPTY: Page = Page {
    iova: NO_PAGE,
    phys: 0,
    access: Permissions::No,
    generation: 0,
};

/// A [`DeviceMemory`] that remembers page translations; see the [module docs](self). Use one
/// per worker pass over a queue, only while holding a request guard for every access.
#[derive(Debug)]
pub struct CachedMemory<'a> {
    mem: &'a DeviceMemory,
    pages: [Cell<Page>; PAGES],
    /// The slot that hit last (checked first), and the one to fill next (round-robin).
    last: Cell<usize>,
    next: Cell<usize>,
}

impl<'a> CachedMemory<'a> {
    /// Wraps `mem`, remembering nothing yet.
    pub fn new(mem: &'a DeviceMemory) -> Self {
        CachedMemory {
            mem,
            pages: [const { Cell::new(EMPTY) }; PAGES],
            last: Cell::new(0),
            next: Cell::new(0),
        }
    }

    /// The memory behind.
    pub fn inner(&self) -> &'a DeviceMemory {
        self.mem
    }

    /// The guest-physical address of `[addr, addr + count)` if it lies inside one page that
    /// is (or now becomes) remembered with `access`.
    fn translate(&self, addr: GuestAddress, count: usize, access: Permissions) -> Option<u64> {
        if !self.mem.get_iommu_enabled() || count == 0 {
            return None;
        }
        let page = addr.0 & !(GRANULE - 1);
        let offset = addr.0 - page;
        // Small (ring entries, descriptors, headers, statuses: data buffers would only push
        // those pages out) and inside one page (no overflow: offset < GRANULE, and count is
        // checked first).
        if count > SMALL || offset + count as u64 > GRANULE {
            return None;
        }
        let iommu = self.mem.iommu();
        // Any invalidation since a page was remembered makes it useless.
        let generation = iommu.generation();
        let usable =
            |p: &Page| p.iova == page && p.generation == generation && p.access.allow(access);
        let last = self.last.get();
        let p = self.pages[last].get();
        if usable(&p) {
            return Some(p.phys + offset);
        }
        for (i, slot) in self.pages.iter().enumerate() {
            let p = slot.get();
            if usable(&p) {
                self.last.set(i);
                return Some(p.phys + offset);
            }
        }
        // Read-write first, so that one entry serves a header read and a status write.
        let (phys, allowed) = iommu
            .cached_page(page, Permissions::ReadWrite)
            .map(|p| (p, Permissions::ReadWrite))
            .or_else(|| {
                (access != Permissions::ReadWrite)
                    .then(|| iommu.cached_page(page, access))
                    .flatten()
                    .map(|p| (p, access))
            })?;
        let slot = self.next.get();
        self.pages[slot].set(Page {
            iova: page,
            phys,
            access: allowed,
            generation,
        });
        self.last.set(slot);
        self.next.set((slot + 1) % PAGES);
        Some(phys + offset)
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
