// SPDX-License-Identifier: Apache-2.0

//! The virtio-iommu device model: configuration space, request queue, event queue.
//!
//! # Request framing
//!
//! A request is one descriptor chain: device-readable descriptors holding the head and body,
//! then device-writable descriptors for the reply (PROBE properties, then the 4-byte tail).
//! The device writes the tail where the request layout puts it (right after `probe_size`
//! bytes of properties for PROBE, at the start of the writable part otherwise), or at the end
//! of the writable part if that is shorter; everything before the tail is written too (zeros
//! unless PROBE succeeded), and the used length counts all of it. Linux copies the reply back
//! only when the used length equals the writable length it supplied (Linux
//! drivers/iommu/virtio-iommu.c, `__viommu_sync_req`),
//! so a well-formed request always gets exactly that.
//!
//! Malformed requests (none of them panic or write outside the chain):
//!
//! | Problem | Reply |
//! |---|---|
//! | fewer than 4 writable bytes, or a writable descriptor outside guest memory | none, used length 0 (no tail to write, §5.13.6) |
//! | unknown request type | none, used length 0 (§5.13.6.1: "SHOULD NOT write the buffer") |
//! | readable part shorter than the head, a readable descriptor outside guest memory, or a readable descriptor after a writable one | DEVERR |
//! | body shorter or longer than the type's layout | INVAL |
//! | PROBE whose property space is not exactly `probe_size` bytes | INVAL, no property written |
//! | MAP or UNMAP without `VIRTIO_IOMMU_F_MAP_UNMAP` negotiated | UNSUPP |
//! | PROBE without `VIRTIO_IOMMU_F_PROBE` negotiated | UNSUPP |
//!
//! Semantic errors get the statuses documented on [`MappingState`]'s operations. Linux ignores
//! the status of MAP and UNMAP, so their failures are also logged at `warn!` (rate-limited).
//!
//! # Threads
//!
//! The request queue is served by the data plane ([`VirtioDevice::queue_handler`]) without
//! the device's control lock: an UNMAP that waits for an endpoint's in-flight request blocks
//! only the IOMMU's worker, not config-space reads. The queue itself is locked only to pop a
//! chain and to return it. Writing `bypass` and device reset restrict every endpoint and do
//! wait for in-flight endpoint requests, on the vCPU that asked.
//! All guest-triggered log lines go through the shared rate limiter ([`crate::ratelimit`]).

use std::collections::BTreeMap;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, Le16, Le64, Permissions, VolatileSlice,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mapping::{
    Invalidation, MappingLimits, MappingState, ReqError, MSI_IOVA_END, MSI_IOVA_START,
};
use super::protocol::*;
use super::{EndpointIommu, Shared, Ticket};
use crate::sync::lock;
use crate::virtio::{
    ActivateError, DeviceMemory, QueueHandler, QueueProgress, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_IOMMU,
};
// Every log line here is guest-triggerable: `debug!`/`warn!` are the rate-limited macros.
use crate::{guest_debug as debug, guest_warn as warn};

/// Index of the request queue.
pub const REQUEST_QUEUE: usize = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Queue sizes: a large request queue lets Linux batch MAP/UNMAP between kicks (it queues
/// requests and kicks once per sync, Linux drivers/iommu/virtio-iommu.c);
/// the driver fills the event queue with one 24-byte buffer per slot.
const QUEUE_SIZES: &[u16] = &[1024, 64];
/// Requests (or event buffers) handled per [`QueueHandler::process_queue`] call.
pub const REQUESTS_PER_KICK: usize = 64;
/// Requests popped (and returned, with one notification) together.
const CHUNK: usize = 16;

/// Page sizes: 4 KiB granule (the x86 page the guest maps with), 2 MiB and 1 GiB so Linux
/// may map huge ranges in one request.
pub const PAGE_SIZE_MASK: u64 = 0x1000 | 0x20_0000 | 0x4000_0000;
/// Bytes of property space in a PROBE reply (one RESV_MEM property needs 24).
pub const PROBE_SIZE: u32 = 512;

/// Features offered. Not `VIRTIO_F_ACCESS_PLATFORM`: the IOMMU does not sit behind itself.
pub const AVAIL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
    | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
    | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
    | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG)
    | (1 << VIRTIO_IOMMU_F_PROBE);

const HEAD_LEN: usize = size_of::<VirtioIommuReqHead>();
const TAIL_LEN: usize = size_of::<VirtioIommuReqTail>();

/// Rows of [`IommuStats::requests`]: 0 for requests whose type is unknown or could not be
/// read, else the `VIRTIO_IOMMU_T_*` value.
pub const STATS_TYPES: usize = 6;
/// Columns of [`IommuStats::requests`]: the `VIRTIO_IOMMU_S_*` value, or
/// [`STATS_NO_STATUS`].
pub const STATS_STATUSES: usize = 10;
/// Column of [`IommuStats::requests`] for requests returned without a tail (used length 0).
pub const STATS_NO_STATUS: usize = 9;

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VirtioIommuError {
    /// `eventfd(2)` failed.
    #[error("Cannot create the fault eventfd")]
    FaultEventFd(#[source] std::io::Error),
}

/// A snapshot of the device's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Completed requests: `requests[type][status]`, see [`STATS_TYPES`] and
    /// [`STATS_STATUSES`].
    pub requests: [[u64; STATS_STATUSES]; STATS_TYPES],
    /// Live domains.
    pub domains: u64,
    /// Live mappings.
    pub mappings: u64,
    /// Endpoint translations (IOTLB lookups).
    pub iotlb_lookups: u64,
    /// IOTLB fills from the mapping state (misses that resolved).
    pub iotlb_fills: u64,
    /// Endpoint accesses that faulted.
    pub faults: u64,
    /// Fault reports written to the event queue.
    pub events_delivered: u64,
    /// Fault reports dropped because [`super::MAX_PENDING_FAULTS`] were already pending.
    pub events_dropped: u64,
}

