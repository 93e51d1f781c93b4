//! Boot tests with the real test guest (needs /dev/kvm and the guest image; CI has both).
//! Each boot takes minutes on the PVM host, so one boot runs several checks.

use std::process::Command;

use e2e::{guest_image, GuestRun};

/// PVH boot of the ELF vmlinux with 2 vCPUs: the guest sees both CPUs, the serial
/// interrupt (IOAPIC pin 4 → KVM MSI route → irqfd) counts up, the guest powers off and the
/// VMM exits 0. The same run dumps the ACPI tables, which must decompile with `iasl -d`.
#[test]
fn vmlinux_boots_smp_guest_to_init_and_powers_off() {
    let image = guest_image();
    let tables = std::env::temp_dir().join(format!("vmm-boot-tables-{}", std::process::id()));
    let mut run = GuestRun::new(&image, &image.vmlinux, "cpus,serial-irq,interrupts");
    run.cpus = 2;
    run.args = vec![
        "--dump-tables".into(),
        tables.to_str().unwrap().into(),
        "--stats".into(),
    ];
    let out = run.run();
    println!("BOOT_TIME vmlinux/pvh 2 vCPUs: {}", out.timing());
    out.assert_clean_poweroff();

    assert_eq!(out.fact("cpus.nproc"), "2", "{}", out.transcript());
    assert_eq!(out.fact("cpus.online"), "2", "{}", out.transcript());
    out.assert_check("serial-irq");
    let before: u64 = out.fact("serial-irq.before").parse().unwrap();
    let after: u64 = out.fact("serial-irq.after").parse().unwrap();
    assert!(
        after > before,
        "serial IRQ count did not grow: {before} -> {after}"
    );
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("userspace_injected=0")),
        "interrupts must all go through irqfds\n{}",
        out.transcript()
    );

    for name in ["DSDT", "APIC", "FACP", "XSDT"] {
        let path = tables.join(format!("{name}.dat"));
        assert!(
            path.exists(),
            "--dump-tables did not write {}",
            path.display()
        );
        let iasl = Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(&tables)
            .output()
            .expect("iasl (Debian acpica-tools) is needed for this test");
        let text = String::from_utf8_lossy(&iasl.stdout).to_string()
            + &String::from_utf8_lossy(&iasl.stderr);
        assert!(
            iasl.status.success() && !text.contains("Error"),
            "iasl -d {name}: {text}"
        );
    }
}

/// The bzImage path (64-bit boot protocol, gzip decompressor run by the guest).
#[test]
fn bzimage_boots_to_init_and_powers_off() {
    let image = guest_image();
    let out = GuestRun::new(&image, &image.bzimage, "cpus").run();
    println!("BOOT_TIME bzImage 1 vCPU: {}", out.timing());
    out.assert_clean_poweroff();
    assert_eq!(out.fact("cpus.nproc"), "1");
}
