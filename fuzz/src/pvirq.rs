//! PV-IR, paravirtual interrupt remapping (`docs/pv-irq-remap.md`): a configuration from the
//! input (IOAPIC ID and pins, 0-4 PCI requesters, 1-4 APIC IDs, 0-300 handles), then register
//! reads and writes at any offset and width, request blocks in guest memory (mostly well-formed
//! `ALLOC`/`SET`/`CLEAR`/`FREE` with fields from the input, sometimes raw bytes) executed by a
//! `REQUEST` write of their address (sometimes misaligned or outside RAM), `translate` calls
//! with messages through handles the input picked (remappable or compatibility format, from
//! IOAPIC pins or PCI requesters), blocked-interrupt reports and resets. A sink re-translates
//! every programmed route an invalidation covers, like the VMM's interrupt router.
//!
//! Checked after every operation: `live_handles` ≤ `MAX_HANDLES`; every successful translation
//! of a remappable message is a Fixed, edge, physical-destination message to one of the
//! configured APIC IDs (a compatibility-format one passes unchanged); a blocked one names the
//! message's index; a request writes back only `status` (and, for a successful `ALLOC`,
//! `handle` and the message) inside its 64-byte block, a valid status, and nothing at all for
//! an ignored `REQUEST`: the rest of guest RAM is compared with a shadow copy.

use std::cell::RefCell;

use devices::pvirq::regs::*;
use devices::pvirq::{PvBlockReason, PvBlocked, PvIrq, PvIrqConfig, PvIrqSink, PvSource};
use devices::remap::remap_index;
use devices::{MsiMessage, RouteInvalidation};
use vm_memory::{Bytes, GuestAddress};

use crate::{fresh_guest_memory, Input, MEM_SIZE};

/// Programmed routes the sink keeps (like the router's GSI routes).
const MAX_ROUTES: usize = 8;
/// Allocations remembered to build messages and requests from.
const MAX_ALLOCS: usize = 16;

thread_local! {
    /// What guest RAM must hold (everything but what the device may write back), and a buffer
    /// to read RAM into: made once per thread.
    static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> =
        RefCell::new((vec![0; MEM_SIZE as usize], vec![0; MEM_SIZE as usize]));
}

/// Checks one translation against the spec (§4).
fn check_translation(cfg: &PvIrqConfig, msg: MsiMessage, result: &Result<MsiMessage, PvBlocked>) {
    match result {
        Ok(out) if msg.is_remappable() => {
            let lo = out.address & 0xffff_ffff;
            let hi = out.address >> 32;
            assert!(
                !out.is_remappable(),
                "{msg:x?} → {out:x?}: still remappable"
            );
            assert_eq!(
                lo & 0xfff0_0000,
                0xfee0_0000,
                "{out:x?}: not an MSI address"
            );
            // RH (bit 3) and DM (bit 2) clear (physical), bits 11:4 and 1:0 zero.
            assert_eq!(lo & 0xfff, 0, "{out:x?}: logical, RH or reserved bits");
            assert_eq!(hi & 0xff, 0, "{out:x?}: address_hi bits 7:0");
            // Fixed (data bits 10:8), edge (bits 15 and 14), vector 0x10..=0xff, nothing else.
            assert_eq!(out.data & !0xff, 0, "{out:x?}: not Fixed, edge");
            assert!(out.data >= u32::from(MIN_VECTOR), "{out:x?}: vector");
            let dest = ((lo >> 12) & 0xff | hi) as u32;
            assert!(
                cfg.apic_ids.contains(&dest),
                "{out:x?}: destination {dest:#x} not in {:x?}",
                cfg.apic_ids
            );
        }
        Ok(out) => assert_eq!(*out, msg, "compatibility format changed"),
        Err(blocked) => assert_eq!(blocked.index, remap_index(msg), "{blocked:?} of {msg:x?}"),
    }
}

/// The router: programmed (source, message) pairs, re-translated when an invalidation covers
/// them.
#[derive(Default)]
struct Router {
    routes: Vec<(PvSource, MsiMessage)>,
    next: usize,
    invalidations: u64,
}

