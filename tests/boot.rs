//! Boot tests with the real test guest (needs /dev/kvm and the guest image; CI has both).
//! Each boot takes minutes on the PVM host, so one boot runs several checks.

use std::process::Command;
use std::time::Duration;

use e2e::{disk_image, guest_image, image_and_pattern_hash, temp_path, GuestOutput, GuestRun};

/// Bytes the guest agent's `disk` check writes (its default, 8 MiB) and its default seed.
const DISK_BYTES: u64 = 8 << 20;
const DISK_SEED: u64 = 1;
/// Kernel log lines the `kmsg` check prints.
const KMSG_GREP: &str = "guest.kmsg_grep=iommu|viot|virtio|vda|DMAR|remapping";

fn decompile_tables(dir: &std::path::Path, names: &[&str]) {
    for name in names {
        let path = dir.join(format!("{name}.dat"));
        assert!(
            path.exists(),
            "--dump-tables did not write {}",
            path.display()
        );
        let iasl = Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(dir)
            .output()
            .expect("iasl (Debian acpica-tools) is needed for this test");
        let text = String::from_utf8_lossy(&iasl.stdout).to_string()
            + &String::from_utf8_lossy(&iasl.stderr);
        assert!(
            iasl.status.success() && !text.contains("Error"),
            "iasl -d {name}: {text}"
        );
    }
}

/// The disk check passed in the guest and the guest's writes reached the image file.
fn assert_disk_written(out: &GuestOutput, image: &std::path::Path) {
    out.assert_check("disk");
    let (file, pattern) = image_and_pattern_hash(image, DISK_SEED, DISK_BYTES);
    assert_eq!(
        file, pattern,
        "image content differs from the pattern the guest wrote"
    );
    assert_eq!(
        out.fact("disk.fnv64"),
        format!("{pattern:016x}"),
        "guest read back other data"
    );
}

/// DMA through the virtio-iommu: mappings were made and torn down, nothing faulted.
fn assert_iommu_translated(out: &GuestOutput) {
    assert!(
        out.kmsg_has("virtio_iommu virtio0"),
        "virtio-iommu did not bind\n{}",
        out.transcript()
    );
    assert!(
        out.kmsg_has("ACPI: VIOT"),
        "no VIOT table in the guest log\n{}",
        out.transcript()
    );
    assert!(
        out.facts
            .get("iommu-groups.device")
            .is_some_and(|d| d.iter().any(|d| d.contains("LNRO0005"))),
        "the disk's platform device is in no IOMMU group\n{}",
        out.transcript()
    );
    let (map, unmap) = (
        out.stat("/iommu/requests/map/ok"),
        out.stat("/iommu/requests/unmap/ok"),
    );
    println!(
        "IOMMU_COUNTS map={map} unmap={unmap} attach={} probe={}",
        out.stat("/iommu/requests/attach/ok"),
        out.stat("/iommu/requests/probe/ok")
    );
    assert!(
        map > 0 && unmap > 0,
        "no MAP/UNMAP traffic: map={map} unmap={unmap}"
    );
    assert_eq!(out.stat("/iommu/faults"), 0, "endpoint DMA faulted");
    assert!(out.stat("/disks/0/errors") == 0, "disk requests failed");
}

/// fio for 10 s of 4 KiB random reads on the disk (the guest agent's `fio` check).
const FIO: &str = "guest.fio=--name=randread+--filename=/dev/vda+--rw=randread+--bs=4k+--direct=1+--ioengine=libaio+--iodepth=8+--runtime=10+--time_based+--output-format=terse";

/// Interrupt remapping (issue 4): Linux enabled it from the DMAR table, the IOAPIC lines are
/// remapped, moving the disk's IRQ to the other CPU rebuilt its route (and only then), and
/// no route was rebuilt and nothing injected from userspace during a 10 s fio run.
fn assert_interrupt_remapping(out: &GuestOutput) {
    assert!(
        out.kmsg_has("DMAR-IR: Enabled IRQ remapping in x2apic mode"),
        "interrupt remapping not enabled\n{}",
        out.transcript()
    );
    assert_remapped_interrupts(out, "IR-IO-APIC", &["ttyS0", "virtio1"]);
    out.assert_check("irq-affinity");
    // Counter deltas between the guest's marks: exact, no log timing involved.
    let rebuilt = out.during("irq-affinity", "routes_rebuilt");
    let (dmar, ioapic) = (
        out.during("irq-affinity", "mmio_exits.dmar"),
        out.during("irq-affinity", "mmio_exits.ioapic"),
    );
    println!("ROUTES_REBUILT_BY_AFFINITY_CHANGE {rebuilt} (VT-d register exits {dmar}, IOAPIC exits {ioapic})");
    // Linux's modify_irte: IRTE and descriptors in RAM, one IQT write; the wait status is RAM.
    assert_eq!(
        dmar, 1,
        "a VT-d affinity change is one exit (the IQT write)"
    );
    assert_eq!(ioapic, 0, "the IOAPIC entry was rewritten");
    assert_eq!(
        rebuilt, 1,
        "one affinity change must rebuild exactly its route"
    );
    out.assert_check("fio");
    assert_eq!(
        out.during("fio", "routes_rebuilt"),
        0,
        "routes rebuilt during fio"
    );
    assert_fio_exits(out);
    assert_eq!(out.stat("/interrupts/signal_msi"), 0);
    assert!(
        out.stat("/remap/iec_selective") > 0,
        "no index-selective invalidation seen"
    );
    assert_eq!(out.stat("/remap/queue_errors"), 0);
    assert_nothing_blocked(out, "/remap/blocked_total");
    assert_eq!(out.stat("/irqs_blocked"), 0);
}