impl IommuStats {
    /// Requests of `type_` (`VIRTIO_IOMMU_T_*`, or 0 for unknown) that completed with
    /// `status` (`VIRTIO_IOMMU_S_*`, or [`STATS_NO_STATUS`]).
    pub fn requests_with(&self, type_: u8, status: usize) -> u64 {
        self.requests
            .get(usize::from(type_))
            .and_then(|row| row.get(status))
            .copied()
            .unwrap_or(0)
    }

    /// All requests of `type_`, whatever their status.
    pub fn requests_of(&self, type_: u8) -> u64 {
        self.requests
            .get(usize::from(type_))
            .map_or(0, |row| row.iter().sum())
    }
}

struct Active {
    mem: DeviceMemory,
    /// Locked to pop a chain and to return one, never while a request waits.
    queues: Vec<Mutex<Queue>>,
    interrupt: Arc<VirtioInterrupt>,
    /// Cleared by reset (under each queue's lock): later completions are dropped.
    live: AtomicBool,
    /// Requests done but not yet returned: they restricted translations that requests
    /// still in flight may use. Locked after the request queue. At most a queue's worth.
    deferred: Mutex<Vec<Deferred>>,
}

/// A completed request whose used buffer waits for endpoint requests (its tickets).
struct Deferred {
    head: u16,
    len: u32,
    tickets: Vec<Ticket>,
}

/// Everything the control path and the data plane share.
struct Inner {
    shared: Arc<Shared>,
    /// Handles of registered endpoints, to invalidate their IOTLBs.
    endpoints: Mutex<BTreeMap<u32, EndpointIommu>>,
    acked_features: AtomicU64,
    active: Mutex<Option<Arc<Active>>>,
    requests: [[AtomicU64; STATS_STATUSES]; STATS_TYPES],
    /// The invalidation buffer of [`Inner::update_with`]; locked after the mapping state.
    scratch: Mutex<Invalidation>,
}

/// The virtio-iommu device; see the [module docs](super).
pub struct VirtioIommu {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field(
                "acked_features",
                &self.inner.acked_features.load(Ordering::Relaxed),
            )
            .field("active", &lock(&self.inner.active).is_some())
            .finish_non_exhaustive()
    }
}

/// What to write back for one request: `status` after `props` (zeros unless PROBE succeeded).
struct Reply {
    status: u8,
    props: Vec<u8>,
}

impl Reply {
    fn status(status: u8) -> Self {
        Reply {
            status,
            props: Vec::new(),
        }
    }
}

impl From<Result<(), ReqError>> for Reply {
    fn from(r: Result<(), ReqError>) -> Self {
        Reply::status(r.map_or_else(ReqError::status, |()| VIRTIO_IOMMU_S_OK))
    }
}

/// Splits an operation's result into the request outcome and the invalidation to apply.
fn split(r: Result<Invalidation, ReqError>) -> (Result<(), ReqError>, Invalidation) {
    match r {
        Ok(inv) => (Ok(()), inv),
        Err(e) => (Err(e), Invalidation::default()),
    }
}

/// Whether no device-readable descriptor follows a device-writable one (virtio 1.2 §2.7.4.2).
fn readable_before_writable<M: GuestMemory>(chain: DescriptorChain<&M>) -> bool {
    let mut seen_writable = false;
    for desc in chain {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return false;
        }
    }
    true
}

/// Memory the request path runs on: the device's [`DeviceMemory`], or the guest RAM behind it.
trait Mem: GuestMemory<Bitmap = ()> {
    /// Reads `buf` at `addr`; whether it all could be.
    fn read_bytes(&self, buf: &mut [u8], addr: GuestAddress) -> bool {
        self.read_slice(buf, addr).is_ok()
    }

    /// Writes `buf` at `addr`; whether it all could be.
    fn write_bytes(&self, buf: &[u8], addr: GuestAddress) -> bool {
        self.write_slice(buf, addr).is_ok()
    }

    /// Whether `[addr, addr + len)` can be accessed with `access`.
    fn accessible(&self, addr: GuestAddress, len: usize, access: Permissions) -> bool {
        self.check_range(addr, len, access)
    }

    /// `[addr, addr + len)` as one writable slice, if this memory can hand one out directly
    /// (`None` says nothing: ask [`Mem::accessible`]).
    fn write_target(&self, _addr: GuestAddress, _len: usize) -> Option<VolatileSlice<'_>> {
        None
    }
}

impl Mem for DeviceMemory {}

/// Guest RAM, with the one-region case (every request of a sane driver) done straight on the
/// region's mapping; anything else takes the general path, which also reports the error.
impl Mem for GuestMemoryMmap {
    fn read_bytes(&self, buf: &mut [u8], addr: GuestAddress) -> bool {
        match in_one_region(self, addr, buf.len()) {
            Some(slice) => slice.copy_to(buf) == buf.len(),
            None => self.read_slice(buf, addr).is_ok(),
        }
    }