impl Router {
    fn program(&mut self, source: PvSource, msg: MsiMessage) {
        if self.routes.len() < MAX_ROUTES {
            self.routes.push((source, msg));
        } else {
            self.routes[self.next % MAX_ROUTES] = (source, msg);
            self.next += 1;
        }
    }
}

impl PvIrqSink for Router {
    fn invalidate(&mut self, pv: &mut PvIrq, inv: RouteInvalidation) {
        self.invalidations += 1;
        if let RouteInvalidation::Indices(ranges) = &inv {
            assert!(!ranges.is_empty(), "empty invalidation");
            for r in ranges {
                assert!(r.start < r.end, "empty range {r:?}");
                assert!(
                    r.end <= u32::from(pv.config().max_handles),
                    "{r:?} past MAX_HANDLES"
                );
            }
        }
        for &(source, msg) in &self.routes {
            if inv.covers(remap_index(msg)) {
                let result = pv.translate(msg, source);
                check_translation(pv.config(), msg, &result);
            }
        }
    }
}

/// One allocation a request returned.
#[derive(Clone, Copy)]
struct Alloc {
    handle: u16,
    count: u16,
    source: PvSource,
    msg: MsiMessage,
}

struct State<'a> {
    pv: PvIrq,
    router: Router,
    cfg: PvIrqConfig,
    allocs: Vec<Alloc>,
    /// Expected guest RAM.
    shadow: &'a mut [u8],
    /// Guest RAM as read back.
    actual: &'a mut [u8],
    mem: vm_memory::GuestMemoryMmap,
}

fn config(input: &mut Input<'_>) -> PvIrqConfig {
    let ioapic_id = input.u8();
    let ioapic_pins = match input.u8() % 4 {
        0 => input.u8(),
        _ => 24,
    };
    let pci_requesters = (0..input.u8() % 5)
        .map(|i| match input.u8() % 4 {
            0 => input.u16(),
            _ => 8 * (u16::from(i) + 1),
        })
        .collect();
    let apic_ids = (0..1 + input.u8() % 4)
        .map(|i| match input.u8() % 4 {
            0 => input.u32(),
            _ => u32::from(i),
        })
        .collect();
    let max_handles = match input.u8() % 4 {
        0 => input.u16() % 301,
        1 => 300,
        _ => 64,
    };
    PvIrqConfig {
        ioapic_id,
        ioapic_pins,
        pci_requesters,
        apic_ids,
        max_handles,
    }
}

/// A source: usually a configured one, sometimes anything.
fn source(input: &mut Input<'_>, cfg: &PvIrqConfig) -> PvSource {
    match input.u8() % 4 {
        0 | 1 => PvSource::IoapicPin {
            ioapic_id: if input.u8() % 8 == 0 {
                input.u8()
            } else {
                cfg.ioapic_id
            },
            pin: input.u8() % cfg.ioapic_pins.saturating_add(1).max(1),
        },
        2 if !cfg.pci_requesters.is_empty() => PvSource::Pci {
            segment: 0,
            requester_id: cfg.pci_requesters[usize::from(input.u8()) % cfg.pci_requesters.len()],
        },
        _ => PvSource::Pci {
            segment: if input.u8() % 8 == 0 { input.u16() } else { 0 },
            requester_id: input.u16(),
        },
    }
}

/// A handle: usually one of an allocation, sometimes around `MAX_HANDLES` or anything.
fn handle(input: &mut Input<'_>, st: &State<'_>) -> u16 {
    match input.u8() % 4 {
        0 | 1 if !st.allocs.is_empty() => {
            let a = st.allocs[usize::from(input.u8()) % st.allocs.len()];
            a.handle + u16::from(input.u8() % 2) * (u16::from(input.u8()) % a.count)
        }
        2 => input.u16() % (st.cfg.max_handles + 2),
        _ => input.u16(),
    }
}

/// A block count: usually 1, sometimes a power of two up to 64, or anything.
fn count(input: &mut Input<'_>) -> u16 {
    match input.u8() % 8 {
        0..=3 => 1,
        4..=6 => 1 << (input.u8() % 7),
        _ => input.u16(),
    }
}