/// Each of `names` has a /proc/interrupts line (the `interrupts` check) of chip `kind`.
fn assert_remapped_interrupts(out: &GuestOutput, kind: &str, names: &[&str]) {
    let lines = out
        .facts
        .get("interrupts.line")
        .cloned()
        .unwrap_or_default();
    for name in names {
        assert!(
            lines.iter().any(|l| l.contains(kind) && l.contains(name)),
            "{name} is not an {kind} interrupt: {lines:?}"
        );
    }
}

/// During fio, what reached the VMM: the virtio-mmio disk costs exactly two register exits
/// per completion interrupt (Linux's `vm_interrupt` reads InterruptStatus and writes
/// InterruptACK; queue notifications are ioeventfds, completions irqfds), nothing is injected
/// from userspace, and no IOAPIC EOI exit happens (all pins are edge).
fn assert_fio_exits(out: &GuestOutput) {
    let exits = out.during("fio", "mmio_exits.disk0");
    let isr = out.during("fio", "disk0.isr_reads");
    let acks = out.during("fio", "disk0.interrupt_acks");
    let irqs = out.during("fio", "irqs.disk0");
    let reads = out.during("fio", "disk0.requests");
    println!(
        "FIO_EXITS disk0 mmio_exits={exits} isr_reads={isr} acks={acks} irqfd_triggers={irqs} requests={reads} read_iops={:?}",
        out.facts.get("fio.read_iops")
    );
    assert!(reads > 0 && irqs > 0, "fio did no I/O on disk0");
    assert_eq!(
        exits,
        isr + acks,
        "disk0 exits other than InterruptStatus/ACK during fio"
    );
    assert_eq!(isr, acks, "each interrupt is one status read and one ACK");
    assert!(isr <= irqs, "more handler runs than interrupts raised");
    assert_eq!(out.during("fio", "signal_msi"), 0);
    assert_eq!(out.during("fio", "ioapic_eoi_exits"), 0);
}

/// The main boot: PVH vmlinux, 2 vCPUs, `--iommu --disk`. Issue 2: the guest sees both CPUs,
/// the serial interrupt (IOAPIC pin → KVM MSI route → irqfd) counts up, no interrupt is
/// injected from userspace, the guest powers off and the VMM exits 0, the dumped ACPI tables
/// decompile. Issue 3: the guest binds the virtio-iommu from ACPI (VIOT + LNRO0005), puts the
/// disk in an IOMMU group, writes a pattern through it that reaches the image file. Issue 4:
/// see [`assert_interrupt_remapping`].
#[test]
fn smp_guest_with_iommu_and_disk() {
    let image = guest_image();
    let disk = disk_image(64);
    let tables = temp_path("tables");
    let mut run = GuestRun::new(
        &image,
        &image.vmlinux,
        "cpus,serial-irq,interrupts,kmsg,iommu-groups,irq-affinity,disk,fio",
    );
    run.cpus = 2;
    run.cmdline.push(KMSG_GREP.into());
    run.cmdline.push(FIO.into());
    run.args = vec![
        "-v".into(),
        "--iommu".into(),
        "--disk".into(),
        disk.to_str().unwrap().into(),
        "--dump-tables".into(),
        tables.to_str().unwrap().into(),
    ];
    let out = run.run();
    println!(
        "BOOT_TIME vmlinux/pvh 2 vCPUs --iommu --disk: {}",
        out.timing()
    );
    out.assert_clean_poweroff();

    assert_eq!(out.fact("cpus.nproc"), "2", "{}", out.transcript());
    assert_eq!(out.fact("cpus.online"), "2", "{}", out.transcript());
    out.assert_check("serial-irq");
    let before: u64 = out.fact("serial-irq.before").parse().unwrap();
    let after: u64 = out.fact("serial-irq.after").parse().unwrap();
    assert!(
        after > before,
        "serial IRQ count did not grow: {before} -> {after}"
    );
    assert_eq!(
        out.stat("/interrupts/signal_msi"),
        0,
        "interrupts must all go through irqfds"
    );
    assert!(out.stat("/serial/irqs") > 0 && out.stat("/virtio/irqs") > 0);
    // The VMM's boot timer: the agent's first mark, measured by the VMM itself.
    let boot_ms = out.stat("/boot_to_init_ms");
    let host_seen = out.init_reached.expect("init reached").as_millis() as u64;
    println!("BOOT_TO_INIT_MS {boot_ms} (host saw GUEST_INIT_REACHED at {host_seen} ms)");
    assert!(
        boot_ms > 0 && boot_ms <= host_seen + 1000,
        "boot_to_init_ms {boot_ms} implausible against {host_seen} ms"
    );
    decompile_tables(&tables, &["DSDT", "APIC", "FACP", "XSDT", "VIOT", "DMAR"]);

    assert_iommu_translated(&out);
    assert_disk_written(&out, &disk);
    assert_interrupt_remapping(&out);
    assert_every_thread_filtered(&out, &["vmm", "vcpu0", "vcpu1", "viommu", "vblk0"]);
}

