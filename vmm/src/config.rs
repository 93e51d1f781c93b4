//! Command line → [`VmConfig`]. Parsing (clap) is separate from validation, and every
//! validation failure is one sentence naming the bad value.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arch::boot::BootError;
use arch::layout;
use clap::{Parser, ValueEnum};

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// One item of `--iommu` (a comma-separated list, e.g. `dma,pvremap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IommuMode {
    /// DMA translation (virtio-iommu) and interrupt remapping through the emulated VT-d unit.
    On,
    /// DMA translation through the virtio-iommu.
    Dma,
    /// Interrupt remapping through the emulated VT-d unit (ACPI DMAR).
    Intremap,
    /// Paravirtual interrupt remapping (PV-IR, ACPI PVIR; docs/pv-irq-remap.md).
    Pvremap,
    /// Nothing.
    Off,
}

/// What `--iommu` selects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IommuSelection {
    /// DMA translation through the virtio-iommu.
    pub dma: bool,
    /// Interrupt remapping through the emulated VT-d unit.
    pub intremap: bool,
    /// Paravirtual interrupt remapping.
    pub pvremap: bool,
}

/// Parses the value of `--iommu`: `on`, `off`, or a comma-separated list of `dma`,
/// `intremap`, `pvremap` (`on` = `dma,intremap`). The two interrupt remappers exclude each
/// other.
pub fn parse_iommu(value: &str) -> Result<IommuSelection, ConfigError> {
    let mut sel = IommuSelection::default();
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    for item in &items {
        let mode = IommuMode::from_str(item, false)
            .map_err(|_| ConfigError::IommuMode(value.to_owned()))?;
        match mode {
            IommuMode::Off if items.len() == 1 => {}
            IommuMode::Off => return Err(ConfigError::IommuMode(value.to_owned())),
            IommuMode::On => {
                sel.dma = true;
                sel.intremap = true;
            }
            IommuMode::Dma => sel.dma = true,
            IommuMode::Intremap => sel.intremap = true,
            IommuMode::Pvremap => sel.pvremap = true,
        }
    }
    if sel.intremap && sel.pvremap {
        return Err(ConfigError::TwoRemappers(value.to_owned()));
    }
    Ok(sel)
}

/// How the platform is described to the guest (`--firmware`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Firmware {
    /// ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, VIOT, DMAR or PVIR).
    Acpi,
    /// A device tree in a `SETUP_DTB` setup_data entry, no ACPI (the guest needs `acpi=off`).
    Dt,
}

/// What `--seccomp` does with each thread's system-call filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// A call outside the thread's allowlist kills the VMM with SIGSYS.
    On,
    /// No filters (debugging).
    Off,
    /// Calls outside the allowlist are allowed and logged by the kernel (audit, `dmesg`).
    Log,
}

