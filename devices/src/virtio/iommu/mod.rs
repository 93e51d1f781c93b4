// SPDX-License-Identifier: Apache-2.0

//! virtio-iommu (virtio 1.2 §5.13) and the per-endpoint translation it gives device models.
//!
//! # Pieces
//!
//! - [`VirtioIommu`] ([`device`]): the virtio device. Its request queue takes ATTACH, DETACH,
//!   MAP, UNMAP and PROBE from the guest driver; its event queue carries fault reports.
//! - [`MappingState`] ([`mapping`]): the authoritative state (domains, mappings, endpoint
//!   attachments, the `bypass` switch), behind one mutex shared by the device and every
//!   endpoint.
//! - [`EndpointIommu`]: one endpoint's view, handed to a device model inside its
//!   [`DeviceMemory`](super::DeviceMemory) (`vm_memory::IommuMemory`). It owns the endpoint's
//!   `Iotlb`; [`VirtioIommu::endpoint`] registers an endpoint ID and returns its handle, and
//!   [`EndpointIommu::passthrough`] is for devices not behind the IOMMU.
//! - [`protocol`]: the wire format.
//!
//! # Translation
//!
//! Every guest-memory access of an endpoint goes through `IommuMemory`, which calls
//! [`Iommu::translate`]. That looks the range up in the endpoint's IOTLB; on a miss (or a
//! permission failure) it locks the mapping state, asks [`MappingState::translate`] for the
//! covering mappings (or the identity, when the endpoint bypasses), fills the IOTLB and looks
//! up again. If the state says the access is not allowed, the fault is recorded (counters,
//! a bounded queue of pending [`VirtioIommuFault`]s, and a write to
//! [`VirtioIommu::fault_eventfd`]) and the access fails, which fails the device's request.
//!
//! MAP needs no invalidation: a miss refills. UNMAP, DETACH, ATTACH (moving an endpoint out
//! of bypass or out of another domain), clearing `bypass`, and device reset all restrict
//! translations: the device drops the affected IOTLB entries while it still holds the state
//! mutex (so no endpoint can refill a stale entry) and takes a ticket on
//! each affected endpoint's in-flight requests (below). The request's used buffer is
//! published only when those requests have finished: at once if there are none, else later
//! (the last of them wakes the worker through the fault eventfd), while the requests queued
//! behind it are served meanwhile. Writing `bypass` and device reset wait on the spot.
//!
//! # Request-guard contract for device models
//!
//! A translation hands the device model host pointers (`VolatileSlice`s) that stay valid after
//! the IOTLB entry is gone. So that "UNMAP completed" means "no device thread still uses the
//! old translation" (the virtio spec's UNMAP request: once it completes, the device must not
//! access the range), a device model behind the IOMMU must:
//!
//! 1. Hold [`EndpointIommu::begin_request`]'s [`RequestGuard`] from the moment it starts
//!    translating addresses for one request (popping the descriptor chain) until it has
//!    finished every access for that request (the used-ring update included), for example:
//!    `let _guard = mem.iommu().begin_request();` at the top of one request's processing, or
//!    around one pass of `process_queue`.
//! 2. Not keep translated slices or addresses after dropping the guard.
//! 3. Not hold the guard while blocking on something that can wait for the IOMMU (the guest,
//!    another device, an unbounded I/O wait): UNMAP/DETACH wait for every guard of the
//!    endpoints they affect, and the guest vCPU waiting for the UNMAP spins with interrupts
//!    off. Take one guard at a time per endpoint (never nest `begin_request`).
//! 4. Not keep an `IotlbIterator` (a `get_slices` iterator) alive across I/O or another
//!    access: it holds the endpoint's IOTLB read lock, which invalidation (under the mapping
//!    state mutex) needs. Collect the slices first, drop the iterator, then do the I/O.
//!
//! A device model that ignores the guard still gets translated and permission-checked
//! accesses; it only loses the guarantee that a translation fetched before an UNMAP is not
//! used after it.
//!
//! # Locks, outermost first
//!
//! endpoint registry (`VirtioIommu`) → mapping state → the device's invalidation buffer →
//! an endpoint's IOTLB, then its in-flight count (an invalidation takes the ticket while
//! still holding the state) → fault queue.
//! A device thread takes its request guard first, then (on a miss) the mapping state and its
//! IOTLB, never holding the IOTLB while waiting for the state, and never across I/O. The
//! IOMMU waits for request guards (an explicit in-flight count per endpoint and a condvar,
//! not a lock) only after releasing the registry and the state.
//!
//! # Cost per access
//!
//! A device model may wrap its `DeviceMemory` in a [`CachedMemory`] for one pass over its
//! queue: it remembers the IOTLB entries the pass used (checked against the endpoint's
//! invalidation generation on every access), so ring, header and buffer accesses skip
//! `vm_memory::Iotlb`'s range-map lookup. virtio-blk does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iotlb, Le32, Le64, Permissions};
use vmm_sys_util::eventfd::EventFd;