/// Issue 11: every VMM thread runs under its seccomp filter (`Seccomp: 2` in
/// `/proc/PID/task/TID/status`), and the threads are the ones expected (main, vCPUs, device
/// workers: none unfiltered, none unknown). KVM's own kernel workers in the process
/// (`kvm-nx-lpage-recovery`, no user code) are checked for the field but not named.
fn assert_every_thread_filtered(out: &GuestOutput, expected: &[&str]) {
    let threads = &out.threads_at_init;
    println!("THREADS_AT_INIT {threads:?}");
    let mut names: Vec<&str> = threads
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with("kvm-"))
        .collect();
    names.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(names, want, "VMM threads at init\n{}", out.transcript());
    for (name, seccomp) in threads {
        assert_eq!(seccomp, "2", "thread {name} has no seccomp filter");
    }
}

/// The same disk test with the guest's IOMMU in strict mode (every unmap invalidated at once),
/// on a virtio-mmio disk and on a virtio-pci disk (issue 7) in the same boot.
#[test]
fn strict_iommu_mode_disk() {
    let image = guest_image();
    let disk = disk_image(64);
    let pci_disk = disk_image(64);
    let mut run = GuestRun::new(&image, &image.vmlinux, "kmsg,iommu-groups,disk");
    run.cmdline.push("iommu.strict=1".into());
    run.cmdline.push(KMSG_GREP.into());
    run.cmdline.push("guest.disk=mmio,pci:0000:00:01.0".into());
    run.args = vec![
        "--iommu".into(),
        "--disk".into(),
        disk.to_str().unwrap().into(),
        "--disk".into(),
        format!("{},transport=pci", pci_disk.to_str().unwrap()),
    ];
    let out = run.run();
    println!(
        "BOOT_TIME vmlinux/pvh 1 vCPU --iommu --disk iommu.strict=1: {}",
        out.timing()
    );
    out.assert_clean_poweroff();
    assert!(
        out.kmsg_has("strict mode"),
        "guest IOMMU not in strict mode\n{}",
        out.transcript()
    );
    assert_iommu_translated(&out);
    assert_disk_written(&out, &disk);
    assert_disk_written(&out, &pci_disk);
    assert_pci_function_in_iommu_group(&out);
}

/// fio on both transports in one run: 10 s of 4 KiB random reads on the virtio-mmio disk and
/// on the virtio-pci disk at once (`@mmio` / `@pci` are resolved by the guest agent).
const FIO_BOTH: &str = "guest.fio=--rw=randread+--bs=4k+--direct=1+--ioengine=libaio+--iodepth=8+--runtime=10+--time_based+--output-format=terse+--name=mmio+--filename=@mmio+--name=pci+--filename=@pci";

/// The VMM arguments of the two-transport boots: `-v`, `iommu` (the `--iommu` option as
/// given), a virtio-mmio disk, a virtio-pci disk with 2 queues, and `--dump-tables`.
fn mmio_and_pci_disk_args(
    iommu: &str,
    mmio_disk: &std::path::Path,
    pci_disk: &std::path::Path,
    tables: &std::path::Path,
) -> Vec<String> {
    vec![
        "-v".into(),
        iommu.into(),
        "--disk".into(),
        mmio_disk.to_str().unwrap().into(),
        "--disk".into(),
        format!("{},transport=pci,queues=2", pci_disk.to_str().unwrap()),
        "--dump-tables".into(),
        tables.to_str().unwrap().into(),
    ]
}

/// The guest's IOMMU groups include the virtio-pci function at 00:01.0.
fn assert_pci_function_in_iommu_group(out: &GuestOutput) {
    assert!(
        out.facts
            .get("iommu-groups.device")
            .is_some_and(|d| d.iter().any(|d| d.contains(":0000:00:01.0:"))),
        "the PCI function is in no IOMMU group\n{}",
        out.transcript()
    );
}

/// The `vfio` check: guest VFIO took the PCI function over (TYPE1v2) without
/// `allow_unsafe_interrupts`.
fn assert_guest_vfio_without_unsafe_interrupts(out: &GuestOutput) {
    out.assert_check("vfio");
    assert_eq!(out.fact("vfio.allow_unsafe_interrupts"), "N");
    assert_eq!(out.fact("vfio.set_iommu"), "ok");
}

/// The remapper's blocked-interrupt counter `blocked_total` (a stats pointer) stayed 0.
fn assert_nothing_blocked(out: &GuestOutput, blocked_total: &str) {
    assert_eq!(
        out.stat(blocked_total),
        0,
        "a legitimate interrupt was blocked"
    );
}

