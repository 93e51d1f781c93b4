//! Harness for end-to-end tests: finds the `vmm` binary and the test guest, boots it with
//! the checks the guest agent should run, and collects what the guest printed.
//!
//! The guest agent (`tests/guest-agent`, the initramfs's `/init`) prints `GUEST_INIT_REACHED`,
//! then `GUEST_FACT <check>.<key>=<value>` and `GUEST_CHECK <name> PASS|FAIL ...` lines, then
//! `GUEST_DONE pass=P fail=F`, and powers off.
//!
//! Missing prerequisites (no /dev/kvm, guest image not built) fail the test with a message
//! saying what to do: CI has both, so a skip would hide a broken setup.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The `vmm` binary: `$VMM_BIN`, or the one next to this test's target directory.
pub fn vmm_binary() -> PathBuf {
    if let Ok(p) = std::env::var("VMM_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("vmm"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "vmm binary not found at {}: run `cargo build` first (or set VMM_BIN)",
        bin.display()
    );
    bin
}

/// The test guest built by `resources/guest/build.sh`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// ELF kernel (boots through PVH).
    pub vmlinux: PathBuf,
    /// bzImage of the same kernel.
    pub bzimage: PathBuf,
    /// Uncompressed initramfs whose /init is the guest agent (nothing else: unpacking costs
    /// emulated guest time on a PVM host).
    pub initramfs: PathBuf,
    /// The same plus `/usr/bin/fio`, for runs with the `fio` check.
    pub initramfs_fio: PathBuf,
    /// The same files as an ext4 image, for `root=/dev/vda` boots without an initramfs.
    pub rootfs: PathBuf,
    /// Extra guest command line this host needs (empty on a real KVM host).
    pub host_cmdline: String,
}

/// Whether this host's KVM is PVM (guest kernel code runs in KVM's emulator and needs the
/// `emul_quirks` command line; see "The PVM host" in resources/guest/README.md).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Locates the built guest image, failing loudly if it is missing.
pub fn guest_image() -> GuestImage {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: end-to-end tests need KVM"
    );
    let script = workspace_root().join("resources/guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print-dir")
        .output()
        .expect("run resources/guest/build.sh --print-dir");
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned();
    assert!(
        out.status.success() && !dir.is_empty(),
        "test guest is not built: run `bash resources/guest/build.sh` (CI does it in .ci/run)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(dir);
    let host_cmdline = if host_is_pvm() {
        std::fs::read_to_string(dir.join("cmdline-pvm.txt"))
            .expect("cmdline-pvm.txt")
            .trim()
            .to_owned()
    } else {
        String::new()
    };
    GuestImage {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio"),
        initramfs_fio: dir.join("initramfs-fio.cpio"),
        rootfs: dir.join("rootfs.ext4"),
        host_cmdline,
    }
}

/// One guest boot to run.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Kernel to boot.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Guest command line (the harness adds the console, host quirks and checks).
    pub cmdline: Vec<String>,
    /// Extra vmm arguments.
    pub args: Vec<String>,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// How long to wait for the VMM to exit.
    pub timeout: Duration,
    /// Send this signal to the VMM after this long (lifecycle tests).
    pub kill_after: Option<(Duration, i32)>,
    /// Where `--stats-json` goes (always passed, read back into [`GuestOutput::stats`]).
    pub stats_json: PathBuf,
}

