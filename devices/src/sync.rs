// SPDX-License-Identifier: Apache-2.0

//! The one way this project takes a lock.
//!
//! A poisoned lock means a thread panicked half-way through an update: the state behind it
//! (mapping tables, routes, device registers) may be inconsistent, and an IOMMU must not keep
//! deciding on half-applied state. So poisoning is fatal: these helpers panic, and the VMM's
//! panic hook turns any panic into a one-line reason and the documented exit code (the VM
//! stops; it never limps on with a dead thread).

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

const POISONED: &str = "lock poisoned: another thread panicked while holding it";

/// Locks `m`; panics (fatal for the VMM) if a holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect(POISONED)
}

/// Read-locks `l`; panics (fatal for the VMM) if a writer panicked.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().expect(POISONED)
}

/// Write-locks `l`; panics (fatal for the VMM) if a holder panicked.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().expect(POISONED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn poisoned_lock_is_fatal_not_recovered() {
        let m = Arc::new(Mutex::new(1));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = lock(&m2);
            panic!("holder panics");
        })
        .join();
        let r = std::panic::catch_unwind(|| *lock(&m));
        assert!(r.is_err(), "a poisoned lock must not be silently recovered");
    }
}