/// Issue 7: a virtio-pci disk with MSI-X (2 queues) behind the virtio-iommu and interrupt
/// remapping, next to a virtio-mmio disk, 2 vCPUs. The guest enumerates the function
/// through ECAM (MCFG) under the ACPI host bridge, puts it in an IOMMU group (VIOT PCI range),
/// its queue vectors are `IR-PCI-MSIX` lines, the pattern round trip works on both disks,
/// during one 10 s fio run on both the PCI disk causes no register exit at all (ioeventfd
/// notifications, irqfd completions) and no route is rebuilt, and guest VFIO takes the
/// function over with TYPE1v2 without `allow_unsafe_interrupts` and maps a buffer. Then a
/// userspace virtio-blk driver over VFIO moves its MSI-X vector to the other CPU with one route
/// rebuilt and no MSI-X table write ([`assert_vfio_msix_move`]).
#[test]
fn pci_msix_disk_with_iommu_and_vfio() {
    let image = guest_image();
    let (mmio_disk, pci_disk) = (disk_image(64), disk_image(64));
    let tables = temp_path("tables-pci");
    let mut run = GuestRun::new(
        &image,
        &image.vmlinux,
        "interrupts,kmsg,iommu-groups,disk,fio,vfio,vfio-msix",
    );
    run.cpus = 2;
    run.cmdline
        .push("guest.kmsg_grep=iommu|viot|virtio|vd|DMAR|remapping|pci|PCI|vfio|ECAM".into());
    // The pattern on the PCI disk only: the main boot covers the virtio-mmio one.
    run.cmdline.push("guest.disk=pci:0000:00:01.0".into());
    run.cmdline.push(FIO_BOTH.into());
    run.args = mmio_and_pci_disk_args("--iommu", &mmio_disk, &pci_disk, &tables);
    let out = run.run();
    println!(
        "BOOT_TIME vmlinux/pvh 2 vCPUs --iommu mmio+pci disks: {}",
        out.timing()
    );
    for l in out.kmsg.iter().filter(|l| {
        l.contains("PCI") || l.contains("pci") || l.contains("ECAM") || l.contains("vfio")
    }) {
        println!("PCI_BRINGUP {l}");
    }
    out.assert_clean_poweroff();
    decompile_tables(&tables, &["DSDT", "MCFG", "VIOT", "DMAR"]);

    // Enumeration, IOMMU group, MSI-X through interrupt remapping.
    assert!(
        out.kmsg_has("ECAM [mem 0xe0000000-0xe00fffff]"),
        "no ECAM from the MCFG\n{}",
        out.transcript()
    );
    assert!(
        out.kmsg_has("[1af4:1042]"),
        "virtio-blk function not enumerated"
    );
    assert_pci_function_in_iommu_group(&out);
    assert_remapped_interrupts(&out, "IR-PCI-MSIX", &["req.0", "req.1"]);
    assert_disk_written(&out, &pci_disk);
    assert_eq!(out.stat("/iommu/faults"), 0, "endpoint DMA faulted");

    // What reached the VMM during fio, per transport.
    out.assert_check("fio");
    let mmio_exits = out.during("fio", "mmio_exits.disk0");
    let mmio_reqs = out.during("fio", "disk0.requests");
    let pci_exits = out.during("fio", "mmio_exits.pci-disk1");
    let pci_reqs = out.during("fio", "disk1.requests");
    let pci_irqs = out.during("fio", "irqs.pci-disk1");
    let map = out.during("fio", "iommu.map");
    let unmap = out.during("fio", "iommu.unmap");
    println!(
        "FIO_EXITS mmio: exits={mmio_exits} requests={mmio_reqs} per_io={:.3}; pci: exits={pci_exits} requests={pci_reqs} irqfd_triggers={pci_irqs} per_io={:.3}; iommu map={map} unmap={unmap}",
        mmio_exits as f64 / mmio_reqs.max(1) as f64,
        pci_exits as f64 / pci_reqs.max(1) as f64,
    );
    assert!(
        pci_reqs > 0 && pci_irqs > 0,
        "fio did no I/O on the PCI disk"
    );
    assert_eq!(
        pci_exits, 0,
        "the PCI disk's I/O reached the VMM during fio"
    );
    assert_eq!(
        out.during("fio", "routes_rebuilt"),
        0,
        "routes rebuilt during fio"
    );
    assert_eq!(out.during("fio", "signal_msi"), 0);
    assert_nothing_blocked(&out, "/remap/blocked_total");

    // Guest VFIO on the PCI function.
    assert_guest_vfio_without_unsafe_interrupts(&out);
    assert!(out.fact("vfio.driver").ends_with("vfio-pci"));

    assert_vfio_msix_move(&out, "/remap/blocked_total");
}

