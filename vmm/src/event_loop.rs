//! The VMM's event loop (event-manager): stop requests from vCPUs, power-off/reset requests
//! from the guest's PM registers, SIGINT/SIGTERM, host input for the serial port, and the
//! eventfds of parked interrupt sources ([`crate::interrupts::ParkedPoller`]).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::{ExitRequest, ExitSignal, Serial};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::seccomp::{self, Filter, SeccompError};
use crate::vcpu::VmExit;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The epoll instance could not be created or waited on.
    #[error("Event manager failed")]
    EventManager(#[source] event_manager::Error),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The `--timeout` timer could not be created or armed.
    #[error("Cannot set up the --timeout timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    /// A signal handler could not be installed.
    #[error("Cannot install a handler for signal {0}")]
    Signal(i32, #[source] vmm_sys_util::errno::Error),
    /// The main thread's seccomp filter could not be installed.
    #[error("Cannot install the main thread's seccomp filter")]
    Seccomp(#[source] SeccompError),
}

/// Eventfd written by the SIGINT/SIGTERM handler (-1 until installed).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// The last signal received.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is
        // an eventfd kept open for the life of the process once installed.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// Everything that can stop the VM, in one subscriber.
struct StopSources {
    vcpu_wake: Arc<EventFd>,
    vcpu_exits: Arc<Mutex<Receiver<VmExit>>>,
    power: ExitSignal,
    signal: Arc<EventFd>,
    /// `--timeout`: the timer and its length in seconds.
    timeout: Option<(TimerFd, u64)>,
    reason: Option<VmExit>,
}

impl MutEventSubscriber for StopSources {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.vcpu_wake.as_raw_fd(),
            self.power.eventfd().as_raw_fd(),
            self.signal.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("Cannot watch stop source fd {fd}: {e:?}");
            }
        }
        if let Some((timer, _)) = &self.timeout {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                log::error!("Cannot watch the --timeout timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.vcpu_wake.as_raw_fd() {
            let _ = self.vcpu_wake.read();
            let received = devices::sync::lock(&self.vcpu_exits).try_recv();
            if let Ok(r) = received {
                self.reason.get_or_insert(r);
            }
        } else if fd == self.power.eventfd().as_raw_fd() {
            match self.power.take() {
                Some(ExitRequest::PowerOff) => {
                    self.reason.get_or_insert(VmExit::PowerOff);
                }
                Some(ExitRequest::Reset) => {
                    self.reason.get_or_insert(VmExit::Reset);
                }
                Some(ExitRequest::DebugExit(v)) => {
                    self.reason.get_or_insert(VmExit::DebugExit(v));
                }
                None => {}
            }
        } else if fd == self.signal.as_raw_fd() {
            let _ = self.signal.read();
            self.reason
                .get_or_insert(VmExit::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
        } else if let Some((timer, secs)) = &mut self.timeout {
            if fd == timer.as_raw_fd() {
                let _ = timer.wait();
                self.reason.get_or_insert(VmExit::Timeout(*secs));
            }
        }
    }
}

/// Host stdin → the guest's serial port.
struct ConsoleIn {
    serial: Arc<Mutex<Serial>>,
    pending: Vec<u8>,
}

impl MutEventSubscriber for ConsoleIn {
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        // epoll refuses regular files and /dev/null: then there is simply no console input.
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            log::debug!("No serial input from stdin: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        if set.contains(EventSet::IN) {
            let mut buf = [0u8; 64];
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) => {
                    let _ = ops.remove(events);
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) => log::debug!("stdin read failed: {e}"),
            }
            let mut serial = devices::sync::lock(&self.serial);
            let taken = serial.enqueue_input(&self.pending);
            self.pending.drain(..taken);
            // Bound what we keep for a guest that never reads its console.
            self.pending.truncate(4096);
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            let _ = ops.remove(events);
        }
    }
}

/// `--timeout`: how long, and when the VMM started (the timeout counts from then).
#[derive(Debug, Clone, Copy)]
pub struct Timeout {
    /// The `--timeout` length.
    pub after: Duration,
    /// VMM start.
    pub started: Instant,
}

/// Runs the loop until something asks the VM to stop, and returns why. `filter` (the main
/// thread's seccomp allowlist) is installed once the loop is set up, before its first wait.
pub fn run(
    vcpu_wake: Arc<EventFd>,
    vcpu_exits: Arc<Mutex<Receiver<VmExit>>>,
    serial: Arc<Mutex<Serial>>,
    power: ExitSignal,
    parked: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    timeout: Option<Timeout>,
    filter: Option<&Filter>,
) -> Result<VmExit, EventLoopError> {
    let timeout = match timeout {
        Some(t) => {
            let mut timer = TimerFd::new().map_err(EventLoopError::Timer)?;
            // A zero duration would disarm the timer: set-up never takes the whole timeout,
            // but keep at least 1 ms.
            let left = t
                .after
                .saturating_sub(t.started.elapsed())
                .max(Duration::from_millis(1));
            timer.reset(left, None).map_err(EventLoopError::Timer)?;
            Some((timer, t.after.as_secs()))
        }
        None => None,
    };
    let signal = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::EventFd)?);
    SIGNAL_FD.store(signal.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| EventLoopError::Signal(sig, e))?;
    }

    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(EventLoopError::EventManager)?;
    let stop = Arc::new(Mutex::new(StopSources {
        vcpu_wake,
        vcpu_exits,
        power,
        signal: signal.clone(),
        timeout,
        reason: None,
    }));
    manager.add_subscriber(stop.clone());
    manager.add_subscriber(parked);
    manager.add_subscriber(Arc::new(Mutex::new(ConsoleIn {
        serial,
        pending: Vec::new(),
    })));
    seccomp::apply(filter).map_err(EventLoopError::Seccomp)?;
    loop {
        if let Some(r) = devices::sync::lock(&stop).reason.take() {
            return Ok(r);
        }
        manager.run().map_err(EventLoopError::EventManager)?;
    }
}
