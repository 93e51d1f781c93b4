//! The MSI-X table and PBA: table and PBA accesses of any width and alignment (and past
//! the end), Message Control writes (enable, function mask), function resets, and device
//! triggers and late pending reports, on 1..=2048 vectors. A sink keeps the routes the table
//! pushed and, after every operation, the target checks the model against the spec:
//!
//! - the pushed state of every vector is exactly its effective state (enabled, not function
//!   masked, entry unmasked → its message; else held), as read back through the table;
//! - a deliverable vector never has its pending bit set;
//! - a trigger delivers (the line fires once) exactly when the vector is deliverable, and
//!   sets the pending bit otherwise; unmasking a pending vector delivers it once.

use std::sync::{Arc, Mutex};

use devices::pci::msix::{
    MsixSink, MsixTable, MsixVectorUpdate, MsixVectors, MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK,
    MSIX_ENTRY_SIZE,
};
use devices::{CountingLine, InterruptLine, MsiMessage};

use crate::Input;

thread_local! {
    /// The lines, made once per thread (2048 allocations per execution cost more than the
    /// rest): their counters carry over between executions, so only differences are used.
    static LINES: Vec<Arc<CountingLine>> =
        (0..2048).map(|_| Arc::new(CountingLine::new())).collect();
}

/// The sink's view: the last pushed state per vector.
struct Routes {
    state: Mutex<Vec<Option<MsiMessage>>>,
}

impl MsixSink for Routes {
    fn vectors_changed(&self, updates: &[MsixVectorUpdate]) {
        assert!(!updates.is_empty(), "empty batch");
        let mut s = self.state.lock().unwrap();
        for (i, u) in updates.iter().enumerate() {
            let v = usize::from(u.vector);
            assert!(v < s.len(), "vector {v} out of range");
            assert!(
                updates[..i].iter().all(|p| p.vector != u.vector),
                "vector {v} twice in one batch"
            );
            assert_ne!(
                s[v], u.msg,
                "vector {v}: a batch entry that changes nothing"
            );
            s[v] = u.msg;
        }
    }
}

/// Entry `v` as the guest reads it (two 64-bit reads).
fn entry(t: &MsixTable, v: usize) -> [u32; 4] {
    let mut e = [0u32; 4];
    for half in 0..2 {
        let mut b = [0u8; 8];
        t.table_read(v as u64 * MSIX_ENTRY_SIZE + 8 * half as u64, &mut b);
        e[2 * half] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        e[2 * half + 1] = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    }
    e
}

/// The effective state of `e` under Message Control `ctrl` (PCI 3.0 §6.8.2).
fn effective_of(ctrl: u16, e: [u32; 4]) -> Option<MsiMessage> {
    if ctrl & MSIX_CTRL_ENABLE == 0 || ctrl & MSIX_CTRL_FUNCTION_MASK != 0 || e[3] & 1 != 0 {
        return None;
    }
    Some(MsiMessage {
        address: u64::from(e[1]) << 32 | u64::from(e[0]),
        data: e[2],
    })
}

fn effective(t: &MsixTable, v: usize) -> Option<MsiMessage> {
    effective_of(t.control_bits(), entry(t, v))
}

/// The spec's invariants over vectors `lo..hi`.
fn check(t: &MsixTable, routes: &Routes, lo: usize, hi: usize) {
    let s = routes.state.lock().unwrap();
    let ctrl = t.control_bits();
    for v in lo..hi {
        let e = entry(t, v);
        let eff = effective_of(ctrl, e);
        assert_eq!(
            s[v], eff,
            "vector {v}: pushed state is not the effective state"
        );
        if eff.is_some() {
            assert!(
                !t.vectors().is_pending(v as u16),
                "vector {v}: deliverable but pending"
            );
        }
        assert_eq!(e[3] & !1, 0, "vector {v}: reserved control bits");
    }
}