/// The `vfio-msix` check (a userspace virtio-blk driver over VFIO in the guest) moved its
/// unmanaged MSI-X vector to the other CPU: across the move (its `move.start`/`move.end` marks,
/// nothing else touching a device in between) exactly one route was rebuilt (the IRTE the
/// guest rewrote, announced by one selective invalidation) and the PCI disk saw no register
/// access, so no MSI-X table write; the interrupts after the move landed on the new CPU.
fn assert_vfio_msix_move(out: &GuestOutput, blocked_total: &str) {
    out.assert_check("vfio-msix");
    let line = out.fact("vfio-msix.line");
    assert!(
        line.contains("IR-PCI-MSIX") && line.contains("vfio-msix[0](0000:00:01.0)"),
        "the vfio-msix vector is not a remapped MSI-X interrupt: {line}"
    );
    let (from, to) = ("vfio-msix.move.start", "vfio-msix.move.end");
    let rebuilt = out.between(from, to, "routes_rebuilt");
    let updates = out.between(from, to, "routing_updates");
    let pci_exits = out.between(from, to, "mmio_exits.pci-disk1");
    let pci_irqs = out.between(from, to, "irqs.pci-disk1");
    // The same counter over the whole check: the driver's register accesses and the MSI-X
    // enable (table writes) do reach it, so the zero above is not a dead counter.
    let check_exits = out.during("vfio-msix", "mmio_exits.pci-disk1");
    let cpus = |key: &str| -> Vec<u64> {
        out.fact(key)
            .split(',')
            .map(|c| c.parse().expect("per-CPU count"))
            .collect()
    };
    let (before, after, end) = (
        cpus("vfio-msix.per_cpu_before_move"),
        cpus("vfio-msix.per_cpu_after_move"),
        cpus("vfio-msix.per_cpu_end"),
    );
    let old: usize = out.fact("vfio-msix.from_cpu").parse().unwrap();
    let new: usize = out.fact("vfio-msix.target_cpu").parse().unwrap();
    let requests: u64 = out.fact("vfio-msix.requests_after").parse().unwrap();
    println!(
        "VFIO_MSIX_MOVE irq={} cpu {old}->{new} (effective {}): routes_rebuilt={rebuilt} routing_updates={updates} pci_disk_mmio_exits={pci_exits} (whole check: {check_exits}) pci_disk_irqs={pci_irqs}; per-CPU counts before move {before:?}, after move {after:?}, after {requests} more requests {end:?}; pattern matched {}/{}",
        out.fact("vfio-msix.irq"),
        out.fact("vfio-msix.effective_after"),
        out.fact("vfio-msix.pattern_matched"),
        2 * requests,
    );
    assert_ne!(old, new, "the vector was not moved to another CPU");
    assert_eq!(out.fact("vfio-msix.effective_after"), new.to_string());
    assert_eq!(rebuilt, 1, "routes rebuilt by the affinity change");
    assert_eq!(
        pci_exits, 0,
        "the affinity change touched the PCI disk (an MSI-X table write)"
    );
    assert_eq!(pci_irqs, 0, "an interrupt during the move phase");
    assert!(
        check_exits > 0,
        "the userspace driver's register accesses were not counted"
    );
    assert!(
        end[new] - after[new] >= requests && end[old] == after[old],
        "interrupts after the move did not all land on CPU {new}: {after:?} -> {end:?}"
    );
    assert_eq!(
        out.fact("vfio-msix.pattern_matched"),
        (2 * requests).to_string(),
        "the userspace driver read other data than the disk check wrote"
    );
    assert_nothing_blocked(out, blocked_total);
}