pub mod cached;
pub mod device;
pub mod mapping;
pub mod protocol;

#[cfg(test)]
mod tests;

pub use cached::CachedMemory;
pub use device::{IommuStats, VirtioIommu, VirtioIommuError};
pub use mapping::{MappingLimits, MappingState};
pub use protocol::VirtioIommuFault;

use crate::guest_warn;
use crate::sync::{lock, read, write};
use mapping::{Fault, IotlbEntry, IDENTITY};

/// Pending fault reports kept while the driver supplies no event buffers; more are dropped
/// (and counted).
pub const MAX_PENDING_FAULTS: usize = 64;

/// How many times a translation refills the IOTLB before giving up (each retry means an
/// invalidation raced with the fill; the state is re-read every time).
const MAX_FILL_ATTEMPTS: usize = 4;

/// Counters updated from any thread.
#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    events_delivered: AtomicU64,
    events_dropped: AtomicU64,
}

/// State shared by the device and every endpoint handle.
#[derive(Debug)]
struct Shared {
    state: Mutex<MappingState>,
    pending_faults: Mutex<VecDeque<VirtioIommuFault>>,
    fault_evt: EventFd,
    counters: Counters,
}

impl Shared {
    fn new(state: MappingState, fault_evt: EventFd) -> Self {
        Shared {
            state: Mutex::new(state),
            pending_faults: Mutex::new(VecDeque::new()),
            fault_evt,
            counters: Counters::default(),
        }
    }

    /// Queues a fault report for the event queue and wakes the device's worker.
    fn record_fault(&self, endpoint: u32, fault: Fault) {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        guest_warn!(
            "virtio-iommu: endpoint {endpoint} fault at {:#x} (reason {}, flags {:#x})",
            fault.address,
            fault.reason,
            fault.flags
        );
        {
            let mut pending = lock(&self.pending_faults);
            if pending.len() >= MAX_PENDING_FAULTS {
                self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            pending.push_back(VirtioIommuFault {
                reason: fault.reason,
                reserved: [0; 3],
                flags: Le32::from(fault.flags),
                endpoint: Le32::from(endpoint),
                reserved1: Le32::from(0),
                address: Le64::from(fault.address),
            });
        }
        if let Err(e) = self.fault_evt.write(1) {
            guest_warn!("virtio-iommu: cannot signal the fault eventfd: {e}");
        }
    }
}

/// Held by a device model while it processes one request; see the
/// [request-guard contract](self#request-guard-contract-for-device-models).
#[must_use = "the guard only protects the request while it is held"]
#[derive(Debug)]
pub struct RequestGuard<'a> {
    endpoint: &'a EndpointInner,
    epoch: u64,
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let in_flight = &self.endpoint.requests;
        let mut s = lock(&in_flight.state);
        let mut last_of_waited_epoch = false;
        if self.epoch == s.epoch {
            // Nobody took a ticket while this request ran: nobody waits for it.
            s.current -= 1;
        } else if let Some(n) = s.older.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                s.older.remove(&self.epoch);
                // Somebody took a ticket while this request ran (an UNMAP, say).
                last_of_waited_epoch = true;
            }
        }
        drop(s);
        if last_of_waited_epoch {
            // Only the end of an older epoch can satisfy a waiter.
            in_flight.done.notify_all();
            if let Some(shared) = &self.endpoint.shared {
                // Wakes the IOMMU's worker, which publishes completions deferred on this.
                if let Err(e) = shared.fault_evt.write(1) {
                    guest_warn!("virtio-iommu: cannot wake the worker: {e}");
                }
            }
        }
    }
}