/// A request block from the input.
fn request_block(input: &mut Input<'_>, st: &State<'_>) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    let put16 = |b: &mut [u8; REQUEST_SIZE], at: usize, v: u16| {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    };
    let tag = input.u8();
    if tag % 16 == 0 {
        let raw = input.bytes(REQUEST_SIZE);
        b[..raw.len()].copy_from_slice(raw);
        return b;
    }
    let op = match tag % 16 {
        1 => input.u16(),
        n => u16::from(n % 4) + 1,
    };
    put16(&mut b, req::OP, op);
    put16(&mut b, req::STATUS, 0xffff);
    match op {
        OP_ALLOC => {
            let src = source(input, &st.cfg);
            let count = count(input);
            match src {
                PvSource::IoapicPin { ioapic_id, pin } => {
                    b[req::SOURCE_TYPE] = SOURCE_IOAPIC;
                    put16(&mut b, req::SOURCE_HI, ioapic_id.into());
                    put16(&mut b, req::SOURCE_LO, pin.into());
                }
                PvSource::Pci {
                    segment,
                    requester_id,
                } => {
                    b[req::SOURCE_TYPE] = SOURCE_PCI;
                    put16(&mut b, req::SOURCE_HI, segment);
                    put16(&mut b, req::SOURCE_LO, requester_id);
                }
            }
            if input.u8() % 16 == 0 {
                b[req::SOURCE_TYPE] = input.u8();
            }
            put16(&mut b, req::COUNT, count);
        }
        OP_SET => {
            put16(&mut b, req::HANDLE, handle(input, st));
            let dest = match input.u8() % 8 {
                0 => input.u32(),
                _ => st.cfg.apic_ids[usize::from(input.u8()) % st.cfg.apic_ids.len()],
            };
            b[req::DEST..req::DEST + 4].copy_from_slice(&dest.to_le_bytes());
            b[req::VECTOR] = input.u8();
        }
        OP_CLEAR => put16(&mut b, req::HANDLE, handle(input, st)),
        OP_FREE => {
            let (h, c) = match input.u8() % 4 {
                0 | 1 if !st.allocs.is_empty() => {
                    let a = st.allocs[usize::from(input.u8()) % st.allocs.len()];
                    (a.handle, a.count)
                }
                _ => (handle(input, st), count(input)),
            };
            put16(&mut b, req::HANDLE, h);
            put16(&mut b, req::COUNT, c);
        }
        _ => {}
    }
    // Sometimes one byte anywhere (a reserved or unused field).
    if input.u8() % 16 == 0 {
        b[usize::from(input.u8()) % REQUEST_SIZE] = input.u8();
    }
    b
}

