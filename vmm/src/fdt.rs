//! Device-tree mode (`--firmware dt`): the DTB built from the same platform description as the
//! ACPI tables, written as the single `SETUP_DTB` entry of the 64-bit boot protocol's
//! `setup_data` chain (the zero page's `hdr.setup_data` points at it), plus the MMIO power-off
//! register the tree's `syscon-poweroff` node drives. No ACPI table is written in this mode.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arch::boot::setup_data_entry;
use arch::layout;
use devices::poweroff::{PowerOff, POWEROFF_REG_OFFSET, POWEROFF_VALUE};
use devices::{Bus, ExitSignal};
use firmware_tables::{build_fdt, FdtError, PlatformDescription, PowerOffDesc};
use linux_loader::bootparam::SETUP_DTB;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// File name of the DTB in the `--dump-tables` directory.
pub const DTB_DUMP_NAME: &str = "vmm.dtb";

/// Errors while setting up the device tree.
#[derive(Debug, thiserror::Error)]
pub enum FdtSetupError {
    /// The description could not be turned into a DTB.
    #[error("Cannot build the device tree")]
    Build(#[source] FdtError),
    /// The DTB does not fit the setup_data area.
    #[error("Device tree setup_data entry of {len} bytes exceeds the {max}-byte area")]
    TooLarge {
        /// Entry size (header + DTB).
        len: usize,
        /// The limit.
        max: u64,
    },
    /// Writing it into guest memory failed.
    #[error("Cannot write the device tree into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// Dumping it failed.
    #[error("Cannot write device tree dump {0}")]
    Dump(PathBuf, #[source] std::io::Error),
    /// The power-off register could not be placed on the MMIO bus.
    #[error("Cannot place the power-off register on the MMIO bus")]
    Bus(#[source] devices::BusError),
}

/// The power-off register as the device tree describes it (the device model's constants at
/// the layout's window).
pub fn poweroff_desc() -> PowerOffDesc {
    PowerOffDesc {
        base: layout::POWEROFF_START,
        size: layout::POWEROFF_SIZE,
        offset: POWEROFF_REG_OFFSET as u32,
        value: POWEROFF_VALUE,
    }
}

/// Puts the power-off register on the MMIO bus; a power-off write goes to `exit`.
pub fn add_poweroff(mmio: &mut Bus, exit: &ExitSignal) -> Result<(), FdtSetupError> {
    let dev = Arc::new(Mutex::new(PowerOff::new(exit.clone())));
    mmio.insert_named(
        "poweroff",
        dev,
        layout::POWEROFF_START,
        layout::POWEROFF_SIZE,
    )
    .map_err(FdtSetupError::Bus)?;
    log::info!("Power-off register at {:#x}", layout::POWEROFF_START);
    Ok(())
}

/// Builds the DTB for `desc`, writes it as a `SETUP_DTB` entry at
/// [`layout::SETUP_DATA_START`] (and to `dump_dir`/[`DTB_DUMP_NAME`]); returns the entry's
/// address for `boot_params.hdr.setup_data`.
pub fn write(
    desc: &PlatformDescription,
    mem: &GuestMemoryMmap,
    dump_dir: Option<&PathBuf>,
) -> Result<u64, FdtSetupError> {
    let dtb = build_fdt(desc, Some(&poweroff_desc())).map_err(FdtSetupError::Build)?;
    let too_large = FdtSetupError::TooLarge {
        len: dtb.len() + arch::boot::SETUP_DATA_HEADER_LEN,
        max: layout::SETUP_DATA_MAX_SIZE,
    };
    let entry = setup_data_entry(SETUP_DTB, &dtb)
        .filter(|e| e.len() as u64 <= layout::SETUP_DATA_MAX_SIZE)
        .ok_or(too_large)?;
    // (linux-loader's FDT configurator exists only for arm64/riscv64.)
    mem.write_slice(&entry, GuestAddress(layout::SETUP_DATA_START))
        .map_err(FdtSetupError::Write)?;
    log::info!(
        "Device tree ({} bytes) in setup_data at {:#x}",
        dtb.len(),
        layout::SETUP_DATA_START
    );
    if let Some(dir) = dump_dir {
        std::fs::create_dir_all(dir).map_err(|e| FdtSetupError::Dump(dir.clone(), e))?;
        let path = dir.join(DTB_DUMP_NAME);
        std::fs::write(&path, &dtb).map_err(|e| FdtSetupError::Dump(path, e))?;
    }
    Ok(layout::SETUP_DATA_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_tables::{IoapicDesc, PmDesc, SerialDesc, VirtioMmioDesc};

    fn desc(num_cpus: u32) -> PlatformDescription {
        PlatformDescription {
            num_cpus,
            ioapic: IoapicDesc {
                id: layout::IOAPIC_ID,
                address: layout::IOAPIC_START as u32,
                gsi_base: 0,
            },
            serial: Some(SerialDesc {
                io_base: layout::SERIAL_PORT,
                irq: layout::SERIAL_IRQ,
            }),
            pm: PmDesc {
                io_base: layout::PM_PORT,
            },
            virtio_mmio: vec![VirtioMmioDesc {
                base: layout::VIRTIO_MMIO_START + layout::VIRTIO_MMIO_WINDOW,
                size: layout::VIRTIO_MMIO_WINDOW,
                irq: layout::VIRTIO_IRQ_START + 1,
                endpoint_id: Some(1),
            }],
            iommu: Some(VirtioMmioDesc {
                base: layout::VIRTIO_MMIO_START,
                size: layout::VIRTIO_MMIO_WINDOW,
                irq: layout::VIRTIO_IRQ_START,
                endpoint_id: None,
            }),
            dmar: None,
            pvir: None,
            pci: None,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn dtb_is_one_setup_dtb_entry_in_low_memory_and_is_dumped() {
        let mem = mem();
        let dir = std::env::temp_dir().join(format!("vmm-fdt-test-{}", std::process::id()));
        let addr = write(&desc(2), &mem, Some(&dir)).unwrap();
        assert_eq!(addr, layout::SETUP_DATA_START);
        let next: u64 = mem.read_obj(GuestAddress(addr)).unwrap();
        let kind: u32 = mem.read_obj(GuestAddress(addr + 8)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(addr + 12)).unwrap();
        assert_eq!((next, kind), (0, SETUP_DTB));
        let dumped = std::fs::read(dir.join(DTB_DUMP_NAME)).unwrap();
        assert_eq!(len as usize, dumped.len());
        let mut in_guest = vec![0u8; dumped.len()];
        mem.read_slice(&mut in_guest, GuestAddress(addr + 16))
            .unwrap();
        assert_eq!(in_guest, dumped);
        assert_eq!(&dumped[..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_largest_guest_still_fits_and_bad_descriptions_are_errors() {
        write(&desc(layout::MAX_CPUS), &mem(), None).unwrap();
        assert!(matches!(
            write(&desc(0), &mem(), None),
            Err(FdtSetupError::Build(_))
        ));
    }

    #[test]
    fn poweroff_register_sits_in_its_layout_window() {
        let mut bus = Bus::new();
        let exit = ExitSignal::new().unwrap();
        add_poweroff(&mut bus, &exit).unwrap();
        assert!(matches!(
            add_poweroff(&mut bus, &exit),
            Err(FdtSetupError::Bus(_))
        ));
    }
}
