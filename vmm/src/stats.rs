//! The counters printed at exit (`--stats`) or written as JSON (`--stats-json PATH`).
//!
//! JSON layout (serde; names are stable for tests and scripts):
//! ```text
//! { "exit", "exit_code", "elapsed_ms",
//!   "boot_to_init_ms": null | ms from VMM start to the guest's first mark 1 (its init),
//!   "marks": [ { id, t_ms, counters: { NAME: value } } ], "marks_dropped",
//!   "interrupts": { irqfd_triggers, signal_msi, ioapic_eoi_exits, routing_updates,
//!                   routes_rebuilt, irqfds, blocked_requests, fault_events, routes_in_use,
//!                   parked },
//!   "serial": { irqs }, "ioapic": { rte_writes, eois },
//!   "virtio": { irqs },
//!   "iommu": null | { requests: { attach|detach|map|unmap|probe|unknown:
//!                                 { ok, ioerr, unsupp, deverr, inval, range, noent, fault,
//!                                   nomem, no_status } },
//!                     domains, mappings, iotlb_lookups, iotlb_fills, faults,
//!                     events_delivered, events_dropped },
//!   "disks": [ { reads, writes, flushes, get_id, unsupported, errors, bytes_read,
//!                bytes_written, mmio_exits } ],
//!   "exits": { mmio: { DEVICE: n }, pio: { DEVICE: n }, mmio_unclaimed, pio_unclaimed },
//!   "irqs_blocked",
//!   "overhead": { first_kvm_run_ms, rss_mid_boot_kib, threads_mid_boot, rss_exit_kib,
//!                 threads, cpu_vcpu_ms, cpu_vmm_ms } (null when not measured; RSS excludes
//!                 guest RAM; mid boot = the guest's init mark; CPU from /proc/self/task),
//!   "remap": null | { iec_global, iec_selective, wait_descriptors, ignored_descriptors,
//!                     queue_errors, translations, passthrough, blocked: { BY REASON },
//!                     blocked_total, faults_recorded, faults_suppressed,
//!                     faults_overflowed, fault_events, completion_events },
//!   "pvirq": null | { requests: { alloc, set, clear, free, bad_op },
//!                     statuses: { ok, bad_op, bad_source, no_space, bad_handle, bad_vector,
//!                                 bad_dest, bad_count },
//!                     bad_request_gpa, live_handles, translations, passthrough,
//!                     blocked: { not_present, not_owner, compatibility_blocked,
//!                                not_allocated, disabled },
//!                     blocked_total, page_reads, page_writes, ignored_accesses, resets } }
//! ```
//!
//! `pvirq` is there with `--iommu=pvremap` (PV-IR; docs/pv-irq-remap.md), `remap` with the
//! VT-d unit; the `interrupts` counters are the same for both.
//!
//! `exits` counts every guest register access the VMM handled (each is a VM exit to
//! userspace), by device: `ioapic`, `dmar` or `pvir`, `virtio-iommu`, `diskN` on MMIO; `serial`,
//! `acpi-pm`, `i8042`, `marker` on port I/O. Mark counters are the `interrupts` fields by
//! name, `mmio_exits.DEVICE`, `pio_exits.DEVICE`, and per virtio device `irqs.NAME`,
//! `NAME.isr_reads`, `NAME.interrupt_acks`, `diskN.requests`, and `cpu_ms.vcpus` /
//! `cpu_ms.vmm` (CPU time of the vCPU threads, guest included, and of the other threads).

use std::collections::BTreeMap;

use devices::bus::BusExits;
use devices::remap::RemapStats;
use devices::virtio::block::BlockStats;
use devices::virtio::iommu::IommuStats;
use devices::{IoapicStats, PvIrqStats};
use serde::Serialize;

use crate::config::VmConfig;
use crate::interrupts::InterruptCounters;
use crate::marks::MarkReport;
use crate::vm::{RunOutcome, VmError};

/// Request-type names, indexed like `IommuStats::requests` (0 = unknown type).
pub const IOMMU_REQUEST_TYPES: [&str; 6] = ["unknown", "attach", "detach", "map", "unmap", "probe"];
/// Status names, indexed like `IommuStats::requests[t]` (`VIRTIO_IOMMU_S_*`, then no status).
pub const IOMMU_STATUSES: [&str; 10] = [
    "ok",
    "ioerr",
    "unsupp",
    "deverr",
    "inval",
    "range",
    "noent",
    "fault",
    "nomem",
    "no_status",
];

/// The iommu counters with the request matrix keyed by type and status names.
#[derive(Serialize)]
struct IommuJson<'a> {
    requests: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    domains: u64,
    mappings: u64,
    iotlb_lookups: u64,
    iotlb_fills: u64,
    faults: u64,
    events_delivered: u64,
    events_dropped: u64,
    #[serde(skip)]
    _s: std::marker::PhantomData<&'a ()>,
}