/// Issue 12: paravirtual interrupt remapping (`--iommu=dma,pvremap`, docs/pv-irq-remap.md)
/// with the guest driver of resources/guest/patches/0002, 2 vCPUs, a virtio-mmio disk (an
/// IOAPIC pin) and a virtio-pci disk (MSI-X). The guest finds the PVIR table and no DMAR,
/// enables PV-IR in x2APIC mode, puts the IOAPIC and the PCI function's MSI-X on it; moving
/// the disk's interrupt to the other CPU is one request (one exit to the PV-IR page), one
/// route rebuilt and no IOAPIC or PCI-BAR access; fio on both disks makes no request and
/// rebuilds nothing; guest VFIO accepts the PCI function without `allow_unsafe_interrupts`,
/// and moving the userspace VFIO driver's MSI-X vector is one request, one route, no PCI access.
#[test]
fn pv_interrupt_remapping_mmio_and_pci_disks() {
    let image = guest_image();
    let (mmio_disk, pci_disk) = (disk_image(64), disk_image(64));
    let tables = temp_path("tables-pvir");
    let mut run = GuestRun::new(
        &image,
        &image.vmlinux,
        "interrupts,kmsg,iommu-groups,irq-affinity,disk,fio,vfio,vfio-msix",
    );
    run.cpus = 2;
    run.cmdline
        .push("guest.kmsg_grep=PV-IR|PVIR|DMAR|x2apic|remapping|IR-|vfio|iommu".into());
    // The pattern on the PCI disk (the userspace VFIO driver reads it back); the pin moved
    // by `irq-affinity` is the virtio-mmio disk's, so its reads go there.
    run.cmdline.push("guest.disk=pci:0000:00:01.0".into());
    run.cmdline.push("guest.irq_disk=mmio".into());
    run.cmdline.push(FIO_BOTH.into());
    run.args = mmio_and_pci_disk_args("--iommu=dma,pvremap", &mmio_disk, &pci_disk, &tables);
    let out = run.run();
    println!(
        "BOOT_TIME vmlinux/pvh 2 vCPUs --iommu=dma,pvremap mmio+pci disks: {}",
        out.timing()
    );
    for l in out
        .kmsg
        .iter()
        .filter(|l| l.contains("PV-IR") || l.contains("x2apic"))
    {
        println!("PVIR_BRINGUP {l}");
    }
    out.assert_clean_poweroff();
    decompile_tables(&tables, &["DSDT", "APIC", "VIOT", "MCFG", "PVIR"]);
    assert!(!tables.join("DMAR.dat").exists(), "a DMAR next to PVIR");

    assert!(
        out.kmsg_has("PV-IR: Enabled IRQ remapping in x2apic mode"),
        "PV-IR not enabled\n{}",
        out.transcript()
    );
    assert!(out.kmsg_has("ACPI: PVIR"), "no PVIR table in the guest log");
    // (The command line itself names DMAR in its grep pattern: look for Linux's own lines.)
    assert!(
        !out.kmsg
            .iter()
            .any(|l| l.contains("ACPI: DMAR") || l.contains("DMAR-IR") || l.contains("DMAR:")),
        "the guest saw a DMAR\n{}",
        out.transcript()
    );
    assert_remapped_interrupts(&out, "IR-IO-APIC", &["ttyS0", "virtio1"]);
    assert_remapped_interrupts(&out, "IR-PCI-MSIX", &["req.0", "req.1"]);
    assert_disk_written(&out, &pci_disk);

    // One affinity change of the virtio-mmio disk's pin.
    out.assert_check("irq-affinity");
    let phase = |c: &str| out.during("irq-affinity", c);
    let (page, rebuilt, updates) = (
        phase("mmio_exits.pvir"),
        phase("routes_rebuilt"),
        phase("routing_updates"),
    );
    let (ioapic, pci) = (phase("mmio_exits.ioapic"), phase("mmio_exits.pci-disk1"));
    println!(
        "PVIR_AFFINITY page_exits={page} routes_rebuilt={rebuilt} routing_updates={updates} ioapic_exits={ioapic} pci_bar_exits={pci} effective={}",
        out.fact("irq-affinity.effective")
    );
    assert_eq!(
        page, 1,
        "an affinity change must be exactly one PV-IR request"
    );
    assert_eq!(
        rebuilt, 1,
        "an affinity change must rebuild exactly its route"
    );
    assert_eq!(updates, 1, "one KVM_SET_GSI_ROUTING per request");
    assert_eq!(ioapic, 0, "the IOAPIC entry was rewritten");
    assert_eq!(pci, 0, "the PCI function was touched");

    // The data plane: nothing reaches the remapper.
    out.assert_check("fio");
    let (fio_page, fio_rebuilt) = (
        out.during("fio", "mmio_exits.pvir"),
        out.during("fio", "routes_rebuilt"),
    );
    let (pci_reqs, pci_exits) = (
        out.during("fio", "disk1.requests"),
        out.during("fio", "mmio_exits.pci-disk1"),
    );
    println!("PVIR_FIO page_exits={fio_page} routes_rebuilt={fio_rebuilt} pci_requests={pci_reqs} pci_exits={pci_exits}");
    assert_eq!(fio_page, 0, "PV-IR requests during fio");
    assert_eq!(fio_rebuilt, 0, "routes rebuilt during fio");
    assert!(pci_reqs > 0, "fio did no I/O on the PCI disk");
    assert_eq!(pci_exits, 0, "the PCI disk's I/O reached the VMM");
    assert_eq!(out.stat("/interrupts/signal_msi"), 0);
    assert_eq!(out.stat("/irqs_blocked"), 0);

    // Guest VFIO: the PCI function's MSIs are isolated by the VMM's source binding.
    assert_guest_vfio_without_unsafe_interrupts(&out);

    // An MSI-X vector moved: the userspace VFIO driver's unmanaged vector. One request, one
    // route, no PCI access (no MSI-X table write), interrupts on the new CPU.
    assert_vfio_msix_move(&out, "/pvirq/blocked_total");
    let (from, to) = ("vfio-msix.move.start", "vfio-msix.move.end");
    let msix_page = out.between(from, to, "mmio_exits.pvir");
    println!("PVIR_MSIX_MOVE page_exits={msix_page}");
    assert_eq!(
        msix_page, 1,
        "an MSI-X affinity change must be one PV-IR request"
    );
}

/// The bzImage path (64-bit boot protocol, gzip decompressor run by the guest), with a disk
/// and no `--iommu`: the disk works on guest-physical addresses and no IOMMU appears.
#[test]
fn bzimage_without_iommu_disk() {
    let image = guest_image();
    let disk = disk_image(64);
    let mut run = GuestRun::new(&image, &image.bzimage, "cpus,kmsg,iommu-groups,disk");
    run.cmdline.push(KMSG_GREP.into());
    run.args = vec!["--disk".into(), disk.to_str().unwrap().into()];
    let out = run.run();
    println!("BOOT_TIME bzImage 1 vCPU --disk: {}", out.timing());
    out.assert_clean_poweroff();
    assert_eq!(out.fact("cpus.nproc"), "1");
    assert_disk_written(&out, &disk);
    assert_eq!(
        out.fact("iommu-groups.groups"),
        "0",
        "an IOMMU group appeared without --iommu"
    );
    assert!(
        !out.kmsg_has("virtio_iommu"),
        "virtio-iommu appeared without --iommu"
    );
    assert!(out
        .stats
        .as_ref()
        .unwrap()
        .pointer("/iommu")
        .unwrap()
        .is_null());
    assert!(out.stat("/disks/0/writes") > 0);
}