/// Command-line interface of `vmm`.
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "Minimal KVM VMM with a paravirtual IOMMU seen early in boot"
)]
pub struct Cli {
    /// Guest kernel: a bzImage or an ELF vmlinux (booted through its PVH note when present).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk loaded at the top of low memory.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u64,
    /// Write every ACPI table as DIR/NAME.dat (with `--firmware dt`: the DTB as DIR/vmm.dtb).
    #[arg(long, value_name = "DIR")]
    pub dump_tables: Option<PathBuf>,
    /// Describe the platform with ACPI tables or with a device tree (`dt`: 64-bit boot
    /// protocol with a SETUP_DTB entry, no ACPI; no interrupt remapping).
    #[arg(long, value_name = "acpi|dt", value_enum, default_value = "acpi")]
    pub firmware: Firmware,
    /// Put devices behind the IOMMU: `on` (DMA translation and VT-d interrupt remapping),
    /// `off`, or a comma-separated list of `dma` (virtio-iommu), `intremap` (emulated VT-d
    /// interrupt remapping) and `pvremap` (paravirtual interrupt remapping, PV-IR), e.g.
    /// `dma,pvremap`. `intremap` and `pvremap` exclude each other.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    pub iommu: Option<String>,
    /// A raw disk image as a virtio-blk device (repeatable):
    /// `PATH[,readonly=on][,iommu=on|off][,transport=mmio|pci][,queues=N]`. Behind the
    /// virtio-iommu by default when `--iommu` enables DMA translation; `queues` (1..=16) needs
    /// `transport=pci`.
    #[arg(
        long,
        value_name = "PATH[,readonly=on][,iommu=on|off][,transport=mmio|pci][,queues=N]"
    )]
    pub disk: Vec<String>,
    /// Add an isa-debug-exit-compatible port at 0xf4: a guest write of V ends the VMM with
    /// exit status (V << 1) | 1, as QEMU's `-device isa-debug-exit`.
    #[arg(long)]
    pub debug_exit: bool,
    /// Stop the guest after SECS seconds (counted from VMM start) with exit status 124.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print device and interrupt counters at exit.
    #[arg(long)]
    pub stats: bool,
    /// Write the counters as JSON to PATH at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// System-call filters per VMM thread (seccomp): `on` kills the VMM with SIGSYS on a call
    /// outside a thread's allowlist, `log` only logs it (kernel audit log), `off` installs none.
    #[arg(long, value_name = "on|off|log", value_enum, default_value = "on")]
    pub seccomp: SeccompMode,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage (setup header with `HdrS` at 0x202).
    BzImage,
    /// An ELF64 vmlinux.
    Elf,
}

/// A disk image opened (with the access the guest gets) while the configuration was
/// checked. The device uses this very file, never the path again: no second open, no window
/// in which the path could point somewhere else. Clones share the file.
#[derive(Debug, Clone)]
pub struct DiskImage(Arc<File>);

impl DiskImage {
    /// Wraps an opened image.
    pub fn new(file: File) -> Self {
        DiskImage(Arc::new(file))
    }

    /// A handle on the same open file (a `dup`), for the device.
    pub fn file(&self) -> std::io::Result<File> {
        self.0.try_clone()
    }
}

/// The same open file.
impl PartialEq for DiskImage {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for DiskImage {}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image path (for messages).
    pub path: PathBuf,
    /// The image, opened read-write unless `read_only`.
    pub image: DiskImage,
    /// Read-only for the guest.
    pub read_only: bool,
    /// Behind the virtio-iommu.
    pub iommu: bool,
    /// virtio-pci (with MSI-X) instead of virtio-mmio.
    pub pci: bool,
    /// Request queues (1 on virtio-mmio).
    pub queues: u16,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel path.
    pub kernel: PathBuf,
    /// Its format.
    pub kernel_format: KernelFormat,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u32,
    /// Memory in bytes.
    pub mem_size: u64,
    /// Where to dump ACPI tables (or the DTB).
    pub dump_tables: Option<PathBuf>,
    /// ACPI tables or a device tree.
    pub firmware: Firmware,
    /// DMA translation through the virtio-iommu.
    pub iommu_dma: bool,
    /// Interrupt remapping through the emulated VT-d unit.
    pub iommu_intremap: bool,
    /// Paravirtual interrupt remapping (PV-IR).
    pub iommu_pvremap: bool,
    /// virtio-blk disks, in order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
    /// The isa-debug-exit-compatible port.
    pub debug_exit: bool,
    /// Stop the guest after this long.
    pub timeout: Option<std::time::Duration>,
    /// Print counters at exit.
    pub stats: bool,
    /// Write counters as JSON.
    pub stats_json: Option<PathBuf>,
    /// System-call filters per thread.
    pub seccomp: SeccompMode,
}

