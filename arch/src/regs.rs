//! Initial vCPU state for the boot vCPU: GDT, segments, control registers, identity page
//! tables, FPU, boot MSRs and the local APIC's LINT pins. Values only; the VMM applies them.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use crate::layout;

/// CR0 protection enable.
pub const X86_CR0_PE: u64 = 0x1;
/// CR0 extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 0x10;
/// CR0 paging.
pub const X86_CR0_PG: u64 = 0x8000_0000;
/// CR4 physical address extension.
pub const X86_CR4_PAE: u64 = 0x20;
/// EFER long mode enable.
pub const EFER_LME: u64 = 0x100;
/// EFER long mode active.
pub const EFER_LMA: u64 = 0x400;

/// MSR numbers set at boot.
pub mod msr_index {
    /// IA32_SYSENTER_CS.
    pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const MSR_STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const MSR_LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const MSR_CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const MSR_IA32_TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE.
    pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// IA32_MISC_ENABLE fast-string bit.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;

/// The boot protocol the vCPU state is set up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
}

/// Packs a GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment register KVM expects.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 64-bit for the Linux boot
/// protocol and 32-bit for PVH.
pub fn boot_gdt(proto: BootProtocol) -> [u64; 4] {
    let code = match proto {
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Identity page tables for the first 1 GiB with 2 MiB pages, as `(address, value)` writes.
pub fn identity_page_tables() -> Vec<(u64, u64)> {
    let mut writes = vec![
        (layout::PML4_START, layout::PDPTE_START | 0x03),
        (layout::PDPTE_START, layout::PDE_START | 0x03),
    ];
    // Present | writable | page size (2 MiB).
    writes.extend((0..512u64).map(|i| (layout::PDE_START + i * 8, (i << 21) | 0x83)));
    writes
}

/// Applies the boot segments and control registers to `sregs` (which holds KVM's current
/// values, so fields we don't own, like the APIC base, stay as KVM set them).
pub fn boot_sregs(sregs: &mut kvm_sregs, proto: BootProtocol) {
    let gdt = boot_gdt(proto);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match proto {
        BootProtocol::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// General-purpose registers for the boot vCPU jumping to `entry`.
pub fn boot_regs(proto: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match proto {
        BootProtocol::Linux64 => {
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = layout::PVH_INFO_START,
    }
    regs
}

/// x87/SSE state at reset: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs the boot vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs
/// write-back by default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        // Enable MTRRs (bit 11) with write-back (6) as the default type.
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Offset of the LVT LINT0 register in the local APIC page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *byte as _;
    }
}

/// Wires LINT0 as ExtINT and LINT1 as NMI, as the MP spec's virtual-wire mode expects.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let mode = |v: u32, m: u32| (v & !0x700) | (m << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt(BootProtocol::Linux64);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.present, cs.s, cs.g),
            (1, 0, 0xb, 1, 1, 1)
        );
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.type_, ds.db, ds.l, ds.selector), (3, 1, 0, 16));
        let pvh_cs = segment_from_gdt(boot_gdt(BootProtocol::Pvh)[1], 1);
        assert_eq!((pvh_cs.l, pvh_cs.db), (0, 1));
        assert_eq!(segment_from_gdt(gdt[0], 0).unusable, 1);
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_pvh_does_not() {
        let mut s = kvm_sregs::default();
        boot_sregs(&mut s, BootProtocol::Linux64);
        assert_eq!(s.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_START);
        boot_sregs(&mut s, BootProtocol::Pvh);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.efer, s.cr4), (0, 0));
    }

    #[test]
    fn identity_map_covers_first_gib() {
        let w = identity_page_tables();
        assert_eq!(w.len(), 514);
        assert_eq!(w[2], (layout::PDE_START, 0x83));
        assert_eq!(w[513], (layout::PDE_START + 511 * 8, (511 << 21) | 0x83));
    }

    #[test]
    fn boot_regs_point_at_boot_structures() {
        let r = boot_regs(BootProtocol::Linux64, 0x100_0200);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100_0200, layout::ZERO_PAGE_START, 2)
        );
        let r = boot_regs(BootProtocol::Pvh, 0x100_0000);
        assert_eq!(r.rbx, layout::PVH_INFO_START);
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x0001_0000);
        set_lint(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&st, APIC_LVT1) >> 8 & 7, APIC_MODE_NMI);
    }
}
