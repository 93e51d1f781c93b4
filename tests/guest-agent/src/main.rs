//! guest-agent: /init of the test guest's initramfs (see README.md for the line formats).
//!
//! As PID 1 it mounts /proc, /sys, /dev and /tmp, prints `GUEST_INIT_REACHED`, runs the checks
//! named by `guest.checks=` on the kernel command line, prints `GUEST_DONE pass=P fail=F` and
//! powers the VM off. A panic prints `GUEST_PANIC <msg>` and powers off too, so a host-side
//! test never waits for a guest that will not finish.
//!
//! Not as PID 1 (debugging on a host): `guest-agent ['<cmdline>']` runs the read-only checks
//! against the given command line (default /proc/cmdline), mounts nothing, does not power off,
//! and refuses the checks that write to disks or spawn programs.

mod checks;
mod marker;
mod parse;
#[allow(dead_code)] // shared with host-side tests, which use all of it
mod pattern;
mod vfio;
mod vfio_msix;

use std::ffi::CString;
use std::io::{self, Write};
use std::time::Instant;

use parse::{one_line, Cmdline};

/// Writes one line to the console (stdout) with a single write, so it is not split up.
pub fn emit(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let mut out = io::stdout().lock();
    let _ = out.write_all(buf.as_bytes());
    let _ = out.flush();
}

/// `GUEST_FACT <check>.<key>=<value>`
pub fn fact(check: &str, key: &str, value: impl std::fmt::Display) {
    emit(&format!(
        "GUEST_FACT {check}.{key}={}",
        one_line(&value.to_string())
    ));
}

fn main() {
    let pid1 = std::process::id() == 1;
    std::panic::set_hook(Box::new(move |info| {
        emit(&format!("GUEST_PANIC {}", one_line(&info.to_string())));
        if pid1 {
            power_off();
        }
    }));

    if pid1 {
        if let Err(e) = mount_filesystems() {
            emit(&format!("GUEST_PANIC {}", one_line(&e)));
            power_off();
        }
    }
    let marks = pid1 && marker::enable();
    marker::mark(marks, marker::MARK_INIT, "init");
    emit("GUEST_INIT_REACHED");
    if let Ok(up) = std::fs::read_to_string("/proc/uptime") {
        fact(
            "init",
            "uptime_s",
            up.split_whitespace().next().unwrap_or("?"),
        );
    }

    let cmdline_text = match std::env::args().nth(1) {
        Some(arg) if !pid1 => arg,
        _ => std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    };
    let cmdline = Cmdline::parse(&cmdline_text);
    let ctx = checks::Ctx {
        cmdline: &cmdline,
        in_guest: pid1,
        marks,
    };

    let (mut pass, mut fail) = (0, 0);
    for (k, name) in cmdline.checks().into_iter().enumerate() {
        emit(&format!("GUEST_RUN {name}"));
        let (start_mark, end_mark) = marker::check_marks(k);
        marker::mark(marks, start_mark, &format!("{name}.start"));
        let start = Instant::now();
        let result = checks::run(&ctx, &name);
        marker::mark(marks, end_mark, &format!("{name}.end"));
        fact(&name, "elapsed_ms", start.elapsed().as_millis());
        match result {
            Ok(()) => {
                pass += 1;
                emit(&format!("GUEST_CHECK {name} PASS"));
            }
            Err(reason) => {
                fail += 1;
                emit(&format!("GUEST_CHECK {name} FAIL {}", one_line(&reason)));
            }
        }
    }
    emit(&format!("GUEST_DONE pass={pass} fail={fail}"));
    if pid1 {
        power_off();
    }
}

fn mount_filesystems() -> Result<(), String> {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        mount(source, target, fstype).map_err(|e| format!("mount {fstype} on {target}: {e}"))?;
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source, target, fstype) = (c(source), c(target), c(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is
    // NULL, which every filesystem mounted here accepts.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // Already mounted (e.g. devtmpfs by CONFIG_DEVTMPFS_MOUNT) is fine.
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(err)
}

/// Flushes filesystems and powers the VM off; never returns.
fn power_off() -> ! {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot() with a valid command; it only returns on error.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    emit(&format!(
        "GUEST_PANIC power off failed: {}",
        io::Error::last_os_error()
    ));
    // PID 1 exiting makes the kernel panic; with panic=-1 on the cmdline that reboots at once.
    std::process::exit(1);
}
