//! KVM test without Linux: an irqfd write delivers an MSI to a tiny real-mode guest, and no
//! interrupt is injected from userspace. Needs /dev/kvm (fails loudly without it).

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use devices::{InterruptLine, MsiMessage};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};
use vmm::interrupts::InterruptManager;

/// Port the guest writes the vector of each interrupt it handles to.
const VECTOR_PORT: u16 = 0x10;
/// Port the guest writes to once its LAPIC is enabled and interrupts are on.
const READY_PORT: u16 = 0x11;
const VECTOR: u8 = 0x40;
const CODE: u64 = 0x1000;
const HANDLER: u64 = 0x1100;

/// 16-bit code: switch the LAPIC to x2APIC mode, software-enable it, say ready, then
/// `sti; hlt` forever.
fn main_code() -> Vec<u8> {
    vec![
        0x66,
        0xb9,
        0x1b,
        0x00,
        0x00,
        0x00, // mov ecx, 0x1b (IA32_APIC_BASE)
        0x0f,
        0x32, //                          rdmsr
        0x66,
        0x0d,
        0x00,
        0x0c,
        0x00,
        0x00, // or eax, 0xc00 (xAPIC global enable | x2APIC)
        0x0f,
        0x30, //                          wrmsr
        0x66,
        0xb9,
        0x0f,
        0x08,
        0x00,
        0x00, // mov ecx, 0x80f (x2APIC SVR)
        0x66,
        0xb8,
        0xff,
        0x01,
        0x00,
        0x00, // mov eax, 0x1ff (APIC enable, spurious 0xff)
        0x66,
        0x31,
        0xd2, //                    xor edx, edx
        0x0f,
        0x30, //                          wrmsr
        0xba,
        READY_PORT as u8,
        0x00, //        mov dx, READY_PORT
        0xee, //                                out dx, al
        0xfb, //                                sti
        0xf4, //                                hlt
        0xeb,
        0xfd, //                          jmp hlt
    ]
}

/// Handler for VECTOR: report it, EOI through the x2APIC EOI MSR, iret.
fn handler_code() -> Vec<u8> {
    vec![
        0xb0,
        VECTOR, //                        mov al, VECTOR
        0xba,
        VECTOR_PORT as u8,
        0x00, //       mov dx, VECTOR_PORT
        0xee, //                                out dx, al
        0x66,
        0xb9,
        0x0b,
        0x08,
        0x00,
        0x00, // mov ecx, 0x80b (x2APIC EOI)
        0x66,
        0x31,
        0xc0, //                    xor eax, eax
        0x66,
        0x31,
        0xd2, //                    xor edx, edx
        0x0f,
        0x30, //                          wrmsr
        0xcf, //                                iret
    ]
}

#[test]
fn irqfd_write_delivers_msi_without_userspace_injection() {
    let kvm = Kvm::new().expect("this test needs /dev/kvm (KVM tests run in CI)");
    let vm = Arc::new(vmm::vm::create_vm(&kvm).expect("VM with split irqchip"));
    let mem = vmm::vm::create_memory(&vm, 64 << 20).expect("guest memory");
    mem.write_slice(&main_code(), GuestAddress(CODE)).unwrap();
    mem.write_slice(&handler_code(), GuestAddress(HANDLER))
        .unwrap();
    // Real-mode IVT entry for VECTOR: offset, then segment 0.
    mem.write_obj(HANDLER as u16, GuestAddress(u64::from(VECTOR) * 4))
        .unwrap();
    mem.write_obj(0u16, GuestAddress(u64::from(VECTOR) * 4 + 2))
        .unwrap();

    let im = Arc::new(InterruptManager::new(vm.clone(), 24, (24, 1023)));
    im.init_routing().unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ss.base = 0;
    sregs.ss.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rsp: 0x8000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();

    let (tx, rx) = channel();
    let runner = std::thread::spawn(move || loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                tx.send((port, data[0])).unwrap();
                if port == VECTOR_PORT {
                    return;
                }
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => panic!("KVM_RUN failed: {e}"),
        }
    });

    let wait = Duration::from_secs(60);
    assert_eq!(
        rx.recv_timeout(wait).expect("guest never got ready").0,
        READY_PORT
    );

    // Route a fresh MSI GSI to APIC ID 0, fixed delivery, VECTOR; then attach its irqfd.
    let gsi = im.allocate_msi().unwrap();
    im.update_routes(&[(
        gsi.gsi(),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: u32::from(VECTOR),
        }),
    )])
    .unwrap();
    let line = im.irqfd_line(gsi.gsi()).unwrap();
    let before = im.counters();
    line.trigger().unwrap();

    let (port, vector) = rx
        .recv_timeout(wait)
        .expect("interrupt never reached the guest");
    assert_eq!((port, vector), (VECTOR_PORT, VECTOR));
    runner.join().unwrap();
    let after = im.counters();
    assert_eq!(
        after.userspace_injected, 0,
        "delivery must not go through userspace"
    );
    assert_eq!(after.irqfd_triggers - before.irqfd_triggers, 1);
}