/// A unique temporary path for this test process.
pub fn temp_path(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("vmm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::SeqCst)))
}

/// A sparse raw disk image of `mib` MiB.
pub fn disk_image(mib: u64) -> PathBuf {
    let p = temp_path("disk.img");
    let f = std::fs::File::create(&p).expect("create disk image");
    f.set_len(mib << 20).expect("size disk image");
    p
}

#[path = "guest-agent/src/pattern.rs"]
#[allow(dead_code, missing_docs)]
mod pattern;

/// FNV-1a 64 of the first `len` bytes of `image`, and of the pattern the guest agent's `disk`
/// check writes with `seed`; equal when the guest's writes reached the image.
pub fn image_and_pattern_hash(image: &Path, seed: u64, len: u64) -> (u64, u64) {
    let data = std::fs::read(image).expect("read disk image");
    let len = len as usize;
    assert!(
        data.len() >= len,
        "disk image is shorter than the written region"
    );
    (
        pattern::fnv1a64(&data[..len]),
        pattern::pattern_fnv64(seed, len as u64),
    )
}

impl GuestRun {
    /// A run of `kernel` with the test initramfs and `checks` for the guest agent: the one
    /// with fio when `checks` has `fio`.
    pub fn new(image: &GuestImage, kernel: &Path, checks: &str) -> Self {
        let mut cmdline = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".to_owned(),
            format!("guest.checks={checks}"),
        ];
        if !image.host_cmdline.is_empty() {
            cmdline.push(image.host_cmdline.clone());
        }
        GuestRun {
            kernel: kernel.to_owned(),
            initrd: Some(if checks.split(',').any(|c| c == "fio") {
                image.initramfs_fio.clone()
            } else {
                image.initramfs.clone()
            }),
            cmdline,
            args: Vec::new(),
            cpus: 1,
            memory_mib: 256,
            timeout: Duration::from_secs(900),
            stats_json: temp_path("stats.json"),
            kill_after: None,
        }
    }

    /// Describes the platform with a device tree instead of ACPI (`--firmware dt`; call it
    /// after setting `args`). The guest gets `acpi=off` (Linux takes CPUs and the IOAPIC from
    /// the tree only with ACPI disabled; the VMM writes no RSDP, this makes it explicit) and
    /// `pci=off` (the tree has no PCI host bridge: no legacy PCI probing).
    pub fn use_device_tree(&mut self) {
        self.args.extend(["--firmware".to_owned(), "dt".to_owned()]);
        self.cmdline
            .extend(["acpi=off".to_owned(), "pci=off".to_owned()]);
    }

    /// Boots the guest and waits for the VMM to exit (or kills it at the timeout).
    pub fn run(&self) -> GuestOutput {
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--memory")
            .arg(self.memory_mib.to_string())
            .arg("--cmdline")
            .arg(self.cmdline.join(" "))
            .args(&self.args)
            .arg("--stats")
            .arg("--stats-json")
            .arg(&self.stats_json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(i) = &self.initrd {
            cmd.arg("--initrd").arg(i);
        }
        eprintln!("e2e: running {cmd:?}");
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn vmm");
        let pid = child.id();
        let threads_at_init = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads_seen = threads_at_init.clone();
        let (tx, rx) = channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned();
                let mut seen = threads_seen.lock().expect("thread list");
                if line.contains("GUEST_INIT_REACHED") && seen.is_empty() {
                    *seen = vmm_threads(pid);
                }
                drop(seen);
                let _ = tx.send((start.elapsed(), false, line));
            }
        });
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send((start.elapsed(), true, line));
            }
        });
        let mut signalled = false;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait vmm") {
                break Some(s);
            }
            if let Some((after, sig)) = self.kill_after {
                if !signalled && start.elapsed() > after {
                    let ok = Command::new("kill")
                        .arg(format!("-{sig}"))
                        .arg(child.id().to_string())
                        .status()
                        .is_ok_and(|s| s.success());
                    assert!(ok, "cannot send signal {sig} to the vmm");
                    signalled = true;
                }
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = out_reader.join();
        let _ = err_reader.join();
        let mut out = GuestOutput {
            status,
            elapsed: start.elapsed(),
            threads_at_init: std::mem::take(&mut *threads_at_init.lock().expect("thread list")),
            ..Default::default()
        };
        for (t, is_err, line) in rx.try_iter() {
            out.timeline.push((t, is_err, line.clone()));
            if is_err {
                out.stderr.push(line);
            } else {
                out.absorb(t, line);
            }
        }
        out.timeline.sort_by_key(|(t, _, _)| *t);
        out.stats = std::fs::read_to_string(&self.stats_json)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
        eprintln!(
            "e2e: vmm exited with {:?} after {:.1}s",
            out.status,
            out.elapsed.as_secs_f64()
        );
        out
    }
}

