//! `vfio-msix`: a minimal userspace virtio-blk driver over VFIO, to move an MSI-X vector the
//! way a passthrough user does (the kernel's own virtio queue vectors are managed: their
//! affinity cannot be changed from /proc).
//!
//! It takes the function over ([`crate::vfio::Session`]), finds the virtio-pci capabilities in
//! config space (virtio 1.2 §4.1.4), drives the device through BAR 0 with pread/pwrite on the
//! device fd, sets up every queue in the DMA-mapped buffer (addresses are IOVAs), gives queue 0
//! MSI-X vector 0 and enables that vector with `VFIO_DEVICE_SET_IRQS` (one eventfd). The
//! kernel's `vfio-msix[0](<dev>)` interrupt is not managed, so its affinity can be written.
//!
//! Then: `guest.vfio_requests` (8) 4 KiB reads of queue 0, each waited for on the eventfd;
//! mark `vfio-msix.move.start`, write `/proc/irq/N/smp_affinity_list`, mark
//! `vfio-msix.move.end` (nothing else touches a device between the two marks, so the VMM's
//! counter deltas between them are the move alone); as many reads again, whose interrupts must
//! land on the new CPU. Finally the device is reset, the vector disabled, the buffer unmapped.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use crate::checks::{join, read, Ctx};
use crate::vfio::{
    ioctl, Session, BUF_SIZE, IOVA, VFIO_DEVICE_GET_IRQ_INFO, VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_SET_IRQS,
};
use crate::{fact, marker, parse, pattern};

const CHECK: &str = "vfio-msix";

const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// `struct vfio_region_info` (without capabilities).
#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Default)]
struct IrqInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    count: u32,
}

/// `struct vfio_irq_set` with room for one eventfd.
#[repr(C)]
struct IrqSet {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: [i32; 1],
}

// Device status bits (virtio 1.2 §2.1).
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const FAILED: u8 = 0x80;
const VIRTIO_F_VERSION_1: u32 = 32;
const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
const NO_VECTOR: u16 = 0xffff;

// `struct virtio_pci_common_cfg` offsets.
const DFSELECT: u64 = 0x00;
const DF: u64 = 0x04;
const GFSELECT: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_MSIX_VECTOR: u64 = 0x1a;
const Q_ENABLE: u64 = 0x1c;
const Q_NOTIFY_OFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;

// `cfg_type` of `struct virtio_pci_cap`.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const PCI_CAP_ID_VNDR: u8 = 0x09;

// Layout of the DMA buffer (offsets; the device sees IOVA + offset).
/// Per queue: descriptors at +0, driver (avail) ring at +0x1000, device (used) ring at +0x2000.
const QUEUE_STRIDE: usize = 0x3000;
const MAX_QUEUES: usize = 8;
const HDR: usize = 0x18000;
const STATUS_BYTE: usize = 0x18100;
const DATA: usize = 0x19000;
const SECTOR_BYTES: usize = 4096;
/// Largest queue size used (fits the per-queue pages).
const QUEUE_SIZE: u16 = 8;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// A VFIO region of the device fd.
struct Region {
    offset: u64,
    size: u64,
}

/// The device fd with its BAR 0 and config-space regions.
struct Device {
    fd: File,
    bar: Region,
    cfg: Region,
    /// BAR 0 offsets of the common configuration and the notify area, and the multiplier.
    common: u64,
    notify: u64,
    notify_mult: u64,
}

fn region(fd: &File, index: u32) -> Result<Region, String> {
    let mut info = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    ioctl(
        fd,
        VFIO_DEVICE_GET_REGION_INFO,
        &mut info as *mut RegionInfo as u64,
        "VFIO_DEVICE_GET_REGION_INFO",
    )?;
    Ok(Region {
        offset: info.offset,
        size: info.size,
    })
}

fn io_at(r: &Region, off: u64, len: usize, what: &str) -> Result<u64, String> {
    match (off.checked_add(len as u64), r.offset.checked_add(off)) {
        (Some(end), Some(at)) if end <= r.size => Ok(at),
        _ => Err(format!(
            "{what} access at {off:#x}+{len} outside the region ({:#x})",
            r.size
        )),
    }
}