impl<'a> IommuJson<'a> {
    fn new(s: &'a IommuStats) -> Self {
        let requests = IOMMU_REQUEST_TYPES
            .iter()
            .enumerate()
            .map(|(t, name)| {
                let by_status = IOMMU_STATUSES
                    .iter()
                    .enumerate()
                    .map(|(st, sname)| (*sname, s.requests_with(t as u8, st)))
                    .collect();
                (*name, by_status)
            })
            .collect();
        IommuJson {
            requests,
            domains: s.domains,
            mappings: s.mappings,
            iotlb_lookups: s.iotlb_lookups,
            iotlb_fills: s.iotlb_fills,
            faults: s.faults,
            events_delivered: s.events_delivered,
            events_dropped: s.events_dropped,
            _s: std::marker::PhantomData,
        }
    }
}

/// A disk's request counters plus the register exits its transport caused.
#[derive(Serialize)]
struct DiskJson<'a> {
    #[serde(flatten)]
    stats: &'a BlockStats,
    mmio_exits: u64,
}

#[derive(Serialize)]
struct RemapJson<'a> {
    #[serde(flatten)]
    stats: &'a RemapStats,
    blocked_total: u64,
}

#[derive(Serialize)]
struct PvIrqJson<'a> {
    #[serde(flatten)]
    stats: &'a PvIrqStats,
    blocked_total: u64,
}

#[derive(Serialize)]
struct Irqs {
    irqs: u64,
}

#[derive(Serialize)]
struct ExitsJson {
    mmio: BTreeMap<String, u64>,
    pio: BTreeMap<String, u64>,
    mmio_unclaimed: u64,
    pio_unclaimed: u64,
}

/// The whole `--stats-json` object.
#[derive(Serialize)]
struct StatsJson<'a> {
    exit: String,
    exit_code: i32,
    elapsed_ms: u64,
    #[serde(flatten)]
    marks: &'a MarkReport,
    interrupts: &'a InterruptCounters,
    serial: Irqs,
    ioapic: &'a IoapicStats,
    virtio: Irqs,
    iommu: Option<IommuJson<'a>>,
    disks: Vec<DiskJson<'a>>,
    exits: ExitsJson,
    irqs_blocked: u64,
    remap: Option<RemapJson<'a>>,
    pvirq: Option<PvIrqJson<'a>>,
    overhead: &'a crate::overhead::Overhead,
}

fn by_name(exits: &[BusExits]) -> BTreeMap<String, u64> {
    exits.iter().map(|e| (e.name.clone(), e.exits)).collect()
}

/// Renders the counters as one JSON object (layout in the module documentation).
pub fn to_json(o: &RunOutcome) -> String {
    let mmio = by_name(&o.exits.mmio);
    let json = StatsJson {
        exit: o.exit.describe(),
        exit_code: o.exit.exit_code(),
        elapsed_ms: o.elapsed.as_millis() as u64,
        marks: &o.marks,
        interrupts: &o.interrupts,
        serial: Irqs {
            irqs: o.serial_irqs,
        },
        ioapic: &o.ioapic,
        virtio: Irqs {
            irqs: o.devices.virtio_irqs,
        },
        iommu: o.devices.iommu.as_ref().map(IommuJson::new),
        disks: o
            .devices
            .disks
            .iter()
            .enumerate()
            .map(|(i, stats)| DiskJson {
                stats,
                mmio_exits: o
                    .devices
                    .disk_names
                    .get(i)
                    .and_then(|n| mmio.get(n))
                    .copied()
                    .unwrap_or(0),
            })
            .collect(),
        exits: ExitsJson {
            mmio,
            pio: by_name(&o.exits.pio),
            mmio_unclaimed: o.exits.mmio_unclaimed,
            pio_unclaimed: o.exits.pio_unclaimed,
        },
        irqs_blocked: o.irqs_blocked,
        remap: o.remap.as_ref().map(|stats| RemapJson {
            stats,
            blocked_total: stats.blocked.total(),
        }),
        pvirq: o.pvirq.as_ref().map(|stats| PvIrqJson {
            stats,
            blocked_total: stats.blocked.total(),
        }),
        overhead: &o.overhead,
    };
    serde_json::to_string(&json).expect("counters serialize to JSON")
}

