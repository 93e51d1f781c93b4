// SPDX-License-Identifier: Apache-2.0

//! A bus that dispatches guest accesses to devices by address.
//!
//! The same [`Bus`] type serves port I/O (addresses are port numbers) and MMIO (addresses are
//! guest physical addresses). Each device owns one half-open range `[base, base + len)` and sees
//! offsets relative to `base`.
//!
//! Devices are stored as `Arc<Mutex<dyn BusDevice>>`, so the VMM can keep its own typed handle
//! (`Arc<Mutex<Ioapic>>`, say) to the same device it puts on the bus. A [`Bus`] is `Send + Sync`:
//! build it at setup, then share it between vCPU threads behind an `Arc<Bus>`. Cloning a bus
//! clones the range table and shares the devices.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::debug;

/// A device that answers guest reads and writes in its bus range.
///
/// `offset` is relative to the base the device was inserted at; `data.len()` is the access size.
/// Both come straight from the guest: implementations must not panic on any offset or size.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes at `offset`, filling `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device range must cover at least one address.
    #[error("Bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Requested base address.
        base: u64,
    },
    /// `base + len` does not fit in a `u64`.
    #[error("Bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Requested base address.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The range intersects a device already on the bus.
    #[error("Bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Requested base address.
        base: u64,
        /// Requested length.
        len: u64,
        /// Base of the device already there.
        other_base: u64,
        /// Length of the device already there.
        other_len: u64,
    },
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    name: Arc<str>,
    /// Guest accesses dispatched to this device: each one is a VM exit that reached the VMM.
    exits: Arc<AtomicU64>,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// How many guest accesses (VM exits handled in userspace) one device on a bus received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusExits {
    /// The name the device was inserted with.
    pub name: String,
    /// Base address (port number on the I/O bus).
    pub base: u64,
    /// Reads plus writes dispatched to it.
    pub exits: u64,
}

