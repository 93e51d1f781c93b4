//! Boot-protocol data: the E820 map, the Linux zero page (64-bit boot protocol) and the PVH
//! start info, computed from the memory size and what was loaded where.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use crate::layout;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Magic value of `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `boot_params.hdr.type_of_loader` for a loader without an assigned ID.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `setup_header.header` magic ("HdrS").
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `setup_header.boot_flag` magic.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `loadflags` bit: the kernel may use the heap up to `heap_end_ptr`.
pub const CAN_USE_HEAP: u8 = 0x80;
/// Most E820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;

/// Errors from computing boot data.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BootError {
    /// The initrd does not fit below the top of low RAM.
    #[error("Initrd of {size} bytes does not fit in guest memory below {max:#x}")]
    InitrdTooBig {
        /// Initrd size in bytes.
        size: u64,
        /// Highest address the initrd may end at.
        max: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("Kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// Limit including the terminating NUL.
        max: usize,
    },
}

/// One range of the guest physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The E820 map for `mem_size` bytes of RAM laid out by [`layout::ram_ranges`]: low RAM up
/// to the EBDA, the reserved legacy/ACPI area, RAM from 1 MiB, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in layout::ram_ranges(mem_size) {
        let (start, size) = if start == 0 {
            (layout::HIMEM_START, size - layout::HIMEM_START)
        } else {
            (start, size)
        };
        map.push(E820Entry {
            addr: start,
            size,
            kind: E820_RAM,
        });
    }
    map
}

/// Highest address (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(layout::MMIO_HOLE_START)
}

/// Where to put an initrd of `size` bytes: page-aligned, as high as possible below
/// `min(top of low RAM, max_addr)` and above `kernel_end`.
pub fn initrd_address(
    mem_size: u64,
    size: u64,
    kernel_end: u64,
    max_addr: u64,
) -> Result<u64, BootError> {
    let top = low_ram_end(mem_size).min(max_addr);
    let err = BootError::InitrdTooBig { size, max: top };
    let start = top.checked_sub(size).ok_or(err.clone())? & !0xfff;
    if start < kernel_end {
        return Err(err);
    }
    Ok(start)
}

/// Checks a command line (without its NUL) against the limit and returns its length with NUL.
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<usize, BootError> {
    let len = cmdline.len() + 1;
    if len > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    Ok(len)
}

/// What the zero page needs to know.
#[derive(Debug, Clone)]
pub struct ZeroPageConfig {
    /// The bzImage setup header read by the loader, if the kernel was a bzImage.
    pub setup_header: Option<setup_header>,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Command line address and length (including NUL).
    pub cmdline: (u64, usize),
    /// Initrd address and size, if any.
    pub initrd: Option<(u64, u64)>,
    /// Physical address of the ACPI RSDP (0: none).
    pub rsdp_addr: u64,
    /// Physical address of the first `setup_data` entry (0: none), for `hdr.setup_data`.
    pub setup_data: u64,
}

/// Builds the zero page for the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst).
pub fn zero_page(cfg: &ZeroPageConfig) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = cfg.cmdline.0 as u32;
    params.hdr.cmdline_size = cfg.cmdline.1 as u32;
    if let Some((addr, size)) = cfg.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = cfg.rsdp_addr;
    params.hdr.setup_data = cfg.setup_data;
    let map = e820_map(cfg.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES) as u8;
    params
}

/// Size of `struct setup_data`'s header: `u64 next; u32 type; u32 len;`.
pub const SETUP_DATA_HEADER_LEN: usize = 16;

/// One `setup_data` entry (arch/x86/include/uapi/asm/setup_data.h), the last of its chain
/// (`next` = 0): the header, then `payload`. `kind` is e.g.
/// [`linux_loader::bootparam::SETUP_DTB`]. `None` if `payload` is longer than a `u32` length.
pub fn setup_data_entry(kind: u32, payload: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(payload.len()).ok()?;
    let mut entry = Vec::with_capacity(SETUP_DATA_HEADER_LEN + payload.len());
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&kind.to_le_bytes());
    entry.extend_from_slice(&len.to_le_bytes());
    entry.extend_from_slice(payload);
    Some(entry)
}

