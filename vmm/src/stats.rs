//! The counters printed at exit (`--stats`) or written as JSON (`--stats-json PATH`).

use crate::config::VmConfig;
use crate::vm::{RunOutcome, VmError};

/// Renders the counters as one JSON object (hand-written: flat numbers only).
pub fn to_json(o: &RunOutcome) -> String {
    let i = &o.interrupts;
    format!(
        concat!(
            "{{\"exit\":\"{}\",\"exit_code\":{},\"elapsed_ms\":{},",
            "\"interrupts\":{{\"irqfd_triggers\":{},\"userspace_injected\":{},",
            "\"routing_updates\":{},\"routes_rebuilt\":{},\"routes_in_use\":{},\"irqfds\":{}}},",
            "\"serial\":{{\"irqs\":{}}},",
            "\"ioapic\":{{\"rte_writes\":{},\"eois\":{}}}}}"
        ),
        o.exit.describe().replace('"', "'"),
        o.exit.exit_code(),
        o.elapsed.as_millis(),
        i.irqfd_triggers,
        i.userspace_injected,
        i.routing_updates,
        i.routes_rebuilt,
        i.routes_in_use,
        i.irqfds,
        o.serial_irqs,
        o.ioapic.rte_writes,
        o.ioapic.eois,
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
            i.irqfd_triggers, i.userspace_injected, i.routing_updates, i.routes_rebuilt, i.routes_in_use, i.irqfds
        );
        eprintln!(
            "vmm: stats: serial irqs={} ioapic rte_writes={} eois={}",
            o.serial_irqs, o.ioapic.rte_writes, o.ioapic.eois
        );
    }
    if let Some(path) = &cfg.stats_json {
        std::fs::write(path, to_json(o)).map_err(|e| VmError::Stats(path.clone(), e))?;
    }
    Ok(())
}