    fn write_bytes(&self, buf: &[u8], addr: GuestAddress) -> bool {
        match in_one_region(self, addr, buf.len()) {
            Some(slice) => {
                slice.copy_from(buf);
                true
            }
            None => self.write_slice(buf, addr).is_ok(),
        }
    }

    fn accessible(&self, addr: GuestAddress, len: usize, access: Permissions) -> bool {
        in_one_region(self, addr, len).is_some()
            || GuestMemory::check_range(self, addr, len, access)
    }

    fn write_target(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'_>> {
        in_one_region(self, addr, len)
    }
}

/// `[addr, addr + len)` as one slice, if it lies inside one region of `mem` (bounds checked
/// by the region).
fn in_one_region(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_>> {
    let (region, offset) = mem.to_region_addr(addr)?;
    region.get_slice(offset, len).ok()
}

/// The largest request body the device knows (PROBE's).
const BODY_MAX: usize = size_of::<VirtioIommuReqProbe>();
/// Chains of at most this many descriptors (Linux sends 2: request, tail) are parsed on the
/// stack in one walk; longer ones take the general path (`virtio_queue::{Reader, Writer}`).
const FAST_DESCS: usize = 4;

/// The device-readable part of a request.
struct Request {
    /// Every readable descriptor lies in guest memory.
    readable: bool,
    /// The request type, if the head could be read.
    type_: Option<u8>,
    /// Readable bytes after the head.
    body_len: usize,
    /// `raw[HEAD_LEN..][..body_len]` holds the body (`body_len <= BODY_MAX`, read).
    body_ok: bool,
    /// Head and body as read.
    raw: [u8; HEAD_LEN + BODY_MAX],
}

impl Request {
    fn new() -> Self {
        Request {
            readable: false,
            type_: None,
            body_len: 0,
            body_ok: false,
            raw: [0; HEAD_LEN + BODY_MAX],
        }
    }
}

/// Reads a request body that must fill the rest of the readable part exactly.
fn read_body<T: ByteValued + Default>(req: &Request) -> Result<T, ReqError> {
    if req.body_len != size_of::<T>() {
        debug!(
            "virtio-iommu: request body is {} bytes, expected {}",
            req.body_len,
            size_of::<T>()
        );
        return Err(ReqError::Inval);
    }
    if !req.body_ok {
        debug!("virtio-iommu: cannot read request body");
        return Err(ReqError::DevErr);
    }
    let mut obj = T::default();
    // `size_of::<T>() == body_len <= BODY_MAX` here.
    obj.as_mut_slice()
        .copy_from_slice(&req.raw[HEAD_LEN..HEAD_LEN + size_of::<T>()]);
    Ok(obj)
}

/// A short chain's descriptors: `(address, length, device-writable)`, in chain order.
type Descs = [(GuestAddress, u32, bool)];

/// Where the reply goes: the writable descriptors of a short chain, or a general writer.
enum ReplySink<'a> {
    /// The one writable descriptor, checked and ready.
    Slice(VolatileSlice<'a>),
    Descs(&'a Descs),
    Writer(Writer<'a>),
}

impl ReplySink<'_> {
    /// Writes `buf` at the start of the writable part (the caller checked it fits).
    fn write_all<M: Mem>(&mut self, mem: &M, buf: &[u8]) -> Result<(), String> {
        match self {
            ReplySink::Writer(w) => std::io::Write::write_all(w, buf).map_err(|e| e.to_string()),
            ReplySink::Slice(slice) => {
                if slice.len() < buf.len() {
                    return Err("writable part too short".into());
                }
                slice.copy_from(buf);
                Ok(())
            }
            ReplySink::Descs(descs) => {
                let mut done = 0;
                for &(addr, len, _) in descs.iter().filter(|d| d.2) {
                    if done == buf.len() {
                        break;
                    }
                    let take = (len as usize).min(buf.len() - done);
                    if !mem.write_bytes(&buf[done..done + take], addr) {
                        return Err(format!("cannot write at {:#x}", addr.0));
                    }
                    done += take;
                }
                if done == buf.len() {
                    Ok(())
                } else {
                    Err("writable part too short".into())
                }
            }
        }
    }
}

/// A parsed chain (the readable part goes into a [`Request`]): descriptor order, and the
/// writable part with its size, `None` if it has fewer than 4 bytes or a descriptor not in
/// memory.
type Parsed<'a> = (bool, Option<(ReplySink<'a>, usize)>);

