// SPDX-License-Identifier: Apache-2.0

//! How a device asks the VMM to power off or reset the VM.
//!
//! An [`ExitSignal`] is an eventfd (non-blocking) that wakes the VMM's event loop plus a shared
//! slot holding the reason. Devices call [`ExitSignal::request`]; the event loop watches
//! [`ExitSignal::eventfd`] and calls [`ExitSignal::take`] when it becomes readable.

use std::io;
use std::sync::{Arc, Mutex};

use log::{error, info};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest wants the VM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitRequest {
    /// Power off (ACPI S5).
    PowerOff,
    /// Reset the machine.
    Reset,
    /// The guest wrote this byte to the debug-exit port ([`crate::debug_exit`]).
    DebugExit(u8),
}

/// Errors from creating an [`ExitSignal`].
#[derive(Debug, thiserror::Error)]
pub enum ExitSignalError {
    /// The eventfd could not be created.
    #[error("Cannot create the exit eventfd")]
    CreateEventFd(#[source] io::Error),
}

#[derive(Debug)]
struct Inner {
    eventfd: EventFd,
    pending: Mutex<Option<ExitRequest>>,
}

/// Shared "please stop the VM" signal; clones refer to the same eventfd and slot.
#[derive(Clone, Debug)]
pub struct ExitSignal {
    inner: Arc<Inner>,
}

impl ExitSignal {
    /// Creates a signal with nothing pending.
    pub fn new() -> Result<ExitSignal, ExitSignalError> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(ExitSignalError::CreateEventFd)?;
        Ok(ExitSignal {
            inner: Arc::new(Inner {
                eventfd,
                pending: Mutex::new(None),
            }),
        })
    }

    /// Records `request` and wakes the event loop.
    ///
    /// A pending [`ExitRequest::PowerOff`] or [`ExitRequest::DebugExit`] is final: a later
    /// request never replaces it (a reset may be replaced by either).
    pub fn request(&self, request: ExitRequest) {
        {
            let mut pending = self.pending();
            if matches!(*pending, None | Some(ExitRequest::Reset)) {
                *pending = Some(request);
            }
        }
        info!("guest requested {request:?}");
        // Written after the slot is filled, so a wake-up always finds the reason.
        if let Err(e) = self.inner.eventfd.write(1) {
            error!("cannot signal the exit eventfd: {e}");
        }
    }

    /// Takes the pending request, if any, and drains the eventfd.
    ///
    /// A wake-up may find nothing (the request was taken on an earlier wake-up); that is not
    /// an error.
    pub fn take(&self) -> Option<ExitRequest> {
        // Drain first: a request racing with us fills the slot before writing the eventfd, so
        // it is either taken below or wakes the loop again.
        match self.inner.eventfd.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => error!("cannot read the exit eventfd: {e}"),
        }
        self.pending().take()
    }

    /// The eventfd the event loop polls for readability.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.eventfd
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<ExitRequest>> {
        crate::sync::lock(&self.inner.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_pending_at_start() {
        let signal = ExitSignal::new().unwrap();
        assert_eq!(signal.take(), None);
        assert!(signal.eventfd().read().is_err());
    }

    #[test]
    fn request_wakes_the_loop_and_is_taken_once() {
        let signal = ExitSignal::new().unwrap();
        signal.clone().request(ExitRequest::Reset);
        assert_eq!(signal.take(), Some(ExitRequest::Reset));
        assert_eq!(signal.take(), None);
        // take() drained the eventfd.
        assert!(signal.eventfd().read().is_err());
    }

    #[test]
    fn eventfd_is_readable_after_request() {
        let signal = ExitSignal::new().unwrap();
        signal.request(ExitRequest::PowerOff);
        assert_eq!(signal.eventfd().read().unwrap(), 1);
        assert_eq!(signal.take(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn power_off_is_not_downgraded_to_reset() {
        let signal = ExitSignal::new().unwrap();
        signal.request(ExitRequest::PowerOff);
        signal.request(ExitRequest::Reset);
        assert_eq!(signal.take(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn debug_exit_is_final_too() {
        let signal = ExitSignal::new().unwrap();
        signal.request(ExitRequest::Reset);
        signal.request(ExitRequest::DebugExit(3));
        signal.request(ExitRequest::PowerOff);
        assert_eq!(signal.take(), Some(ExitRequest::DebugExit(3)));
    }

    #[test]
    fn reset_is_upgraded_to_power_off() {
        let signal = ExitSignal::new().unwrap();
        signal.request(ExitRequest::Reset);
        signal.request(ExitRequest::PowerOff);
        assert_eq!(signal.take(), Some(ExitRequest::PowerOff));
    }
}
