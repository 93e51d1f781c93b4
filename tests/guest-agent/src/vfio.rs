//! `vfio`: hands a PCI function to `vfio-pci` and drives the VFIO type-1 IOMMU API with raw
//! ioctls, as a userspace driver (QEMU, DPDK) would: container, group, `VFIO_SET_IOMMU`
//! (TYPE1v2), `VFIO_IOMMU_MAP_DMA` / `UNMAP_DMA` of a buffer, and the device fd.
//!
//! `VFIO_SET_IOMMU` succeeds without `allow_unsafe_interrupts` only if the group's MSIs are
//! isolated (interrupt remapping: the Intel IR irq domain is `IRQ_DOMAIN_FLAG_ISOLATED_MSI`).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};

use crate::checks::Ctx;
use crate::fact;

const VFIO_TYPE: u64 = b';' as u64;
const fn vfio_io(nr: u64) -> u64 {
    (VFIO_TYPE << 8) | nr
}
const VFIO_GET_API_VERSION: u64 = vfio_io(100);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(101);
const VFIO_SET_IOMMU: u64 = vfio_io(102);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(103);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(104);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(106);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(113);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(114);
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(108);
pub const VFIO_DEVICE_GET_IRQ_INFO: u64 = vfio_io(109);
pub const VFIO_DEVICE_SET_IRQS: u64 = vfio_io(110);
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;
/// The buffer mapped for the device, and where.
pub const BUF_SIZE: usize = 1 << 20;
pub const IOVA: u64 = 0x10_0000;

#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

/// `ioctl(fd, req, arg)`; the error names the request.
pub fn ioctl(fd: &File, req: u64, arg: u64, what: &str) -> Result<i32, String> {
    // SAFETY: every request used here takes either an integer or a pointer to a live,
    // correctly sized `repr(C)` structure, passed as `arg` by the caller.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(rc)
}

fn write_sys(path: &str, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("write {value} to {path}: {e}"))
}

/// A VFIO container with one group attached, TYPE1v2 set, and [`BUF_SIZE`] bytes of anonymous
/// memory mapped for the device at [`IOVA`]. Dropping it unmaps and frees the buffer.
pub struct Session {
    pub container: File,
    pub group: File,
    /// The PCI function, e.g. `0000:00:01.0`.
    pub dev: String,
    buf: *mut libc::c_void,
    mapped: bool,
}

