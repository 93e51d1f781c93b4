//! The VMM's marker register (port 0x640, 32-bit): each write makes the VMM snapshot its
//! counters, so host-side tests can tell what happened between two points of the guest's
//! timeline. Mark 1 = init reached (the VMM's boot timer); check number `k` (0-based) is
//! bracketed by marks `16 + 2k` (start) and `17 + 2k` (end); a check's own sub-phase marks
//! ([`phase_mark`]) are numbered from [`MARK_PHASE_BASE`] up. Every mark is announced with a
//! `GUEST_MARK <id> <label>` line.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::emit;

/// The VMM's marker port (vmm `arch::layout::MARKER_PORT`).
const MARKER_PORT: u16 = 0x640;
/// Mark written once userspace runs.
pub const MARK_INIT: u32 = 1;
/// First ID of the sub-phase marks a check writes itself (`<check>.<phase>`), in writing order;
/// far above the check marks (`16 + 2k`).
pub const MARK_PHASE_BASE: u32 = 0x1_0000;

static NEXT_PHASE: AtomicU32 = AtomicU32::new(MARK_PHASE_BASE);

/// Port access for this process; false when not permitted (then marks are not written).
pub fn enable() -> bool {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(MARKER_PORT), 4, 1) };
    if rc != 0 {
        emit(&format!(
            "GUEST_FACT marker.error=ioperm: {}",
            std::io::Error::last_os_error()
        ));
    }
    rc == 0
}

/// Writes mark `id` (when `enabled`) and announces it.
pub fn mark(enabled: bool, id: u32, label: &str) {
    if enabled {
        // SAFETY: ioperm granted this port; a port write touches no memory of this process.
        unsafe {
            std::arch::asm!("out dx, eax", in("dx") MARKER_PORT, in("eax") id, options(nomem, nostack, preserves_flags));
        }
    }
    emit(&format!("GUEST_MARK {id} {label}"));
}

/// The start and end marks of check number `k`.
pub fn check_marks(k: usize) -> (u32, u32) {
    let k = u32::try_from(k).unwrap_or(u32::MAX / 2 - 16);
    (16 + 2 * k, 17 + 2 * k)
}

/// Writes the next sub-phase mark, labelled `<check>.<phase>` (see [`MARK_PHASE_BASE`]).
pub fn phase_mark(enabled: bool, check: &str, phase: &str) {
    let id = NEXT_PHASE.fetch_add(1, Ordering::Relaxed);
    mark(enabled, id, &format!("{check}.{phase}"));
}
