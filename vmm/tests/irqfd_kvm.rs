//! KVM test without Linux: an irqfd write delivers an MSI to a tiny real-mode guest, and no
//! interrupt is injected from userspace. Needs /dev/kvm (fails loudly without it).

mod common;

use std::sync::Arc;

use common::{start_tiny_guest, VECTOR, VECTOR_PORT, WAIT};
use devices::{InterruptLine, MsiMessage};
use vmm::interrupts::InterruptManager;

#[test]
fn irqfd_write_delivers_msi_without_userspace_injection() {
    let guest = start_tiny_guest();
    let im = Arc::new(InterruptManager::new(guest.vm.clone(), 24, (24, 1023)));
    im.init_routing().unwrap();

    // Route a fresh MSI GSI to APIC ID 0, fixed delivery, VECTOR; then attach its irqfd.
    let gsi = im.allocate_msi().unwrap();
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: u32::from(VECTOR),
    };
    im.update_routes(&[(gsi.gsi(), Some(msg))]).unwrap();
    let line = im.irqfd_line(gsi.gsi()).unwrap();
    let before = im.counters();
    line.trigger().unwrap();

    let (port, vector) = guest
        .ports
        .recv_timeout(WAIT)
        .expect("interrupt never reached the guest");
    assert_eq!((port, vector), (VECTOR_PORT, VECTOR));
    guest.vcpu.join().unwrap();
    let after = im.counters();
    assert_eq!(
        after.signal_msi, 0,
        "delivery must not go through userspace"
    );
    assert_eq!(after.irqfd_triggers - before.irqfd_triggers, 1);
}
