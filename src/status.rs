//! What the process's supervisor hears about it: for systemd, sd_notify
//! READY and STATUS messages (what `systemctl status` shows; no-ops outside
//! systemd, where NOTIFY_SOCKET is unset); for our own listener, the moment
//! the client committed to a disk (a pid on a pipe), after which the
//! listener never drops it to make room.

use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

static READY: AtomicBool = AtomicBool::new(false);

/// Tell the service manager we are up (once), with a status line.
pub fn ready(status: &str) {
    READY.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Update the status line.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Before exiting: a `Type=notify` instance that exits without ever having
/// sent READY=1 is marked failed, even when its client only listed exports
/// and left.
pub fn ready_before_exit(status: &str) {
    if !READY.swap(true, Ordering::Relaxed) {
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The listener's pipe, in a child it forked.
static LISTENER: OnceLock<OwnedFd> = OnceLock::new();

/// In a child of the standalone listener: where to report [`committed`].
pub fn report_to_listener(pipe: OwnedFd) {
    let _ = LISTENER.set(pipe);
}

/// The client asked for its disk (INFO, GO or EXPORT_NAME): from now on
/// it is not "still negotiating". One write of our pid, atomic on a pipe.
pub fn committed() {
    if let Some(pipe) = LISTENER.get() {
        let _ = nix::unistd::write(pipe, &std::process::id().to_ne_bytes());
    }
}
