// SPDX-License-Identifier: Apache-2.0

//! Rate limiting for every log message a guest can trigger.
//!
//! A hostile guest can make a device model fail a request millions of times per second; each
//! failure deserves a diagnostic, but the VMM's log must not become the guest's megaphone. All
//! devices share **one token bucket** ([`GUEST_LOG`]): [`BURST`] messages may go out at once,
//! then [`REFILL_PER_SEC`] per second. Messages that find the bucket empty are counted and
//! dropped; the next message that gets through says how many were suppressed.
//!
//! Use [`guest_warn!`](crate::guest_warn) / [`guest_debug!`](crate::guest_debug) for
//! messages caused by guest input. Dependencies that log guest-caused conditions themselves
//! (virtio-queue prints an `error!` for every malformed descriptor chain) are tamed by
//! [`GuestLogFilter`], a [`log::Log`] wrapper the VMM installs around its logger: records from
//! those crates are re-levelled to `debug` and pass through the same bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Messages that may be logged back to back before the rate applies.
pub const BURST: u64 = 20;
/// Messages per second allowed once the burst is used up.
pub const REFILL_PER_SEC: u64 = 5;

/// Crates whose own log records describe guest-caused conditions (malformed chains, bad
/// addresses). [`GuestLogFilter`] re-levels them to `debug` and rate limits them.
pub const GUEST_TRIGGERED_TARGETS: &[&str] = &["virtio_queue", "vm_memory"];

/// A token bucket with a suppressed-message count.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<Option<BucketState>>,
    suppressed: AtomicU64,
    burst: u64,
    per_sec: u64,
}

#[derive(Debug)]
struct BucketState {
    /// Tokens in millitokens, so refill needs no floats.
    milli: u64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens, refilled at `per_sec` tokens per second.
    pub const fn new(burst: u64, per_sec: u64) -> Self {
        Self {
            state: Mutex::new(None),
            suppressed: AtomicU64::new(0),
            burst,
            per_sec,
        }
    }

    /// Takes a token. `Some(n)` = log now, `n` earlier messages were suppressed;
    /// `None` = drop this one (it is counted).
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        // The state is two integers updated together under the lock: a poisoned lock still
        // holds a consistent value.
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = guard.get_or_insert(BucketState {
            milli: self.burst * 1000,
            last: now,
        });
        let elapsed_ms = now
            .duration_since(st.last)
            .as_millis()
            .min(u128::from(u32::MAX)) as u64;
        if elapsed_ms > 0 {
            st.milli = (st.milli + elapsed_ms * self.per_sec).min(self.burst * 1000);
            st.last = now;
        }
        if st.milli >= 1000 {
            st.milli -= 1000;
            drop(guard);
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Messages dropped since the last admitted one.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// The bucket shared by every guest-triggerable message of the process.
pub static GUEST_LOG: TokenBucket = TokenBucket::new(BURST, REFILL_PER_SEC);

/// Logs `args` at `level` if the shared bucket admits it (the level filter is checked first,
/// so disabled messages cost no token). Used by [`guest_warn!`](crate::guest_warn).
pub fn guest_log(level: Level, target: &str, args: std::fmt::Arguments<'_>) {
    if level > log::max_level() {
        return;
    }
    if let Some(suppressed) = GUEST_LOG.admit() {
        if suppressed > 0 {
            log::log!(target: target, level, "{args} ({suppressed} similar guest-triggered messages suppressed)");
        } else {
            log::log!(target: target, level, "{args}");
        }
    }
}

/// `warn!` for a condition a guest can cause: rate limited by the shared bucket.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::ratelimit::guest_log(log::Level::Warn, module_path!(), format_args!($($arg)+))
    };
}

/// `debug!` for a condition a guest can cause: rate limited by the shared bucket.
#[macro_export]
macro_rules! guest_debug {
    ($($arg:tt)+) => {
        $crate::ratelimit::guest_log(log::Level::Debug, module_path!(), format_args!($($arg)+))
    };
}

/// A [`Log`] wrapper that re-levels records of [`GUEST_TRIGGERED_TARGETS`] to `debug` and
/// passes them through [`GUEST_LOG`]; every other record goes to the inner logger unchanged.
pub struct GuestLogFilter<L> {
    inner: L,
    /// The most verbose level the inner logger accepts.
    max: LevelFilter,
}

impl<L: Log> GuestLogFilter<L> {
    /// Wraps `inner`, which accepts records up to `max`.
    pub fn new(inner: L, max: LevelFilter) -> Self {
        Self { inner, max }
    }

    fn guest_triggered(target: &str) -> bool {
        GUEST_TRIGGERED_TARGETS
            .iter()
            .any(|t| target == *t || target.strip_prefix(t).is_some_and(|r| r.starts_with("::")))
    }
}

impl<L: Log> Log for GuestLogFilter<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        if Self::guest_triggered(metadata.target()) {
            return self.max >= LevelFilter::Debug;
        }
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !Self::guest_triggered(record.target()) {
            self.inner.log(record);
            return;
        }
        if self.max < LevelFilter::Debug {
            return;
        }
        let Some(suppressed) = GUEST_LOG.admit() else {
            return;
        };
        let args = record.args();
        let note = if suppressed > 0 {
            format!(" ({suppressed} similar guest-triggered messages suppressed)")
        } else {
            String::new()
        };
        self.inner.log(
            &Record::builder()
                .level(Level::Debug)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .args(format_args!("{args}{note}"))
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_admits_burst_then_suppresses_and_reports_the_count() {
        let b = TokenBucket::new(3, 0);
        assert_eq!(b.admit(), Some(0));
        assert_eq!(b.admit(), Some(0));
        assert_eq!(b.admit(), Some(0));
        for _ in 0..10 {
            assert_eq!(b.admit(), None);
        }
        assert_eq!(b.suppressed(), 10);
    }

    #[test]
    fn bucket_refills_over_time() {
        let b = TokenBucket::new(1, 1000);
        assert_eq!(b.admit(), Some(0));
        assert_eq!(b.admit(), None);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            b.admit(),
            Some(1),
            "refilled, and says one message was dropped"
        );
    }

    #[test]
    fn dependency_targets_match_by_crate_path() {
        type F = GuestLogFilter<NoLog>;
        assert!(F::guest_triggered("virtio_queue"));
        assert!(F::guest_triggered("virtio_queue::chain"));
        assert!(!F::guest_triggered("virtio_queue_x"));
        assert!(!F::guest_triggered("devices::virtio"));
    }

    struct NoLog;
    impl Log for NoLog {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, _: &Record<'_>) {}
        fn flush(&self) {}
    }
}