/// The VMM's threads, read from `/proc/PID/task/*/{comm,status}`: (name, `Seccomp:` value).
fn vmm_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.map_while(Result::ok) {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let seccomp = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        out.push((comm.trim().to_owned(), seccomp));
    }
    out.sort();
    out
}

/// What a guest run produced.
#[derive(Debug, Default)]
pub struct GuestOutput {
    /// Exit status; `None` if the run timed out and was killed.
    pub status: Option<ExitStatus>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Serial console lines.
    pub serial: Vec<String>,
    /// VMM stderr lines.
    pub stderr: Vec<String>,
    /// Time from VMM start to `GUEST_INIT_REACHED`.
    pub init_reached: Option<Duration>,
    /// Time from VMM start to `GUEST_DONE`.
    pub done: Option<Duration>,
    /// `GUEST_FACT` values by key (a repeated key keeps every value).
    pub facts: BTreeMap<String, Vec<String>>,
    /// `GUEST_CHECK` results: name → (passed, detail).
    pub checks: BTreeMap<String, (bool, String)>,
    /// The VMM's `--stats-json` counters, if it wrote them.
    pub stats: Option<serde_json::Value>,
    /// Every serial (`false`) and stderr (`true`) line with its arrival time.
    pub timeline: Vec<(Duration, bool, String)>,
    /// `GUEST_KMSG` lines (kernel log lines the `kmsg` check printed).
    pub kmsg: Vec<String>,
    /// `GUEST_MARK` lines: label (`init`, `<check>.start`, `<check>.end`, a check's sub-phase
    /// `<check>.<phase>`) → mark ID.
    pub marks: BTreeMap<String, u64>,
    /// The VMM's threads when the guest printed `GUEST_INIT_REACHED`: (name, the `Seccomp:`
    /// field of `/proc/PID/task/TID/status`, 2 = filter installed).
    pub threads_at_init: Vec<(String, String)>,
}

impl GuestOutput {
    fn absorb(&mut self, t: Duration, line: String) {
        // The marker may follow other console output on the same line.
        if line.contains("GUEST_INIT_REACHED") && self.init_reached.is_none() {
            self.init_reached = Some(t);
        }
        if let Some(rest) = line.split("GUEST_FACT ").nth(1) {
            if let Some((k, v)) = rest.split_once('=') {
                self.facts
                    .entry(k.trim().to_owned())
                    .or_default()
                    .push(v.trim().to_owned());
            }
        }
        if let Some(rest) = line.split("GUEST_CHECK ").nth(1) {
            let mut parts = rest.splitn(3, ' ');
            let name = parts.next().unwrap_or("").to_owned();
            let passed = parts.next() == Some("PASS");
            let detail = parts.next().unwrap_or("").to_owned();
            self.checks.insert(name, (passed, detail));
        }
        if let Some(rest) = line.split("GUEST_MARK ").nth(1) {
            if let Some((id, label)) = rest.split_once(' ') {
                if let Ok(id) = id.parse() {
                    self.marks.insert(label.trim().to_owned(), id);
                }
            }
        }
        if let Some(rest) = line.split("GUEST_KMSG ").nth(1) {
            self.kmsg.push(rest.to_owned());
        }
        if line.contains("GUEST_DONE") && self.done.is_none() {
            self.done = Some(t);
        }
        self.serial.push(line);
    }

