// SPDX-License-Identifier: Apache-2.0

//! virtio-blk over a raw image (virtio 1.2, §5.2).
//!
//! One request queue. A request is a descriptor chain laid out the way every Linux, BSD and
//! firmware driver builds it:
//!
//! ```text
//!  [header: 16 bytes, device-readable] [data: 0..n descriptors] [status: 1 byte, device-writable]
//! ```
//!
//! The header holds the request type and the starting sector; data descriptors are all
//! device-writable for a read (`VIRTIO_BLK_T_IN`) and all device-readable for a write
//! (`VIRTIO_BLK_T_OUT`). A header split over several descriptors is not supported (IOERR).
//!
//! Every guest buffer is reached through the [`DeviceMemory`] given to `activate`: when the
//! device sits behind the virtio-iommu each access is translated and permission-checked, and
//! a fault (unmapped IOVA, write to a read-only mapping) fails that request with
//! `VIRTIO_BLK_S_IOERR`. Data moves directly between the image and guest memory (no bounce
//! buffer). Behind the IOMMU, one pass over the queue goes through a
//! [`CachedMemory`], so the ring and buffer accesses of
//! its requests reuse the IOTLB entries they found (as long as nothing was invalidated).
//!
//! # Bounded work, and what waits for what
//!
//! - A request has at most [`SEG_MAX`] data segments of at most [`SIZE_MAX`] bytes each
//!   (`VIRTIO_BLK_F_SEG_MAX`, `VIRTIO_BLK_F_SIZE_MAX`); larger requests get IOERR.
//! - All of a request's buffers are translated into owned slices *before* the image is
//!   touched, so no IOMMU lock (IOTLB, mapping state) is held during disk I/O. The request's
//!   [`RequestGuard`] is held instead: an UNMAP of its domain completes only after the
//!   request is done (see `virtio::iommu`).
//! - The data plane ([`VirtioDevice::queue_handler`]) locks the queue only to pop a chain and
//!   to return it, never across I/O, and handles at most [`REQUESTS_PER_KICK`] requests per
//!   call; each completion is signalled on its own. Config reads, feature negotiation and
//!   reset take no lock the data plane holds across I/O.
//!
//! Nothing a guest puts in a descriptor chain makes the device panic: malformed requests get
//! `VIRTIO_BLK_S_IOERR` (or, when there is no usable status byte, go back to the used ring with
//! length 0) and a rate-limited `debug!` line.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestMemory, GuestMemoryError, Permissions, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::iommu::{CachedMemory, RequestGuard};
use super::{
    ActivateError, DeviceMemory, QueueHandler, QueueProgress, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
};
use crate::sync::lock;
use crate::{guest_debug, guest_warn};

/// Feature bit: the maximum size of one data segment is in `size_max`.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit: the maximum number of data segments per request is in `seg_max`.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: the logical block size is in `blk_size`.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: the device has a volatile write cache and accepts `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit: more than one request queue; their number is in `num_queues`.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// Most request queues a device offers.
pub const MAX_QUEUES: u16 = 16;

/// Request type: read sectors into device-writable buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write sectors from device-readable buffers.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: make previous writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: return the device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: the request failed (device or driver error).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the device ID string returned by `VIRTIO_BLK_T_GET_ID`.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// The virtio-blk sector size, fixed by the spec whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// Size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request, announced in `seg_max`. Linux builds at most this many
/// (`max_segments`); a request needs `SEG_MAX + 2` ring slots without indirect descriptors.
pub const SEG_MAX: u32 = 128;
/// Largest data segment, announced in `size_max` (Linux's `max_segment_size`).
pub const SIZE_MAX: u32 = 128 << 10;
/// Largest data length of one request: [`SEG_MAX`] segments of [`SIZE_MAX`] bytes (16 MiB).
/// Linux sends at most `max_sectors_kb` (1280 KiB by default) per request.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Requests handled per [`QueueHandler::process_queue`] call before the worker gets to look
/// at its other events again.
pub const REQUESTS_PER_KICK: usize = 16;

/// Size of the request header (`struct virtio_blk_req` up to the data).
const REQUEST_HEADER_SIZE: usize = 16;
/// Descriptors kept per request: header, [`SEG_MAX`] data segments, status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Bytes of `struct virtio_blk_config` we fill in (up to and including `num_queues`); the
/// rest reads as 0.
const CONFIG_SIZE: usize = 36;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The size of the image could not be determined.
    #[error("Cannot get the size of the disk image")]
    ImageSize(#[source] io::Error),
}

/// Where a block device's sectors live. Positioned I/O straight into (out of) guest memory;
/// implementations may block (the device calls them with no lock of its own held).
pub trait DiskBackend: Send + Sync {
    /// Size of the image in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from the image at byte `offset`.
    fn read_at(&self, offset: u64, buf: &mut VolatileSlice<'_>) -> io::Result<()>;
    /// Writes all of `buf` to the image at byte `offset`.
    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()>;
    /// Makes earlier writes durable.
    fn flush(&self) -> io::Result<()>;
}

/// A [`DiskBackend`] over a raw image file (or block device).
#[derive(Debug)]
pub struct FileBackend(Mutex<File>);

impl FileBackend {
    /// Wraps an open image.
    pub fn new(file: File) -> Self {
        FileBackend(Mutex::new(file))
    }
}

fn volatile_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

impl DiskBackend for FileBackend {
    fn size(&self) -> io::Result<u64> {
        // Seeking to the end also works for block devices, whose metadata length is 0.
        lock(&self.0).seek(SeekFrom::End(0))
    }

    fn read_at(&self, offset: u64, buf: &mut VolatileSlice<'_>) -> io::Result<()> {
        let mut f = lock(&self.0);
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact_volatile(buf).map_err(volatile_io)
    }

    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        let mut f = lock(&self.0);
        f.seek(SeekFrom::Start(offset))?;
        f.write_all_volatile(buf).map_err(volatile_io)
    }

    fn flush(&self) -> io::Result<()> {
        lock(&self.0).sync_data()
    }
}

/// Request counters, for the VMM's report. A request is counted under its type when its header
/// could be read, whatever its outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// `VIRTIO_BLK_T_IN` requests.
    pub reads: u64,
    /// `VIRTIO_BLK_T_OUT` requests.
    pub writes: u64,
    /// `VIRTIO_BLK_T_FLUSH` requests.
    pub flushes: u64,
    /// `VIRTIO_BLK_T_GET_ID` requests.
    pub get_id: u64,
    /// Requests of other types, answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Requests that failed: answered `VIRTIO_BLK_S_IOERR`, or returned without a status
    /// because the chain had no usable status byte.
    pub errors: u64,
    /// Bytes read from the image into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image.
    pub bytes_written: u64,
}