/// What an operation that restricted translations must wait for: requests of one endpoint
/// that started before the restriction. See [`EndpointIommu::ticket`].
#[derive(Clone, Debug)]
pub(crate) struct Ticket {
    endpoint: EndpointIommu,
    epoch: u64,
}

impl Ticket {
    /// Whether every request the ticket waits for has finished.
    pub(crate) fn done(&self) -> bool {
        self.endpoint.inner.requests.done(self.epoch)
    }

    /// Blocks until [`Ticket::done`].
    pub(crate) fn wait(&self) {
        self.endpoint.inner.requests.wait(self.epoch);
    }
}

/// An endpoint's in-flight requests, by the epoch they started in. A waiter (UNMAP and the
/// other restricting operations) starts a new epoch and waits only for requests of earlier
/// epochs: requests that start later already see the invalidated IOTLB, so a busy endpoint
/// cannot starve an UNMAP, whatever the lock implementation prefers.
#[derive(Debug, Default)]
struct InFlight {
    state: Mutex<InFlightState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct InFlightState {
    epoch: u64,
    /// Requests still running that started in `epoch` (the common case: no allocation).
    current: usize,
    /// Requests still running that started in earlier epochs, per start epoch (no zero
    /// counts). Only tickets move requests here.
    older: BTreeMap<u64, usize>,
}

impl InFlight {
    fn begin(&self) -> u64 {
        let mut s = lock(&self.state);
        s.current += 1;
        s.epoch
    }

    /// Starts a new epoch; returns the last one, whose requests a waiter waits for. `None`
    /// when no request is in flight: there is nothing to wait for (a request that begins
    /// later translates after the caller's invalidation).
    fn ticket(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        if s.current == 0 && s.older.is_empty() {
            return None;
        }
        let before = s.epoch;
        if s.current > 0 {
            let n = std::mem::take(&mut s.current);
            s.older.insert(before, n);
        }
        // A u64 of epochs does not wrap.
        s.epoch += 1;
        Some(before)
    }

    fn done(&self, ticket: u64) -> bool {
        lock(&self.state).older.range(..=ticket).next().is_none()
    }

    /// Waits for every request of epoch `ticket` or earlier.
    fn wait(&self, ticket: u64) {
        let mut s = lock(&self.state);
        while s.older.range(..=ticket).next().is_some() {
            s = self
                .done
                .wait(s)
                .expect("lock poisoned: another thread panicked while holding it");
        }
    }

    /// Requests in flight now (for tests and diagnostics).
    fn count(&self) -> usize {
        let s = lock(&self.state);
        s.current + s.older.values().sum::<usize>()
    }
}

/// An endpoint's IOTLB (`vm_memory::Iotlb`, what `IommuMemory` translates with), and the
/// same entries as whole ranges for [`CachedMemory`], which finds one with a single B-tree
/// search. Both change together under the endpoint's lock, and `entries` never holds a
/// translation `iotlb` lacks: an invalidation drops every entry it touches, whole.
#[derive(Debug, Default)]
struct Tlb {
    iotlb: Iotlb,
    /// By first IOVA; never overlapping.
    entries: BTreeMap<u64, IotlbEntry>,
}

impl Tlb {
    /// Drops the entries overlapping `[start, end)`.
    fn drop_overlapping(&mut self, start: u64, end: u64) {
        // Entries do not overlap: walking down from the last one starting before `end`, the
        // first that ends at or before `start` ends the search.
        while let Some((&k, e)) = self.entries.range(..end).next_back() {
            if k.saturating_add(e.len) <= start {
                break;
            }
            self.entries.remove(&k);
        }
    }
}

/// A read lock on an endpoint's IOTLB, as `IommuMemory` wants it.
#[derive(Debug)]
pub struct IotlbReadGuard<'a>(RwLockReadGuard<'a, Tlb>);