/// Parses a chain of at most [`FAST_DESCS`] descriptors (`list`, in chain order) with the
/// same outcome as [`parse_general`], without allocating or walking the chain again.
fn parse_fast<'a, M: Mem>(mem: &'a M, list: &'a Descs, req: &mut Request) -> Parsed<'a> {
    // A readable descriptor after a writable one shows as a (writable, readable) neighbour pair.
    let ordered = !list.windows(2).any(|w| w[0].2 && !w[1].2);

    let mut readable = true;
    let mut total = 0usize;
    for &(addr, len, _) in list.iter().filter(|d| !d.2) {
        let len = len as usize;
        if len == 0 {
            continue;
        }
        // What of this descriptor lands in `raw`; the rest is only checked.
        let take = req.raw.len().saturating_sub(total).min(len);
        if take < len && !mem.accessible(addr, len, Permissions::Read) {
            readable = false;
        }
        if take > 0 && !mem.read_bytes(&mut req.raw[total..total + take], addr) {
            readable = false;
        }
        // At most FAST_DESCS u32 lengths: no overflow.
        total += len;
    }
    req.readable = readable;
    if readable && total >= HEAD_LEN {
        req.type_ = Some(req.raw[0]);
        req.body_len = total - HEAD_LEN;
        req.body_ok = req.body_len <= BODY_MAX;
    }

    // The common shape, one writable descriptor: checked once, as the slice written later.
    let mut writables = list.iter().filter(|d| d.2);
    if let (Some(&(addr, len, _)), None) = (writables.next(), writables.next()) {
        if let Some(slice) = mem.write_target(addr, len as usize) {
            let sink =
                (len as usize >= TAIL_LEN).then_some((ReplySink::Slice(slice), len as usize));
            return (ordered, sink);
        }
    }
    let mut writable = 0usize;
    let mut in_memory = true;
    for &(addr, len, _) in list.iter().filter(|d| d.2) {
        if len > 0 && !mem.accessible(addr, len as usize, Permissions::Write) {
            in_memory = false;
        }
        writable += len as usize;
    }
    let sink = (in_memory && writable >= TAIL_LEN).then_some((ReplySink::Descs(list), writable));
    (ordered, sink)
}

/// Parses any chain through `virtio_queue`'s `Reader` and `Writer`.
fn parse_general<'a, M: Mem>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
    req: &mut Request,
) -> Parsed<'a> {
    let ordered = readable_before_writable(chain.clone());
    let reader = Reader::new(mem, chain.clone())
        .map_err(|e| debug!("virtio-iommu: unreadable request: {e}"))
        .ok();
    let writer = Writer::new(mem, chain)
        .map_err(|e| debug!("virtio-iommu: unwritable request: {e}"))
        .ok();
    if let Some(mut r) = reader {
        req.readable = true;
        let head: Option<VirtioIommuReqHead> = (r.available_bytes() >= HEAD_LEN)
            .then(|| r.read_obj().ok())
            .flatten();
        if let Some(h) = head {
            req.type_ = Some(h.type_);
            req.body_len = r.available_bytes();
            req.body_ok = req.body_len <= BODY_MAX
                && std::io::Read::read_exact(
                    &mut r,
                    &mut req.raw[HEAD_LEN..HEAD_LEN + req.body_len],
                )
                .is_ok();
        }
    }
    let sink = writer.filter(|w| w.available_bytes() >= TAIL_LEN).map(|w| {
        let n = w.available_bytes();
        (ReplySink::Writer(w), n)
    });
    (ordered, sink)
}

fn type_name(type_: u8) -> &'static str {
    match type_ {
        VIRTIO_IOMMU_T_ATTACH => "ATTACH",
        VIRTIO_IOMMU_T_DETACH => "DETACH",
        VIRTIO_IOMMU_T_MAP => "MAP",
        VIRTIO_IOMMU_T_UNMAP => "UNMAP",
        VIRTIO_IOMMU_T_PROBE => "PROBE",
        _ => "unknown",
    }
}

impl VirtioIommu {
    /// A device with [`MappingLimits::default`].
    pub fn new() -> Result<Self, VirtioIommuError> {
        Self::with_limits(MappingLimits::default())
    }

    /// A device enforcing `limits` (and advertising their input and domain ranges).
    pub fn with_limits(limits: MappingLimits) -> Result<Self, VirtioIommuError> {
        let fault_evt = EventFd::new(EFD_NONBLOCK).map_err(VirtioIommuError::FaultEventFd)?;
        Ok(VirtioIommu {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared::new(MappingState::new(limits), fault_evt)),
                endpoints: Mutex::new(BTreeMap::new()),
                acked_features: AtomicU64::new(0),
                active: Mutex::new(None),
                requests: Default::default(),
                scratch: Mutex::new(Invalidation::default()),
            }),
        })
    }

    /// Registers endpoint `id` (the ID in VIOT / the DT `iommus` property) as one the guest
    /// may attach, and returns its handle for the device model's
    /// [`device_memory`](crate::virtio::device_memory). Calling it again with the same ID
    /// returns a handle to the same endpoint.
    pub fn endpoint(&self, id: u32) -> EndpointIommu {
        self.inner.endpoint(id)
    }

    /// Written whenever an endpoint records a fault, and when the last endpoint request a
    /// deferred UNMAP/DETACH/ATTACH waits for ends. The VMM's worker calls
    /// `process_queue(EVENT_QUEUE)` when it is readable; that reads (resets) the eventfd,
    /// returns the deferred requests that may now complete, and moves pending faults into
    /// event-queue buffers.
    pub fn fault_eventfd(&self) -> &EventFd {
        &self.inner.shared.fault_evt
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> IommuStats {
        self.inner.stats()
    }

    /// The configuration space as the driver sees it now.
    pub fn config(&self) -> VirtioIommuConfig {
        self.inner.config()
    }
}

impl Inner {
    fn endpoint(&self, id: u32) -> EndpointIommu {
        let mut registry = lock(&self.endpoints);
        if let Some(h) = registry.get(&id) {
            return h.clone();
        }
        lock(&self.shared.state).add_endpoint(id);
        let h = EndpointIommu::with_shared(id, Some(self.shared.clone()));
        registry.insert(id, h.clone());
        h
    }