impl BlockStats {
    fn add(&mut self, o: &BlockStats) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.get_id += o.get_id;
        self.unsupported += o.unsupported;
        self.errors += o.errors;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
    }
}

/// The backing image and what the guest is told about it.
struct Disk {
    backend: Box<dyn DiskBackend>,
    /// In 512-byte sectors.
    capacity: u64,
    read_only: bool,
    /// NUL-padded.
    id: [u8; VIRTIO_BLK_ID_BYTES],
}

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: DeviceMemory,
    /// One per request queue; each locked to pop a chain and to return one, never across
    /// I/O. Queues share no lock on the data path.
    queues: Vec<Mutex<Queue>>,
    interrupt: Arc<VirtioInterrupt>,
    /// Cleared (under `queue`) by reset: completions of requests still in flight are dropped.
    live: AtomicBool,
}

/// The data plane, shared by the device and its worker.
struct BlockQueue {
    disk: Disk,
    stats: Mutex<BlockStats>,
    active: Mutex<Option<Arc<Active>>>,
}

/// A virtio-blk device over a raw image; see the [module documentation](self).
pub struct Block {
    features: u64,
    /// Maximum size of each request queue (one entry per queue).
    queue_sizes: Vec<u16>,
    acked_features: u64,
    data: Arc<BlockQueue>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.data.disk.capacity)
            .field("read_only", &self.data.disk.read_only)
            .field("features", &self.features)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

/// Why a request failed. Decides the log level; the guest sees IOERR either way.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{0} descriptors, more than {MAX_DESCRIPTORS}")]
    TooManyDescriptors(usize),
    #[error("status descriptor of {0} bytes (data and status merged?)")]
    LongStatus(u32),
    #[error("no header descriptor")]
    NoHeader,
    #[error("header in a device-writable descriptor")]
    WritableHeader,
    #[error("header descriptor of {0} bytes")]
    ShortHeader(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("data descriptor with the wrong direction")]
    WrongDirection,
    #[error("data segment of {0} bytes, more than size_max {SIZE_MAX}")]
    SegmentTooLarge(u32),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    PartialSector(u64),
    #[error("sectors {sector}+{count} past the end ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("GET_ID data in a device-readable descriptor")]
    ReadableIdBuffer,
    /// A guest buffer could not be reached: outside guest memory, or an IOMMU fault.
    #[error("request buffer not accessible: {0}")]
    GuestMemory(#[from] GuestMemoryError),
    /// The image failed.
    #[error("image I/O failed: {0}")]
    Host(io::Error),
}

impl Block {
    /// A device over the raw image `file`, of `file`'s size rounded down to whole sectors.
    ///
    /// `read_only` offers `VIRTIO_BLK_F_RO` and fails writes (open `file` read-only too).
    /// `id` is returned by `VIRTIO_BLK_T_GET_ID`, cut to 20 bytes. `access_platform` offers
    /// `VIRTIO_F_ACCESS_PLATFORM`: set it when the device sits behind the IOMMU, or the guest
    /// driver hands out physical addresses and bypasses it. A driver that refuses it then
    /// fails feature negotiation.
    pub fn new(
        file: File,
        read_only: bool,
        id: String,
        access_platform: bool,
    ) -> Result<Block, BlockError> {
        Self::with_backend(
            Box::new(FileBackend::new(file)),
            read_only,
            id,
            access_platform,
        )
    }

    /// [`Block::new`] over any [`DiskBackend`].
    pub fn with_backend(
        backend: Box<dyn DiskBackend>,
        read_only: bool,
        id: String,
        access_platform: bool,
    ) -> Result<Block, BlockError> {
        let size = backend.size().map_err(BlockError::ImageSize)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            warn!(
                "virtio-blk: image size {size} is not a multiple of {SECTOR_SIZE}; the last {} \
                 bytes are not visible to the guest",
                size % SECTOR_SIZE
            );
        }
        let capacity = size / SECTOR_SIZE;

        if id.len() > VIRTIO_BLK_ID_BYTES {
            warn!("virtio-blk: device id {id:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes; cut");
        }
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if access_platform {
            features |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        info!(
            "virtio-blk: {capacity} sectors, {}, id {id:?}{}",
            if read_only { "read-only" } else { "read-write" },
            if access_platform {
                ", behind the IOMMU"
            } else {
                ""
            }
        );
        Ok(Block {
            features,
            queue_sizes: vec![QUEUE_SIZE],
            acked_features: 0,
            data: Arc::new(BlockQueue {
                disk: Disk {
                    backend,
                    capacity,
                    read_only,
                    id: id_bytes,
                },
                stats: Mutex::new(BlockStats::default()),
                active: Mutex::new(None),
            }),
        })
    }

    /// Offers `queues` request queues (1..=[`MAX_QUEUES`], clamped), with
    /// `VIRTIO_BLK_F_MQ` when more than one. Each queue is served and signalled on its own.
    pub fn with_queues(mut self, queues: u16) -> Block {
        let n = queues.clamp(1, MAX_QUEUES);
        self.queue_sizes = vec![QUEUE_SIZE; usize::from(n)];
        if n > 1 {
            self.features |= 1 << VIRTIO_BLK_F_MQ;
        } else {
            self.features &= !(1 << VIRTIO_BLK_F_MQ);
        }
        self
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.data.disk.capacity
    }

    /// The request counters.
    pub fn stats(&self) -> BlockStats {
        *lock(&self.data.stats)
    }

