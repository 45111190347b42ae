//! What `systemctl status` shows: sd_notify READY and STATUS messages
//! (no-ops outside systemd, where NOTIFY_SOCKET is unset).

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
