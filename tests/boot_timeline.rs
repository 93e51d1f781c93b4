//! `scripts/boot-timeline.py` on two synthetic consoles: the boots are aligned on the messages
//! they share (numbers blanked), each stretch's time on both sides and the difference come out
//! largest first with the messages only one side printed, `--host` uses the host arrival
//! times, and a log without printk timestamps is one error line and a non-zero exit.

use std::process::{Command, Output};

use e2e::{temp_path, workspace_root};

fn timeline(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(workspace_root().join("scripts/boot-timeline.py"))
        .args(args)
        .output()
        .expect("run python3 scripts/boot-timeline.py")
}

fn write(name: &str, text: &str) -> String {
    let p = temp_path(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn aligns_two_boots_and_ranks_the_stretches() {
    // A spends 4 s in the "pci" stretch where B spends 1 s and prints two extra lines; the
    // device numbers differ (blanked). B's host clock is 10 s ahead of its printk clock.
    let a = write(
        "timeline-a.log",
        "100 [    0.000000] Linux version 6.12\n\
         200 [    1.000000] ACPI: bus 0 ready\n\
         300 [    5.000000] virtio_blk virtio1: [vda] 131072 blocks\n\
         400 [    6.500000] Run /init as init process\n\
         GUEST_INIT_REACHED\n",
    );
    let b = write(
        "timeline-b.log",
        "10000 [    0.000000] Linux version 6.12\n\
         11000 [    1.000000] ACPI: bus 0 ready\n\
         11500 [    1.500000] pci 0000:00:02.0: enabling device\n\
         11700 [    1.700000] pci 0000:00:03.0: enabling device\n\
         12000 [    2.000000] virtio_blk virtio2: [vda] 131072 blocks\n\
         13000 [    3.000000] Run /init as init process\n",
    );
    let out = timeline(&[&a, &b, "--names", "vmm,ch", "--top", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("4 shared messages of 4 (vmm) and 6 (ch)"),
        "{text}"
    );
    assert!(
        text.contains("between them: vmm 6.500 s, ch 3.000 s, difference +3.500 s"),
        "{text}"
    );
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| vmm"))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    // Largest first: the 4000 vs 1000 ms stretch, with B's extra lines named; then 1500 vs 1000.
    assert!(
        rows[0].starts_with("| 4000 | 1000 | +3000 | ACPI: bus 0 ready | virtio_blk"),
        "{text}"
    );
    assert!(
        rows[0].contains("pci 0000:00:02.0: enabling device; pci 0000:00:03.0"),
        "{text}"
    );
    assert!(
        rows[1].starts_with("| 1500 | 1000 | +500 | virtio_blk"),
        "{text}"
    );

    // Host arrival times: the stretches are 100 ms each on A, 1000 ms and 2000 ms on B.
    let out = timeline(&[&a, &b, "--host", "--top", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("host arrival clock"), "{text}");
    assert!(
        text.contains("between them: A 0.300 s, B 3.000 s, difference -2.700 s"),
        "{text}"
    );
}

#[test]
fn a_log_without_timestamps_is_one_error_line() {
    let a = write("timeline-none.log", "no printk here\nGUEST_INIT_REACHED\n");
    let out = timeline(&[&a, &a]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no printk-timestamped lines"), "{err}");
    // --host on a console without host times says so.
    let b = write(
        "timeline-printk.log",
        "[    1.000000] x\n[    2.000000] y\n",
    );
    let out = timeline(&[&b, &b, "--host"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no host timestamps"));
}