impl std::ops::Deref for IotlbReadGuard<'_> {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        &self.0.iotlb
    }
}

#[derive(Debug)]
struct EndpointInner {
    /// Endpoint ID (0 and meaningless for pass-through handles).
    id: u32,
    iotlb: RwLock<Tlb>,
    /// Device threads' requests in flight; the device waits for them after an invalidation.
    requests: InFlight,
    /// `None`: pass-through handle, identity translation.
    shared: Option<Arc<Shared>>,
    /// Bumped (under the IOTLB write lock) by every invalidation: a [`CachedMemory`] drops
    /// its page translations when it changes.
    generation: AtomicU64,
    lookups: AtomicU64,
    fills: AtomicU64,
}

/// The IOMMU as one endpoint sees it: an IOTLB filled from the endpoint's domain mappings.
/// A cheap handle (clones share state): `IommuMemory` owns one, the virtio-iommu device keeps
/// another to invalidate it.
#[derive(Clone, Debug)]
pub struct EndpointIommu {
    inner: Arc<EndpointInner>,
}

impl Default for EndpointIommu {
    fn default() -> Self {
        Self::passthrough()
    }
}

impl EndpointIommu {
    /// An IOMMU that is never consulted (for `IommuMemory` with the IOMMU disabled). If it is
    /// consulted anyway it translates 1:1.
    pub fn passthrough() -> Self {
        Self::with_shared(0, None)
    }

    fn with_shared(id: u32, shared: Option<Arc<Shared>>) -> Self {
        EndpointIommu {
            inner: Arc::new(EndpointInner {
                id,
                iotlb: RwLock::new(Tlb::default()),
                requests: InFlight::default(),
                shared,
                generation: AtomicU64::new(0),
                lookups: AtomicU64::new(0),
                fills: AtomicU64::new(0),
            }),
        }
    }

    /// The endpoint ID, or `None` for a pass-through handle.
    pub fn endpoint_id(&self) -> Option<u32> {
        self.inner.shared.as_ref().map(|_| self.inner.id)
    }

