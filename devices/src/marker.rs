// SPDX-License-Identifier: Apache-2.0

//! A write-only marker register: the guest writes a mark ID, the VMM records what its
//! counters were at that moment.
//!
//! Tests and benchmarks need to know what happened *between* two points of the guest's
//! timeline ("no route was rebuilt during the fio run", "the disk caused N exits while it
//! completed M requests"). Comparing the VMM's log with the serial console by arrival time
//! cannot order them; a register write can: the VMM handles it synchronously on the writing
//! vCPU, so a snapshot taken there is exactly ordered with the guest's own actions on that
//! vCPU. The same register is the boot timer: mark [`MARK_INIT`] is written by the guest's
//! init.
//!
//! One register at offset 0, 1, 2 or 4 bytes wide (a narrower write is zero-extended); reads
//! return all ones. Each write is pushed to the [`MarkSink`] the owner gave; the sink bounds
//! how many it keeps (the guest may write in a loop).

use crate::bus::BusDevice;

/// The mark the guest's init writes first: "userspace reached" (boot time).
pub const MARK_INIT: u32 = 1;

/// Receives each mark the guest writes (on the writing vCPU's thread: must not block).
pub trait MarkSink: Send {
    /// The guest wrote `id`.
    fn mark(&self, id: u32);
}

/// The register; see the [module documentation](self).
pub struct Marker {
    sink: Box<dyn MarkSink>,
}

impl Marker {
    /// A marker pushing into `sink`.
    pub fn new(sink: Box<dyn MarkSink>) -> Self {
        Marker { sink }
    }
}

impl BusDevice for Marker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || !matches!(data.len(), 1 | 2 | 4) {
            crate::guest_debug!(
                "marker: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        self.sink.mark(u32::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Rec(Arc<Mutex<Vec<u32>>>);
    impl MarkSink for Rec {
        fn mark(&self, id: u32) {
            self.0.lock().unwrap().push(id);
        }
    }

    #[test]
    fn writes_of_1_2_4_bytes_at_offset_0_are_marks_others_are_ignored() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut m = Marker::new(Box::new(Rec(got.clone())));
        m.write(0, &[7]);
        m.write(0, &[0x34, 0x12]);
        m.write(0, &0xdead_beef_u32.to_le_bytes());
        m.write(1, &[1]);
        m.write(0, &[1, 2, 3]);
        m.write(0, &[0; 8]);
        let mut d = [0u8; 4];
        m.read(0, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(*got.lock().unwrap(), vec![7, 0x1234, 0xdead_beef]);
    }
}
