//! Loading the kernel, initrd and command line, and writing the boot-protocol structures.

use std::fs::File;
use std::path::PathBuf;

use arch::boot::{self, BootError};
use arch::layout;
use arch::regs::BootProtocol;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{KernelFormat, VmConfig};

/// `xloadflags` bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// Errors while loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Opening a file failed.
    #[error("Cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel.
    #[error("Cannot load kernel {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("Kernel {0} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    Not64Bit(PathBuf),
    /// Initrd placement failed.
    #[error("Cannot place the initrd")]
    Initrd(#[source] BootError),
    /// Reading the initrd into guest memory failed.
    #[error("Cannot read initrd {path} into guest memory")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line was refused.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("Cannot write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing boot parameters failed.
    #[error("Cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing to guest memory failed.
    #[error("Cannot write boot data to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// Boot protocol the registers are set up for.
    pub protocol: BootProtocol,
    /// Entry point.
    pub entry: u64,
}

fn open(path: &PathBuf) -> Result<File, KernelError> {
    File::open(path).map_err(|source| KernelError::Open {
        path: path.clone(),
        source,
    })
}

/// Loads kernel, initrd and command line, and writes the zero page or the PVH start info.
///
/// With `setup_data` (the address of a `setup_data` chain, e.g. the device tree) the kernel is
/// always entered through the 64-bit boot protocol, an ELF too: PVH has no setup_data.
pub fn load(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    rsdp_addr: u64,
    setup_data: Option<u64>,
) -> Result<BootEntry, KernelError> {
    let mut kernel = open(&cfg.kernel)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| KernelError::Load {
        path: cfg.kernel.clone(),
        source,
    };
    let result = match cfg.kernel_format {
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel, himem).map_err(load_err)?,
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, himem).map_err(load_err)?,
    };
    let kernel_end = result.kernel_load.0 + result.kernel_end;

    let mut initrd = None;
    if let Some(path) = &cfg.initrd {
        let mut f = open(path)?;
        let size = f
            .metadata()
            .map_err(|source| KernelError::Open {
                path: path.clone(),
                source,
            })?
            .len();
        let max = result
            .setup_header
            .map(|h| u64::from(h.initrd_addr_max))
            .filter(|m| *m != 0)
            .unwrap_or(u64::MAX);
        let addr = boot::initrd_address(cfg.mem_size, size, kernel_end, max)
            .map_err(KernelError::Initrd)?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(|source| KernelError::ReadInitrd {
                path: path.clone(),
                source,
            })?;
        initrd = Some((addr, size));
    }

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(KernelError::Cmdline)?;
    cmdline
        .insert_str(&cfg.cmdline)
        .map_err(KernelError::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(KernelError::WriteCmdline)?;
    let cmdline_len = cfg.cmdline.len() + 1;

    // PVH when the ELF has the note (it skips the decompressor and starts in 32-bit mode) and
    // no setup_data is needed; otherwise the Linux 64-bit boot protocol.
    if let (PvhBootCapability::PvhEntryPresent(entry), None) = (result.pvh_boot_cap, setup_data) {
        let info = boot::pvh_info(cfg.mem_size, layout::CMDLINE_START, initrd, rsdp_addr);
        let mut params = BootParams::new(&info.start_info, GuestAddress(layout::PVH_INFO_START));
        params.set_sections(&info.memmap, GuestAddress(layout::PVH_MEMMAP_START));
        if !info.modules.is_empty() {
            params.set_modules(&info.modules, GuestAddress(layout::PVH_MODLIST_START));
        }
        PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
            .map_err(KernelError::BootParams)?;
        log::info!(
            "Booting {} through PVH at {:#x}",
            cfg.kernel.display(),
            entry.0
        );
        return Ok(BootEntry {
            protocol: BootProtocol::Pvh,
            entry: entry.0,
        });
    }

    let entry = match result.setup_header {
        Some(h) => {
            if h.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(KernelError::Not64Bit(cfg.kernel.clone()));
            }
            // The 64-bit entry of a bzImage is 0x200 past the protected-mode code start
            // (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL").
            result.kernel_load.0 + 0x200
        }
        None => result.kernel_load.0,
    };
    let zp = boot::zero_page(&boot::ZeroPageConfig {
        setup_header: result.setup_header,
        mem_size: cfg.mem_size,
        cmdline: (layout::CMDLINE_START, cmdline_len),
        initrd,
        rsdp_addr,
        setup_data: setup_data.unwrap_or(0),
    });
    let params = BootParams::new(&zp, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(KernelError::BootParams)?;
    log::info!(
        "Booting {} through the 64-bit boot protocol at {entry:#x}",
        cfg.kernel.display()
    );
    Ok(BootEntry {
        protocol: BootProtocol::Linux64,
        entry,
    })
}

/// Writes the GDT, IDT and identity page tables the boot vCPU's registers refer to.
pub fn write_boot_tables(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<(), KernelError> {
    let gdt = arch::regs::boot_gdt(protocol);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(KernelError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(KernelError::Memory)?;
    if protocol == BootProtocol::Linux64 {
        for (addr, value) in arch::regs::identity_page_tables() {
            mem.write_obj(value, GuestAddress(addr))
                .map_err(KernelError::Memory)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_tables_are_written_where_the_registers_point() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, BootProtocol::Linux64).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8))
            .unwrap();
        assert_eq!(code, arch::regs::boot_gdt(BootProtocol::Linux64)[1]);
    }
}
