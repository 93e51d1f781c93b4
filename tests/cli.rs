//! Bad command-line input: one error line on stderr, a non-zero exit, never a panic.

use std::process::Command;

use e2e::{temp_path, vmm_binary};

/// A fresh file per call: the tests run in parallel, and one test rewriting a file another
/// is reading made them flaky.
fn temp(name: &str, bytes: &[u8]) -> String {
    let p = temp_path(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

fn fake_bzimage() -> String {
    let mut b = vec![0u8; 0x400];
    b[0x202..0x206].copy_from_slice(b"HdrS");
    temp("bzImage", &b)
}

/// Runs vmm and asserts: non-zero exit, exactly one stderr line containing `expect`.
fn assert_one_line_error(args: &[&str], expect: &str) {
    let out = Command::new(vmm_binary())
        .args(args)
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one error line, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(expect),
        "{args:?}: {:?} lacks {expect:?}",
        lines[0]
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing should reach the console");
}

#[test]
fn missing_kernel_argument() {
    assert_one_line_error(&[], "--kernel");
}

#[test]
fn kernel_file_does_not_exist() {
    assert_one_line_error(
        &["--kernel", "/nonexistent/bzImage"],
        "Cannot read kernel /nonexistent/bzImage",
    );
}

#[test]
fn kernel_is_a_directory() {
    assert_one_line_error(&["--kernel", "/"], "Cannot read kernel /");
}

#[test]
fn kernel_is_not_a_kernel() {
    let f = temp("notes.txt", b"just some text, no kernel here");
    assert_one_line_error(&["--kernel", &f], "is not a bzImage or an ELF vmlinux");
}

#[test]
fn zero_cpus() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--cpus", "0"],
        "--cpus must be between 1 and 254, got 0",
    );
}

#[test]
fn cpus_not_a_number() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--cpus", "two"],
        "invalid value 'two'",
    );
}

#[test]
fn memory_too_small() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--memory", "16"],
        "--memory must be between 64 and",
    );
}

#[test]
fn memory_too_large() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--memory", "999999999"],
        "--memory must be between 64 and",
    );
}

#[test]
fn negative_memory() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--memory", "-5"],
        "unexpected argument",
    );
}

#[test]
fn initrd_missing() {
    assert_one_line_error(
        &[
            "--kernel",
            &fake_bzimage(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "Cannot read initrd",
    );
}

#[test]
fn unknown_iommu_mode() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--iommu=maybe"],
        "--iommu=maybe: expected on, off, or a comma-separated list of dma, intremap, pvremap",
    );
}

#[test]
fn pv_remapping_excludes_vtd_remapping() {
    for mode in ["--iommu=intremap,pvremap", "--iommu=on,pvremap"] {
        assert_one_line_error(
            &["--kernel", &fake_bzimage(), mode],
            "pvremap (PV-IR) and intremap (VT-d, also part of `on`) exclude each other",
        );
    }
}

#[test]
fn unknown_flag() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--frobnicate"],
        "unexpected argument '--frobnicate'",
    );
}

#[test]
fn truncated_bzimage_fails_to_load_without_panic() {
    // Passes the format sniff but linux-loader must refuse it: one line, non-zero exit.
    assert_one_line_error(
        &["--kernel", &fake_bzimage()],
        "Cannot load the guest kernel",
    );
}

#[test]
fn device_tree_cannot_describe_interrupt_remapping() {
    for iommu in ["--iommu", "--iommu=on", "--iommu=intremap"] {
        assert_one_line_error(
            &["--kernel", &fake_bzimage(), "--firmware", "dt", iommu],
            "--firmware dt cannot describe interrupt remapping",
        );
    }
    let out = Command::new(vmm_binary())
        .args(["--kernel", &fake_bzimage(), "--firmware=dt", "--iommu"])
        .output()
        .expect("run vmm");
    assert_eq!(out.status.code(), Some(2), "a configuration error exits 2");
}

#[test]
fn unknown_firmware() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--firmware", "uefi"],
        "invalid value 'uefi'",
    );
}

#[test]
fn zero_timeout() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--timeout", "0"],
        "--timeout must be at least 1 second",
    );
}

#[test]
fn timeout_not_a_number() {
    assert_one_line_error(
        &["--kernel", &fake_bzimage(), "--timeout", "5s"],
        "invalid value '5s' for '--timeout <SECS>'",
    );
}

#[test]
fn device_tree_with_a_pci_disk_is_refused() {
    let disk = temp("disk.img", &[0u8; 4096]);
    assert_one_line_error(
        &[
            "--kernel",
            &fake_bzimage(),
            "--firmware",
            "dt",
            "--disk",
            &format!("{disk},transport=pci"),
        ],
        "--firmware dt does not describe PCI",
    );
}
