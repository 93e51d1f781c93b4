//! The counters printed at exit (`--stats`) or written as JSON (`--stats-json PATH`).
//!
//! JSON layout (flat numbers, hand-written; names are stable for tests and scripts):
//! ```text
//! { "exit", "exit_code", "elapsed_ms",
//!   "interrupts": { irqfd_triggers, userspace_injected, routing_updates, routes_rebuilt,
//!                   routes_in_use, irqfds },
//!   "serial": { irqs }, "ioapic": { rte_writes, eois },
//!   "virtio": { irqs },
//!   "iommu": null | { requests: { attach|detach|map|unmap|probe|unknown:
//!                                 { ok, ioerr, unsupp, deverr, inval, range, noent, fault,
//!                                   nomem, no_status } },
//!                     domains, mappings, iotlb_lookups, iotlb_fills, faults,
//!                     events_delivered, events_dropped },
//!   "disks": [ { reads, writes, flushes, get_id, unsupported, errors, bytes_read,
//!                bytes_written } ],
//!   "irqs_blocked",
//!   "remap": null | { iec_global, iec_selective, wait_descriptors, ignored_descriptors,
//!                     queue_errors, translations, passthrough, blocked, blocked_by: {...},
//!                     faults_recorded, fault_events, completion_events } }
//! ```

use devices::remap::RemapStats;
use devices::virtio::iommu::IommuStats;

use crate::config::VmConfig;
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

fn iommu_json(s: &IommuStats) -> String {
    let reqs: Vec<String> = IOMMU_REQUEST_TYPES
        .iter()
        .enumerate()
        .map(|(t, name)| {
            let by_status: Vec<String> = IOMMU_STATUSES
                .iter()
                .enumerate()
                .map(|(st, sname)| format!("\"{sname}\":{}", s.requests[t][st]))
                .collect();
            format!("\"{name}\":{{{}}}", by_status.join(","))
        })
        .collect();
    format!(
        "{{\"requests\":{{{}}},\"domains\":{},\"mappings\":{},\"iotlb_lookups\":{},\"iotlb_fills\":{},\"faults\":{},\"events_delivered\":{},\"events_dropped\":{}}}",
        reqs.join(","),
        s.domains,
        s.mappings,
        s.iotlb_lookups,
        s.iotlb_fills,
        s.faults,
        s.events_delivered,
        s.events_dropped
    )
}

fn remap_json(r: &RemapStats) -> String {
    let b = &r.blocked;
    format!(
        concat!(
            "{{\"iec_global\":{},\"iec_selective\":{},\"wait_descriptors\":{},\"ignored_descriptors\":{},",
            "\"queue_errors\":{},\"translations\":{},\"passthrough\":{},\"blocked\":{},",
            "\"blocked_by\":{{\"request_reserved\":{},\"index_out_of_bounds\":{},\"not_present\":{},",
            "\"table_read_failed\":{},\"irte_reserved\":{},\"compatibility_blocked\":{},",
            "\"source_id_mismatch\":{},\"remapping_disabled\":{}}},",
            "\"faults_recorded\":{},\"fault_events\":{},\"completion_events\":{}}}"
        ),
        r.iec_global,
        r.iec_selective,
        r.wait_descriptors,
        r.ignored_descriptors,
        r.queue_errors,
        r.translations,
        r.passthrough,
        b.total(),
        b.request_reserved,
        b.index_out_of_bounds,
        b.not_present,
        b.table_read_failed,
        b.irte_reserved,
        b.compatibility_blocked,
        b.source_id_mismatch,
        b.remapping_disabled,
        r.faults_recorded,
        r.fault_events,
        r.completion_events
    )
}

/// Renders the counters as one JSON object.
pub fn to_json(o: &RunOutcome) -> String {
    let i = &o.interrupts;
    let iommu = o
        .devices
        .iommu
        .as_ref()
        .map_or("null".to_owned(), iommu_json);
    let disks: Vec<String> = o
        .devices
        .disks
        .iter()
        .map(|d| {
            format!(
                "{{\"reads\":{},\"writes\":{},\"flushes\":{},\"get_id\":{},\"unsupported\":{},\"errors\":{},\"bytes_read\":{},\"bytes_written\":{}}}",
                d.reads, d.writes, d.flushes, d.get_id, d.unsupported, d.errors, d.bytes_read, d.bytes_written
            )
        })
        .collect();
    format!(
        concat!(
            "{{\"exit\":\"{}\",\"exit_code\":{},\"elapsed_ms\":{},",
            "\"interrupts\":{{\"irqfd_triggers\":{},\"userspace_injected\":{},",
            "\"routing_updates\":{},\"routes_rebuilt\":{},\"routes_in_use\":{},\"irqfds\":{}}},",
            "\"serial\":{{\"irqs\":{}}},",
            "\"ioapic\":{{\"rte_writes\":{},\"eois\":{}}},",
            "\"virtio\":{{\"irqs\":{}}},\"iommu\":{},\"disks\":[{}],",
            "\"irqs_blocked\":{},\"remap\":{}}}"
        ),
        o.exit.describe().replace('"', "'"),
        o.exit.exit_code(),
        o.elapsed.as_millis(),
        i.irqfd_triggers,
        i.signal_msi,
        i.routing_updates,
        i.routes_rebuilt,
        i.routes_in_use,
        i.irqfds,
        o.serial_irqs,
        o.ioapic.rte_writes,
        o.ioapic.eois,
        o.devices.virtio_irqs,
        iommu,
        disks.join(","),
        o.irqs_blocked,
        o.remap.as_ref().map_or("null".to_owned(), remap_json),
    )
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
            "vmm: stats: interrupts irqfd_triggers={} userspace_injected={} routing_updates={} routes_rebuilt={} routes_in_use={} irqfds={}",
            i.irqfd_triggers, i.signal_msi, i.routing_updates, i.routes_rebuilt, i.routes_in_use, i.irqfds
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