    /// `struct virtio_blk_config` up to `num_queues`, little endian.
    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.data.disk.capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20 geometry: not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // 24..32 topology, 32 writeback, 33 unused: not offered.
        c[34..36].copy_from_slice(&(self.queue_sizes.len() as u16).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) -> bool {
        let platform = 1 << VIRTIO_F_ACCESS_PLATFORM;
        if self.features & platform != 0 && features & platform == 0 {
            // Its addresses would still be translated: every request would fault. Refusing
            // FEATURES_OK tells the driver at once (virtio 1.2 §6.1).
            guest_warn!("virtio-blk: driver refused ACCESS_PLATFORM; FEATURES_OK refused");
            return false;
        }
        self.acked_features = features & self.features;
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (not offered).
        guest_debug!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: DeviceMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let expected = self.queue_sizes.len();
        if got != expected {
            return Err(ActivateError::QueueCount { expected, got });
        }
        let mut ready = Vec::with_capacity(got);
        for (i, mut queue) in queues.into_iter().enumerate() {
            if !queue.ready() || !queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            // VIRTIO_F_RING_EVENT_IDX is not offered.
            queue.set_event_idx(false);
            ready.push(Mutex::new(queue));
        }
        *lock(&self.data.active) = Some(Arc::new(Active {
            mem,
            queues: ready,
            interrupt,
            live: AtomicBool::new(true),
        }));
        Ok(())
    }

    fn queue_handler(&self) -> Arc<dyn QueueHandler> {
        self.data.clone()
    }

    fn reset(&mut self) {
        if let Some(active) = lock(&self.data.active).take() {
            // Waits at most for a pop or a used-ring update, never for I/O.
            let _queues: Vec<_> = active.queues.iter().map(lock).collect();
            active.live.store(false, Ordering::SeqCst);
        }
        self.acked_features = 0;
    }
}

impl QueueHandler for BlockQueue {
    fn process_queue(&self, index: usize) -> QueueProgress {
        let Some(active) = lock(&self.active).clone() else {
            guest_debug!("virtio-blk: notification before activation; ignored");
            return QueueProgress::Idle;
        };
        let Some(queue_lock) = active.queues.get(index) else {
            guest_debug!("virtio-blk: notification for missing queue {index}; ignored");
            return QueueProgress::Idle;
        };
        if active.mem.get_iommu_enabled() {
            // Remembers the ring and header pages' translations across this pass; every
            // access through it happens under a request guard.
            self.serve(&active, queue_lock, index, &CachedMemory::new(&active.mem))
        } else {
            self.serve(&active, queue_lock, index, &active.mem)
        }
    }
}

impl BlockQueue {
    /// Serves up to [`REQUESTS_PER_KICK`] requests of queue `index`, accessing guest memory
    /// through `mem` (`active.mem` itself, or a view of it).
    fn serve<M: GuestMemory<Bitmap = ()>>(
        &self,
        active: &Active,
        queue_lock: &Mutex<Queue>,
        index: usize,
        mem: &M,
    ) -> QueueProgress {
        for _ in 0..REQUESTS_PER_KICK {
            // Held while this request uses translations, so an UNMAP cannot complete under it.
            let _request = begin_request(&active.mem);
            let chain = {
                let mut queue = lock(queue_lock);
                if !active.live.load(Ordering::SeqCst) {
                    return QueueProgress::Idle;
                }
                queue.pop_descriptor_chain(mem)
            };
            let Some(chain) = chain else {
                return QueueProgress::Idle;
            };
            let head = chain.head_index();
            let mut stats = BlockStats::default();
            let len = process_request(&self.disk, &mut stats, mem, chain);
            lock(&self.stats).add(&stats);

            let mut queue = lock(queue_lock);
            if !active.live.load(Ordering::SeqCst) {
                // Reset while the request ran: the ring belongs to the old driver instance.
                return QueueProgress::Idle;
            }
            if let Err(e) = queue.add_used(mem, head, len) {
                // The used ring is not writable (unmapped by the guest, say): nothing more
                // can be completed until the driver fixes it or resets the device.
                guest_debug!("virtio-blk: cannot return request {head} to the used ring: {e}");
                return QueueProgress::Idle;
            }
            // Signalled per request: a slow request after this one does not delay it.
            // Without EVENT_IDX this honours VRING_AVAIL_F_NO_INTERRUPT only.
            match queue.needs_notification(mem) {
                Ok(false) => {}
                Ok(true) => active.interrupt.signal_queue(index),
                Err(e) => {
                    guest_debug!("virtio-blk: cannot read used_event ({e}); notifying anyway");
                    active.interrupt.signal_queue(index);
                }
            }
        }
        QueueProgress::More
    }
}

/// Marks the start of one request for the IOMMU: while the returned guard lives, an UNMAP of
/// the endpoint's domain does not complete, so no request uses a stale translation after the
/// guest was told the mapping is gone (see the contract in `virtio::iommu`). One guard per
/// request, never nested; dropped before the next request.
fn begin_request(mem: &DeviceMemory) -> RequestGuard<'_> {
    mem.iommu().begin_request()
}

