//! A panic in a VMM thread stops the process with one line and `fatal::EXIT_PANIC`.
//!
//! The panic hook ends the process, so each case re-runs this test binary as a child
//! (`PANIC_CHILD=<case>`) and checks the child's exit status and stderr.

use std::process::Command;
use std::sync::{Arc, Mutex};

use devices::virtio::{ActivateError, DeviceMemory, VirtioDevice, VirtioInterrupt};
use virtio_queue::Queue;
use vmm::fatal::{install_panic_hook, EXIT_PANIC};
use vmm::worker::Worker;
use vmm_sys_util::eventfd::EventFd;

/// A device whose queue handler panics, as a buggy device model would.
struct PanickingDevice;

impl VirtioDevice for PanickingDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn ack_features(&mut self, _: u64) {}
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: DeviceMemory,
        _: Vec<Queue>,
        _: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn process_queue(&mut self, _: usize) {
        panic!("device model bug (test)");
    }
    fn reset(&mut self) {}
}

/// The child's body: a real device worker thread whose device panics on a queue kick.
fn child_worker_panic() -> ! {
    install_panic_hook();
    let kick = Arc::new(EventFd::new(0).unwrap());
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(PanickingDevice));
    let _worker = Worker::spawn("virtio-test0".into(), device, vec![(kick.clone(), 0)]).unwrap();
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(20));
    // Reached only if the panic did not end the process.
    std::process::exit(0)
}

fn child_main_thread_panic() -> ! {
    install_panic_hook();
    panic!("line one\nline two");
}

fn run_child(case: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("PANIC_CHILD", case)
        .output()
        .expect("re-run the test binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Not a test on its own: the entry point of the child processes.
#[test]
fn child_entry() {
    match std::env::var("PANIC_CHILD").as_deref() {
        Ok("worker") => child_worker_panic(),
        Ok("main") => child_main_thread_panic(),
        _ => {}
    }
}

fn fatal_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("vmm: fatal:"))
        .collect()
}

#[test]
fn panic_in_a_device_worker_ends_the_process_with_the_panic_exit_code() {
    let (code, stderr) = run_child("worker");
    assert_eq!(code, Some(EXIT_PANIC), "stderr:\n{stderr}");
    let lines = fatal_lines(&stderr);
    assert_eq!(lines.len(), 1, "stderr:\n{stderr}");
    assert!(
        lines[0].contains("thread 'virtio-test0' panicked at")
            && lines[0].ends_with("device model bug (test)"),
        "{}",
        lines[0]
    );
}

#[test]
fn panic_report_is_one_line() {
    let (code, stderr) = run_child("main");
    assert_eq!(code, Some(EXIT_PANIC), "stderr:\n{stderr}");
    let lines = fatal_lines(&stderr);
    assert_eq!(lines.len(), 1, "stderr:\n{stderr}");
    assert!(lines[0].ends_with("line one line two"), "{}", lines[0]);
}
