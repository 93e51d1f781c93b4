//! Device worker threads: one per virtio device, sleeping in epoll on the device's queue
//! ioeventfds (KVM signals them on a guest QueueNotify write without a VM exit to userspace)
//! and on any extra notifier the device has (the virtio-iommu's fault eventfd).
//!
//! The worker drives the device's [`QueueHandler`], never the device's control mutex: the
//! vCPU paths that take that mutex (config space, Status, reset) do not wait for disk I/O.
//! Each call handles a bounded batch of requests; when the handler says there is more, the
//! worker re-arms the queue's eventfd and goes back to epoll, so the stop event and the
//! device's other queues get their turn between batches.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::virtio::{QueueHandler, QueueProgress};

use crate::seccomp::{self, Filter, SeccompError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll or eventfd setup failed.
    #[error("Cannot set up the device worker's epoll")]
    Epoll(#[source] std::io::Error),
    /// The thread could not be spawned or could not install its seccomp filter.
    #[error("Cannot start the device worker thread")]
    Spawn(#[source] SeccompError),
}

/// A running worker; dropping it does not stop it, [`Worker::stop`] does.
#[derive(Debug)]
pub struct Worker {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<Option<()>>>,
}

/// One eventfd the worker waits on and the queue to process when it fires.
pub type Notifier = (Arc<EventFd>, usize);

impl Worker {
    /// Starts a thread that installs `filter` (its seccomp allowlist, [`crate::seccomp`])
    /// and then calls `handler.process_queue(q)` whenever a notifier for `q` fires.
    pub fn spawn(
        name: String,
        handler: Arc<dyn QueueHandler>,
        notifiers: Vec<Notifier>,
        filter: Option<Filter>,
    ) -> Result<Worker, WorkerError> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Epoll)?);
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        let stop_token = notifiers.len() as u64;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, stop_token),
            )
            .map_err(WorkerError::Epoll)?;
        for (i, (fd, _)) in notifiers.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(WorkerError::Epoll)?;
        }
        let stop2 = stop.clone();
        let handle = seccomp::spawn(name, filter, move || {
            run(epoll, stop_token, &stop2, handler.as_ref(), &notifiers)
        })
        .map_err(WorkerError::Spawn)?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(
    epoll: Epoll,
    stop_token: u64,
    stop: &EventFd,
    handler: &dyn QueueHandler,
    notifiers: &[Notifier],
) {
    let mut events = vec![EpollEvent::default(); notifiers.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("Device worker epoll failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == stop_token {
                let _ = stop.read();
                return;
            }
            let Some((fd, queue)) = notifiers.get(token as usize) else {
                continue;
            };
            // Reset the eventfd before processing so a notify during processing re-arms it.
            let _ = fd.read();
            if handler.process_queue(*queue) == QueueProgress::More {
                // Budget used up with work left: come back after the other ready events.
                if let Err(e) = fd.write(1) {
                    log::error!("Device worker cannot re-arm queue {queue}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Reports `More` for its first `more` calls.
    struct Budgeted {
        calls: AtomicUsize,
        more: usize,
    }

    impl QueueHandler for Budgeted {
        fn process_queue(&self, index: usize) -> QueueProgress {
            assert_eq!(index, 3);
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.more {
                QueueProgress::More
            } else {
                QueueProgress::Idle
            }
        }
    }

    #[test]
    fn worker_comes_back_while_the_handler_has_more() {
        let handler = Arc::new(Budgeted {
            calls: AtomicUsize::new(0),
            more: 2,
        });
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let worker =
            Worker::spawn("test".into(), handler.clone(), vec![(fd.clone(), 3)], None).unwrap();
        fd.write(1).unwrap();
        let t0 = Instant::now();
        while handler.calls.load(Ordering::SeqCst) < 3 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        worker.stop();
        assert_eq!(
            handler.calls.load(Ordering::SeqCst),
            3,
            "one kick, two re-arms"
        );
    }
}