/// The PVH start info plus its memory map and module list
/// (xen/include/public/arch-x86/hvm/start_info.h).
#[derive(Debug, Clone)]
pub struct PvhInfo {
    /// The `hvm_start_info` to write at [`layout::PVH_INFO_START`].
    pub start_info: hvm_start_info,
    /// Memory map to write at [`layout::PVH_MEMMAP_START`].
    pub memmap: Vec<hvm_memmap_table_entry>,
    /// Modules (the initrd) to write at [`layout::PVH_MODLIST_START`].
    pub modules: Vec<hvm_modlist_entry>,
}

/// Builds the PVH boot information.
pub fn pvh_info(
    mem_size: u64,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> PvhInfo {
    let memmap: Vec<_> = e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST_START
        },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    PvhInfo {
        start_info,
        memmap,
        modules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_area() {
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: layout::EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(
            map[1].addr <= layout::ACPI_START
                && map[1].addr + map[1].size >= layout::ACPI_START + layout::ACPI_SIZE
        );
        assert_eq!(
            map[2],
            E820Entry {
                addr: layout::HIMEM_START,
                size: (512 << 20) - layout::HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_has_ram_above_4g_for_large_guests() {
        let map = e820_map(6 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram + layout::HIMEM_START - layout::EBDA_START, 6 << 30);
        assert_eq!(map.last().unwrap().addr, layout::MMIO_HOLE_END);
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= layout::MMIO_HOLE_START
                    || e.addr >= layout::MMIO_HOLE_END)
        );
    }

    #[test]
    fn zero_page_fields_are_filled() {
        let zp = zero_page(&ZeroPageConfig {
            setup_header: None,
            mem_size: 256 << 20,
            cmdline: (layout::CMDLINE_START, 12),
            initrd: Some((0x0f00_0000, 0x1234)),
            rsdp_addr: layout::ACPI_START,
            setup_data: layout::SETUP_DATA_START,
        });
        let hdr = zp.hdr;
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ zp.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!({ hdr.setup_data }, layout::SETUP_DATA_START);
        assert_eq!(zp.e820_entries, 3);
        let e = zp.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (
                layout::HIMEM_START,
                (256 << 20) - layout::HIMEM_START,
                E820_RAM
            )
        );
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let a = initrd_address(512 << 20, 0x1801, 0x200_0000, u64::MAX).unwrap();
        assert_eq!(a, ((512 << 20) - 0x1801) & !0xfff);
        // Never above the MMIO hole, whatever the memory size.
        let a = initrd_address(8 << 30, 0x1000, 0x200_0000, u64::MAX).unwrap();
        assert_eq!(a, layout::MMIO_HOLE_START - 0x1000);
        // Respects the kernel's initrd_addr_max.
        let a = initrd_address(8 << 30, 0x1000, 0x200_0000, 0x7fff_ffff).unwrap();
        assert_eq!(a, 0x7fff_e000);
    }

    #[test]
    fn initrd_that_overlaps_the_kernel_is_refused() {
        let e = initrd_address(64 << 20, 63 << 20, 0x200_0000, u64::MAX).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }));
        assert!(initrd_address(64 << 20, u64::MAX, 0, u64::MAX).is_err());
    }

    #[test]
    fn setup_data_entry_is_header_then_payload() {
        let e = setup_data_entry(linux_loader::bootparam::SETUP_DTB, &[0xd0, 0x0d, 0xfe]).unwrap();
        assert_eq!(e.len(), SETUP_DATA_HEADER_LEN + 3);
        assert_eq!(&e[..8], &[0; 8], "next = 0: last entry");
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 3);
        assert_eq!(&e[16..], &[0xd0, 0x0d, 0xfe]);
    }

    #[test]
    fn long_cmdline_is_refused() {
        assert_eq!(check_cmdline("console=ttyS0", 2048), Ok(14));
        assert!(check_cmdline(&"x".repeat(2048), 2048).is_err());
    }

    #[test]
    fn pvh_info_describes_memory_cmdline_initrd_and_rsdp() {
        let info = pvh_info(
            512 << 20,
            layout::CMDLINE_START,
            Some((0x1000_0000, 0x2000)),
            layout::ACPI_START,
        );
        let si = info.start_info;
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.modlist_paddr, layout::PVH_MODLIST_START);
        assert_eq!(si.memmap_entries, 3);
        assert_eq!(si.rsdp_paddr, layout::ACPI_START);
        assert_eq!(info.modules[0].paddr, 0x1000_0000);
        let none = pvh_info(512 << 20, layout::CMDLINE_START, None, 0);
        assert_eq!(none.start_info.nr_modules, 0);
        assert_eq!(none.start_info.modlist_paddr, 0);
    }
}
