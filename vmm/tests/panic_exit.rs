//! A panic in a VMM thread stops the process with one line and `fatal::EXIT_PANIC`.
//!
//! The panic hook ends the process, so each case re-runs this test binary as a child
//! (`PANIC_CHILD=<case>`) and checks the child's exit status and stderr.

use std::process::Command;
use std::sync::Arc;

use devices::virtio::{QueueHandler, QueueProgress};
use vmm::fatal::{install_panic_hook, EXIT_PANIC};
use vmm::worker::Worker;
use vmm_sys_util::eventfd::EventFd;

/// A device data plane whose queue handler panics, as a buggy device model would.
struct PanickingQueue;

impl QueueHandler for PanickingQueue {
    fn process_queue(&self, _: usize) -> QueueProgress {
        panic!("device model bug (test)");
    }
}

/// The child's body: a real device worker thread whose device panics on a queue kick.
fn child_worker_panic() -> ! {
    install_panic_hook();
    let kick = Arc::new(EventFd::new(0).unwrap());
    let _worker = Worker::spawn(
        "virtio-test0".into(),
        Arc::new(PanickingQueue),
        vec![(kick.clone(), 0)],
        None,
    )
    .unwrap();
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