    fn stats(&self) -> IommuStats {
        let (lookups, fills) = lock(&self.endpoints).values().fold((0, 0), |(l, f), h| {
            (
                l + h.inner.lookups.load(Ordering::Relaxed),
                f + h.inner.fills.load(Ordering::Relaxed),
            )
        });
        let (domains, mappings) = {
            let s = lock(&self.shared.state);
            (s.domain_count() as u64, s.mapping_count() as u64)
        };
        let c = &self.shared.counters;
        IommuStats {
            requests: self
                .requests
                .each_ref()
                .map(|row| row.each_ref().map(|c| c.load(Ordering::Relaxed))),
            domains,
            mappings,
            iotlb_lookups: lookups,
            iotlb_fills: fills,
            faults: c.faults.load(Ordering::Relaxed),
            events_delivered: c.events_delivered.load(Ordering::Relaxed),
            events_dropped: c.events_dropped.load(Ordering::Relaxed),
        }
    }

    fn config(&self) -> VirtioIommuConfig {
        let s = lock(&self.shared.state);
        let l = s.limits();
        VirtioIommuConfig {
            page_size_mask: Le64::from(PAGE_SIZE_MASK),
            input_range: VirtioIommuRange64 {
                start: l.input_start.into(),
                end: l.input_end.into(),
            },
            domain_range: VirtioIommuRange32 {
                start: l.domain_start.into(),
                end: l.domain_end.into(),
            },
            probe_size: PROBE_SIZE.into(),
            bypass: u8::from(s.bypass()),
            reserved: [0; 3],
        }
    }

    fn negotiated(&self, feature: u32) -> bool {
        self.acked_features.load(Ordering::SeqCst) & (1 << feature) != 0
    }

    /// Runs `op` on the mapping state and drops the IOTLB entries it invalidated (state still
    /// locked, so nothing refills them meanwhile). Returns what the caller must wait for
    /// before reporting completion: the affected endpoints' requests already in flight.
    fn update<T>(
        &self,
        op: impl FnOnce(&mut MappingState) -> (T, Invalidation),
    ) -> (T, Vec<Ticket>) {
        self.update_with(|s, inv| {
            let (out, i) = op(s);
            *inv = i;
            out
        })
    }

    /// [`Inner::update`] with the operation writing its invalidation into a buffer the
    /// device reuses (UNMAP: no allocation per request).
    fn update_with<T>(
        &self,
        op: impl FnOnce(&mut MappingState, &mut Invalidation) -> T,
    ) -> (T, Vec<Ticket>) {
        let registry = lock(&self.endpoints);
        let mut state = lock(&self.shared.state);
        let mut inv = lock(&self.scratch);
        inv.endpoints.clear();
        let out = op(&mut state, &mut inv);
        let mut tickets = Vec::new();
        for h in inv.endpoints.iter().filter_map(|ep| registry.get(ep)) {
            h.invalidate(inv.ranges.as_deref());
            // After the invalidation; requests that begin from now on see it. Taking the
            // ticket under the state mutex is fine: nothing holds an endpoint's in-flight
            // lock while waiting for the state.
            tickets.extend(h.ticket());
        }
        (out, tickets)
    }

    /// [`Inner::update`], then waits (blocking) for the affected endpoints' requests.
    fn update_and_wait(&self, op: impl FnOnce(&mut MappingState) -> Invalidation) {
        let ((), tickets) = self.update(|s| ((), op(s)));
        for t in &tickets {
            t.wait();
        }
    }

    fn set_bypass(&self, bypass: bool) {
        self.update_and_wait(|s| s.set_bypass(bypass));
    }

