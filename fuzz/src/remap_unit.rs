//! The interrupt-remapping unit: register writes and reads (any offset and width, and the
//! enable sequences a driver uses), invalidation-queue descriptors and IRTE tables in guest
//! memory from the input, tail moves, `translate` calls with remappable and compatibility
//! messages and any source-id, and blocked requests (fault recording).

use devices::remap::regs::*;
use devices::remap::{RecordingSink, RemapUnit};
use devices::MsiMessage;
use vm_memory::{Bytes, GuestAddress};

use crate::{fresh_guest_memory, Input, MEM_SIZE};

/// Where the input's invalidation queue and remapping table go.
const IQ_BASE: u64 = 0x0;
const IRT_BASE: u64 = 0x8000;

fn write(unit: &mut RemapUnit, sink: &mut RecordingSink, offset: u64, value: u64, width: usize) {
    let v = value.to_le_bytes();
    unit.write(offset, &v[..width.min(8)], sink);
}

/// A register offset: usually one the unit implements, sometimes anything in (or past) the
/// 4 KiB window.
fn register(input: &mut Input<'_>) -> u64 {
    const REGS: [u64; 24] = [
        DMAR_VER_REG,
        DMAR_CAP_REG,
        DMAR_ECAP_REG,
        DMAR_GCMD_REG,
        DMAR_GSTS_REG,
        DMAR_RTADDR_REG,
        DMAR_CCMD_REG,
        DMAR_FSTS_REG,
        DMAR_FECTL_REG,
        DMAR_FEDATA_REG,
        DMAR_FEADDR_REG,
        DMAR_FEUADDR_REG,
        DMAR_IQH_REG,
        DMAR_IQT_REG,
        DMAR_IQA_REG,
        DMAR_ICS_REG,
        DMAR_IECTL_REG,
        DMAR_IEDATA_REG,
        DMAR_IEADDR_REG,
        DMAR_IEUADDR_REG,
        DMAR_IQER_REG,
        DMAR_IRTA_REG,
        DMAR_FRCD_REG,
        DMAR_IOTLB_REGS,
    ];
    match input.u8() % 8 {
        0 => u64::from(input.u16()) % 0x1100,
        1 => DMAR_FRCD_REG + 16 * u64::from(input.u8() % 10) + u64::from(input.u8() % 16),
        _ => REGS[usize::from(input.u8()) % REGS.len()] + u64::from(input.u8() % 8 == 0) * 4,
    }
}

/// An MSI the IOAPIC or a device might send: remappable format with an index (and subhandle)
/// from the input, or compatibility format, or anything.
fn message(input: &mut Input<'_>) -> MsiMessage {
    match input.u8() % 4 {
        0 | 1 => {
            let index = u64::from(input.u16());
            let shv = u64::from(input.u8() & 1);
            // Remappable: bit 4 set, handle[14:0] in bits 19:5, handle[15] in bit 2, SHV bit 3.
            let address =
                0xfee0_0000 | (index & 0x7fff) << 5 | (index >> 15 & 1) << 2 | shv << 3 | 1 << 4;
            MsiMessage {
                address,
                data: if shv == 1 { u32::from(input.u16()) } else { 0 },
            }
        }
        2 => MsiMessage {
            address: 0xfee0_0000 | u64::from(input.u16()) << 4,
            data: input.u32(),
        },
        _ => MsiMessage {
            address: input.u64(),
            data: input.u32(),
        },
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = fresh_guest_memory();
    // The queue (up to 256 descriptors) and the table (up to 2048 entries): from the input.
    let iq = input.bytes(usize::from(input.clone().u16() % 4096));
    let _ = mem.write_slice(iq, GuestAddress(IQ_BASE));
    let irt = input.bytes(usize::from(input.clone().u16() % 4096));
    let _ = mem.write_slice(irt, GuestAddress(IRT_BASE));
    let mut unit = RemapUnit::new(mem.clone());
    let mut sink = RecordingSink::default();

    // A driver's enable sequence, unless the input skips it.
    if input.u8() % 4 != 0 {
        let eime = u64::from(input.bool()) << 11;
        let irta = IRT_BASE | eime | u64::from(input.u8() % 16);
        write(&mut unit, &mut sink, DMAR_IRTA_REG, irta, 8);
        write(
            &mut unit,
            &mut sink,
            DMAR_GCMD_REG,
            u64::from(DMA_GCMD_SIRTP),
            4,
        );
        let iqa = IQ_BASE | u64::from(input.u8() % 2);
        write(&mut unit, &mut sink, DMAR_IQA_REG, iqa, 8);
        write(&mut unit, &mut sink, DMAR_IQT_REG, 0, 8);
        write(
            &mut unit,
            &mut sink,
            DMAR_GCMD_REG,
            u64::from(DMA_GCMD_QIE),
            4,
        );
        let ire = if input.bool() {
            DMA_GCMD_IRE | DMA_GCMD_QIE
        } else {
            DMA_GCMD_QIE
        };
        let cfi = if input.u8() % 4 == 0 { DMA_GCMD_CFI } else { 0 };
        write(&mut unit, &mut sink, DMAR_GCMD_REG, u64::from(ire | cfi), 4);
    }
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 12 {
            0..=2 => {
                let off = register(&mut input);
                let width = input.width();
                let value = input.u64();
                write(&mut unit, &mut sink, off, value, width);
            }
            3 => {
                let off = register(&mut input);
                let mut out = vec![0u8; input.width()];
                unit.read(off, &mut out);
            }
            4 | 5 => {
                // A descriptor in the queue, then the tail moved past it.
                let slot = u64::from(input.u8());
                let desc = input.bytes(16);
                let _ = mem.write_slice(desc, GuestAddress(IQ_BASE + 16 * slot));
                let tail = (u64::from(input.u8()) << 4) & 0x7fff0;
                write(&mut unit, &mut sink, DMAR_IQT_REG, tail, 8);
            }
            6 => {
                // An IRTE in the table.
                let index = u64::from(input.u16() % 2048);
                let entry = input.bytes(16);
                let at = IRT_BASE + 16 * index;
                if at + 16 <= MEM_SIZE {
                    let _ = mem.write_slice(entry, GuestAddress(at));
                }
            }
            7..=9 => {
                let msg = message(&mut input);
                let sid = if input.bool() { input.u16() } else { 0xf0f8 };
                if let Err(blocked) = unit.translate(msg, sid) {
                    unit.request_blocked(&blocked, sid, &mut sink);
                }
            }
            10 => {
                let _ = sink.take_invalidation();
                let _ = sink.take_msis();
            }
            _ => {
                if input.u8() % 16 == 0 {
                    unit.reset(&mut sink);
                }
                let _ = unit.stats();
                let _ = unit.enabled();
            }
        }
    }
}