impl Device {
    fn cfg_read(&self, off: u64, len: usize) -> Result<u32, String> {
        let mut b = [0u8; 4];
        let buf = b.get_mut(..len).ok_or("config read wider than 4")?;
        self.fd
            .read_exact_at(buf, io_at(&self.cfg, off, len, "config")?)
            .map_err(|e| format!("config read at {off:#x}: {e}"))?;
        Ok(u32::from_le_bytes(b))
    }

    fn cfg_write(&self, off: u64, bytes: &[u8]) -> Result<(), String> {
        self.fd
            .write_all_at(bytes, io_at(&self.cfg, off, bytes.len(), "config")?)
            .map_err(|e| format!("config write at {off:#x}: {e}"))
    }

    fn bar_read(&self, off: u64, len: usize) -> Result<u32, String> {
        let mut b = [0u8; 4];
        let buf = b.get_mut(..len).ok_or("BAR read wider than 4")?;
        self.fd
            .read_exact_at(buf, io_at(&self.bar, off, len, "BAR 0")?)
            .map_err(|e| format!("BAR 0 read at {off:#x}: {e}"))?;
        Ok(u32::from_le_bytes(b))
    }

    fn bar_write(&self, off: u64, bytes: &[u8]) -> Result<(), String> {
        self.fd
            .write_all_at(bytes, io_at(&self.bar, off, bytes.len(), "BAR 0")?)
            .map_err(|e| format!("BAR 0 write at {off:#x}: {e}"))
    }

    // Common configuration registers.
    fn r8(&self, reg: u64) -> Result<u8, String> {
        Ok(self.bar_read(self.common + reg, 1)? as u8)
    }
    fn r16(&self, reg: u64) -> Result<u16, String> {
        Ok(self.bar_read(self.common + reg, 2)? as u16)
    }
    fn r32(&self, reg: u64) -> Result<u32, String> {
        self.bar_read(self.common + reg, 4)
    }
    fn w8(&self, reg: u64, v: u8) -> Result<(), String> {
        self.bar_write(self.common + reg, &[v])
    }
    fn w16(&self, reg: u64, v: u16) -> Result<(), String> {
        self.bar_write(self.common + reg, &v.to_le_bytes())
    }
    fn w32(&self, reg: u64, v: u32) -> Result<(), String> {
        self.bar_write(self.common + reg, &v.to_le_bytes())
    }
    fn w64_split(&self, reg: u64, v: u64) -> Result<(), String> {
        self.w32(reg, v as u32)?;
        self.w32(reg + 4, (v >> 32) as u32)
    }

    /// Finds the common and notify capabilities (virtio 1.2 §4.1.4) by walking config space.
    fn find_caps(&mut self) -> Result<(), String> {
        const PCI_STATUS_CAP_LIST: u32 = 1 << 4;
        if self.cfg_read(0x06, 2)? & PCI_STATUS_CAP_LIST == 0 {
            return Err("no capability list".into());
        }
        let mut ptr = self.cfg_read(0x34, 1)? & 0xfc;
        let (mut common, mut notify, mut isr) = (None, None, false);
        // At most 48 capabilities fit in 256 bytes: a loop in the list ends here too.
        for _ in 0..48 {
            if ptr < 0x40 {
                break;
            }
            let p = u64::from(ptr);
            let id = self.cfg_read(p, 1)? as u8;
            let next = self.cfg_read(p + 1, 1)? & 0xfc;
            if id == PCI_CAP_ID_VNDR {
                let cfg_type = self.cfg_read(p + 3, 1)? as u8;
                let bar = self.cfg_read(p + 4, 1)?;
                let offset = u64::from(self.cfg_read(p + 8, 4)?);
                match (cfg_type, bar) {
                    (CAP_COMMON_CFG, 0) => common = Some(offset),
                    (CAP_NOTIFY_CFG, 0) => {
                        notify = Some((offset, u64::from(self.cfg_read(p + 16, 4)?)))
                    }
                    (CAP_ISR_CFG, 0) => isr = true,
                    _ => {}
                }
            }
            ptr = next;
        }
        let common = common.ok_or("no common configuration capability in BAR 0")?;
        let (notify, mult) = notify.ok_or("no notify capability in BAR 0")?;
        fact(
            CHECK,
            "caps",
            format!("common={common:#x} notify={notify:#x} multiplier={mult} isr={isr}"),
        );
        self.common = common;
        self.notify = notify;
        self.notify_mult = mult;
        Ok(())
    }