    fn count(&self, type_: Option<u8>, status: usize) {
        let row = type_
            .map(usize::from)
            .filter(|&t| t < STATS_TYPES)
            .unwrap_or(0);
        if let Some(slot) = self
            .requests
            .get(row)
            .and_then(|r| r.get(status.min(STATS_NO_STATUS)))
        {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles one request chain; returns the used length. `tickets` gets what must finish
    /// before the used buffer may be published.
    fn handle_request<M: Mem>(
        &self,
        mem: &M,
        chain: DescriptorChain<&M>,
        tickets: &mut Vec<Ticket>,
    ) -> u32 {
        // One walk: short chains (all Linux sends) are parsed from this copy.
        let mut descs = [(GuestAddress(0), 0u32, false); FAST_DESCS];
        let mut n = 0;
        let mut short = true;
        for d in chain.clone() {
            if n == FAST_DESCS {
                short = false;
                break;
            }
            descs[n] = (d.addr(), d.len(), d.is_write_only());
            n += 1;
        }
        let mut req = Request::new();
        let (ordered, sink) = if short {
            parse_fast(mem, &descs[..n], &mut req)
        } else {
            parse_general(mem, chain, &mut req)
        };
        let type_ = req.type_;

        let Some((mut sink, writable)) = sink else {
            debug!("virtio-iommu: request has no room for a tail; returned unwritten");
            self.count(type_, STATS_NO_STATUS);
            return 0;
        };

        let reply = match (ordered, req.readable, type_) {
            (false, _, _) => {
                debug!("virtio-iommu: readable descriptor after a writable one");
                Reply::status(VIRTIO_IOMMU_S_DEVERR)
            }
            (true, false, _) | (true, true, None) => {
                debug!("virtio-iommu: request head missing or unreadable");
                Reply::status(VIRTIO_IOMMU_S_DEVERR)
            }
            (true, true, Some(t)) => match t {
                VIRTIO_IOMMU_T_ATTACH => self.attach(&req, tickets).into(),
                VIRTIO_IOMMU_T_DETACH => self.detach(&req, tickets).into(),
                VIRTIO_IOMMU_T_MAP => self.map(&req).into(),
                VIRTIO_IOMMU_T_UNMAP => self.unmap(&req, tickets).into(),
                VIRTIO_IOMMU_T_PROBE => self.probe(&req, writable - TAIL_LEN),
                _ => {
                    debug!("virtio-iommu: unknown request type {t}; returned unwritten");
                    self.count(None, STATS_NO_STATUS);
                    return 0;
                }
            },
        };
        if reply.status != VIRTIO_IOMMU_S_OK {
            let t = type_.unwrap_or(0);
            let (name, status) = (type_name(t), reply.status);
            if t == VIRTIO_IOMMU_T_MAP || t == VIRTIO_IOMMU_T_UNMAP {
                // Linux never looks at these statuses; make the failure visible here.
                warn!("virtio-iommu: {name} request failed with status {status}");
            } else {
                debug!("virtio-iommu: {name} request failed with status {status}");
            }
        }

        // The tail goes where the layout puts it, or at the end of a too-short writable part.
        let expected_props = if type_ == Some(VIRTIO_IOMMU_T_PROBE) {
            PROBE_SIZE as usize
        } else {
            0
        };
        let tail_at = expected_props.min(writable - TAIL_LEN);
        // Only PROBE replies carry more than the tail.
        let mut tail = [0u8; TAIL_LEN];
        let mut long = Vec::new();
        let buf: &mut [u8] = if tail_at == 0 {
            &mut tail
        } else {
            long.resize(tail_at + TAIL_LEN, 0);
            &mut long
        };
        let n = reply.props.len().min(tail_at);
        buf[..n].copy_from_slice(&reply.props[..n]);
        buf[tail_at] = reply.status;
        if let Err(e) = sink.write_all(mem, buf) {
            debug!("virtio-iommu: cannot write request reply: {e}");
            self.count(type_, STATS_NO_STATUS);
            return 0;
        }
        self.count(type_, usize::from(reply.status));
        // At most PROBE_SIZE + 4 bytes.
        buf.len() as u32
    }

    fn attach(&self, req: &Request, tickets: &mut Vec<Ticket>) -> Result<(), ReqError> {
        let req: VirtioIommuReqAttach = read_body(req)?;
        if req.reserved != [0; 4] {
            return Err(ReqError::Inval);
        }
        let (domain, endpoint, flags) = (
            u32::from(req.domain),
            u32::from(req.endpoint),
            u32::from(req.flags),
        );
        debug!("virtio-iommu: ATTACH endpoint {endpoint} to domain {domain} flags {flags:#x}");
        let (r, t) = self.update(|s| split(s.attach(domain, endpoint, flags)));
        tickets.extend(t);
        r
    }

    fn detach(&self, req: &Request, tickets: &mut Vec<Ticket>) -> Result<(), ReqError> {
        let req: VirtioIommuReqDetach = read_body(req)?;
        let (domain, endpoint) = (u32::from(req.domain), u32::from(req.endpoint));
        debug!("virtio-iommu: DETACH endpoint {endpoint} from domain {domain}");
        let (r, t) = self.update(|s| split(s.detach(domain, endpoint)));
        tickets.extend(t);
        r
    }

    fn map(&self, req: &Request) -> Result<(), ReqError> {
        if !self.negotiated(VIRTIO_IOMMU_F_MAP_UNMAP) {
            return Err(ReqError::Unsupp);
        }
        let req: VirtioIommuReqMap = read_body(req)?;
        let (domain, start, end, phys, flags) = (
            u32::from(req.domain),
            u64::from(req.virt_start),
            u64::from(req.virt_end),
            u64::from(req.phys_start),
            u32::from(req.flags),
        );
        // Nothing to invalidate after a MAP: IOTLB misses refill from the state.
        lock(&self.shared.state).map(domain, start, end, phys, flags)
    }

    fn unmap(&self, req: &Request, tickets: &mut Vec<Ticket>) -> Result<(), ReqError> {
        if !self.negotiated(VIRTIO_IOMMU_F_MAP_UNMAP) {
            return Err(ReqError::Unsupp);
        }
        let req: VirtioIommuReqUnmap = read_body(req)?;
        // §5.13.6.6: the device MAY reject a non-zero `reserved` with INVAL; we do, and
        // leave the mappings alone.
        if req.reserved != [0; 4] {
            return Err(ReqError::Inval);
        }
        let (domain, start, end) = (
            u32::from(req.domain),
            u64::from(req.virt_start),
            u64::from(req.virt_end),
        );
        let (r, t) = self.update_with(|s, inv| s.unmap_into(domain, start, end, inv));
        tickets.extend(t);
        r
    }

    /// PROBE: one RESV_MEM/MSI property for the x86 MSI doorbell window, then zeros (type
    /// NONE). Without the MSI property Linux invents an ARM-style software MSI window at
    /// 0x800_0000 (Linux drivers/iommu/virtio-iommu.c, `viommu_get_resv_regions`).
    fn probe(&self, req: &Request, props_len: usize) -> Reply {
        if !self.negotiated(VIRTIO_IOMMU_F_PROBE) {
            return Reply::status(VIRTIO_IOMMU_S_UNSUPP);
        }
        let req: VirtioIommuReqProbe = match read_body(req) {
            Ok(r) => r,
            Err(e) => return Reply::status(e.status()),
        };
        let endpoint = u32::from(req.endpoint);
        if !lock(&self.shared.state).has_endpoint(endpoint) {
            return Reply::status(VIRTIO_IOMMU_S_NOENT);
        }
        if props_len != PROBE_SIZE as usize {
            // §5.13.6.7: a property list of the wrong size gets INVAL and no property.
            debug!("virtio-iommu: PROBE with {props_len} bytes of property space, expected {PROBE_SIZE}");
            return Reply::status(VIRTIO_IOMMU_S_INVAL);
        }
        let msi = VirtioIommuProbeResvMem {
            head: VirtioIommuProbeProperty {
                type_: Le16::from(VIRTIO_IOMMU_PROBE_T_RESV_MEM),
                length: Le16::from(
                    (size_of::<VirtioIommuProbeResvMem>() - size_of::<VirtioIommuProbeProperty>())
                        as u16,
                ),
            },
            subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
            reserved: [0; 3],
            start: Le64::from(MSI_IOVA_START),
            end: Le64::from(MSI_IOVA_END),
        };
        let mut props = vec![0u8; props_len];
        props[..size_of::<VirtioIommuProbeResvMem>()].copy_from_slice(msi.as_slice());
        Reply {
            status: VIRTIO_IOMMU_S_OK,
            props,
        }
    }

    /// Serves up to [`REQUESTS_PER_KICK`] requests. A request that restricted translations
    /// still in use by endpoint requests (UNMAP, DETACH, ATTACH during a slow disk read) is
    /// applied at once but returned only when those requests finish
    /// ([`Inner::complete_deferred`]); the requests behind it, for other endpoints, do not
    /// wait (the driver matches completions by token; `VIRTIO_F_IN_ORDER` is not offered).
    fn process_requests(&self, active: &Active) -> QueueProgress {
        let queue = &active.queues[REQUEST_QUEUE];
        let progress = self.process_requests_budget(active, queue);
        self.complete_deferred(active);
        progress
    }

    fn process_requests_budget(&self, active: &Active, queue: &Mutex<Queue>) -> QueueProgress {
        match active.mem.physical_memory() {
            // The virtio-iommu does not sit behind an IOMMU (it does not offer
            // ACCESS_PLATFORM): its memory is plain guest RAM, the same accesses `IommuMemory`
            // makes with translation disabled, without its per-access wrapper.
            Some(phys) => self.process_requests_in(active, queue, phys),
            None => self.process_requests_in(active, queue, &active.mem),
        }
    }

    fn process_requests_in<M: Mem>(
        &self,
        active: &Active,
        queue: &Mutex<Queue>,
        mem: &M,
    ) -> QueueProgress {
        let mut served = 0;
        while served < REQUESTS_PER_KICK {
            // Pop a chunk under one lock (one read of the available index), serve it without
            // the lock, return it under one lock with one notification.
            let want = CHUNK.min(REQUESTS_PER_KICK - served);
            let mut chains: [Option<DescriptorChain<&M>>; CHUNK] = std::array::from_fn(|_| None);
            let mut popped = 0;
            {
                let mut q = lock(queue);
                if !active.live.load(Ordering::SeqCst) {
                    return QueueProgress::Idle;
                }
                match q.iter(mem) {
                    Ok(mut avail) => {
                        for slot in chains.iter_mut().take(want) {
                            let Some(chain) = avail.next() else { break };
                            *slot = Some(chain);
                            popped += 1;
                        }
                    }
                    Err(e) => debug!("virtio-iommu: cannot read the request queue: {e}"),
                }
            }
            if popped == 0 {
                return QueueProgress::Idle;
            }
            served += popped;
            let mut used = [(0u16, 0u32); CHUNK];
            let mut n_used = 0;
            let mut deferred = Vec::new();
            for chain in chains.into_iter().flatten() {
                let head = chain.head_index();
                // Invalidations happen inside; the used buffer is published only once no
                // request can still use the old translations.
                let mut tickets = Vec::new();
                let len = self.handle_request(mem, chain, &mut tickets);
                tickets.retain(|t| !t.done());
                if tickets.is_empty() {
                    used[n_used] = (head, len);
                    n_used += 1;
                } else {
                    deferred.push(Deferred { head, len, tickets });
                }
            }
            let mut q = lock(queue);
            if !active.live.load(Ordering::SeqCst) {
                return QueueProgress::Idle;
            }
            if !deferred.is_empty() {
                lock(&active.deferred).extend(deferred);
            }
            for &(head, len) in &used[..n_used] {
                if let Err(e) = q.add_used(mem, head, len) {
                    warn!("virtio-iommu: cannot return request {head}: {e}");
                    return QueueProgress::Idle;
                }
            }
            if n_used > 0 {
                Self::notify(&mut q, mem, active, REQUEST_QUEUE);
            }
            // A short chunk means the ring ran dry: the next round looks once more (the
            // driver may have added requests meanwhile) and stops if it is still empty.
        }
        QueueProgress::More
    }

    /// Returns the deferred requests whose tickets are done. Called by the worker after each
    /// batch and whenever the last waited-for endpoint request of an epoch ends (it writes
    /// the fault eventfd, the worker's `EVENT_QUEUE` notifier).
    fn complete_deferred(&self, active: &Active) {
        let mut q = lock(&active.queues[REQUEST_QUEUE]);
        if !active.live.load(Ordering::SeqCst) {
            return;
        }
        let mut deferred = lock(&active.deferred);
        let mut completed = false;
        let mut i = 0;
        while i < deferred.len() {
            if !deferred[i].tickets.iter().all(Ticket::done) {
                i += 1;
                continue;
            }
            let d = deferred.remove(i);
            if let Err(e) = q.add_used(&active.mem, d.head, d.len) {
                warn!("virtio-iommu: cannot return request {}: {e}", d.head);
                continue;
            }
            completed = true;
        }
        drop(deferred);
        if completed {
            Self::notify(&mut q, &active.mem, active, REQUEST_QUEUE);
        }
    }

    fn process_events(&self, active: &Active) -> QueueProgress {
        let mut q = lock(&active.queues[EVENT_QUEUE]);
        if !active.live.load(Ordering::SeqCst) {
            return QueueProgress::Idle;
        }
        let mut completed = false;
        let mut progress = QueueProgress::More;
        for _ in 0..REQUESTS_PER_KICK {
            let Some(fault) = lock(&self.shared.pending_faults).front().copied() else {
                progress = QueueProgress::Idle;
                break;
            };
            let Some(chain) = q.pop_descriptor_chain(&active.mem) else {
                progress = QueueProgress::Idle;
                break;
            };
            let head = chain.head_index();
            let written = match Writer::new(&active.mem, chain) {
                Ok(mut w) if w.available_bytes() >= size_of::<VirtioIommuFault>() => {
                    w.write_obj(fault).is_ok()
                }
                Ok(_) => {
                    debug!("virtio-iommu: event buffer too small for a fault report");
                    false
                }
                Err(e) => {
                    debug!("virtio-iommu: unusable event buffer: {e}");
                    false
                }
            };
            let len = if written {
                lock(&self.shared.pending_faults).pop_front();
                self.shared
                    .counters
                    .events_delivered
                    .fetch_add(1, Ordering::Relaxed);
                size_of::<VirtioIommuFault>() as u32
            } else {
                0
            };
            if let Err(e) = q.add_used(&active.mem, head, len) {
                warn!("virtio-iommu: cannot return event buffer {head}: {e}");
                progress = QueueProgress::Idle;
                break;
            }
            completed = true;
        }
        if completed {
            Self::notify(&mut q, &active.mem, active, EVENT_QUEUE);
        }
        progress
    }

    fn notify<M: GuestMemory>(queue: &mut Queue, mem: &M, active: &Active, index: usize) {
        match queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) => active.interrupt.signal_used_queue(),
            Err(e) => {
                debug!("virtio-iommu: queue {index}: cannot check notification suppression: {e}");
                active.interrupt.signal_used_queue();
            }
        }
    }
}