/// Invalid user input.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The kernel can't be opened.
    #[error("Cannot read kernel {path}")]
    KernelUnreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an ELF.
    #[error("Kernel {0} is not a bzImage or an ELF vmlinux")]
    KernelFormat(PathBuf),
    /// The initrd can't be opened.
    #[error("Cannot read initrd {path}")]
    InitrdUnreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Bad vCPU count.
    #[error("--cpus must be between 1 and {max}, got {got}")]
    Cpus {
        /// What was asked.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// Bad memory size.
    #[error("--memory must be between {min} and {max} MiB, got {got}")]
    Memory {
        /// What was asked.
        got: u64,
        /// Lower limit.
        min: u64,
        /// Upper limit.
        max: u64,
    },
    /// A `--disk` value is malformed.
    #[error("Invalid --disk {value:?}: {reason}")]
    Disk {
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A disk image can't be opened.
    #[error("Cannot open disk image {path}")]
    DiskUnreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Too many disks for the virtio-mmio IRQ pins.
    #[error("At most {max} --disk devices are supported, got {got}")]
    TooManyDisks {
        /// What was asked.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// Interrupt remapping asked for with a device tree, which cannot describe it.
    #[error("--firmware dt cannot describe interrupt remapping (it needs ACPI DMAR or PVIR): use --iommu=dma or --firmware acpi")]
    DtRemapping,
    /// An `--iommu` value that is not `on`, `off` or a list of `dma`, `intremap`, `pvremap`.
    #[error("--iommu={0}: expected on, off, or a comma-separated list of dma, intremap, pvremap")]
    IommuMode(String),
    /// Both interrupt remappers asked for.
    #[error("--iommu={0}: pvremap (PV-IR) and intremap (VT-d, also part of `on`) exclude each other: choose one interrupt remapper")]
    TwoRemappers(String),
    /// `--firmware dt` with a PCI disk: the device tree has no PCI host bridge.
    #[error("--firmware dt does not describe PCI: use transport=mmio for --disk")]
    DtPci,
    /// `--timeout 0`.
    #[error("--timeout must be at least 1 second")]
    Timeout,
    /// Command line too long.
    #[error("--cmdline is {len} bytes; the limit is {max}")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Parses `PATH[,readonly=on|off][,iommu=on|off]`. With `iommu_dma` (the virtio-iommu is
/// there) the disk sits behind it unless `iommu=off`; without it `iommu=on` is an error.
pub fn parse_disk(value: &str, iommu_dma: bool) -> Result<DiskConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::Disk {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let mut parts = value.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("missing path"))?;
    let path = PathBuf::from(path);
    let mut read_only = false;
    let mut iommu = iommu_dma;
    let mut pci = false;
    let mut queues = 1u16;
    for opt in parts {
        let (key, val) = opt
            .split_once('=')
            .ok_or_else(|| bad("options are key=value"))?;
        match key {
            "transport" => {
                pci = match val {
                    "pci" => true,
                    "mmio" => false,
                    _ => return Err(bad("transport is mmio or pci")),
                };
                continue;
            }
            "queues" => {
                queues = val
                    .parse()
                    .ok()
                    .filter(|q| (1..=devices::virtio::block::MAX_QUEUES).contains(q))
                    .ok_or_else(|| bad("queues is 1..=16"))?;
                continue;
            }
            _ => {}
        }
        let on = match val {
            "on" | "true" | "1" => true,
            "off" | "false" | "0" => false,
            _ => return Err(bad("values are on or off")),
        };
        match key {
            "readonly" => read_only = on,
            "iommu" => iommu = on,
            _ => return Err(bad(&format!("unknown option {key}"))),
        }
    }
    if queues > 1 && !pci {
        return Err(bad("queues=N needs transport=pci"));
    }
    if iommu && !iommu_dma {
        return Err(bad("iommu=on needs --iommu (or --iommu=dma)"));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(&path)
        .map_err(|source| ConfigError::DiskUnreadable {
            path: path.clone(),
            source,
        })?;
    Ok(DiskConfig {
        path,
        image: DiskImage::new(file),
        read_only,
        iommu,
        pci,
        queues,
    })
}

fn sniff_kernel(path: &Path) -> Result<KernelFormat, ConfigError> {
    let unreadable = |source| ConfigError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(unreadable)?;
    if f.metadata().map_err(unreadable)?.is_dir() {
        return Err(unreadable(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let mut head = vec![0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(unreadable)? {
            0 => break,
            r => n += r,
        }
    }
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelFormat(path.to_owned()))
}

impl VmConfig {
    /// Validates the command line.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let kernel_format = sniff_kernel(&cli.kernel)?;
        if let Some(p) = &cli.initrd {
            File::open(p).map_err(|source| ConfigError::InitrdUnreadable {
                path: p.clone(),
                source,
            })?;
        }
        if cli.cpus == 0 || cli.cpus > layout::MAX_CPUS {
            return Err(ConfigError::Cpus {
                got: cli.cpus,
                max: layout::MAX_CPUS,
            });
        }
        let (min, max) = (layout::MIN_MEMORY >> 20, layout::MAX_MEMORY >> 20);
        if cli.memory < min || cli.memory > max {
            return Err(ConfigError::Memory {
                got: cli.memory,
                min,
                max,
            });
        }
        if let Err(BootError::CmdlineTooLong { len, max }) =
            arch::boot::check_cmdline(&cli.cmdline, layout::CMDLINE_MAX_SIZE)
        {
            return Err(ConfigError::Cmdline { len, max });
        }
        if cli.timeout == Some(0) {
            return Err(ConfigError::Timeout);
        }
        let iommu = match &cli.iommu {
            Some(v) => parse_iommu(v)?,
            None => IommuSelection::default(),
        };
        let (iommu_dma, iommu_intremap, iommu_pvremap) = (iommu.dma, iommu.intremap, iommu.pvremap);
        if cli.firmware == Firmware::Dt && (iommu_intremap || iommu_pvremap) {
            return Err(ConfigError::DtRemapping);
        }
        let max_disks = (layout::IOAPIC_PINS - layout::VIRTIO_IRQ_START - 1) as usize;
        if cli.disk.len() > max_disks {
            return Err(ConfigError::TooManyDisks {
                got: cli.disk.len(),
                max: max_disks,
            });
        }
        let disks = cli
            .disk
            .iter()
            .map(|d| parse_disk(d, iommu_dma))
            .collect::<Result<Vec<_>, _>>()?;
        if cli.firmware == Firmware::Dt && disks.iter().any(|d| d.pci) {
            return Err(ConfigError::DtPci);
        }
        Ok(VmConfig {
            kernel: cli.kernel,
            kernel_format,
            initrd: cli.initrd,
            cmdline: cli.cmdline,
            cpus: cli.cpus,
            mem_size: cli.memory << 20,
            dump_tables: cli.dump_tables,
            firmware: cli.firmware,
            iommu_dma,
            disks,
            iommu_intremap,
            iommu_pvremap,
            debug_exit: cli.debug_exit,
            timeout: cli.timeout.map(std::time::Duration::from_secs),
            stats: cli.stats,
            stats_json: cli.stats_json,
            seccomp: cli.seccomp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn bzimage() -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b
    }

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        VmConfig::from_cli(Cli::try_parse_from(args).unwrap())
    }

    #[test]
    fn defaults_are_one_cpu_512_mib_and_serial_console() {
        let k = temp_file("bz", &bzimage());
        let c = parse(&["vmm", "--kernel", k.to_str().unwrap()]).unwrap();
        assert_eq!(
            (c.cpus, c.mem_size, c.cmdline.as_str()),
            (1, 512 << 20, "console=ttyS0")
        );
        assert_eq!(c.kernel_format, KernelFormat::BzImage);
        assert!(!c.iommu_dma && !c.iommu_intremap);
    }

    #[test]
    fn elf_kernel_is_recognised() {
        let k = temp_file("elf", b"\x7fELF\x02\x01\x01rest");
        assert_eq!(
            parse(&["vmm", "--kernel", k.to_str().unwrap()])
                .unwrap()
                .kernel_format,
            KernelFormat::Elf
        );
    }

    #[test]
    fn iommu_flag_selects_both_or_one() {
        let k = temp_file("bz2", &bzimage());
        let k = k.to_str().unwrap();
        let c = parse(&["vmm", "--kernel", k, "--iommu"]).unwrap();
        assert!(c.iommu_dma && c.iommu_intremap);
        let c = parse(&["vmm", "--kernel", k, "--iommu=dma"]).unwrap();
        assert!(c.iommu_dma && !c.iommu_intremap);
        let c = parse(&["vmm", "--kernel", k, "--iommu=intremap"]).unwrap();
        assert!(!c.iommu_dma && c.iommu_intremap && !c.iommu_pvremap);
        let c = parse(&["vmm", "--kernel", k, "--iommu=off"]).unwrap();
        assert!(!c.iommu_dma && !c.iommu_intremap && !c.iommu_pvremap);
        let c = parse(&["vmm", "--kernel", k]).unwrap();
        assert!(!c.iommu_pvremap);
    }

    #[test]
    fn pvremap_alone_or_with_dma_but_never_with_vtd() {
        let k = temp_file("bz7", &bzimage());
        let k = k.to_str().unwrap();
        let c = parse(&["vmm", "--kernel", k, "--iommu=pvremap"]).unwrap();
        assert!(!c.iommu_dma && !c.iommu_intremap && c.iommu_pvremap);
        for v in ["dma,pvremap", "pvremap,dma"] {
            let c = parse(&["vmm", "--kernel", k, &format!("--iommu={v}")]).unwrap();
            assert!(c.iommu_dma && !c.iommu_intremap && c.iommu_pvremap, "{v}");
        }
        let c = parse(&["vmm", "--kernel", k, "--iommu", "dma,intremap"]).unwrap();
        assert!(c.iommu_dma && c.iommu_intremap && !c.iommu_pvremap);
        for v in [
            "pvremap,intremap",
            "intremap,pvremap",
            "on,pvremap",
            "dma,pvremap,intremap",
        ] {
            let e = parse(&["vmm", "--kernel", k, &format!("--iommu={v}")]).unwrap_err();
            assert!(
                matches!(e, ConfigError::TwoRemappers(ref s) if s == v),
                "{v}: {e:?}"
            );
            let msg = e.to_string();
            assert!(
                !msg.contains('\n') && msg.contains("exclude each other"),
                "{msg}"
            );
        }
        for v in ["pv", "dma,,pvremap", "off,dma", "", "PVREMAP"] {
            assert!(
                matches!(
                    parse(&["vmm", "--kernel", k, &format!("--iommu={v}")]),
                    Err(ConfigError::IommuMode(_))
                ),
                "{v}"
            );
        }
    }

    #[test]
    fn firmware_defaults_to_acpi_and_dt_refuses_interrupt_remapping() {
        let k = temp_file("bz4", &bzimage());
        let k = k.to_str().unwrap();
        assert_eq!(
            parse(&["vmm", "--kernel", k]).unwrap().firmware,
            Firmware::Acpi
        );
        let c = parse(&["vmm", "--kernel", k, "--firmware", "dt", "--iommu=dma"]).unwrap();
        assert_eq!(c.firmware, Firmware::Dt);
        assert!(c.iommu_dma && !c.iommu_intremap);
        for iommu in [
            "--iommu",
            "--iommu=on",
            "--iommu=intremap",
            "--iommu=pvremap",
            "--iommu=dma,pvremap",
        ] {
            assert!(
                matches!(
                    parse(&["vmm", "--kernel", k, "--firmware=dt", iommu]),
                    Err(ConfigError::DtRemapping)
                ),
                "{iommu}"
            );
        }
        assert!(Cli::try_parse_from(["vmm", "--kernel", k, "--firmware", "uefi"]).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let k = temp_file("bz3", &bzimage());
        let k = k.to_str().unwrap();
        assert!(matches!(
            parse(&["vmm", "--kernel", k, "--cpus", "0"]),
            Err(ConfigError::Cpus { .. })
        ));
        assert!(matches!(
            parse(&["vmm", "--kernel", k, "--cpus", "255"]),
            Err(ConfigError::Cpus { .. })
        ));
        assert!(matches!(
            parse(&["vmm", "--kernel", k, "--memory", "1"]),
            Err(ConfigError::Memory { .. })
        ));
        assert!(matches!(
            parse(&["vmm", "--kernel", k, "--memory", "999999999"]),
            Err(ConfigError::Memory { .. })
        ));
        assert!(matches!(
            parse(&["vmm", "--kernel", k, "--timeout", "0"]),
            Err(ConfigError::Timeout)
        ));
        let c = parse(&["vmm", "--kernel", k, "--timeout", "5", "--debug-exit"]).unwrap();
        assert_eq!(c.timeout, Some(std::time::Duration::from_secs(5)));
        assert!(c.debug_exit);
        let long = "x".repeat(3000);
        assert!(matches!(
            parse(&["vmm", "--kernel", k, "--cmdline", &long]),
            Err(ConfigError::Cmdline { .. })
        ));
    }

    #[test]
    fn disk_options_parse_and_default_to_the_iommu() {
        let img = temp_file("disk.img", &[0u8; 4096]);
        let p = img.to_str().unwrap();
        let d = parse_disk(p, true).unwrap();
        assert_eq!((d.read_only, d.iommu), (false, true));
        let d = parse_disk(&format!("{p},readonly=on,iommu=off"), true).unwrap();
        assert_eq!((d.read_only, d.iommu), (true, false));
        assert!(!parse_disk(p, false).unwrap().iommu);
        assert_eq!((d.pci, d.queues), (false, 1), "virtio-mmio by default");
        let d = parse_disk(&format!("{p},transport=pci,queues=4"), true).unwrap();
        assert_eq!((d.pci, d.queues, d.iommu), (true, 4, true));
    }

    #[test]
    fn disk_image_is_the_file_opened_while_parsing() {
        let img = temp_file("disk3.img", b"first image");
        let p = img.to_str().unwrap();
        let d = parse_disk(p, false).unwrap();
        // The path now names another file: the device still gets the one that was checked.
        std::fs::remove_file(&img).unwrap();
        temp_file("disk3.img", b"other");
        let mut content = String::new();
        let mut f = d.image.file().unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut content).unwrap();
        assert_eq!(content, "first image");
        assert_eq!(d.clone(), d, "clones share the image");
    }

    #[test]
    fn bad_disk_values_are_refused() {
        let img = temp_file("disk2.img", &[0u8; 4096]);
        let p = img.to_str().unwrap();
        for bad in [
            String::new(),
            format!("{p},readonly"),
            format!("{p},color=red"),
            format!("{p},iommu=maybe"),
            format!("{p},transport=isa"),
            format!("{p},transport=pci,queues=0"),
            format!("{p},transport=pci,queues=17"),
            format!("{p},queues=2"),
        ] {
            assert!(
                matches!(parse_disk(&bad, true), Err(ConfigError::Disk { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_disk(&format!("{p},iommu=on"), false),
            Err(ConfigError::Disk { .. })
        ));
        assert!(matches!(
            parse_disk("/nonexistent/disk", false),
            Err(ConfigError::DiskUnreadable { .. })
        ));
    }

    #[test]
    fn missing_or_wrong_kernel_is_refused() {
        assert!(matches!(
            parse(&["vmm", "--kernel", "/nonexistent/k"]),
            Err(ConfigError::KernelUnreadable { .. })
        ));
        let t = temp_file("text", b"hello, not a kernel");
        assert!(matches!(
            parse(&["vmm", "--kernel", t.to_str().unwrap()]),
            Err(ConfigError::KernelFormat(_))
        ));
        assert!(matches!(
            parse(&["vmm", "--kernel", "/"]),
            Err(ConfigError::KernelUnreadable { .. })
        ));
    }
}