    fn status(&self) -> Result<u8, String> {
        self.r8(STATUS)
    }

    /// Writes 0 to the status and waits (bounded) until it reads back 0.
    fn reset(&self) -> Result<(), String> {
        self.w8(STATUS, 0)?;
        let start = Instant::now();
        while self.status()? != 0 {
            if start.elapsed() > Duration::from_secs(2) {
                return Err("device status does not read 0 after reset".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn add_status(&self, bits: u8) -> Result<u8, String> {
        let s = self.status()? | bits;
        self.w8(STATUS, s)?;
        let now = self.status()?;
        if now & (NEEDS_RESET | FAILED) != 0 || now & bits != bits {
            return Err(format!("status {s:#x} written, {now:#x} read back"));
        }
        Ok(now)
    }
}

/// The DMA buffer, accessed volatilely at bounds-checked offsets.
struct Dma {
    base: *mut u8,
}

impl Dma {
    fn ptr<T>(&self, off: usize) -> Result<*mut T, String> {
        let size = std::mem::size_of::<T>();
        if !off.is_multiple_of(std::mem::align_of::<T>())
            || off.checked_add(size).is_none_or(|e| e > BUF_SIZE)
        {
            return Err(format!(
                "DMA buffer access at {off:#x}+{size} out of bounds"
            ));
        }
        // SAFETY: `off + size <= BUF_SIZE`, so the pointer stays inside the mapping.
        Ok(unsafe { self.base.add(off) }.cast())
    }

    fn write<T: Copy>(&self, off: usize, v: T) -> Result<(), String> {
        let p = self.ptr::<T>(off)?;
        // SAFETY: `p` is in bounds and aligned for T (checked by `ptr`); the buffer is ours
        // and the device only writes the parts it was handed (volatile: it is shared memory).
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    fn read<T: Copy>(&self, off: usize) -> Result<T, String> {
        let p = self.ptr::<T>(off)?;
        // SAFETY: as in `write`; any bit pattern is a valid integer.
        Ok(unsafe { p.read_volatile() })
    }

    /// A copy of `len` bytes at `off`.
    fn copy_out(&self, off: usize, len: usize) -> Result<Vec<u8>, String> {
        let end = off
            .checked_add(len)
            .ok_or("DMA buffer copy out of bounds")?;
        (off..end).map(|o| self.read::<u8>(o)).collect()
    }
}

/// Queue 0's ring state.
struct Ring {
    size: u16,
    avail_idx: u16,
    used_idx: u16,
}

fn eventfd() -> Result<OwnedFd, String> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until the eventfd is signalled (or `timeout` passes); returns its count.
fn wait_eventfd(fd: &OwnedFd, timeout: Duration) -> Result<u64, String> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(0);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as i32) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll eventfd: {e}"));
        }
        if rc == 0 {
            continue;
        }
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            return Ok(v);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(format!("read eventfd: {e}"));
        }
    }
}

fn set_msix(dev: &Device, efd: Option<&OwnedFd>) -> Result<(), String> {
    let set = IrqSet {
        argsz: std::mem::size_of::<IrqSet>() as u32,
        flags: VFIO_IRQ_SET_ACTION_TRIGGER
            | if efd.is_some() {
                VFIO_IRQ_SET_DATA_EVENTFD
            } else {
                VFIO_IRQ_SET_DATA_NONE
            },
        index: VFIO_PCI_MSIX_IRQ_INDEX,
        start: 0,
        count: u32::from(efd.is_some()),
        data: [efd.map_or(-1, |f| f.as_raw_fd())],
    };
    ioctl(
        &dev.fd,
        VFIO_DEVICE_SET_IRQS,
        &set as *const IrqSet as u64,
        "VFIO_DEVICE_SET_IRQS(MSI-X)",
    )
    .map(|_| ())
}