/// Address-keyed table of devices; see the [module documentation](self).
///
/// Every access dispatched to a device is counted ([`Bus::exits`]), as are accesses no
/// device claims: these are the exits that reach the VMM, the figure that shows whether a
/// data path stays inside KVM.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by base address; ranges never overlap (checked in [`Bus::insert`]).
    devices: BTreeMap<u64, BusEntry>,
    unclaimed: Arc<AtomicU64>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.devices
                    .iter()
                    .map(|(base, e)| format!("{base:#x}+{:#x}", e.len)),
            )
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Puts `device` on the bus at `[base, base + len)`.
    ///
    /// Refuses an empty range, a range that wraps past `u64::MAX`, and any overlap with a device
    /// already on the bus. Adjacent ranges are fine.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_named(&format!("device@{base:#x}"), device, base, len)
    }

    /// [`Bus::insert`] with the name under which the device's exits are reported.
    pub fn insert_named(
        &mut self,
        name: &str,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The only candidate for an overlap is the last device starting before our end: any
        // earlier one ends before it starts (ranges on the bus are disjoint).
        if let Some((&other_base, other)) = self.devices.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.devices.insert(
            base,
            BusEntry {
                len,
                name: name.into(),
                exits: Arc::default(),
                device,
            },
        );
        Ok(())
    }

    /// Accesses dispatched to each device so far, in address order.
    pub fn exits(&self) -> Vec<BusExits> {
        self.devices
            .iter()
            .map(|(&base, e)| BusExits {
                name: e.name.to_string(),
                base,
                exits: e.exits.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Each device's exit counter (shared: it keeps counting), for live snapshots.
    pub fn exit_counters(&self) -> Vec<(String, Arc<AtomicU64>)> {
        self.devices
            .values()
            .map(|e| (e.name.to_string(), e.exits.clone()))
            .collect()
    }

    /// Accesses that no device claimed (answered all-ones or dropped).
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the bus has no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Finds the device whose range holds the whole access `[addr, addr + size)`, and the
    /// offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &BusEntry)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let fits = (size as u64)
            .checked_add(offset)
            .is_some_and(|end| end <= entry.len);
        if !fits {
            if offset < entry.len {
                debug!(
                    "bus: {size}-byte access at {addr:#x} crosses the end of the device at \
                     {base:#x}+{:#x}",
                    entry.len
                );
            }
            return None;
        }
        Some((offset, entry))
    }

    /// Reads `data.len()` bytes at `addr` from the device there.
    ///
    /// Returns `false`, leaving `data` untouched, when no single device holds the whole access;
    /// the caller logs it and answers all-ones, as an unclaimed bus does.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => {
                entry.exits.fetch_add(1, Ordering::Relaxed);
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Writes `data` at `addr` to the device there.
    ///
    /// Returns `false` when no single device holds the whole access; the write is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => {
                entry.exits.fetch_add(1, Ordering::Relaxed);
                lock(&entry.device).write(offset, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Locks a device; a device poisoned by a panic is fatal ([`crate::sync`]).
fn lock(device: &Mutex<dyn BusDevice>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    crate::sync::lock(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with `offset` repeated.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        reads: usize,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads += 1;
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bus>();
        assert_send_sync::<Arc<Bus>>();
    }

    #[test]
    fn bus_rejects_zero_length() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert!(bus.is_empty());
    }

    #[test]
    fn bus_rejects_wrapping_range() {
        let mut bus = Bus::new();
        assert!(matches!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
        // The exclusive end must fit in a u64, so the very last address cannot be covered
        // (nothing lives there); the one before it can.
        assert!(matches!(
            bus.insert(recorder(), u64::MAX, 1),
            Err(BusError::Overflow { .. })
        ));
        assert!(bus.insert(recorder(), u64::MAX - 1, 1).is_ok());
    }

    #[test]
    fn bus_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        // Same base, starts inside, ends inside, covers it entirely.
        for (base, len) in [(0x100, 1), (0x10f, 0x10), (0xf8, 0x9), (0x0, 0x1000)] {
            assert_eq!(
                bus.insert(recorder(), base, len),
                Err(BusError::Overlap {
                    base,
                    len,
                    other_base: 0x100,
                    other_len: 0x10
                }),
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(bus.len(), 1);
    }

    #[test]
    fn bus_accepts_adjacent_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
        bus.insert(recorder(), 0x110, 0x10).unwrap();
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn bus_dispatches_with_relative_offset() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();

        assert!(bus.write(0x3fb, &[0xaa]));
        assert_eq!(dev.lock().unwrap().last_write, Some((3, vec![0xaa])));

        let mut data = [0u8; 2];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5, 5]);
    }

    #[test]
    fn bus_picks_the_right_device_among_several() {
        let mut bus = Bus::new();
        let low = recorder();
        let high = recorder();
        bus.insert(low.clone(), 0x1000, 0x1000).unwrap();
        bus.insert(high.clone(), 0x2000, 0x1000).unwrap();

        assert!(bus.write(0x2004, &[1, 2, 3, 4]));
        assert!(low.lock().unwrap().last_write.is_none());
        assert_eq!(high.lock().unwrap().last_write, Some((4, vec![1, 2, 3, 4])));
    }

    #[test]
    fn unclaimed_access_returns_false_and_leaves_data() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();

        let mut data = [0xffu8; 4];
        assert!(!bus.read(0xff, &mut data));
        assert!(!bus.read(0x110, &mut data));
        assert!(!bus.write(0x0, &[0]));
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn access_crossing_device_end_is_unclaimed() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();

        let mut data = [0u8; 4];
        assert!(!bus.read(0x10e, &mut data));
        assert!(!bus.write(0x10d, &[0; 4]));
        assert_eq!(dev.lock().unwrap().reads, 0);
        // Exactly up to the end is fine.
        assert!(bus.read(0x10c, &mut data));
    }

    #[test]
    fn poisoned_device_is_fatal() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();

        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = dev.lock().unwrap();
            panic!("poison the device mutex");
        }));
        assert!(dev.is_poisoned());

        let mut data = [0u8; 1];
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bus.read(0x101, &mut data)));
        assert!(
            r.is_err(),
            "a device left half-updated by a panic must not be used again"
        );
    }

    #[test]
    fn cloned_bus_shares_devices() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        let clone = bus.clone();

        assert!(clone.write(0x102, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((2, vec![7])));
    }
}

#[cfg(test)]
mod exit_count_tests {
    use super::*;

    struct Nop;
    impl BusDevice for Nop {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn every_dispatched_access_is_counted_per_device_and_clones_share_counts() {
        let mut bus = Bus::new();
        bus.insert_named("a", Arc::new(Mutex::new(Nop)), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Nop)), 0x200, 0x10).unwrap();
        let clone = bus.clone();
        let mut d = [0u8; 4];
        assert!(bus.read(0x104, &mut d));
        assert!(clone.write(0x100, &[1]));
        assert!(clone.write(0x20c, &[1, 2, 3, 4]));
        assert!(!bus.read(0x300, &mut d), "nobody there");
        assert!(!bus.write(0x10e, &[0; 4]), "crosses the end of a");
        let exits = bus.exits();
        assert_eq!(
            exits,
            vec![
                BusExits {
                    name: "a".into(),
                    base: 0x100,
                    exits: 2
                },
                BusExits {
                    name: "device@0x200".into(),
                    base: 0x200,
                    exits: 1
                },
            ]
        );
        assert_eq!(bus.unclaimed(), 2);
    }
}