/// A table offset: usually a word of a real entry, sometimes anywhere.
fn table_offset(input: &mut Input<'_>, n: usize) -> u64 {
    match input.u8() % 4 {
        0 | 1 => {
            u64::from(input.u16()) % n as u64 * MSIX_ENTRY_SIZE + 4 * u64::from(input.u8() % 4)
        }
        2 => u64::from(input.u16()) % (n as u64 * MSIX_ENTRY_SIZE + 32),
        _ => input.u64(),
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let n = match input.u8() % 8 {
        // The PBA word boundaries and the 2048 limit (past it: truncated); not every size,
        // as every Message Control write walks the whole table.
        0 => [63, 64, 65, 128, 2047, 2048, 2100][usize::from(input.u8() % 7)],
        1 => 1,
        _ => 1 + usize::from(input.u8() % 64),
    };
    let lines: Vec<Arc<CountingLine>> = LINES.with(|l| l[..n.min(2048)].to_vec());
    let vectors = MsixVectors::new(
        lines
            .iter()
            .map(|l| l.clone() as Arc<dyn InterruptLine>)
            .collect(),
    );
    let n = vectors.count();
    let routes = Arc::new(Routes {
        state: Mutex::new(vec![None; n]),
    });
    let mut t = MsixTable::new(vectors, routes.clone());
    assert_eq!(t.table_size(), n as u64 * MSIX_ENTRY_SIZE);
    assert_eq!(t.pba_size(), n.div_ceil(64) as u64 * 8);

    let mut last = Vec::new();
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        // Which vectors the check covers after this operation.
        let mut touched = 0..0;
        match input.u8() % 10 {
            0..=2 => {
                let off = table_offset(&mut input, n);
                let width = [4, 8, 4, 8, 1, 2, 16, 3][usize::from(input.u8() % 8)];
                let v = match input.u8() % 4 {
                    0 => 0xfee0_0000 | u64::from(input.u16()) << 4,
                    1 => u64::from(input.u8() & 1),
                    _ => input.u64(),
                };
                let mut b = v.to_le_bytes().to_vec();
                b.resize(width, 0);
                t.table_write(off, &b);
                let i = (off / MSIX_ENTRY_SIZE).min(n as u64) as usize;
                touched = i..(i + 1).min(n);
            }
            3 => {
                let off = table_offset(&mut input, n);
                let mut out = vec![0xaau8; [4, 8, 1, 2, 16, 0][usize::from(input.u8() % 6)]];
                t.table_read(off, &mut out);
            }
            4 => {
                let off = if input.bool() {
                    8 * u64::from(input.u8() % 40)
                } else {
                    input.u64()
                };
                let mut out = vec![0xaau8; [8, 4, 1, 2, 16, 0, 3][usize::from(input.u8() % 7)]];
                t.pba_read(off, &mut out);
                if input.u8() % 8 == 0 {
                    t.pba_write(off, &out);
                }
            }
            5 => {
                let ctrl = input.u16();
                t.set_control(ctrl);
                assert_eq!(
                    t.control_bits(),
                    ctrl & (MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK)
                );
                touched = 0..n;
            }
            6 | 7 => {
                // A device trigger (or a late report from a parked irqfd).
                let v = if input.u8() % 16 == 0 {
                    input.u16()
                } else {
                    input.u16() % n as u16
                };
                let i = usize::from(v);
                let deliverable = i < n && effective(&t, i).is_some();
                let before = lines.get(i).map(|l| l.triggers());
                let pending_sets = t.vectors().pending_sets();
                if input.bool() {
                    t.vectors().trigger(v);
                } else {
                    t.vectors().set_pending(v);
                }
                if let Some(before) = before {
                    let fired = lines[i].triggers() - before;
                    assert_eq!(fired, u64::from(deliverable), "vector {v}: deliveries");
                    assert_eq!(t.vectors().is_pending(v), !deliverable, "vector {v}: PBA");
                    touched = i..i + 1;
                } else {
                    assert_eq!(t.vectors().pending_sets(), pending_sets);
                }
            }
            8 => {
                // Unmasking a pending vector delivers it exactly once.
                let i = usize::from(input.u16()) % n;
                let pending = t.vectors().is_pending(i as u16);
                let before = lines[i].triggers();
                t.table_write(i as u64 * MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
                let expect = u64::from(pending && effective(&t, i).is_some());
                assert_eq!(lines[i].triggers() - before, expect, "vector {i}: unmask");
                touched = i..i + 1;
            }
            _ => {
                if input.u8() % 4 == 0 {
                    t.reset();
                    for v in 0..n {
                        assert!(!t.vectors().is_pending(v as u16), "pending after reset");
                    }
                    touched = 0..n;
                }
            }
        }
        // The vectors this operation touched (at most 16: set_control and reset are covered
        // by the check at the end).
        check(
            &t,
            &routes,
            touched.start,
            touched.end.min(touched.start + 16),
        );
        if touched.len() == 1 {
            last.push(touched.start);
        }
    }
    // The first 256 vectors and every one touched on its own.
    check(&t, &routes, 0, n.min(256));
    for v in last {
        check(&t, &routes, v, v + 1);
    }
}