/// A prebuilt root filesystem, the way CI users boot (issue 10): the recipe's ext4 image (the
/// initramfs's files, `mke2fs -d`) is the virtio-mmio disk behind the virtio-iommu, the kernel
/// mounts it as `/` (`root=/dev/vda`, no initramfs) and runs the agent from it; fio reads and
/// writes a file on it, so the root filesystem's DMA goes through the IOMMU.
#[test]
fn ext4_root_disk_behind_iommu() {
    let image = guest_image();
    let root = temp_path("rootfs.ext4");
    std::fs::copy(&image.rootfs, &root).expect("copy the rootfs image");
    let mut run = GuestRun::new(&image, &image.vmlinux, "cpus,kmsg,iommu-groups,fio");
    run.initrd = None;
    run.cmdline.extend([
        "root=/dev/vda".into(),
        "rootfstype=ext4".into(),
        "rw".into(),
        "init=/init".into(),
        "guest.kmsg_grep=EXT4-fs|VFS|iommu|vda".into(),
        "guest.fio=--name=rootfile+--filename=/fio.dat+--size=8m+--rw=randrw+--bs=4k+--direct=1+--ioengine=libaio+--iodepth=8+--runtime=3+--time_based+--output-format=terse".into(),
    ]);
    run.args = vec![
        "--iommu=dma".into(),
        "--disk".into(),
        root.to_str().unwrap().into(),
    ];
    let out = run.run();
    println!(
        "BOOT_TIME vmlinux/pvh ext4 root on --iommu=dma disk: {}",
        out.timing()
    );
    out.assert_clean_poweroff();
    assert!(
        out.kmsg_has("VFS: Mounted root (ext4 filesystem)"),
        "the ext4 image is not the root\n{}",
        out.transcript()
    );
    assert!(out.kmsg_has("EXT4-fs (vda): mounted filesystem"));
    assert_iommu_translated(&out);
    out.assert_check("fio");
    let (reads, writes) = (
        out.during("fio", "disk0.requests"),
        out.stat("/disks/0/writes"),
    );
    let (map, unmap) = (
        out.during("fio", "iommu.map"),
        out.during("fio", "iommu.unmap"),
    );
    println!("ROOTFS_FIO requests={reads} writes_total={writes} map={map} unmap={unmap}");
    assert!(reads > 0 && writes > 0, "fio did no I/O on the root disk");
    assert!(
        map > 0,
        "the root disk's fio I/O was not mapped through the IOMMU"
    );
}

/// Kernel log lines the device-tree test wants to see (`kmsg` check).
const KMSG_GREP_DT: &str =
    "guest.kmsg_grep=iommu|virtio|vda|vdb|deferred|syscon|poweroff|ttyS|smp:|IOAPIC|Virtual Wire|ACPI";

/// `dtc -I dtb -O dts` of the dumped DTB: no warnings, and the nodes of the devices placed
/// (IOMMU in slot 0, disk 0 behind it with endpoint ID 1, disk 1 with `iommu=off` in slot 2).
fn assert_dumped_dtb(dir: &std::path::Path) {
    let path = dir.join("vmm.dtb");
    let out = Command::new("dtc")
        .args(["-I", "dtb", "-O", "dts"])
        .arg(&path)
        .output()
        .expect("dtc (Debian device-tree-compiler) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "dtc {}: {stderr}",
        path.display()
    );
    let dts = String::from_utf8_lossy(&out.stdout);
    let node = |name: &str| {
        let start = dts
            .find(&format!("{name} {{"))
            .unwrap_or_else(|| panic!("no {name} in\n{dts}"));
        let end = start + dts[start..].find("};").unwrap();
        dts[start..end].to_owned()
    };
    let iommu = node("iommu@d0000000");
    assert!(iommu.contains("#iommu-cells = <0x01>;") && iommu.contains("phandle = <0x02>;"));
    assert!(iommu.contains("interrupts = <0x05 0x03>;"), "{iommu}");
    let disk0 = node("virtio_mmio@d0001000");
    assert!(disk0.contains("iommus = <0x02 0x01>;"), "{disk0}");
    assert!(disk0.contains("interrupts = <0x06 0x03>;"), "{disk0}");
    let disk1 = node("virtio_mmio@d0002000");
    assert!(
        !disk1.contains("iommus"),
        "the iommu=off disk names the IOMMU: {disk1}"
    );
    assert!(dts.contains("cpu@1 {") && !dts.contains("cpu@2 {"));
    assert!(dts.contains("compatible = \"syscon-poweroff\";"));
    let acpi: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".dat"))
        .collect();
    assert!(acpi.is_empty(), "ACPI tables dumped in DT mode: {acpi:?}");
}

