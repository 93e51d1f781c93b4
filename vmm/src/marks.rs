//! Counter snapshots at guest-written marks (`devices::marker`), for `--stats-json`.
//!
//! Each mark the guest writes records the time since VMM start and the value of every
//! registered counter. Counters are read from atomics only: the snapshot runs on the writing
//! vCPU and must never wait for a device lock (a worker may hold one across disk I/O).
//! At most [`MAX_MARKS`] are kept; further ones are counted as dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use devices::marker::{MarkSink, MARK_INIT};
use serde::Serialize;

/// Marks kept per run (a guest writing in a loop must not grow the VMM's memory).
pub const MAX_MARKS: usize = 1024;

/// A counter read at each mark.
pub type CounterFn = Box<dyn Fn() -> u64 + Send + Sync>;

/// One guest-written mark.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mark {
    /// The value the guest wrote.
    pub id: u32,
    /// Milliseconds since the VMM started.
    pub t_ms: u64,
    /// Every registered counter at that moment.
    pub counters: BTreeMap<String, u64>,
}

/// The marks of one run, as reported.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MarkReport {
    /// VMM start → the first [`MARK_INIT`] write (the guest's init running), if it came.
    pub boot_to_init_ms: Option<u64>,
    /// Marks in the order they were written.
    pub marks: Vec<Mark>,
    /// Marks not kept because [`MAX_MARKS`] were already recorded.
    pub marks_dropped: u64,
}

/// Records marks; shared between the marker device (as its sink) and the VMM.
pub struct MarkRecorder {
    start: Instant,
    counters: OnceLock<Vec<(String, CounterFn)>>,
    marks: Mutex<Vec<Mark>>,
    dropped: AtomicU64,
    on_init: OnceLock<InitHook>,
}

/// Runs once, on the vCPU, when the guest's first init mark arrives.
pub type InitHook = Box<dyn Fn() + Send + Sync>;

impl MarkRecorder {
    /// A recorder whose times count from `start`.
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(MarkRecorder {
            start,
            counters: OnceLock::new(),
            marks: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            on_init: OnceLock::new(),
        })
    }

    /// Sets the counters every mark records (once, when the VM is built; marks written before
    /// that carry no counters).
    pub fn set_counters(&self, counters: Vec<(String, CounterFn)>) {
        if self.counters.set(counters).is_err() {
            log::warn!("marks: counters were already set");
        }
    }

    /// Sets what runs at the guest's first init mark (the mid-boot overhead sample).
    pub fn set_on_init(&self, hook: InitHook) {
        if self.on_init.set(hook).is_err() {
            log::warn!("marks: init hook was already set");
        }
    }

    fn record(&self, id: u32) {
        let t_ms = self.start.elapsed().as_millis() as u64;
        let counters = self
            .counters
            .get()
            .map(|c| c.iter().map(|(name, f)| (name.clone(), f())).collect())
            .unwrap_or_default();
        let mut marks = devices::sync::lock(&self.marks);
        if marks.len() >= MAX_MARKS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first_init = id == MARK_INIT && !marks.iter().any(|m| m.id == MARK_INIT);
        if first_init {
            log::info!("Guest init reached after {t_ms} ms");
        }
        marks.push(Mark { id, t_ms, counters });
        drop(marks);
        if first_init {
            if let Some(hook) = self.on_init.get() {
                hook();
            }
        }
    }

    /// What was recorded so far.
    pub fn report(&self) -> MarkReport {
        let marks = devices::sync::lock(&self.marks).clone();
        MarkReport {
            boot_to_init_ms: marks.iter().find(|m| m.id == MARK_INIT).map(|m| m.t_ms),
            marks,
            marks_dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The marker device's sink: a handle on the shared recorder.
pub struct RecorderSink(pub Arc<MarkRecorder>);

impl MarkSink for RecorderSink {
    fn mark(&self, id: u32) {
        self.0.record(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_snapshot_counters_and_the_first_init_mark_is_the_boot_time() {
        let rec = MarkRecorder::new(Instant::now());
        let sink = RecorderSink(rec.clone());
        sink.mark(5); // before the counters exist
        let n = Arc::new(AtomicU64::new(10));
        let n2 = n.clone();
        rec.set_counters(vec![(
            "x".into(),
            Box::new(move || n2.load(Ordering::Relaxed)),
        )]);
        sink.mark(MARK_INIT);
        n.store(12, Ordering::Relaxed);
        sink.mark(2);
        sink.mark(MARK_INIT);
        let r = rec.report();
        assert_eq!(r.marks.len(), 4);
        assert!(r.marks[0].counters.is_empty());
        assert_eq!(r.marks[1].counters["x"], 10);
        assert_eq!(r.marks[2].counters["x"], 12);
        assert_eq!(r.boot_to_init_ms, Some(r.marks[1].t_ms));
    }

    #[test]
    fn a_guest_writing_marks_in_a_loop_is_bounded() {
        let rec = MarkRecorder::new(Instant::now());
        let sink = RecorderSink(rec.clone());
        for i in 0..(MAX_MARKS as u32 + 10) {
            sink.mark(i);
        }
        let r = rec.report();
        assert_eq!(r.marks.len(), MAX_MARKS);
        assert_eq!(r.marks_dropped, 10);
    }
}
