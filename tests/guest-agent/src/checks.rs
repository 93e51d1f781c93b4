//! The checks named by `guest.checks=`. Each prints its facts and returns `Ok` (PASS) or
//! `Err(reason)` (FAIL).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::parse::{self, Cmdline};
use crate::pattern;
use crate::{emit, fact};

pub struct Ctx<'a> {
    pub cmdline: &'a Cmdline,
    /// Running as PID 1 in the test guest (not on a developer's host).
    pub in_guest: bool,
    /// Marks reach the VMM (the marker port is accessible): for [`crate::marker::phase_mark`].
    pub marks: bool,
}

type CheckResult = Result<(), String>;

pub fn run(ctx: &Ctx, name: &str) -> CheckResult {
    match name {
        "cpus" => cpus(ctx),
        "serial-irq" => serial_irq(ctx),
        "interrupts" => interrupts(),
        "kmsg" => kmsg(ctx),
        "iommu-groups" => iommu_groups(),
        "disk" => guest_only(ctx, disk),
        "fio" => guest_only(ctx, fio),
        "shell" => guest_only(ctx, shell),
        "sleep" => sleep(ctx),
        "irq-affinity" => guest_only(ctx, irq_affinity),
        "devicetree" => devicetree(),
        "vfio" => guest_only(ctx, crate::vfio::vfio),
        "vfio-msix" => guest_only(ctx, crate::vfio_msix::vfio_msix),
        _ => Err("unknown check".to_string()),
    }
}

/// Checks that write to disks or start programs run only as PID 1 in the guest: on a host,
/// `guest.disk=/dev/vda` could be the host's own disk.
fn guest_only(ctx: &Ctx, check: fn(&Ctx) -> CheckResult) -> CheckResult {
    if !ctx.in_guest {
        return Err("refused: not PID 1 in the test guest".to_string());
    }
    check(ctx)
}

/// A disk named on the command line: a `/dev/...` path, `pci:DDDD:BB:DD.F` (the block device
/// of that virtio-pci function) or `mmio` (the first virtio block device not on PCI).
pub fn resolve_disk(spec: &str) -> Result<String, String> {
    if spec.starts_with("of:") {
        return disk_path(spec);
    }
    if let Some(bdf) = spec.strip_prefix("pci:") {
        let dir = format!("/sys/bus/pci/devices/{bdf}");
        for entry in fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))? {
            let name = entry.map_err(|e| e.to_string())?.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("virtio") {
                let block = format!("{dir}/{name}/block");
                if let Some(Ok(b)) = fs::read_dir(&block).ok().and_then(|mut r| r.next()) {
                    return Ok(format!("/dev/{}", b.file_name().to_string_lossy()));
                }
            }
        }
        return Err(format!("no block device under {dir}"));
    }
    if spec == "mmio" {
        let mut names: Vec<String> = fs::read_dir("/sys/block")
            .map_err(|e| format!("read /sys/block: {e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vd"))
            .collect();
        names.sort();
        for n in names {
            let path = fs::canonicalize(format!("/sys/block/{n}")).unwrap_or_default();
            if !path.display().to_string().contains("/pci0000:") {
                return Ok(format!("/dev/{n}"));
            }
        }
        return Err("no virtio-mmio block device".to_string());
    }
    Ok(spec.to_string())
}

/// `guest.disk`, resolved ([`resolve_disk`]); the first of a comma-separated list.
fn disk_dev(ctx: &Ctx) -> Result<String, String> {
    let spec = ctx.cmdline.get("guest.disk").unwrap_or("/dev/vda");
    resolve_disk(spec.split(',').next().unwrap_or(spec))
}

pub(crate) fn read(path: &str) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))
}

/// `cpus`: facts `online` (/sys/devices/system/cpu/online) and `nproc` (sched_getaffinity).
/// With `guest.expect_cpus=N`, FAIL unless both are N.
fn cpus(ctx: &Ctx) -> CheckResult {
    let online = parse::parse_cpu_list(&read("/sys/devices/system/cpu/online")?)?;
    fact("cpus", "online", online);
    // SAFETY: cpu_set_t is a plain bitmask for which all-zero is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `set` was filled in by sched_getaffinity.
    let nproc = unsafe { libc::CPU_COUNT(&set) } as usize;
    fact("cpus", "nproc", nproc);
    if let Some(expect) = ctx.cmdline.get("guest.expect_cpus") {
        let expect: usize = expect
            .parse()
            .map_err(|_| format!("bad guest.expect_cpus={expect}"))?;
        if online != expect || nproc != expect {
            return Err(format!(
                "expected {expect} CPUs, online={online} nproc={nproc}"
            ));
        }
    }
    if online == 0 || nproc == 0 {
        return Err("no CPUs".to_string());
    }
    Ok(())
}