/// Device-tree mode (`--firmware dt --iommu=dma`): PVH-capable vmlinux entered through the
/// 64-bit boot protocol with the DTB in setup_data, 2 vCPUs, `acpi=off`. The guest has a
/// device tree, brings up both CPUs from `/cpus`, ttyS0 takes interrupts through the DT
/// IOAPIC, virtio-iommu binds from the `virtio,mmio` node, the disk whose node has `iommus`
/// is in an IOMMU group (and is written through it, MAP/UNMAP > 0), and `poweroff` reaches
/// the syscon power-off register: exit 0. Negative control in the same boot: a second disk
/// with `iommu=off` has no `iommus`, no IOMMU group, and no ATTACH (ATTACH count = 1).
#[test]
fn device_tree_boot_with_virtio_iommu() {
    let image = guest_image();
    let disk = disk_image(64);
    let bypass = disk_image(64);
    let tables = temp_path("dt-tables");
    let mut run = GuestRun::new(
        &image,
        &image.vmlinux,
        "devicetree,cpus,serial-irq,kmsg,iommu-groups,disk",
    );
    run.cpus = 2;
    run.cmdline.push("earlycon=uart8250,io,0x3f8,115200".into());
    run.cmdline.push(KMSG_GREP_DT.into());
    // The translated disk by its DT node: it probes after the IOMMU, so it need not be vda.
    run.cmdline
        .push("guest.disk=of:d0001000.virtio_mmio".into());
    run.args = vec![
        "-v".into(),
        "--iommu=dma".into(),
        "--disk".into(),
        disk.to_str().unwrap().into(),
        "--disk".into(),
        format!("{},iommu=off", bypass.display()),
        "--dump-tables".into(),
        tables.to_str().unwrap().into(),
    ];
    run.use_device_tree();
    let out = run.run();
    println!(
        "BOOT_TIME vmlinux/64-bit+DTB 2 vCPUs --firmware dt --iommu=dma 2 disks: {}",
        out.timing()
    );
    for line in &out.kmsg {
        println!("DT_KMSG {line}");
    }
    out.assert_clean_poweroff();
    assert!(
        out.stderr.iter().any(|l| l.contains("Device tree (")),
        "the VMM did not write a device tree\n{}",
        out.transcript()
    );
    assert_dumped_dtb(&tables);

    // The guest runs on the tree.
    out.assert_check("devicetree");
    assert_eq!(out.fact("devicetree.compatible"), "vmm,x86-virt");
    let devices = out
        .facts
        .get("devicetree.device")
        .cloned()
        .unwrap_or_default();
    println!("DT_DEVICES {devices:?}");
    for (dev, driver) in [
        ("d0000000.iommu", "virtio-mmio"),
        ("d0001000.virtio_mmio", "virtio-mmio"),
        ("d0002000.virtio_mmio", "virtio-mmio"),
        ("3f8.serial", "of_serial"),
        ("poweroff", "syscon-poweroff"),
    ] {
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with(&format!("{dev}:{driver}:"))),
            "{dev} not bound to {driver}: {devices:?}"
        );
    }
    assert!(
        out.kmsg_has("Virtual Wire compatibility mode") && out.kmsg_has("IOAPIC[0]"),
        "LAPIC/IOAPIC not taken from the tree\n{}",
        out.transcript()
    );
    assert!(!out.kmsg_has("ACPI: VIOT"), "ACPI tables seen in DT mode");
    assert_eq!(out.fact("cpus.nproc"), "2", "{}", out.transcript());
    assert_eq!(out.fact("cpus.online"), "2", "{}", out.transcript());
    out.assert_check("serial-irq");
    let line = out.fact("serial-irq.line");
    assert!(line.contains("IO-APIC") && line.contains("ttyS0"), "{line}");
    assert_eq!(out.stat("/interrupts/signal_msi"), 0);

    // virtio-iommu bound from DT; only the disk with `iommus` is behind it.
    assert!(
        out.kmsg_has("virtio_iommu virtio0"),
        "virtio-iommu did not bind\n{}",
        out.transcript()
    );
    assert!(
        out.kmsg_has("d0001000.virtio_mmio: Adding to iommu group"),
        "the disk is in no IOMMU group\n{}",
        out.transcript()
    );
    assert!(
        !out.kmsg_has("deferred probe pending"),
        "a device never probed\n{}",
        out.transcript()
    );
    let groups = out
        .facts
        .get("iommu-groups.device")
        .cloned()
        .unwrap_or_default();
    assert!(
        groups.iter().any(|g| g.contains(":d0001000.virtio_mmio:")),
        "{groups:?}"
    );
    assert!(
        !groups.iter().any(|g| g.contains("d0002000")),
        "the iommu=off disk is in an IOMMU group: {groups:?}"
    );
    assert_eq!(out.fact("iommu-groups.devices"), "1");
    assert_disk_written(&out, &disk);
    assert_every_thread_filtered(&out, &["vmm", "vcpu0", "vcpu1", "viommu", "vblk0", "vblk1"]);
    let (map, unmap, attach) = (
        out.stat("/iommu/requests/map/ok"),
        out.stat("/iommu/requests/unmap/ok"),
        out.stat("/iommu/requests/attach/ok"),
    );
    println!("IOMMU_COUNTS map={map} unmap={unmap} attach={attach}");
    assert!(map > 0 && unmap > 0, "no MAP/UNMAP traffic: {map}/{unmap}");
    assert_eq!(attach, 1, "only the first disk's endpoint attaches");
    assert_eq!(out.stat("/iommu/faults"), 0, "endpoint DMA faulted");
    assert_eq!(out.stat("/disks/0/errors"), 0);
    assert_eq!(
        out.stat("/disks/1/writes"),
        0,
        "nothing writes the bypass disk"
    );
}

/// SIGTERM stops a running VM promptly with its own exit status and one line saying why.
#[test]
fn sigterm_stops_the_vmm_cleanly() {
    let image = guest_image();
    let mut run = GuestRun::new(&image, &image.vmlinux, "sleep");
    run.cmdline.push("guest.sleep_ms=600000".into());
    run.timeout = Duration::from_secs(120);
    run.kill_after = Some((Duration::from_secs(5), libc_sigterm()));
    let out = run.run();
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(128 + 15),
        "{}",
        out.transcript()
    );
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("stopped by signal 15")),
        "{}",
        out.transcript()
    );
    assert!(
        out.elapsed < Duration::from_secs(30),
        "stop took {:?}",
        out.elapsed
    );
}

fn libc_sigterm() -> i32 {
    libc::SIGTERM
}