    /// The full transcript, for failure messages.
    pub fn transcript(&self) -> String {
        let mut s = String::from("---- serial ----\n");
        for l in &self.serial {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("---- vmm stderr ----\n");
        for l in &self.stderr {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// The single value of a fact, failing with the transcript if absent.
    pub fn fact(&self, key: &str) -> &str {
        match self.facts.get(key).and_then(|v| v.first()) {
            Some(v) => v,
            None => panic!("guest reported no fact {key}\n{}", self.transcript()),
        }
    }

    /// Asserts the VMM exited 0 after the guest agent finished with every check passing.
    pub fn assert_clean_poweroff(&self) {
        assert!(
            self.status.is_some(),
            "vmm timed out\n{}",
            self.transcript()
        );
        assert!(
            self.init_reached.is_some(),
            "guest never reached init\n{}",
            self.transcript()
        );
        assert!(
            self.done.is_some(),
            "guest agent never finished\n{}",
            self.transcript()
        );
        let failed: Vec<_> = self.checks.iter().filter(|(_, (ok, _))| !ok).collect();
        assert!(
            failed.is_empty(),
            "guest checks failed: {failed:?}\n{}",
            self.transcript()
        );
        assert_eq!(
            self.status.and_then(|s| s.code()),
            Some(0),
            "vmm did not exit 0 after power-off\n{}",
            self.transcript()
        );
    }

    /// Asserts a named guest check ran and passed.
    pub fn assert_check(&self, name: &str) {
        match self.checks.get(name) {
            Some((true, _)) => {}
            Some((false, d)) => panic!("guest check {name} failed: {d}\n{}", self.transcript()),
            None => panic!("guest check {name} did not run\n{}", self.transcript()),
        }
    }

    /// A counter from `--stats-json` by JSON pointer (e.g. `/iommu/requests/map/ok`).
    pub fn stat(&self, pointer: &str) -> u64 {
        let stats = self
            .stats
            .as_ref()
            .unwrap_or_else(|| panic!("vmm wrote no stats\n{}", self.transcript()));
        match stats.pointer(pointer).and_then(|v| v.as_u64()) {
            Some(v) => v,
            None => panic!("no counter {pointer} in {stats}"),
        }
    }

    /// The VMM's counter snapshot at the guest's mark `label` (`--stats-json` `marks`).
    pub fn mark_counters(&self, label: &str) -> &serde_json::Map<String, serde_json::Value> {
        let id = *self
            .marks
            .get(label)
            .unwrap_or_else(|| panic!("the guest wrote no mark {label}\n{}", self.transcript()));
        let stats = self
            .stats
            .as_ref()
            .unwrap_or_else(|| panic!("vmm wrote no stats\n{}", self.transcript()));
        stats
            .pointer("/marks")
            .and_then(|m| m.as_array())
            .and_then(|marks| {
                marks
                    .iter()
                    .find(|m| m.pointer("/id").and_then(|v| v.as_u64()) == Some(id))
            })
            .and_then(|m| m.pointer("/counters"))
            .and_then(|c| c.as_object())
            .unwrap_or_else(|| panic!("no snapshot of mark {id} ({label}) in {stats}"))
    }

    /// How much VMM counter `counter` grew while guest check `check` ran (between its
    /// start and end marks). Exact: the VMM snapshots on the vCPU that writes the mark.
    pub fn during(&self, check: &str, counter: &str) -> u64 {
        self.between(&format!("{check}.start"), &format!("{check}.end"), counter)
    }

    /// How much VMM counter `counter` grew from guest mark `from` to mark `to` (labels as in
    /// [`GuestOutput::marks`], e.g. a check's sub-phase marks `vfio-msix.move.start`).
    pub fn between(&self, from: &str, to: &str, counter: &str) -> u64 {
        let get = |label: &str| {
            self.mark_counters(label)
                .get(counter)
                .and_then(|v| v.as_u64())
                .unwrap_or_else(|| panic!("no counter {counter} at mark {label}"))
        };
        let (start, end) = (get(from), get(to));
        assert!(end >= start, "{counter} went backwards from {from} to {to}");
        end - start
    }

    /// Whether the kernel log (from the `kmsg` check) has a line containing `needle`.
    pub fn kmsg_has(&self, needle: &str) -> bool {
        self.kmsg.iter().any(|l| l.contains(needle))
    }

    /// A one-line timing summary for the test log.
    pub fn timing(&self) -> String {
        let secs =
            |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
        format!(
            "init_reached={} guest_done={} vmm_exit={:.1}s",
            secs(self.init_reached),
            secs(self.done),
            self.elapsed.as_secs_f64()
        )
    }
}