/// Writes a request block, then `REQUEST` with its address (or another), and checks what the
/// device wrote back.
fn request(input: &mut Input<'_>, st: &mut State<'_>) {
    let block = request_block(input, st);
    let at = 64 * (u64::from(input.u8()) % (MEM_SIZE / 64));
    st.mem
        .write_slice(&block, GuestAddress(at))
        .expect("block in RAM");
    st.shadow[at as usize..at as usize + REQUEST_SIZE].copy_from_slice(&block);
    let gpa = match input.u8() % 16 {
        0 => at + 1 + u64::from(input.u8() % 63),
        1 => input.address(),
        2 => MEM_SIZE - 64,
        3 => MEM_SIZE,
        4 => !63,
        _ => at,
    };
    let live_before = st.pv.stats().live_handles;
    st.pv.write(REG_REQUEST, &gpa.to_le_bytes(), &mut st.router);
    st.mem
        .read_slice(st.actual, GuestAddress(0))
        .expect("read RAM");
    let valid = gpa % 64 == 0 && gpa.checked_add(64).is_some_and(|end| end <= MEM_SIZE);
    if !valid {
        assert!(
            st.actual == st.shadow,
            "ignored request at {gpa:#x} wrote RAM"
        );
        return;
    }
    let g = gpa as usize;
    let (before, rest) = st.actual.split_at(g);
    let (blk, after) = rest.split_at(REQUEST_SIZE);
    assert!(before == &st.shadow[..g], "RAM below the block changed");
    assert!(
        after == &st.shadow[g + REQUEST_SIZE..],
        "RAM above the block changed"
    );
    let old = &st.shadow[g..g + REQUEST_SIZE];
    let status = u16::from_le_bytes([blk[2], blk[3]]);
    assert!(status <= 7, "status {status}");
    let op = u16::from_le_bytes([old[0], old[1]]);
    let alloc_ok = op == OP_ALLOC && status == 0;
    for i in 0..REQUEST_SIZE {
        let may = (2..4).contains(&i)
            || alloc_ok && ((0x0c..0x0e).contains(&i) || (0x18..0x24).contains(&i));
        assert!(
            may || blk[i] == old[i],
            "request byte {i:#x} changed (op {op}, status {status})"
        );
    }
    let live = st.pv.stats().live_handles;
    if alloc_ok {
        let dword = |at: usize| u32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
        let handle = u16::from_le_bytes([blk[0x0c], blk[0x0d]]);
        let count = u16::from_le_bytes([old[6], old[7]]);
        assert_eq!(live, live_before + u32::from(count), "live after ALLOC");
        assert!(u32::from(handle) + u32::from(count) <= u32::from(st.cfg.max_handles));
        assert_eq!(handle % count, 0, "ALLOC block not aligned");
        let msg = MsiMessage {
            address: u64::from(dword(0x1c)) << 32 | u64::from(dword(0x18)),
            data: dword(0x20),
        };
        assert_eq!(remap_index(msg), Some(handle.into()), "ALLOC message index");
        let source = if old[req::SOURCE_TYPE] == SOURCE_IOAPIC {
            PvSource::IoapicPin {
                ioapic_id: old[8],
                pin: old[0x0a],
            }
        } else {
            PvSource::Pci {
                segment: u16::from_le_bytes([old[8], old[9]]),
                requester_id: u16::from_le_bytes([old[0x0a], old[0x0b]]),
            }
        };
        let a = Alloc {
            handle,
            count,
            source,
            msg,
        };
        if st.allocs.len() < MAX_ALLOCS {
            st.allocs.push(a);
        } else {
            st.allocs[usize::from(handle) % MAX_ALLOCS] = a;
        }
    } else if !(op == OP_FREE && status == 0) {
        assert_eq!(live, live_before, "live changed by op {op} status {status}");
    }
    st.shadow[g..g + REQUEST_SIZE].copy_from_slice(blk);
}

/// A message a source might send: an allocation's (with a sub-handle), one built from a
/// handle, compatibility format, or anything.
fn message(input: &mut Input<'_>, st: &State<'_>) -> (MsiMessage, Option<PvSource>) {
    match input.u8() % 8 {
        0..=3 if !st.allocs.is_empty() => {
            let a = st.allocs[usize::from(input.u8()) % st.allocs.len()];
            let sub = u32::from(input.u8()) % u32::from(a.count.max(1));
            (
                MsiMessage {
                    address: a.msg.address,
                    data: a.msg.data + sub,
                },
                Some(a.source),
            )
        }
        0..=4 => {
            let h = u64::from(handle(input, st));
            let shv = u64::from(input.u8() & 1);
            let address = 0xfee0_0000 | (h & 0x7fff) << 5 | (h >> 15 & 1) << 2 | shv << 3 | 1 << 4;
            let data = if shv == 1 {
                u32::from(input.u8() % 32)
            } else {
                u32::from(input.u8())
            };
            (MsiMessage { address, data }, None)
        }
        5 | 6 => (
            MsiMessage {
                address: 0xfee0_0000 | u64::from(input.u16()) << 2 & 0xfffef,
                data: input.u32(),
            },
            None,
        ),
        _ => (
            MsiMessage {
                address: input.u64(),
                data: input.u32(),
            },
            None,
        ),
    }
}

fn check(st: &State<'_>) {
    let stats = st.pv.stats();
    assert!(
        stats.live_handles <= u32::from(st.cfg.max_handles),
        "{} live handles of {}",
        stats.live_handles,
        st.cfg.max_handles
    );
}