/// The IRQ number and /proc/interrupts description of `name`, and its per-CPU counts.
fn irq_line(name: &str) -> Result<(String, Vec<u64>, String), String> {
    let text = read("/proc/interrupts")?;
    let mut lines = text.lines();
    let ncpus = parse::interrupts_cpu_columns(lines.next().unwrap_or(""));
    lines
        .filter_map(|l| parse::parse_interrupts_line(l, ncpus))
        .find(|l| l.desc.split_whitespace().any(|w| w == name))
        .map(|l| (l.irq.to_string(), l.counts.clone(), l.desc.to_string()))
        .ok_or(format!("no {name} line in /proc/interrupts"))
}

/// Everything the check measured with the device set up.
struct Io<'a> {
    dev: &'a Device,
    dma: Dma,
    ring: Ring,
    efd: OwnedFd,
    notify_addr: u64,
    seed: u64,
    pattern_end: u64,
    matched: u64,
    next_sector: u64,
}

impl Io<'_> {
    /// One 4 KiB read of the next sectors through queue 0, waited for on the eventfd.
    fn read_one(&mut self) -> Result<(), String> {
        let d = &self.dma;
        let sector = self.next_sector;
        self.next_sector += (SECTOR_BYTES / 512) as u64;
        d.write::<u32>(HDR, 0)?; // VIRTIO_BLK_T_IN
        d.write::<u32>(HDR + 4, 0)?;
        d.write::<u64>(HDR + 8, sector)?;
        d.write::<u8>(STATUS_BYTE, 0xff)?;
        for i in (0..SECTOR_BYTES).step_by(8) {
            d.write::<u64>(DATA + i, 0)?;
        }
        let iova = |off: usize| IOVA + off as u64;
        for (i, (addr, len, flags, next)) in [
            (iova(HDR), 16u32, DESC_F_NEXT, 1u16),
            (
                iova(DATA),
                SECTOR_BYTES as u32,
                DESC_F_NEXT | DESC_F_WRITE,
                2,
            ),
            (iova(STATUS_BYTE), 1, DESC_F_WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let at = 16 * i;
            d.write::<u64>(at, addr)?;
            d.write::<u32>(at + 8, len)?;
            d.write::<u16>(at + 12, flags)?;
            d.write::<u16>(at + 14, next)?;
        }
        let (avail, used) = (0x1000, 0x2000);
        let slot = usize::from(self.ring.avail_idx % self.ring.size);
        d.write::<u16>(avail + 4 + 2 * slot, 0)?; // head: descriptor 0
        fence(Ordering::SeqCst);
        self.ring.avail_idx = self.ring.avail_idx.wrapping_add(1);
        d.write::<u16>(avail + 2, self.ring.avail_idx)?;
        fence(Ordering::SeqCst);
        self.dev.bar_write(self.notify_addr, &0u16.to_le_bytes())?;

        let signalled = wait_eventfd(&self.efd, Duration::from_secs(10))?;
        fence(Ordering::SeqCst);
        let used_idx = d.read::<u16>(used + 2)?;
        if signalled == 0 {
            return Err(format!(
                "no MSI-X interrupt within 10 s for sector {sector} (used idx {used_idx}, expected {})",
                self.ring.used_idx.wrapping_add(1)
            ));
        }
        if used_idx != self.ring.used_idx.wrapping_add(1) {
            return Err(format!(
                "interrupt, but used idx {used_idx} (expected {})",
                self.ring.used_idx.wrapping_add(1)
            ));
        }
        let elem = used + 4 + 8 * usize::from(self.ring.used_idx % self.ring.size);
        self.ring.used_idx = used_idx;
        let (id, len) = (d.read::<u32>(elem)?, d.read::<u32>(elem + 4)?);
        let status = d.read::<u8>(STATUS_BYTE)?;
        if id != 0 || status != 0 {
            return Err(format!(
                "sector {sector}: used id {id} len {len} status {status}"
            ));
        }
        let off = sector * 512;
        if off + SECTOR_BYTES as u64 <= self.pattern_end {
            let mut expected = vec![0u8; SECTOR_BYTES];
            pattern::fill(self.seed, off, &mut expected);
            if d.copy_out(DATA, SECTOR_BYTES)? == expected {
                self.matched += 1;
            }
        }
        Ok(())
    }
}