    /// Marks the start of one request's processing; hold the guard until the request's last
    /// guest-memory access. See the
    /// [request-guard contract](self#request-guard-contract-for-device-models).
    pub fn begin_request(&self) -> RequestGuard<'_> {
        RequestGuard {
            endpoint: &self.inner,
            epoch: self.inner.requests.begin(),
        }
    }

    /// Call after invalidating this endpoint's IOTLB: what to wait for before telling the
    /// driver that the old translations are gone (`None`: no request in flight, nothing).
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        let epoch = self.inner.requests.ticket()?;
        Some(Ticket {
            endpoint: self.clone(),
            epoch,
        })
    }

    /// Requests of this endpoint in flight (holding a [`RequestGuard`]) right now.
    pub fn requests_in_flight(&self) -> usize {
        self.inner.requests.count()
    }

    /// Whether two handles refer to the same endpoint state.
    pub fn same_endpoint(&self, other: &EndpointIommu) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Drops IOTLB entries: the ranges `(iova, length)`, or everything. Callers hold the
    /// mapping-state mutex so that no translation refills a stale entry meanwhile. The IOTLB
    /// lock is only ever held for a lookup or a fill (device models drop their slice
    /// iterators before doing I/O), so this never waits for a device's I/O.
    fn invalidate(&self, ranges: Option<&[(u64, u64)]>) {
        let mut tlb = write(&self.inner.iotlb);
        // Before the entries go (the lock orders both for IOTLB readers); `Release` pairs
        // with [`EndpointIommu::generation`].
        self.inner.generation.fetch_add(1, Ordering::Release);
        match ranges {
            None => {
                tlb.iotlb.invalidate_all();
                tlb.entries.clear();
            }
            Some(ranges) => {
                for &(iova, len) in ranges {
                    // `Iotlb` ranges end at `iova + len`, which must not overflow.
                    let len = len.min(u64::MAX - iova);
                    tlb.iotlb.invalidate_mapping(
                        GuestAddress(iova),
                        usize::try_from(len).unwrap_or(usize::MAX),
                    );
                    tlb.drop_overlapping(iova, iova + len);
                }
            }
        }
    }

    /// The invalidation generation: read it before [`EndpointIommu::cached_page`], and trust
    /// that page translation only while it stays the same.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The IOTLB entry holding `iova`, if there is one now. No fill and no fault: a miss is
    /// left to [`Iommu::translate`].
    pub(crate) fn cached_entry(&self, iova: u64) -> Option<IotlbEntry> {
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        let tlb = read(&self.inner.iotlb);
        let (&start, e) = tlb.entries.range(..=iova).next_back()?;
        (iova - start < e.len).then_some(*e)
    }

    fn fill(tlb: &mut Tlb, entries: &[IotlbEntry]) -> Result<(), IommuError> {
        for e in entries {
            tlb.iotlb.set_mapping(
                GuestAddress(e.iova),
                GuestAddress(e.phys),
                usize::try_from(e.len).unwrap_or(usize::MAX),
                e.perm,
            )?;
            // `set_mapping` replaces what it overlaps; so does the range copy, whole entries.
            tlb.drop_overlapping(e.iova, e.iova.saturating_add(e.len));
            if e.len > 0 {
                tlb.entries.insert(e.iova, *e);
            }
        }
        Ok(())
    }
}

impl Iommu for EndpointIommu {
    type IotlbGuard<'a> = IotlbReadGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let inner = &*self.inner;
        let cannot = |reason: &str| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: reason.into(),
        };
        inner.lookups.fetch_add(1, Ordering::Relaxed);

        // `Iotlb::lookup` computes `iova + length`; it must not wrap.
        let fits = u64::try_from(length)
            .ok()
            .and_then(|l| iova.0.checked_add(l))
            .is_some();
        if !fits {
            if let Some(shared) = &inner.shared {
                shared.record_fault(
                    inner.id,
                    Fault {
                        reason: protocol::VIRTIO_IOMMU_FAULT_R_MAPPING,
                        flags: mapping::access_fault_flags(access)
                            | protocol::VIRTIO_IOMMU_FAULT_F_ADDRESS,
                        address: iova.0,
                    },
                );
            }
            return Err(cannot("access wraps around the address space"));
        }

        for _ in 0..MAX_FILL_ATTEMPTS {
            if let Ok(hit) = Iotlb::lookup(IotlbReadGuard(read(&inner.iotlb)), iova, length, access)
            {
                return Ok(hit);
            }
            let Some(shared) = &inner.shared else {
                Self::fill(&mut write(&inner.iotlb), &[IDENTITY])?;
                continue;
            };
            // Fill while holding the state mutex: an invalidation (which also holds it) then
            // either happens before (and we fill the new state) or after (and drops our fill).
            let state = lock(&shared.state);
            match state.translate(inner.id, iova.0, length as u64, access) {
                Ok(entries) => {
                    Self::fill(&mut write(&inner.iotlb), &entries)?;
                    inner.fills.fetch_add(1, Ordering::Relaxed);
                }
                Err(fault) => {
                    drop(state);
                    shared.record_fault(inner.id, fault);
                    return Err(cannot(
                        if fault.reason == protocol::VIRTIO_IOMMU_FAULT_R_DOMAIN {
                            "endpoint is not attached to a domain"
                        } else {
                            "no mapping with the required permissions"
                        },
                    ));
                }
            }
        }
        Err(cannot("IOTLB invalidated during every refill"))
    }
}
