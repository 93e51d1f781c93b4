//! CPUID for each vCPU: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), with the per-vCPU
//! topology fields and the hypervisor bit set. The vendor is never changed.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC-deadline timer (emulated by KVM's in-kernel LAPIC).
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: HTT (more than one logical processor per package).
pub const EDX_HTT: u32 = 1 << 28;

/// Per-vCPU facts the CPUID table depends on.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub cpu_id: u8,
    /// Number of vCPUs.
    pub cpu_count: u8,
    /// Whether KVM can emulate the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// Patches the supported-CPUID table for one vCPU.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], topo: VcpuTopology) {
    let id = u32::from(topo.cpu_id);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH
                // line size in 8-byte units.
                e.ebx = (id << 24) | (u32::from(topo.cpu_count) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if topo.cpu_count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            // Extended topology: EDX is the x2APIC ID of this logical processor.
            0xb | 0x1f => e.edx = id,
            // AMD extended APIC ID (EAX) and core ID (EBX[7:0]), one thread per core.
            0x8000_001e => {
                e.eax = id;
                e.ebx = (e.ebx & !0xff) & !0xff00 | id;
                e.ecx &= !0x7ff;
            }
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1.
            4 => {
                e.eax &= 0x03ff_ffff;
                e.eax |= (u32::from(topo.cpu_count.max(1)) - 1) << 26;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut t = vec![leaf(0, 0), leaf(1, 0)];
        filter_cpuid(
            &mut t,
            VcpuTopology {
                cpu_id: 3,
                cpu_count: 4,
                tsc_deadline: true,
            },
        );
        assert_eq!(t[1].ebx >> 24, 3);
        assert_eq!((t[1].ebx >> 16) & 0xff, 4);
        assert_ne!(t[1].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(t[1].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(t[1].edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_report_x2apic_id() {
        let mut t = vec![leaf(0xb, 0), leaf(0xb, 1), leaf(0x1f, 0)];
        filter_cpuid(
            &mut t,
            VcpuTopology {
                cpu_id: 1,
                cpu_count: 2,
                tsc_deadline: false,
            },
        );
        assert!(t.iter().all(|e| e.edx == 1));
    }

    #[test]
    fn vendor_leaf_is_untouched() {
        let mut t = vec![kvm_cpuid_entry2 {
            function: 0,
            ebx: 0x6874_7541,
            ..Default::default()
        }];
        filter_cpuid(
            &mut t,
            VcpuTopology {
                cpu_id: 0,
                cpu_count: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(t[0].ebx, 0x6874_7541);
    }
}