pub fn vfio_msix(ctx: &Ctx) -> Result<(), String> {
    let session = Session::open(ctx, CHECK)?;
    let fd = session.device()?;
    let mut dev = Device {
        bar: region(&fd, VFIO_PCI_BAR0_REGION_INDEX)?,
        cfg: region(&fd, VFIO_PCI_CONFIG_REGION_INDEX)?,
        fd,
        common: 0,
        notify: 0,
        notify_mult: 0,
    };
    fact(CHECK, "bar0_size", dev.bar.size);
    let mut info = IrqInfo {
        argsz: std::mem::size_of::<IrqInfo>() as u32,
        index: VFIO_PCI_MSIX_IRQ_INDEX,
        ..Default::default()
    };
    ioctl(
        &dev.fd,
        VFIO_DEVICE_GET_IRQ_INFO,
        &mut info as *mut IrqInfo as u64,
        "VFIO_DEVICE_GET_IRQ_INFO(MSI-X)",
    )?;
    fact(CHECK, "msix_vectors", info.count);
    if info.count == 0 {
        return Err("the function has no MSI-X vectors".into());
    }
    dev.find_caps()?;
    let efd = eventfd()?;
    set_msix(&dev, Some(&efd))?;
    let result = drive(ctx, &dev, &session, efd);
    // Leave the function quiet: device reset, vector off (errors only reported).
    if let Err(e) = dev.reset() {
        fact(CHECK, "cleanup_error", e);
    }
    if let Err(e) = set_msix(&dev, None) {
        fact(CHECK, "cleanup_error", e);
    }
    drop(dev);
    drop(session);
    result
}