/// A register offset: usually a real one, sometimes anything in (or past) the page.
fn register(input: &mut Input<'_>) -> u64 {
    const REGS: [u64; 9] = [
        REG_ID,
        REG_VERSION,
        REG_FEATURES,
        REG_MAX_HANDLES,
        REG_CTRL,
        REG_STATUS,
        REG_REQUEST,
        REG_FAULT_COUNT,
        REG_LAST_FAULT,
    ];
    match input.u8() % 8 {
        0 => u64::from(input.u16()) % (PVIR_PAGE_SIZE + 0x10),
        1 => u64::from(input.u8() % 0x40),
        _ => REGS[usize::from(input.u8()) % REGS.len()],
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cfg = config(&mut input);
    let mem = fresh_guest_memory();
    BUFFERS.with(|b| {
        let (shadow, actual) = &mut *b.borrow_mut();
        shadow.fill(0);
        let mut st = State {
            pv: PvIrq::new(cfg.clone(), mem.clone()),
            router: Router::default(),
            cfg,
            allocs: Vec::new(),
            shadow,
            actual,
            mem,
        };
        let mut ops = 0;
        while !input.is_empty() && ops < 256 {
            ops += 1;
            match input.u8() % 16 {
                0 | 1 => {
                    // CTRL: enable / block compat / reset, usually.
                    let v = match input.u8() % 8 {
                        0 => input.u32(),
                        1 => CTRL_RESET,
                        n => u32::from(n % 4),
                    };
                    st.pv.write(REG_CTRL, &v.to_le_bytes(), &mut st.router);
                }
                2 => {
                    let off = register(&mut input);
                    let width = input.width();
                    let v = input.u64().to_le_bytes();
                    let mut bytes = v.to_vec();
                    bytes.resize(width, 0);
                    // REQUEST through here is checked only for not crashing.
                    st.pv.write(off, &bytes, &mut st.router);
                    st.mem
                        .read_slice(st.actual, GuestAddress(0))
                        .expect("read RAM");
                    st.shadow.copy_from_slice(st.actual);
                }
                3 => {
                    let off = register(&mut input);
                    let mut out = vec![0u8; input.width()];
                    st.pv.read(off, &mut out);
                    if off == REG_MAX_HANDLES && out.len() == 4 {
                        assert_eq!(out, u32::from(st.cfg.max_handles).to_le_bytes());
                    }
                }
                4..=8 => request(&mut input, &mut st),
                9..=12 => {
                    let (msg, own) = message(&mut input, &st);
                    let src = match own {
                        Some(s) if input.u8() % 4 != 0 => s,
                        _ => source(&mut input, &st.cfg),
                    };
                    let result = st.pv.translate(msg, src);
                    check_translation(&st.cfg, msg, &result);
                    if input.bool() {
                        st.router.program(src, msg);
                    }
                    let n = u64::from(input.u8() % 4);
                    if let Err(blocked) = result {
                        st.pv.request_blocked(&blocked, src, n);
                    }
                }
                13 => {
                    const REASONS: [PvBlockReason; 5] = [
                        PvBlockReason::NotPresent,
                        PvBlockReason::NotOwner,
                        PvBlockReason::CompatibilityBlocked,
                        PvBlockReason::NotAllocated,
                        PvBlockReason::Disabled,
                    ];
                    let blocked = PvBlocked {
                        reason: REASONS[usize::from(input.u8()) % REASONS.len()],
                        index: input.bool().then(|| input.u32()),
                    };
                    let src = source(&mut input, &st.cfg);
                    let n = if input.u8() % 8 == 0 {
                        input.u64()
                    } else {
                        u64::from(input.u8() % 4)
                    };
                    st.pv.request_blocked(&blocked, src, n);
                }
                14 => {
                    // LAST_FAULT W1C.
                    let v = if input.bool() {
                        LAST_FAULT_VALID
                    } else {
                        input.u64()
                    };
                    st.pv
                        .write(REG_LAST_FAULT, &v.to_le_bytes(), &mut st.router);
                }
                _ => {
                    if input.u8() % 8 == 0 {
                        st.pv.reset(&mut st.router);
                        st.allocs.clear();
                        assert_eq!(st.pv.stats().live_handles, 0);
                    }
                    let _ = st.pv.enabled();
                }
            }
            check(&st);
        }
    });
}