/// Prints and/or writes the counters as the configuration asks.
pub fn report(cfg: &VmConfig, o: &RunOutcome) -> Result<(), VmError> {
    if cfg.stats {
        let i = &o.interrupts;
        eprintln!(
            "vmm: stats: exit={:?} elapsed={:.1}s",
            o.exit,
            o.elapsed.as_secs_f64()
        );
        eprintln!(
            "vmm: stats: interrupts irqfd_triggers={} signal_msi={} ioapic_eoi_exits={} routing_updates={} routes_rebuilt={} routes_in_use={} irqfds={} blocked_requests={} fault_events={}",
            i.irqfd_triggers, i.signal_msi, i.ioapic_eoi_exits, i.routing_updates, i.routes_rebuilt, i.routes_in_use, i.irqfds, i.blocked_requests, i.fault_events
        );
        let exits = |v: &[BusExits]| {
            v.iter()
                .map(|e| format!("{}={}", e.name, e.exits))
                .collect::<Vec<_>>()
                .join(" ")
        };
        eprintln!(
            "vmm: stats: exits mmio {} unclaimed={}; pio {} unclaimed={}",
            exits(&o.exits.mmio),
            o.exits.mmio_unclaimed,
            exits(&o.exits.pio),
            o.exits.pio_unclaimed
        );
        if let Some(ms) = o.marks.boot_to_init_ms {
            eprintln!("vmm: stats: boot_to_init_ms={ms}");
        }
        let v = &o.overhead;
        let f = |x: Option<u64>| x.map_or("?".to_owned(), |x| x.to_string());
        eprintln!(
            "vmm: stats: overhead first_kvm_run_ms={} rss_mid_boot_kib={} rss_exit_kib={} threads={} cpu_vmm_ms={} cpu_vcpu_ms={}",
            f(v.first_kvm_run_ms), f(v.rss_mid_boot_kib), f(v.rss_exit_kib), f(v.threads), f(v.cpu_vmm_ms), f(v.cpu_vcpu_ms)
        );
        eprintln!(
            "vmm: stats: serial irqs={} ioapic rte_writes={} eois={} virtio irqs={}",
            o.serial_irqs, o.ioapic.rte_writes, o.ioapic.eois, o.devices.virtio_irqs
        );
        if let Some(s) = &o.devices.iommu {
            let line: Vec<String> = IOMMU_REQUEST_TYPES
                .iter()
                .enumerate()
                .skip(1)
                .map(|(t, name)| {
                    let total: u64 = s.requests[t].iter().sum();
                    format!("{name}={}/{}", s.requests[t][0], total)
                })
                .collect();
            eprintln!(
                "vmm: stats: iommu requests(ok/total) {} mappings={} iotlb_lookups={} iotlb_fills={} faults={} events={}",
                line.join(" "),
                s.mappings,
                s.iotlb_lookups,
                s.iotlb_fills,
                s.faults,
                s.events_delivered
            );
        }
        if let Some(r) = &o.remap {
            eprintln!(
                "vmm: stats: remap iec_global={} iec_selective={} waits={} queue_errors={} translations={} blocked={} faults={}",
                r.iec_global, r.iec_selective, r.wait_descriptors, r.queue_errors, r.translations, r.blocked.total(), r.faults_recorded
            );
        }
        if let Some(p) = &o.pvirq {
            eprintln!(
                "vmm: stats: pvirq alloc={} set={} clear={} free={} ok={} failed={} live_handles={} translations={} blocked={} page_reads={} page_writes={}",
                p.requests.alloc, p.requests.set, p.requests.clear, p.requests.free, p.statuses.ok,
                p.statuses.total() - p.statuses.ok, p.live_handles, p.translations, p.blocked.total(),
                p.page_reads, p.page_writes
            );
        }
        for (n, d) in o.devices.disks.iter().enumerate() {
            eprintln!(
                "vmm: stats: disk{n} reads={} writes={} flushes={} errors={} bytes_read={} bytes_written={}",
                d.reads, d.writes, d.flushes, d.errors, d.bytes_read, d.bytes_written
            );
        }
    }
    if let Some(path) = &cfg.stats_json {
        std::fs::write(path, to_json(o)).map_err(|e| VmError::Stats(path.clone(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvirq_json_has_requests_statuses_handles_blocked_and_page_accesses() {
        let mut stats = PvIrqStats::default();
        stats.requests.set = 3;
        stats.blocked.not_owner = 2;
        stats.blocked.not_present = 1;
        stats.live_handles = 5;
        stats.page_writes = 7;
        let json = serde_json::to_value(PvIrqJson {
            stats: &stats,
            blocked_total: stats.blocked.total(),
        })
        .unwrap();
        assert_eq!(json["requests"]["set"], 3);
        assert_eq!(json["statuses"]["ok"], 0);
        assert_eq!(json["live_handles"], 5);
        assert_eq!(json["blocked"]["not_owner"], 2);
        assert_eq!(json["blocked_total"], 3);
        assert_eq!(json["page_writes"], 7);
        assert!(json.get("page_reads").is_some());
    }
}