fn drive(ctx: &Ctx, dev: &Device, session: &Session, efd: OwnedFd) -> Result<(), String> {
    // Memory space and bus mastering (vfio-pci enables memory only).
    let cmd = dev.cfg_read(0x04, 2)? as u16;
    dev.cfg_write(0x04, &(cmd | 0x6).to_le_bytes())?;

    dev.reset()?;
    dev.add_status(ACKNOWLEDGE)?;
    dev.add_status(DRIVER)?;
    dev.w32(DFSELECT, 0)?;
    let lo = dev.r32(DF)?;
    dev.w32(DFSELECT, 1)?;
    let hi = dev.r32(DF)?;
    let offered = u64::from(lo) | (u64::from(hi) << 32);
    // VERSION_1 only, plus ACCESS_PLATFORM when offered: a device behind the IOMMU refuses
    // drivers that do not accept it (its addresses are IOVAs either way).
    let wanted = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
    let features = offered & wanted;
    fact(
        CHECK,
        "features",
        format!("offered={offered:#x} accepted={features:#x}"),
    );
    if features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err("device does not offer VIRTIO_F_VERSION_1".into());
    }
    dev.w32(GFSELECT, 0)?;
    dev.w32(GF, features as u32)?;
    dev.w32(GFSELECT, 1)?;
    dev.w32(GF, (features >> 32) as u32)?;
    dev.add_status(FEATURES_OK)?;
    dev.w16(MSIX_CONFIG, NO_VECTOR)?;

    let nq = usize::from(dev.r16(NUM_QUEUES)?);
    fact(CHECK, "num_queues", nq);
    if nq == 0 || nq > MAX_QUEUES {
        return Err(format!("{nq} queues (1..={MAX_QUEUES} supported)"));
    }
    let dma = Dma {
        base: session.buf(),
    };
    let mut ring = Ring {
        size: 0,
        avail_idx: 0,
        used_idx: 0,
    };
    let mut notify_off = 0;
    // Every queue must be ready for the device to start; only queue 0 is used.
    for q in 0..nq {
        let base = q * QUEUE_STRIDE;
        for off in (base..base + QUEUE_STRIDE).step_by(8) {
            dma.write::<u64>(off, 0)?;
        }
        dev.w16(Q_SELECT, q as u16)?;
        let max = dev.r16(Q_SIZE)?;
        if max == 0 {
            return Err(format!("queue {q} not available"));
        }
        let size = max.min(QUEUE_SIZE);
        dev.w16(Q_SIZE, size)?;
        let vector = if q == 0 { 0 } else { NO_VECTOR };
        dev.w16(Q_MSIX_VECTOR, vector)?;
        if dev.r16(Q_MSIX_VECTOR)? != vector {
            return Err(format!("queue {q}: MSI-X vector {vector} refused"));
        }
        let iova = IOVA + base as u64;
        dev.w64_split(Q_DESC, iova)?;
        dev.w64_split(Q_DRIVER, iova + 0x1000)?;
        dev.w64_split(Q_DEVICE, iova + 0x2000)?;
        if q == 0 {
            ring.size = size;
            notify_off = u64::from(dev.r16(Q_NOTIFY_OFF)?);
        }
        dev.w16(Q_ENABLE, 1)?;
    }
    dev.add_status(DRIVER_OK)?;
    fact(CHECK, "queue_size", ring.size);

    let name = format!("vfio-msix[0]({})", session.dev);
    let (irq, start_counts, desc) = irq_line(&name)?;
    fact(CHECK, "irq", &irq);
    fact(CHECK, "line", parse::one_line(&desc));
    fact(CHECK, "per_cpu_start", join(&start_counts));
    let ncpus = start_counts.len();
    if ncpus < 2 {
        return Err("needs at least 2 CPUs".into());
    }

    let requests = ctx.cmdline.get_u64("guest.vfio_requests", 8)?;
    let mut io = Io {
        dev,
        dma,
        ring,
        efd,
        notify_addr: dev.notify + notify_off * dev.notify_mult,
        seed: ctx.cmdline.get_u64("guest.disk_seed", 1)?,
        pattern_end: ctx.cmdline.get_u64("guest.disk_mib", 8)? << 20,
        matched: 0,
        next_sector: 0,
    };
    for _ in 0..requests {
        io.read_one()?;
    }
    fact(CHECK, "requests_before", requests);

    let affinity = format!("/proc/irq/{irq}/smp_affinity_list");
    let effective = format!("/proc/irq/{irq}/effective_affinity_list");
    let from: usize = read(&effective)?
        .trim()
        .parse()
        .map_err(|_| format!("{effective} is not one CPU"))?;
    let target = match ctx.cmdline.get("guest.irq_cpu") {
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| format!("bad guest.irq_cpu={c}"))?,
        None => (0..ncpus).find(|&c| c != from).unwrap_or(0),
    };
    let (_, before_move, _) = irq_line(&name)?;
    fact(CHECK, "from_cpu", from);
    fact(CHECK, "target_cpu", target);
    fact(CHECK, "per_cpu_before_move", join(&before_move));

    // The move, alone between two marks.
    marker::phase_mark(ctx.marks, CHECK, "move.start");
    let moved = fs::write(&affinity, format!("{target}\n"));
    marker::phase_mark(ctx.marks, CHECK, "move.end");
    moved.map_err(|e| format!("write {affinity}: {e}"))?;

    let now = read(&effective)?;
    fact(CHECK, "effective_after", now.trim());
    let (_, after_move, _) = irq_line(&name)?;
    fact(CHECK, "per_cpu_after_move", join(&after_move));
    for _ in 0..requests {
        io.read_one()?;
    }
    fact(CHECK, "requests_after", requests);
    let (_, end, _) = irq_line(&name)?;
    fact(CHECK, "per_cpu_end", join(&end));
    fact(CHECK, "pattern_matched", io.matched);

    let count = |v: &[u64], c: usize| v.get(c).copied().unwrap_or(0);
    let on_target = count(&end, target).saturating_sub(count(&after_move, target));
    let on_old = count(&end, from).saturating_sub(count(&after_move, from));
    if now.trim() != target.to_string() {
        return Err(format!(
            "effective affinity {} after moving to CPU {target}",
            now.trim()
        ));
    }
    if on_target < requests || (from != target && on_old != 0) {
        return Err(format!(
            "after the move CPU {target} took {on_target} and CPU {from} {on_old} of {requests} interrupts"
        ));
    }
    Ok(())
}