/// `serial-irq`: the serial port's interrupt count must grow while we write to the console.
fn serial_irq(ctx: &Ctx) -> CheckResult {
    let bytes = ctx.cmdline.get_u64("guest.serial_fill_bytes", 2048)? as usize;
    let timeout = Duration::from_millis(ctx.cmdline.get_u64("guest.serial_timeout_ms", 20000)?);
    let before_text = read("/proc/interrupts")?;
    let before =
        parse::find_serial_irq(&before_text).ok_or("no ttyS0/serial line in /proc/interrupts")?;
    fact("serial-irq", "before", before.total());
    fact("serial-irq", "before_per_cpu", join(&before.counts));

    // Lines of filler through the tty (interrupt-driven), unlike printk (polled).
    let line = format!("GUEST_SERIAL_FILL {}\n", "x".repeat(45));
    let mut fill = String::new();
    while fill.len() < bytes {
        fill.push_str(&line);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(fill.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| format!("write console: {e}"))?;
    drop(out);
    // Wait (bounded) until the UART has sent it all: a UART without working interrupts never
    // drains, and tcdrain() would wait forever.
    let start = Instant::now();
    let left = loop {
        let left = output_queue_len();
        if left == 0 || start.elapsed() > timeout {
            break left;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    fact("serial-irq", "written", fill.len());
    fact("serial-irq", "unsent", left);

    let after_text = read("/proc/interrupts")?;
    let after =
        parse::find_serial_irq(&after_text).ok_or("serial line gone from /proc/interrupts")?;
    fact("serial-irq", "after", after.total());
    fact("serial-irq", "after_per_cpu", join(&after.counts));
    let raw = after_text
        .lines()
        .find(|l| parse::parse_interrupts_line(l, usize::MAX).map(|p| p.irq) == Some(after.irq))
        .unwrap_or("");
    fact("serial-irq", "line", raw.trim());
    if after.total() > before.total() {
        Ok(())
    } else {
        Err(format!(
            "serial interrupt count did not grow ({} -> {}, {left} bytes unsent)",
            before.total(),
            after.total()
        ))
    }
}

/// Bytes still queued for output on stdout's tty (0 if it is no tty).
fn output_queue_len() -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int to the valid pointer passed.
    let rc = unsafe { libc::ioctl(1, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

pub(crate) fn join(counts: &[u64]) -> String {
    counts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `interrupts`: every line of /proc/interrupts as `interrupts.line=<line>`.
fn interrupts() -> CheckResult {
    for line in read("/proc/interrupts")?.lines() {
        fact("interrupts", "line", line.trim());
    }
    Ok(())
}

/// `kmsg`: the kernel log so far as `GUEST_KMSG <text>` lines, filtered by
/// `guest.kmsg_grep=word1|word2` (case-insensitive) if given.
fn kmsg(ctx: &Ctx) -> CheckResult {
    let grep = ctx.cmdline.get("guest.kmsg_grep").unwrap_or("");
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("open /dev/kmsg: {e}"))?;
    let mut buf = vec![0u8; 8192];
    let (mut total, mut matched) = (0, 0);
    loop {
        // One read returns one record.
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]);
                if let Some(text) = parse::kmsg_text(&record) {
                    total += 1;
                    if parse::kmsg_matches(text, grep) {
                        matched += 1;
                        emit(&format!("GUEST_KMSG {text}"));
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            // EPIPE: records were overwritten before we read them; the next read goes on.
            Err(e) if e.kind() == ErrorKind::BrokenPipe || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read /dev/kmsg: {e}")),
        }
    }
    fact("kmsg", "records", total);
    fact("kmsg", "matched", matched);
    Ok(())
}

/// `iommu-groups`: `device=<group>:<dev>:<type>` and `path=<group>:<dev>:<sysfs path>` per
/// device, then `groups=N` and `devices=M`. Always PASS (informational).
fn iommu_groups() -> CheckResult {
    let root = "/sys/kernel/iommu_groups";
    let mut groups: Vec<(u64, String)> = match fs::read_dir(root) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .map(|name| (name.parse().unwrap_or(u64::MAX), name))
            .collect(),
        Err(_) => Vec::new(), // no IOMMU: the directory may not exist
    };
    groups.sort();
    let mut ndev = 0;
    for (_, group) in &groups {
        let gtype = fs::read_to_string(format!("{root}/{group}/type"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".to_string());
        let dir = format!("{root}/{group}/devices");
        let mut devs: Vec<String> = fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        devs.sort();
        for dev in devs {
            ndev += 1;
            let link = format!("{dir}/{dev}");
            let resolved = fs::canonicalize(&link)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("? ({e})"));
            fact("iommu-groups", "device", format!("{group}:{dev}:{gtype}"));
            fact("iommu-groups", "path", format!("{group}:{dev}:{resolved}"));
        }
    }
    fact("iommu-groups", "groups", groups.len());
    fact("iommu-groups", "devices", ndev);
    Ok(())
}

/// `devicetree`: the kernel has a device tree (/sys/firmware/devicetree/base). Facts: the root
/// `compatible`, and per platform device created from a DT node
/// `device=<name>:<driver or ->:<block devices below it, comma-separated>`.
fn devicetree() -> CheckResult {
    let base = "/sys/firmware/devicetree/base";
    if !std::path::Path::new(base).is_dir() {
        return Err(format!(
            "{base} does not exist: the kernel has no device tree"
        ));
    }
    let compatible = fs::read(format!("{base}/compatible"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default();
    fact("devicetree", "compatible", compatible);
    let root = "/sys/bus/platform/devices";
    let mut names: Vec<String> = fs::read_dir(root)
        .map_err(|e| format!("read {root}: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| std::path::Path::new(&format!("{root}/{n}/of_node")).exists())
        .collect();
    names.sort();
    for name in names {
        let driver = fs::read_link(format!("{root}/{name}/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "-".to_string());
        let blocks = block_devices_of(&format!("{root}/{name}")).join(",");
        fact("devicetree", "device", format!("{name}:{driver}:{blocks}"));
    }
    Ok(())
}

/// Block devices of a virtio platform device: `<dev>/virtio*/block/*`.
fn block_devices_of(dev: &str) -> Vec<String> {
    let mut out = Vec::new();
    for v in fs::read_dir(dev)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        if !v.file_name().to_string_lossy().starts_with("virtio") {
            continue;
        }
        let dir = v.path().join("block");
        for b in fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            out.push(b.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// `guest.disk`: a device path, or `of:<platform device>` for the block device of that
/// virtio-mmio device (probe order decides `vda`/`vdb` when some devices wait for the IOMMU).
fn disk_path(spec: &str) -> Result<String, String> {
    let Some(dev) = spec.strip_prefix("of:") else {
        return Ok(spec.to_string());
    };
    match block_devices_of(&format!("/sys/bus/platform/devices/{dev}")).first() {
        Some(b) => Ok(format!("/dev/{b}")),
        None => Err(format!("platform device {dev} has no block device")),
    }
}

const DISK_CHUNK: usize = 1 << 20;
const DIRECT_ALIGN: usize = 4096;

/// A `len`-byte buffer aligned for O_DIRECT, carved out of a slightly larger Vec.
fn aligned_buffer(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.clear();
    storage.resize(len + DIRECT_ALIGN, 0);
    let off = storage.as_ptr().align_offset(DIRECT_ALIGN);
    &mut storage[off..off + len]
}

fn open_direct(dev: &str, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {dev} O_DIRECT: {e}"))
}

/// `disk`: writes the pattern (pattern.rs, `guest.disk_seed`) over the first `guest.disk_mib`
/// MiB of `guest.disk` with O_DIRECT, syncs, drops the page cache and reads it back.
fn disk(ctx: &Ctx) -> CheckResult {
    // A comma-separated list: the same pattern on each disk, in order.
    let specs = ctx
        .cmdline
        .get("guest.disk")
        .unwrap_or("/dev/vda")
        .to_string();
    for spec in specs.split(',') {
        let dev = resolve_disk(spec)?;
        disk_one(ctx, &dev)?;
    }
    Ok(())
}

fn disk_one(ctx: &Ctx, dev: &str) -> CheckResult {
    let mib = ctx.cmdline.get_u64("guest.disk_mib", 8)?;
    let seed = ctx.cmdline.get_u64("guest.disk_seed", 1)?;
    let len = mib << 20;
    fact("disk", "device", dev);
    fact("disk", "seed", seed);

    let mut storage = Vec::new();
    let buf = aligned_buffer(&mut storage, DISK_CHUNK);
    let mut hash = pattern::Fnv64::new();
    let start = Instant::now();
    let f = open_direct(dev, true)?;
    let mut off = 0;
    while off < len {
        let n = DISK_CHUNK.min((len - off) as usize);
        pattern::fill(seed, off, &mut buf[..n]);
        hash.update(&buf[..n]);
        f.write_all_at(&buf[..n], off)
            .map_err(|e| format!("write {dev} at {off}: {e}"))?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| format!("fsync {dev}: {e}"))?;
    drop(f);
    fact("disk", "write_ms", start.elapsed().as_millis());
    fact("disk", "bytes", len);
    fact("disk", "fnv64", format!("{:016x}", hash.finish()));

    // O_DIRECT bypasses the page cache anyway; drop it too when the kernel has the knob.
    if let Ok(mut dc) = OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
    {
        let _ = dc.write_all(b"3");
    }

    let start = Instant::now();
    let f = open_direct(dev, false)?;
    let mut expected = vec![0u8; DISK_CHUNK];
    let mut off = 0;
    while off < len {
        let n = DISK_CHUNK.min((len - off) as usize);
        f.read_exact_at(&mut buf[..n], off)
            .map_err(|e| format!("read {dev} at {off}: {e}"))?;
        pattern::fill(seed, off, &mut expected[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != expected[i]) {
            let at = off + i as u64;
            fact("disk", "mismatch_offset", at);
            return Err(format!(
                "read back differs at byte {at}: {:#04x}, expected {:#04x}",
                buf[i], expected[i]
            ));
        }
        off += n as u64;
    }
    fact("disk", "read_ms", start.elapsed().as_millis());
    Ok(())
}

/// `irq-affinity`: moves the disk's interrupt to another CPU through
/// /proc/irq/N/smp_affinity_list, then reads from the disk (O_DIRECT, one interrupt per
/// request) and checks that the new CPU's count for that IRQ grew. The IRQ is the
/// /proc/interrupts line whose actions contain `guest.irq_match` (default `virtio1`, the disk
/// when the virtio-iommu is virtio0); the target CPU is `guest.irq_cpu` or else the CPU that
/// handled the fewest of its interrupts so far. Facts: `irq`, `line`, `target_cpu`,
/// `before_per_cpu`, `after_per_cpu`, `effective` (effective_affinity_list), `requests`.
fn irq_affinity(ctx: &Ctx) -> CheckResult {
    let name = ctx.cmdline.get("guest.irq_match").unwrap_or("virtio1");
    let kib = ctx.cmdline.get_u64("guest.affinity_io_kib", 512)?;
    // The disk whose interrupt `guest.irq_match` names, when it is not `guest.disk`.
    let dev = match ctx.cmdline.get("guest.irq_disk") {
        Some(spec) => resolve_disk(spec)?,
        None => disk_dev(ctx)?,
    };
    let dev = dev.as_str();
    let find = |text: &str| -> Option<(String, Vec<u64>, String)> {
        let mut lines = text.lines();
        let ncpus = parse::interrupts_cpu_columns(lines.next()?);
        lines
            .filter_map(|l| parse::parse_interrupts_line(l, ncpus))
            .find(|l| l.desc.split_whitespace().any(|w| w == name))
            .map(|l| (l.irq.to_string(), l.counts.clone(), l.desc.to_string()))
    };
    let (irq, before, desc) =
        find(&read("/proc/interrupts")?).ok_or(format!("no {name} line in /proc/interrupts"))?;
    fact("irq-affinity", "irq", &irq);
    fact("irq-affinity", "line", parse::one_line(&desc));
    fact("irq-affinity", "before_per_cpu", join(&before));
    if before.len() < 2 {
        return Err("needs at least 2 CPUs".to_string());
    }
    let target = match ctx.cmdline.get("guest.irq_cpu") {
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| format!("bad guest.irq_cpu={c}"))?,
        None => (0..before.len()).min_by_key(|&c| before[c]).unwrap_or(1),
    };
    fact("irq-affinity", "target_cpu", target);
    let path = format!("/proc/irq/{irq}/smp_affinity_list");
    fs::write(&path, format!("{target}\n")).map_err(|e| format!("write {path}: {e}"))?;

    // A burst of small direct reads: each completion is one interrupt.
    let f = open_direct(dev, false)?;
    let mut storage = Vec::new();
    let buf = aligned_buffer(&mut storage, 4096);
    let requests = kib / 4;
    for i in 0..requests {
        f.read_exact_at(&mut buf[..4096], i * 4096)
            .map_err(|e| format!("read {dev}: {e}"))?;
    }
    fact("irq-affinity", "requests", requests);
    let effective = read(&format!("/proc/irq/{irq}/effective_affinity_list")).unwrap_or_default();
    fact("irq-affinity", "effective", effective.trim());
    let (_, after, _) = find(&read("/proc/interrupts")?)
        .ok_or(format!("{name} line gone from /proc/interrupts"))?;
    fact("irq-affinity", "after_per_cpu", join(&after));
    let grew = after.get(target).copied().unwrap_or(0) > before.get(target).copied().unwrap_or(0);
    if !grew {
        return Err(format!(
            "CPU {target} got none of the {requests} interrupts"
        ));
    }
    Ok(())
}

/// `fio`: runs /usr/bin/fio with the `+`-separated arguments of `guest.fio=`, prints its
/// output (stdout and stderr) as `GUEST_FIO <line>`; PASS iff it exits 0.
fn fio(ctx: &Ctx) -> CheckResult {
    // `@pci` / `@mmio` in an argument: that transport's disk (see `resolve_disk`).
    let mut args = parse::fio_args(ctx.cmdline.get("guest.fio").ok_or("guest.fio= not set")?);
    for a in &mut args {
        for (token, spec) in [("@pci", "pci:0000:00:01.0"), ("@mmio", "mmio")] {
            if a.contains(token) {
                *a = a.replace(token, &resolve_disk(spec)?);
            }
        }
    }
    fact("fio", "args", args.join(" "));
    let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut child = {
        let mut cmd = Command::new("/usr/bin/fio");
        cmd.args(&args)
            .env("PATH", "/bin:/usr/bin")
            .stdin(Stdio::null())
            .stdout(writer.try_clone().map_err(|e| format!("pipe: {e}"))?)
            .stderr(writer);
        cmd.spawn().map_err(|e| {
            format!("spawn /usr/bin/fio: {e} (boot the recipe's initramfs-fio.cpio)")
        })?
        // `cmd` (holding the pipe's write end) is dropped here, so reading ends at fio's exit.
    };
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.map_err(|e| format!("read fio output: {e}"))?;
        let line = String::from_utf8_lossy(&line);
        emit(&format!("GUEST_FIO {}", line.trim_end()));
        if let Some((job, r, w)) = parse::fio_terse_iops(&line) {
            fact("fio", "job", job);
            fact("fio", "read_iops", r);
            fact("fio", "write_iops", w);
        }
    }
    let status = child.wait().map_err(|e| format!("wait fio: {e}"))?;
    fact("fio", "exit", status.code().map_or(-1, |c| c));
    if status.success() {
        Ok(())
    } else {
        Err(format!("fio {status}"))
    }
}

/// `shell`: an interactive busybox shell on the console, for debugging only. The recipe's
/// initramfs has no busybox: append its `busybox.cpio` (resources/guest/README.md).
fn shell(_ctx: &Ctx) -> CheckResult {
    let status = Command::new("/bin/busybox")
        .arg("sh")
        .env("PATH", "/bin:/usr/bin")
        .status()
        .map_err(|e| {
            format!("spawn /bin/busybox sh: {e} (initramfs without busybox: append the recipe's busybox.cpio)")
        })?;
    fact("shell", "exit", status.code().map_or(-1, |c| c));
    Ok(())
}

/// `sleep`: sleeps `guest.sleep_ms` (default 1000) milliseconds.
fn sleep(ctx: &Ctx) -> CheckResult {
    let ms = ctx.cmdline.get_u64("guest.sleep_ms", 1000)?;
    std::thread::sleep(Duration::from_millis(ms));
    fact("sleep", "ms", ms);
    Ok(())
}
