//! Shared by the KVM tests: a tiny real-mode guest that enables its x2APIC, says it is
//! ready on a port, then halts with interrupts on; its handlers for [`VECTOR`] and
//! [`FAULT_VECTOR`] write the vector to [`VECTOR_PORT`] and EOI. No Linux involved.

#![allow(dead_code)]

pub mod pvirq;
pub mod remap;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use std::time::{Duration, Instant};

use devices::Ioapic;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm::interrupts::{InterruptManager, ParkedPoller};
use vmm::irq_routing::{IrqRouter, RemapBus};
use vmm::remapper::InterruptRemapper;

use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Port the guest writes the vector of each interrupt it handles to.
pub const VECTOR_PORT: u16 = 0x10;
/// Port the guest writes to once its LAPIC is enabled and interrupts are on.
pub const READY_PORT: u16 = 0x11;
pub const VECTOR: u8 = 0x40;
/// A second vector the guest counts without stopping (the tests send fault events there).
pub const FAULT_VECTOR: u8 = 0x41;
pub const CODE: u64 = 0x1000;
pub const HANDLER: u64 = 0x1100;
pub const FAULT_HANDLER: u64 = 0x1200;

/// 16-bit code: switch the LAPIC to x2APIC mode, software-enable it, say ready, then
/// `sti; hlt` forever.
pub fn main_code() -> Vec<u8> {
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

/// Handler for `vector`: report it, EOI through the x2APIC EOI MSR, iret.
pub fn handler_code(vector: u8) -> Vec<u8> {
    vec![
        0xb0,
        vector, //                        mov al, vector
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

/// A VM with split irqchip running the tiny guest on one vCPU.
pub struct TinyGuest {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Its memory (64 MiB).
    pub mem: GuestMemoryMmap,
    /// (port, value) of each byte the guest writes to a port; the vCPU thread ends after the
    /// first write of `VECTOR` to `VECTOR_PORT`.
    pub ports: Receiver<(u16, u8)>,
    /// The vCPU thread.
    pub vcpu: JoinHandle<()>,
}

/// Starts the tiny guest and waits until it is ready for interrupts.
pub fn start_tiny_guest() -> TinyGuest {
    let kvm = Kvm::new().expect("this test needs /dev/kvm (KVM tests run in CI)");
    let vm = Arc::new(vmm::vm::create_vm(&kvm).expect("VM with split irqchip"));
    let mem = vmm::vm::create_memory(&vm, 64 << 20).expect("guest memory");
    mem.write_slice(&main_code(), GuestAddress(CODE)).unwrap();
    for (vector, handler) in [(VECTOR, HANDLER), (FAULT_VECTOR, FAULT_HANDLER)] {
        mem.write_slice(&handler_code(vector), GuestAddress(handler))
            .unwrap();
        // Real-mode IVT entry: offset, then segment 0.
        mem.write_obj(handler as u16, GuestAddress(u64::from(vector) * 4))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(u64::from(vector) * 4 + 2))
            .unwrap();
    }

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
    let thread = std::thread::spawn(move || loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                tx.send((port, data[0])).unwrap();
                if port == VECTOR_PORT && data[0] == VECTOR {
                    return;
                }
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => panic!("KVM_RUN failed: {e}"),
        }
    });
    let ready = rx.recv_timeout(WAIT).expect("guest never got ready");
    assert_eq!(ready.0, READY_PORT);
    TinyGuest {
        vm,
        mem,
        ports: rx,
        vcpu: thread,
    }
}

/// How long to wait for the guest.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The VMM's parked-source poller, on its own event loop thread; stops when dropped.
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    pub fn start(im: Arc<InterruptManager>) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
                EventManager::new().unwrap();
            manager.add_subscriber(Arc::new(Mutex::new(ParkedPoller::new(im))));
            while !flag.load(Ordering::SeqCst) {
                manager.run_with_timeout(20).unwrap();
            }
        });
        Poller {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The tiny guest behind an interrupt router, as the remapping KVM tests use it.
pub struct RoutedGuest {
    pub guest: TinyGuest,
    /// 24 IOAPIC pins, MSI GSIs 24..=1023, KVM routing initialised.
    pub im: Arc<InterruptManager>,
    pub router: Arc<Mutex<IrqRouter>>,
    /// The router's register page (the remapper's registers).
    pub regs: RemapBus,
    /// The VMM's parked-source poller; stops when dropped.
    pub poller: Poller,
}

/// Starts the tiny guest, its interrupt manager, a router over IOAPIC `ioapic_id` (its pins
/// with requester ID `ioapic_sid`) translating through the remapper `remapper` builds on the
/// guest's memory, and the parked-source poller.
pub fn start_routed_guest(
    ioapic_id: u8,
    ioapic_sid: u16,
    remapper: impl FnOnce(&GuestMemoryMmap) -> Box<dyn InterruptRemapper>,
) -> RoutedGuest {
    let guest = start_tiny_guest();
    let im = Arc::new(InterruptManager::new(guest.vm.clone(), 24, (24, 1023)));
    im.init_routing().unwrap();
    let router = IrqRouter::with_remapper(
        Ioapic::new(ioapic_id),
        Some(remapper(&guest.mem)),
        im.clone(),
        ioapic_sid,
    );
    let regs = RemapBus(router.clone());
    let poller = Poller::start(im.clone());
    RoutedGuest {
        guest,
        im,
        router,
        regs,
        poller,
    }
}

/// Waits for the guest to report `vector`.
pub fn expect_vector(guest: &TinyGuest, vector: u8, what: &str) {
    let (port, got) = guest
        .ports
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("guest did not get {what}"));
    assert_eq!((port, got), (VECTOR_PORT, vector), "{what}");
}

/// Checks that the guest reports nothing within 300 ms.
pub fn expect_nothing(guest: &TinyGuest, what: &str) {
    if let Ok(got) = guest.ports.recv_timeout(Duration::from_millis(300)) {
        panic!("{what}: unexpected {got:?}");
    }
}

/// Polls `cond` every 5 ms until it holds; fails after [`WAIT`].
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