/// Handles one descriptor chain; returns the used length (bytes written to the chain's
/// device-writable buffers, status byte included).
fn process_request<M: GuestMemory<Bitmap = ()>>(
    disk: &Disk,
    stats: &mut BlockStats,
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
) -> u32 {
    // Keep the first MAX_DESCRIPTORS; walk the rest (bounded by the queue or indirect table
    // size) only to find the status descriptor.
    let mut descs = Vec::new();
    let mut last = None;
    let mut count = 0usize;
    for desc in chain {
        if descs.len() < MAX_DESCRIPTORS {
            descs.push(desc);
        }
        last = Some(desc);
        count += 1;
    }

    let status_desc = match last {
        // A chain cut short (bad `next`, a loop, an unreadable descriptor) ends in a
        // descriptor that still has NEXT: its status byte is nowhere to be found.
        Some(d) if d.is_write_only() && d.len() >= 1 && !d.has_next() => d,
        _ => {
            guest_debug!(
                "virtio-blk: request without a writable status descriptor; returned unanswered"
            );
            stats.errors += 1;
            return 0;
        }
    };

    let result = if count > MAX_DESCRIPTORS {
        Err(RequestError::TooManyDescriptors(count))
    } else if status_desc.len() > 1 {
        // The status is the last byte of the request (§5.2.6): a longer descriptor means the
        // driver merged data and status, a layout not supported here. Fail rather than let
        // it read data that was never written.
        Err(RequestError::LongStatus(status_desc.len()))
    } else {
        execute(disk, stats, mem, &descs[..descs.len() - 1])
    };
    let (status, data_len) = match result {
        Ok(Some(written)) => (VIRTIO_BLK_S_OK, written),
        Ok(None) => (VIRTIO_BLK_S_UNSUPP, 0),
        Err(e) => {
            stats.errors += 1;
            match e {
                RequestError::Host(_) => guest_warn!("virtio-blk: {e}"),
                _ => guest_debug!("virtio-blk: request failed: {e}"),
            }
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };

    let written = status_desc
        .addr()
        .checked_add(u64::from(status_desc.len()) - 1)
        .ok_or(GuestMemoryError::GuestAddressOverflow)
        .and_then(|addr| mem.write_slice(&[status], addr));
    if let Err(e) = written {
        guest_debug!("virtio-blk: cannot write the status byte: {e}");
        if status != VIRTIO_BLK_S_IOERR {
            stats.errors += 1;
        }
        return 0;
    }
    data_len + 1
}

/// Runs one request given its header and data descriptors (the status descriptor removed).
/// Returns the bytes written to guest buffers, or `None` for an unsupported request type.
fn execute<M: GuestMemory<Bitmap = ()>>(
    disk: &Disk,
    stats: &mut BlockStats,
    mem: &M,
    descs: &[Descriptor],
) -> Result<Option<u32>, RequestError> {
    let Some((header, data)) = descs.split_first() else {
        return Err(RequestError::NoHeader);
    };
    if header.is_write_only() {
        return Err(RequestError::WritableHeader);
    }
    if (header.len() as usize) < REQUEST_HEADER_SIZE {
        return Err(RequestError::ShortHeader(header.len()));
    }
    let mut raw = [0u8; REQUEST_HEADER_SIZE];
    mem.read_slice(&mut raw, header.addr())?;
    let request_type = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    // raw[4..8] is the I/O priority, ignored.
    let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));

    match request_type {
        VIRTIO_BLK_T_IN => {
            stats.reads += 1;
            let len = transfer(disk, mem, sector, data, Direction::Read)?;
            stats.bytes_read += len;
            // At most MAX_REQUEST_BYTES, which fits in a u32.
            Ok(Some(len as u32))
        }
        VIRTIO_BLK_T_OUT => {
            stats.writes += 1;
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = transfer(disk, mem, sector, data, Direction::Write)?;
            stats.bytes_written += len;
            Ok(Some(0))
        }
        VIRTIO_BLK_T_FLUSH => {
            stats.flushes += 1;
            disk.backend.flush().map_err(RequestError::Host)?;
            Ok(Some(0))
        }
        VIRTIO_BLK_T_GET_ID => {
            stats.get_id += 1;
            get_id(disk, mem, data).map(Some)
        }
        other => {
            stats.unsupported += 1;
            guest_debug!("virtio-blk: unsupported request type {other}");
            Ok(None)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Image to guest (`VIRTIO_BLK_T_IN`).
    Read,
    /// Guest to image (`VIRTIO_BLK_T_OUT`).
    Write,
}

/// Moves the data of a read or write between the image at `sector` and the guest buffers in
/// `data`. Every buffer is checked (direction, size) and translated into a slice of guest
/// memory before the image is touched, so a bad buffer fails the request without a partial
/// write, and no translation lock is held during the I/O. Returns the number of bytes moved.
fn transfer<M: GuestMemory<Bitmap = ()>>(
    disk: &Disk,
    mem: &M,
    sector: u64,
    data: &[Descriptor],
    direction: Direction,
) -> Result<u64, RequestError> {
    let (writable, access) = match direction {
        Direction::Read => (true, Permissions::Write),
        Direction::Write => (false, Permissions::Read),
    };
    let mut total: u64 = 0;
    for desc in data {
        if desc.is_write_only() != writable {
            return Err(RequestError::WrongDirection);
        }
        if desc.len() > SIZE_MAX {
            return Err(RequestError::SegmentTooLarge(desc.len()));
        }
        // At most SEG_MAX segments (checked by the caller) of at most SIZE_MAX bytes.
        total += u64::from(desc.len());
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::PartialSector(total));
    }
    let out_of_range = || RequestError::OutOfRange {
        sector,
        count: total / SECTOR_SIZE,
        capacity: disk.capacity,
    };
    let mut offset = sector
        .checked_mul(SECTOR_SIZE)
        .filter(|&o| {
            o.checked_add(total)
                .is_some_and(|end| end <= disk.capacity * SECTOR_SIZE)
        })
        .ok_or_else(out_of_range)?;

    // Translate everything first. The slices point into guest RAM and stay valid without the
    // translation: dropping each `get_slices` iterator releases the endpoint's IOTLB lock,
    // and the request guard (held by the caller) keeps an UNMAP of these buffers from
    // completing until the I/O below is done.
    let mut slices: Vec<VolatileSlice<'_>> = Vec::with_capacity(data.len());
    for desc in data.iter().filter(|d| d.len() > 0) {
        for slice in mem.get_slices(desc.addr(), desc.len() as usize, access)? {
            slices.push(slice?);
        }
    }
    for slice in &mut slices {
        match direction {
            Direction::Read => disk.backend.read_at(offset, slice),
            Direction::Write => disk.backend.write_at(offset, slice),
        }
        .map_err(RequestError::Host)?;
        offset += slice.len() as u64;
    }
    Ok(total)
}

