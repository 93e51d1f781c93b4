//! CI-friendly exits on the real `vmm` binary and KVM, with no Linux boot: each test writes a
//! tiny ELF "kernel" (64-bit code entered through the Linux 64-bit boot protocol) and runs
//! `vmm` on it.
//!
//! - a guest write of V to the `--debug-exit` port 0xf4 ends the VMM with `(V << 1) | 1`;
//! - `--timeout 5` on a guest that never powers off ends it after ~5 s with exit 124.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Load and entry address of the tiny kernel (1 MiB, where the VMM loads kernels).
const LOAD: u64 = 0x10_0000;

/// An ELF64 executable with one PT_LOAD segment of `code` at [`LOAD`], entry at its start.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let off = (EHDR + PHDR) as u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len(), EHDR);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&off.to_le_bytes()); // p_offset
    f.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

fn write_kernel(name: &str, code: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-ci-exits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code)).unwrap();
    p
}

fn vmm() -> Command {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test runs the vmm binary on KVM"
    );
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

/// `mov al, V; out 0xf4, al; 1: hlt; jmp 1b`.
fn debug_exit_code(v: u8) -> Vec<u8> {
    vec![0xb0, v, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]
}

#[test]
fn a_guest_write_to_the_debug_exit_port_ends_the_vmm_with_v_shl_1_or_1() {
    for v in [0u8, 0x10, 0x7f] {
        let k = write_kernel(&format!("exit{v}"), &debug_exit_code(v));
        let out = vmm()
            .args([
                "--kernel",
                k.to_str().unwrap(),
                "--memory",
                "64",
                "--debug-exit",
            ])
            .args(["--timeout", "60"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from((v << 1) | 1)),
            "value {v:#x}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("debug-exit port"), "{stderr}");
    }
}

#[test]
fn without_debug_exit_the_port_does_nothing() {
    // The same write, no --debug-exit: the guest halts forever, the timeout stops it.
    let k = write_kernel("noexit", &debug_exit_code(1));
    let out = vmm()
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
}

#[test]
fn timeout_stops_a_guest_that_never_powers_off() {
    // `1: jmp 1b`: spins forever, never exits to the VMM.
    let k = write_kernel("spin", &[0xeb, 0xfe]);
    let stats = k.with_file_name("spin-stats.json");
    let start = Instant::now();
    let out = vmm()
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64",
            "--timeout",
            "5",
        ])
        .arg("--stats-json")
        .arg(&stats)
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(15),
        "stopped after {took:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("--timeout"), "{stderr}");
    let json = std::fs::read_to_string(&stats).unwrap();
    assert!(json.contains("\"exit_code\":124"), "{json}");
    // The overhead figures: start-up to the first KVM_RUN, RSS without guest RAM, threads.
    for key in ["first_kvm_run_ms", "rss_exit_kib", "threads", "cpu_vmm_ms"] {
        let at = json
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("{key}: {json}"));
        let v: String = json[at + key.len() + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert!(!v.is_empty(), "{key} is not a number: {json}");
    }
}
