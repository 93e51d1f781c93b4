//! `scripts/bench-fio.sh`: one configuration (virtio-mmio disk behind the virtio-iommu in
//! strict mode), 3 s per fio job, one guest boot: the results JSON has every figure, numeric,
//! the table and the chart are written. And the A/B verdict (`--compare`) on synthetic results:
//! a change is flagged only at p < 0.01 and >= 5 %.

use std::process::Command;

use e2e::{guest_image, temp_path, vmm_binary, workspace_root};

fn script() -> std::path::PathBuf {
    workspace_root().join("scripts/bench-fio.sh")
}

#[test]
fn bench_fio_one_configuration_three_seconds() {
    let _ = guest_image(); // fails with a clear message if KVM or the guest is missing
    let out = temp_path("bench-fio");
    let status = Command::new("bash")
        .arg(script())
        .args(["--out", out.to_str().unwrap(), "--runtime", "3"])
        .args(["--iommu", "strict", "--remap", "off", "--no-qemu"])
        .env("VMM_BIN", vmm_binary())
        .status()
        .expect("run bench-fio.sh");
    assert!(status.success(), "bench-fio.sh failed: {status}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let configs = json["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 1, "{json}");
    let c = &configs[0];
    for key in [
        "randread.iops",
        "randread.bw_kib_s",
        "randread.clat_p50_us",
        "randread.clat_p99_us",
        "randwrite.iops",
        "lat.iops",
        "lat.clat_p50_us",
        "lat.clat_p99_us",
        "disk_exits_per_io",
        "register_exits_per_io",
        "irqs_per_io",
        "map_per_io",
        "unmap_per_io",
        "vmm_cpu_us_per_io",
        "vcpu_cpu_us_per_io",
        "process_cpu_s",
    ] {
        assert!(c[key].is_number(), "{key} missing or not a number: {c}");
    }
    assert!(c["randread.iops"].as_f64().unwrap() > 0.0, "{c}");
    // Strict mode: the guest maps and unmaps around every I/O.
    assert!(c["map_per_io"].as_f64().unwrap() >= 1.0, "{c}");
    assert!(c["unmap_per_io"].as_f64().unwrap() >= 1.0, "{c}");
    // virtio-mmio: two register exits (InterruptStatus read, ACK write) per interrupt.
    let (exits, irqs) = (
        c["disk_exits_per_io"].as_f64().unwrap(),
        c["irqs_per_io"].as_f64().unwrap(),
    );
    assert!(irqs > 0.0 && exits > 0.0, "{c}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("vmm mmio iommu=strict remap=off"), "{md}");
    let png = std::fs::read(out.join("results.png")).expect("results.png (gnuplot-nox)");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // The same boot shows that Linux found the VMM's MP table (so its search stopped at
    // 639 KiB instead of scanning the BIOS area).
    let log = c["log"].as_str().map(|l| out.join(l));
    let runs = json["runs"].as_array().unwrap();
    let log = log.or_else(|| runs[0]["log"].as_str().map(|l| out.join(l)));
    let console = std::fs::read_to_string(log.expect("a run log")).unwrap();
    assert!(
        console.contains("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"),
        "no MP table found by the guest"
    );
}

/// A results file with `runs` samples per metric around `mean`.
fn results(iops: &[f64], exits: &[f64]) -> String {
    serde_json::json!({
        "configs": [{
            "config": {"name": "vmm mmio iommu=off remap=off"},
            "samples": {"randread.iops": iops, "disk_exits_per_io": exits},
        }]
    })
    .to_string()
}

#[test]
fn ab_compare_flags_only_significant_changes_of_five_percent() {
    let base = temp_path("base.json");
    let new = temp_path("new.json");
    std::fs::write(
        &base,
        results(
            &[100.0, 101.0, 99.0, 100.5, 99.5],
            &[2.0, 2.0, 2.0, 2.01, 1.99],
        ),
    )
    .unwrap();
    // IOPS 10 % lower, clearly separated: a regression. Exits 1 % higher but separated:
    // significant yet below 5 %, so not flagged.
    std::fs::write(
        &new,
        results(
            &[90.0, 90.5, 89.5, 90.2, 89.8],
            &[2.03, 2.02, 2.02, 2.03, 2.02],
        ),
    )
    .unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg("--compare")
        .arg(&base)
        .arg(&new)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a regression exits 1: {text}");
    let line = |key: &str| text.lines().find(|l| l.contains(key)).unwrap().to_owned();
    assert!(line("randread.iops").contains("REGRESSED"), "{text}");
    assert!(line("disk_exits_per_io").contains("no change"), "{text}");
    // Too few runs: never a verdict.
    std::fs::write(&new, results(&[50.0, 50.0], &[2.0, 2.0])).unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg("--compare")
        .arg(&base)
        .arg(&new)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("too few runs"), "{text}");
}