/// Writes the ID string to the device-writable data buffers, as much as fits in 20 bytes.
fn get_id<M: GuestMemory<Bitmap = ()>>(
    disk: &Disk,
    mem: &M,
    data: &[Descriptor],
) -> Result<u32, RequestError> {
    let mut written = 0usize;
    for desc in data {
        if !desc.is_write_only() {
            return Err(RequestError::ReadableIdBuffer);
        }
        let n = (desc.len() as usize).min(VIRTIO_BLK_ID_BYTES - written);
        if n == 0 {
            continue;
        }
        mem.write_slice(&disk.id[written..written + n], desc.addr())?;
        written += n;
    }
    // At most 20.
    Ok(written as u32)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::interrupt::CountingLine;
    use crate::virtio::device_memory;

    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;

    /// Guest RAM: the queue at 0, request buffers from 0x1_0000, 1 MiB in all.
    const MEM_SIZE: usize = 0x10_0000;
    /// virtio-queue 0.18's mock puts the used ring 16 bytes after the start of the
    /// available ring's entries (not 32), so a test adds at most 8 chains.
    const MOCK_QUEUE_SIZE: u16 = 16;
    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    /// Past the end of guest RAM.
    const OUTSIDE: u64 = 0x1000_0000;
    const DISK_SECTORS: u64 = 64;

    /// A readable or writable buffer of a chain.
    #[derive(Clone, Copy)]
    enum Buf {
        R(u64, u32),
        W(u64, u32),
    }

    struct Disk {
        /// A second handle on the image, to check what the device wrote.
        image: File,
        _temp: TempFile,
    }

    /// An image whose sector `n` is filled with the byte `n`.
    fn disk(sectors: u64) -> (File, Disk) {
        let temp = TempFile::new().unwrap();
        let mut file = temp.as_file().try_clone().unwrap();
        for n in 0..sectors {
            file.write_all(&[n as u8; SECTOR_SIZE as usize]).unwrap();
        }
        let image = file.try_clone().unwrap();
        (file, Disk { image, _temp: temp })
    }

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    }

    /// Adds one chain made of `bufs`, its descriptors starting at table index `first`.
    fn submit(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, bufs: &[Buf]) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (addr, len, mut flags) = match *b {
                    Buf::R(a, l) => (a, l, 0),
                    Buf::W(a, l) => (a, l, VRING_DESC_F_WRITE),
                };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                SplitDescriptor::new(addr, len, flags, first + i as u16 + 1).into()
            })
            .collect();
        vq.add_desc_chains(&descs, first).unwrap();
    }

    /// Activates `block` on the mock queue, without an IOMMU.
    fn activate(
        block: &mut Block,
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> Arc<CountingLine> {
        let line = Arc::new(CountingLine::new());
        let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
        block
            .activate(
                device_memory(mem.clone(), None),
                vec![vq.create_queue::<Queue>().unwrap()],
                interrupt,
            )
            .unwrap();
        line
    }

    /// The `n`th used element as (descriptor head, length).
    fn used(vq: &MockSplitQueue<GuestMemoryMmap>, n: usize) -> (u32, u32) {
        let elem = vq.used().ring().ref_at(n).unwrap().load();
        (elem.id(), elem.len())
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Runs one request on a fresh read-write device; returns (status, used len, device).
    fn run_one(request_type: u32, sector: u64, bufs: &[Buf]) -> (u8, u32, Block, Disk) {
        let (file, d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "disk0".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        activate(&mut block, &mem, &vq);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        header(&mem, request_type, sector);
        submit(&vq, 0, bufs);
        block.process_queue(0);
        assert_eq!(
            vq.used().idx().load(),
            1,
            "request returned to the used ring"
        );
        let (head, len) = used(&vq, 0);
        assert_eq!(head, 0);
        (status(&mem), len, block, d)
    }

    #[test]
    fn features_and_config() {
        let (file, _d) = disk(DISK_SECTORS);
        let block = Block::new(file, true, "x".into(), true).unwrap();
        let f = block.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_RO,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(block.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(block.queue_max_sizes(), &[QUEUE_SIZE]);

        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        let mut word = [0u8; 4];
        block.read_config(8, &mut word);
        assert_eq!(u32::from_le_bytes(word), SIZE_MAX, "size_max");
        assert_eq!(SIZE_MAX, 128 << 10);
        block.read_config(12, &mut word);
        assert_eq!(u32::from_le_bytes(word), SEG_MAX, "seg_max");
        assert_eq!(SEG_MAX, 128);
        block.read_config(20, &mut word);
        assert_eq!(u32::from_le_bytes(word), 512);
        // Past what we fill in, and absurd offsets: zeros.
        word = [0xff; 4];
        block.read_config(60, &mut word);
        assert_eq!(word, [0; 4]);
        word = [0xff; 4];
        block.read_config(u64::MAX, &mut word);
        assert_eq!(word, [0; 4]);

        let (file, _d) = disk(1);
        let rw = Block::new(file, false, "x".into(), false).unwrap();
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(rw.features() & (1 << VIRTIO_F_ACCESS_PLATFORM), 0);
    }

    #[test]
    fn capacity_rounds_a_partial_sector_down() {
        let temp = TempFile::new().unwrap();
        temp.as_file().write_all(&[0u8; 1000]).unwrap();
        let block = Block::new(
            temp.as_file().try_clone().unwrap(),
            false,
            "x".into(),
            false,
        );
        assert_eq!(block.unwrap().capacity(), 1);
    }

    #[test]
    fn read_copies_sectors_into_guest_memory() {
        let (file, _d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let line = activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_IN, 3);
        // Two data segments: sector 3 in one, sectors 4-5 in the other.
        submit(
            &vq,
            0,
            &[
                Buf::R(HEADER, 16),
                Buf::W(DATA, 512),
                Buf::W(DATA + 0x1000, 1024),
                Buf::W(STATUS, 1),
            ],
        );
        block.process_queue(0);

        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 512 + 1024 + 1));
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf[..512], GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 3));
        mem.read_slice(&mut buf, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(buf[..512].iter().all(|&b| b == 4));
        assert!(buf[512..].iter().all(|&b| b == 5));
        assert_eq!(line.triggers(), 1);
        let stats = block.stats();
        assert_eq!((stats.reads, stats.bytes_read, stats.errors), (1, 1536, 0));
    }

    #[test]
    fn write_reaches_the_image() {
        let (file, d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_OUT, 10);
        mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        submit(
            &vq,
            0,
            &[Buf::R(HEADER, 16), Buf::R(DATA, 1024), Buf::W(STATUS, 1)],
        );
        block.process_queue(0);

        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 1));
        let mut image = [0u8; 3 * 512];
        d.image.read_exact_at(&mut image, 9 * 512).unwrap();
        assert!(image[..512].iter().all(|&b| b == 9), "sector before");
        assert!(image[512..1536].iter().all(|&b| b == 0xab));
        d.image.read_exact_at(&mut image[..512], 12 * 512).unwrap();
        assert!(image[..512].iter().all(|&b| b == 12), "sector after");
        let stats = block.stats();
        assert_eq!((stats.writes, stats.bytes_written), (1, 1024));
    }

    #[test]
    fn flush_succeeds() {
        let (s, len, block, _d) = run_one(
            VIRTIO_BLK_T_FLUSH,
            0,
            &[Buf::R(HEADER, 16), Buf::W(STATUS, 1)],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(block.stats().flushes, 1);
    }

    #[test]
    fn get_id_returns_the_padded_id() {
        let (file, _d) = disk(1);
        let mut block = Block::new(file, false, "serial-1".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        activate(&mut block, &mem, &vq);
        mem.write_slice(&[0xff; 32], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        submit(
            &vq,
            0,
            &[Buf::R(HEADER, 16), Buf::W(DATA, 32), Buf::W(STATUS, 1)],
        );
        block.process_queue(0);

        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 21));
        let mut id = [0u8; 32];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..8], b"serial-1");
        assert!(id[8..20].iter().all(|&b| b == 0), "NUL padding");
        assert!(id[20..].iter().all(|&b| b == 0xff), "nothing past 20 bytes");
        assert_eq!(block.stats().get_id, 1);
    }

    #[test]
    fn long_id_is_cut_to_20_bytes() {
        let (file, _d) = disk(1);
        let block = Block::new(file, false, "a".repeat(30), false).unwrap();
        assert_eq!(block.data.disk.id, [b'a'; 20]);
    }

    #[test]
    fn unsupported_type_answers_unsupp() {
        // VIRTIO_BLK_T_DISCARD (11), not offered.
        let (s, len, block, _d) = run_one(
            11,
            0,
            &[Buf::R(HEADER, 16), Buf::R(DATA, 16), Buf::W(STATUS, 1)],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_UNSUPP, 1));
        let stats = block.stats();
        assert_eq!((stats.unsupported, stats.errors), (1, 0));
    }

    #[test]
    fn out_of_range_sectors_fail_with_ioerr() {
        for (sector, len) in [
            (DISK_SECTORS, 512),
            (DISK_SECTORS - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512 + 1, 512),
        ] {
            let (s, used_len, block, _d) = run_one(
                VIRTIO_BLK_T_IN,
                sector,
                &[Buf::R(HEADER, 16), Buf::W(DATA, len), Buf::W(STATUS, 1)],
            );
            assert_eq!((s, used_len), (VIRTIO_BLK_S_IOERR, 1), "sector {sector}");
            assert_eq!(block.stats().errors, 1);
        }
        // The last sector itself is fine.
        let (s, _, _, _d) = run_one(
            VIRTIO_BLK_T_IN,
            DISK_SECTORS - 1,
            &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
        );
        assert_eq!(s, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn write_to_read_only_disk_fails_and_leaves_the_image() {
        let (file, d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, true, "ro".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        submit(
            &vq,
            0,
            &[Buf::R(HEADER, 16), Buf::R(DATA, 512), Buf::W(STATUS, 1)],
        );
        block.process_queue(0);

        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        let mut sector = [0xffu8; 512];
        d.image.read_exact_at(&mut sector, 0).unwrap();
        assert_eq!(sector, [0; 512]);
        let stats = block.stats();
        assert_eq!((stats.writes, stats.errors, stats.bytes_written), (1, 1, 0));
    }

    #[test]
    fn malformed_chains_fail_with_ioerr() {
        let cases: &[(&str, u32, &[Buf])] = &[
            (
                "truncated header",
                VIRTIO_BLK_T_IN,
                &[Buf::R(HEADER, 8), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
            ),
            (
                "header writable",
                VIRTIO_BLK_T_IN,
                &[Buf::W(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
            ),
            ("status only", VIRTIO_BLK_T_IN, &[Buf::W(STATUS, 1)]),
            (
                "read into readable buffer",
                VIRTIO_BLK_T_IN,
                &[Buf::R(HEADER, 16), Buf::R(DATA, 512), Buf::W(STATUS, 1)],
            ),
            (
                "write from writable buffer",
                VIRTIO_BLK_T_OUT,
                &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
            ),
            (
                "partial sector",
                VIRTIO_BLK_T_IN,
                &[Buf::R(HEADER, 16), Buf::W(DATA, 100), Buf::W(STATUS, 1)],
            ),
            (
                "header outside memory",
                VIRTIO_BLK_T_IN,
                &[Buf::R(OUTSIDE, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
            ),
            (
                "data outside memory",
                VIRTIO_BLK_T_IN,
                &[Buf::R(HEADER, 16), Buf::W(OUTSIDE, 512), Buf::W(STATUS, 1)],
            ),
            (
                "data across the end of memory",
                VIRTIO_BLK_T_OUT,
                &[
                    Buf::R(HEADER, 16),
                    Buf::R(MEM_SIZE as u64 - 512, 1024),
                    Buf::W(STATUS, 1),
                ],
            ),
            (
                "get_id into readable buffer",
                VIRTIO_BLK_T_GET_ID,
                &[Buf::R(HEADER, 16), Buf::R(DATA, 20), Buf::W(STATUS, 1)],
            ),
        ];
        for (what, request_type, bufs) in cases {
            let (s, len, block, d) = run_one(*request_type, 0, bufs);
            assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1), "{what}");
            assert_eq!(block.stats().errors, 1, "{what}");
            assert_eq!(block.stats().bytes_written, 0, "{what}");
            let mut sector = [0xffu8; 512];
            d.image.read_exact_at(&mut sector, 0).unwrap();
            assert_eq!(sector, [0; 512], "{what}: image untouched");
        }
    }

    #[test]
    fn too_large_request_fails_with_ioerr() {
        // Two descriptors adding up to more than MAX_REQUEST_BYTES, never touched.
        let big = (MAX_REQUEST_BYTES / 2 + 512) as u32;
        let (s, len, _, _d) = run_one(
            VIRTIO_BLK_T_IN,
            0,
            &[
                Buf::R(HEADER, 16),
                Buf::W(DATA, big),
                Buf::W(DATA, big),
                Buf::W(STATUS, 1),
            ],
        );
        assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1));
    }

    #[test]
    fn request_without_usable_status_returns_with_length_zero() {
        let cases: &[(&str, &[Buf])] = &[
            ("missing status", &[Buf::R(HEADER, 16), Buf::R(DATA, 512)]),
            (
                "read-only status",
                &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::R(STATUS, 1)],
            ),
            (
                "empty status",
                &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 0)],
            ),
            (
                "status outside memory",
                &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(OUTSIDE, 1)],
            ),
            ("header only", &[Buf::R(HEADER, 16)]),
        ];
        for (what, bufs) in cases {
            let (s, len, block, _d) = run_one(VIRTIO_BLK_T_IN, 0, bufs);
            assert_eq!(len, 0, "{what}");
            assert_eq!(s, 0xff, "{what}: status byte untouched");
            assert_eq!(block.stats().errors, 1, "{what}");
        }
        // The data of a request without a status is not transferred.
        let (_, _, block, _d) =
            run_one(VIRTIO_BLK_T_IN, 0, &[Buf::R(HEADER, 16), Buf::W(DATA, 512)]);
        assert_eq!(block.stats().bytes_read, 0);
    }

    #[test]
    fn broken_chain_is_returned_unanswered() {
        let (file, _d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // The status descriptor claims a successor outside the descriptor table.
        let descs: [RawDescriptor; 2] = [
            SplitDescriptor::new(HEADER, 16, VRING_DESC_F_NEXT, 1).into(),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 999).into(),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        block.process_queue(0);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 0));
    }

    #[test]
    fn batch_completes_every_request_and_signals_each() {
        let (file, _d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let line = activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_IN, 1);
        submit(
            &vq,
            0,
            &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
        );
        submit(
            &vq,
            3,
            &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS + 1, 1)],
        );
        submit(
            &vq,
            6,
            &[
                Buf::R(HEADER, 16),
                Buf::W(OUTSIDE, 512),
                Buf::W(STATUS + 2, 1),
            ],
        );
        block.process_queue(0);

        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(used(&vq, 0), (0, 513));
        assert_eq!(used(&vq, 1), (3, 513));
        assert_eq!(used(&vq, 2), (6, 1));
        let mut statuses = [0xffu8; 3];
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert_eq!(
            statuses,
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR]
        );
        // One interrupt per completion: a slow request never delays an earlier one's.
        assert_eq!(line.triggers(), 3);
        let stats = block.stats();
        assert_eq!((stats.reads, stats.errors, stats.bytes_read), (3, 1, 1024));

        // Nothing new: no interrupt.
        block.process_queue(0);
        assert_eq!(line.triggers(), 3);
    }

    #[test]
    fn notifications_before_activation_or_for_other_queues_are_ignored() {
        let (file, _d) = disk(1);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        block.process_queue(0);
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let line = activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        submit(&vq, 0, &[Buf::R(HEADER, 16), Buf::W(STATUS, 1)]);
        block.process_queue(1);
        block.process_queue(usize::MAX);
        assert_eq!(vq.used().idx().load(), 0);
        assert_eq!(line.triggers(), 0);
    }

    #[test]
    fn activate_checks_the_queues() {
        let (file, _d) = disk(1);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new())));
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);

        let two = vec![
            vq.create_queue::<Queue>().unwrap(),
            vq.create_queue::<Queue>().unwrap(),
        ];
        assert!(matches!(
            block.activate(device_memory(mem.clone(), None), two, interrupt.clone()),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 2
            })
        ));

        let mut not_ready = vq.create_queue::<Queue>().unwrap();
        not_ready.set_ready(false);
        assert!(matches!(
            block.activate(
                device_memory(mem.clone(), None),
                vec![not_ready],
                interrupt.clone()
            ),
            Err(ActivateError::InvalidQueue(0))
        ));

        // Rings outside guest memory.
        let outside = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let mut q = outside.create_queue::<Queue>().unwrap();
        q.try_set_used_ring_address(GuestAddress(OUTSIDE)).unwrap();
        assert!(matches!(
            block.activate(device_memory(mem.clone(), None), vec![q], interrupt),
            Err(ActivateError::InvalidQueue(0))
        ));
    }

    #[test]
    fn requests_go_through_the_iommu_endpoint() {
        // A fresh virtio-iommu is in bypass: the endpoint translates 1:1, but every access
        // still goes through its IOTLB, and each request takes its request guard.
        let iommu = crate::virtio::iommu::VirtioIommu::new().unwrap();
        let (file, _d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), true).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let line = Arc::new(CountingLine::new());
        block
            .activate(
                device_memory(mem.clone(), Some(iommu.endpoint(1))),
                vec![vq.create_queue::<Queue>().unwrap()],
                Arc::new(VirtioInterrupt::new(line.clone())),
            )
            .unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 7);
        submit(
            &vq,
            0,
            &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
        );
        submit(
            &vq,
            3,
            &[
                Buf::R(HEADER, 16),
                Buf::W(OUTSIDE, 512),
                Buf::W(STATUS + 1, 1),
            ],
        );
        block.process_queue(0);

        let mut statuses = [0xffu8; 2];
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert_eq!(statuses, [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR]);
        let first: u8 = mem.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(first, 7);
        assert!(iommu.stats().iotlb_lookups > 0);
        assert_eq!(line.triggers(), 2);
    }

    #[test]
    fn reset_deactivates() {
        let (file, _d) = disk(1);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        let line = activate(&mut block, &mem, &vq);
        block.ack_features(block.features());
        block.reset();
        assert_eq!(block.acked_features, 0);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        submit(&vq, 0, &[Buf::R(HEADER, 16), Buf::W(STATUS, 1)]);
        block.process_queue(0);
        assert_eq!(vq.used().idx().load(), 0);
        assert_eq!(line.triggers(), 0);
    }

    /// A backend whose first read blocks until released (or `hold` passes), then fills the
    /// buffer with 0x5a. Signals `started` when the read begins.
    pub(crate) struct SlowDisk {
        started: Mutex<Option<std::sync::mpsc::Sender<()>>>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        hold: std::time::Duration,
    }

    impl SlowDisk {
        /// The backend, a receiver told when the read starts, a sender that ends it.
        pub(crate) fn new(
            hold: std::time::Duration,
        ) -> (
            SlowDisk,
            std::sync::mpsc::Receiver<()>,
            std::sync::mpsc::Sender<()>,
        ) {
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let (release_tx, release_rx) = std::sync::mpsc::channel();
            (
                SlowDisk {
                    started: Mutex::new(Some(started_tx)),
                    release: Mutex::new(release_rx),
                    hold,
                },
                started_rx,
                release_tx,
            )
        }
    }

    impl DiskBackend for SlowDisk {
        fn size(&self) -> io::Result<u64> {
            Ok(1 << 20)
        }
        fn read_at(&self, _offset: u64, buf: &mut VolatileSlice<'_>) -> io::Result<()> {
            if let Some(tx) = lock(&self.started).take() {
                let _ = tx.send(());
            }
            let _ = lock(&self.release).recv_timeout(self.hold);
            buf.write_slice(&vec![0x5a; buf.len()], 0)
                .map_err(io::Error::other)
        }
        fn write_at(&self, _offset: u64, _buf: &VolatileSlice<'_>) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn w32(t: &mut crate::virtio::mmio::MmioTransport, offset: u64, value: u32) {
        crate::bus::BusDevice::write(t, offset, &value.to_le_bytes());
    }

    fn r32(t: &mut crate::virtio::mmio::MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        crate::bus::BusDevice::read(t, offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Brings `t` to DRIVER_OK with one queue on `vq`, accepting `features_hi` (the upper 32
    /// feature bits: 1 = VERSION_1, 2 = ACCESS_PLATFORM).
    pub(crate) fn driver_ok(
        t: &mut crate::virtio::mmio::MmioTransport,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        features_hi: u32,
    ) {
        use crate::virtio::mmio::*;
        w32(t, VIRTIO_MMIO_STATUS, 1);
        w32(t, VIRTIO_MMIO_STATUS, 3);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, features_hi);
        w32(t, VIRTIO_MMIO_STATUS, 0xb);
        w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(MOCK_QUEUE_SIZE));
        for (reg, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr()),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr()),
            (VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr()),
        ] {
            w32(t, reg, addr.0 as u32);
            w32(t, reg + 4, (addr.0 >> 32) as u32);
        }
        w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        w32(t, VIRTIO_MMIO_STATUS, 0xf);
    }

    #[test]
    fn segment_over_size_max_or_too_many_segments_fail_with_ioerr() {
        // A disk and memory big enough for the requests below: only the caps can fail them.
        let (file, _d) = disk(4 * u64::from(SIZE_MAX) / SECTOR_SIZE);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // One segment just over size_max, then one of exactly size_max.
        for (n, (len, expected)) in [
            (SIZE_MAX + 512, VIRTIO_BLK_S_IOERR),
            (SIZE_MAX, VIRTIO_BLK_S_OK),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            submit(
                &vq,
                3 * n as u16,
                &[Buf::R(HEADER, 16), Buf::W(DATA, len), Buf::W(STATUS, 1)],
            );
            block.process_queue(0);
            assert_eq!(status(&mem), expected, "segment of {len} bytes");
        }
        assert_eq!(block.stats().bytes_read, u64::from(SIZE_MAX));

        // seg_max + 1 data segments (an indirect-free chain this long needs a big table).
        let (file, _d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
        activate(&mut block, &mem, &vq);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![Buf::R(HEADER, 16)];
        bufs.extend((0..=SEG_MAX as u64).map(|i| Buf::W(DATA + 512 * (i % 8), 512)));
        bufs.push(Buf::W(STATUS, 1));
        submit(&vq, 0, &bufs);
        block.process_queue(0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(block.stats().bytes_read, 0);
    }

    #[test]
    fn refusing_access_platform_fails_features_ok() {
        let mem = guest_memory();
        for (features_hi, accepted) in [(1, false), (3, true)] {
            let (file, _d) = disk(1);
            let block = Block::new(file, false, "d".into(), true).unwrap();
            let mut t = crate::virtio::mmio::MmioTransport::new(
                Arc::new(Mutex::new(block)),
                device_memory(mem.clone(), None),
                Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::new()))),
            );
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
            driver_ok(&mut t, &vq, features_hi);
            let st = r32(&mut t, crate::virtio::mmio::VIRTIO_MMIO_STATUS);
            assert_eq!(
                st & crate::virtio::mmio::DEVICE_FEATURES_OK != 0,
                accepted,
                "features {features_hi:#x}: status {st:#x}"
            );
            assert_eq!(t.is_activated(), accepted);
        }
    }

    /// The old device held its mutex (and the transport's path to config space, Status and
    /// reset) for a whole queue drain; with a backend stuck for 2 s these took 2 s.
    #[test]
    fn registers_and_reset_do_not_wait_for_a_stuck_read() {
        use crate::virtio::mmio::*;
        use std::time::{Duration, Instant};
        const QUICK: Duration = Duration::from_millis(200);

        let (slow, started, release) = SlowDisk::new(Duration::from_secs(2));
        let block = Block::with_backend(Box::new(slow), false, "slow".into(), false).unwrap();
        let block = Arc::new(Mutex::new(block));
        let mem = guest_memory();
        let line = Arc::new(CountingLine::new());
        let mut t = MmioTransport::new(
            block.clone(),
            device_memory(mem.clone(), None),
            Arc::new(VirtioInterrupt::new(line.clone())),
        );
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), MOCK_QUEUE_SIZE);
        driver_ok(&mut t, &vq, 1);
        assert!(t.is_activated());
        header(&mem, VIRTIO_BLK_T_IN, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        submit(
            &vq,
            0,
            &[Buf::R(HEADER, 16), Buf::W(DATA, 512), Buf::W(STATUS, 1)],
        );
        let handler = lock(&block).queue_handler();
        let worker = std::thread::spawn(move || handler.process_queue(0));
        started
            .recv_timeout(Duration::from_secs(5))
            .expect("read started");

        let t0 = Instant::now();
        let mut capacity = [0u8; 8];
        crate::bus::BusDevice::read(&mut t, VIRTIO_MMIO_CONFIG, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2048);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), 0xf);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert!(t0.elapsed() < QUICK, "registers took {:?}", t0.elapsed());

        // Reset while the read is stuck: immediate, and the request is never completed
        // into the old ring.
        let t0 = Instant::now();
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(t0.elapsed() < QUICK, "reset took {:?}", t0.elapsed());
        assert_eq!(r32(&mut t, VIRTIO_MMIO_STATUS), 0);
        release.send(()).unwrap();
        assert_eq!(worker.join().unwrap(), QueueProgress::Idle);
        assert_eq!(vq.used().idx().load(), 0, "completion after reset dropped");
        assert_eq!(line.triggers(), 0);
    }

    #[test]
    fn work_per_call_is_bounded() {
        let (file, _d) = disk(DISK_SECTORS);
        let mut block = Block::new(file, false, "d".into(), false).unwrap();
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
        let line = activate(&mut block, &mem, &vq);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let n = REQUESTS_PER_KICK as u16 + 4;
        for i in 0..n {
            submit(&vq, 2 * i, &[Buf::R(HEADER, 16), Buf::W(STATUS, 1)]);
        }
        let handler = block.queue_handler();
        assert_eq!(handler.process_queue(0), QueueProgress::More);
        assert_eq!(block.stats().flushes, REQUESTS_PER_KICK as u64);
        assert_eq!(line.triggers(), REQUESTS_PER_KICK as u64);
        assert_eq!(handler.process_queue(0), QueueProgress::Idle);
        assert_eq!(block.stats().flushes, u64::from(n));
    }
}