impl Session {
    /// Binds `guest.vfio_dev` (default `0000:00:01.0`) to vfio-pci and sets up the container;
    /// facts go under `check`.
    pub fn open(ctx: &Ctx, check: &str) -> Result<Session, String> {
        let dev = ctx
            .cmdline
            .get("guest.vfio_dev")
            .unwrap_or("0000:00:01.0")
            .to_string();
        let sys = format!("/sys/bus/pci/devices/{dev}");
        let unsafe_irqs =
            fs::read_to_string("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|e| format!("? ({e})"));
        fact(check, "allow_unsafe_interrupts", &unsafe_irqs);
        if unsafe_irqs != "N" {
            return Err(format!(
                "allow_unsafe_interrupts is {unsafe_irqs}, must be N"
            ));
        }
        let bound = fs::canonicalize(format!("{sys}/driver")).ok();
        if !bound.as_ref().is_some_and(|d| d.ends_with("vfio-pci")) {
            if let Some(driver) = bound {
                fact(check, "old_driver", driver.display());
                write_sys(&format!("{sys}/driver/unbind"), &dev)?;
            }
            write_sys(&format!("{sys}/driver_override"), "vfio-pci")?;
            write_sys("/sys/bus/pci/drivers_probe", &dev)?;
        }
        let driver = fs::canonicalize(format!("{sys}/driver"))
            .map_err(|e| format!("{dev} bound to no driver after drivers_probe: {e}"))?;
        fact(check, "driver", driver.display());
        if !driver.ends_with("vfio-pci") {
            return Err(format!("{dev} bound to {}", driver.display()));
        }
        let group = fs::read_link(format!("{sys}/iommu_group"))
            .map_err(|e| format!("{dev} has no IOMMU group: {e}"))?;
        let group = group
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or("bad iommu_group link")?;
        fact(check, "group", &group);

        let rw = |p: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| format!("open {p}: {e}"))
        };
        let container = rw("/dev/vfio/vfio")?;
        let api = ioctl(&container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
        fact(check, "api_version", api);
        let ext = ioctl(
            &container,
            VFIO_CHECK_EXTENSION,
            VFIO_TYPE1V2_IOMMU,
            "VFIO_CHECK_EXTENSION",
        )?;
        fact(check, "type1v2", ext);
        let group_fd = rw(&format!("/dev/vfio/{group}"))?;
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        ioctl(
            &group_fd,
            VFIO_GROUP_GET_STATUS,
            &mut status as *mut GroupStatus as u64,
            "VFIO_GROUP_GET_STATUS",
        )?;
        fact(check, "group_flags", status.flags);
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err("group not viable".to_string());
        }
        let cfd: i32 = container.as_raw_fd();
        ioctl(
            &group_fd,
            VFIO_GROUP_SET_CONTAINER,
            &cfd as *const i32 as u64,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl(
            &container,
            VFIO_SET_IOMMU,
            VFIO_TYPE1V2_IOMMU,
            "VFIO_SET_IOMMU(TYPE1v2)",
        )?;
        fact(check, "set_iommu", "ok");

        // SAFETY: an anonymous private mapping; checked for MAP_FAILED, unmapped on drop.
        let buf = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BUF_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if buf == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let mut session = Session {
            container,
            group: group_fd,
            dev,
            buf,
            mapped: false,
        };
        let map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: buf as u64,
            iova: IOVA,
            size: BUF_SIZE as u64,
        };
        ioctl(
            &session.container,
            VFIO_IOMMU_MAP_DMA,
            &map as *const DmaMap as u64,
            "VFIO_IOMMU_MAP_DMA",
        )?;
        session.mapped = true;
        fact(check, "map_dma", format!("iova={IOVA:#x} size={BUF_SIZE}"));
        Ok(session)
    }

    /// The device fd of the function (`VFIO_GROUP_GET_DEVICE_FD`).
    pub fn device(&self) -> Result<File, String> {
        let name = CString::new(self.dev.clone()).map_err(|e| e.to_string())?;
        let fd = ioctl(
            &self.group,
            VFIO_GROUP_GET_DEVICE_FD,
            name.as_ptr() as u64,
            "VFIO_GROUP_GET_DEVICE_FD",
        )?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The mapped buffer (host virtual address), [`BUF_SIZE`] bytes at IOVA [`IOVA`].
    pub fn buf(&self) -> *mut u8 {
        self.buf.cast()
    }

    /// `VFIO_IOMMU_UNMAP_DMA` of the buffer (also done on drop).
    pub fn unmap(&mut self) -> Result<(), String> {
        if !self.mapped {
            return Ok(());
        }
        self.mapped = false;
        let unmap = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova: IOVA,
            size: BUF_SIZE as u64,
        };
        ioctl(
            &self.container,
            VFIO_IOMMU_UNMAP_DMA,
            &unmap as *const DmaUnmap as u64,
            "VFIO_IOMMU_UNMAP_DMA",
        )?;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.unmap();
        // SAFETY: `buf` is the mapping created in `open`, of BUF_SIZE bytes; nothing uses it
        // after the session (the device fd is closed and the DMA mapping is gone).
        unsafe { libc::munmap(self.buf, BUF_SIZE) };
    }
}

pub fn vfio(ctx: &Ctx) -> Result<(), String> {
    let mut session = Session::open(ctx, "vfio")?;
    drop(session.device()?);
    fact("vfio", "device_fd", "ok");
    session.unmap()?;
    fact("vfio", "unmap_dma", "ok");
    Ok(())
}