impl QueueHandler for Inner {
    fn process_queue(&self, index: usize) -> QueueProgress {
        if index == EVENT_QUEUE {
            // Reset the eventfd first, so a fault recorded from now on wakes the worker again.
            let _ = self.shared.fault_evt.read();
        }
        let Some(active) = lock(&self.active).clone() else {
            debug!("virtio-iommu: queue {index} notified before activation");
            return QueueProgress::Idle;
        };
        match index {
            REQUEST_QUEUE => self.process_requests(&active),
            EVENT_QUEUE => {
                self.complete_deferred(&active);
                self.process_events(&active)
            }
            _ => {
                debug!("virtio-iommu: notification for unknown queue {index}");
                QueueProgress::Idle
            }
        }
    }
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn ack_features(&mut self, features: u64) -> bool {
        let inner = &self.inner;
        inner
            .acked_features
            .store(features & AVAIL_FEATURES, Ordering::SeqCst);
        lock(&inner.shared.state).set_negotiated(
            inner.negotiated(VIRTIO_IOMMU_F_BYPASS_CONFIG),
            inner.negotiated(VIRTIO_IOMMU_F_PROBE),
        );
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.inner.config();
        let bytes = config.as_slice();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Only `bypass` is writable, only with BYPASS_CONFIG negotiated, and only with 0 or 1.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            if at != Some(VIRTIO_IOMMU_CONFIG_BYPASS_OFFSET as u64) {
                debug!("virtio-iommu: write to read-only config byte {at:?} ignored");
                continue;
            }
            if !self.inner.negotiated(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
                debug!("virtio-iommu: bypass written without BYPASS_CONFIG; ignored");
            } else if b > 1 {
                debug!("virtio-iommu: invalid bypass value {b} ignored");
            } else {
                debug!("virtio-iommu: bypass set to {b}");
                self.inner.set_bypass(b == 1);
            }
        }
    }

    fn activate(
        &mut self,
        mem: DeviceMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        for (i, q) in queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        *lock(&self.inner.active) = Some(Arc::new(Active {
            mem,
            queues: queues.into_iter().map(Mutex::new).collect(),
            interrupt,
            live: AtomicBool::new(true),
            deferred: Mutex::new(Vec::new()),
        }));
        Ok(())
    }

    fn queue_handler(&self) -> Arc<dyn QueueHandler> {
        self.inner.clone()
    }

    fn reset(&mut self) {
        let inner = &self.inner;
        if let Some(active) = lock(&inner.active).take() {
            for q in &active.queues {
                // Waits at most for a pop or a used-ring update.
                let _q = lock(q);
                active.live.store(false, Ordering::SeqCst);
            }
        }
        inner.acked_features.store(0, Ordering::SeqCst);
        inner.update_and_wait(MappingState::reset);
        lock(&inner.shared.pending_faults).clear();
    }
}
