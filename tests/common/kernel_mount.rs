//! A served disk mounted by the host's own kernel, although it has no NBD
//! module: qemu-storage-daemon connects to tmpdisk as an NBD client and
//! exports the disk as a file through FUSE, and a loop device makes that
//! file a block device to mount. Everything done through the mount lands
//! on that one client's disk. Torn down in reverse on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Proc, TestDir, cmd, require, require_root, run_ok, wait_until};

pub struct KernelMount {
    qsd: Option<Proc>,
    export: PathBuf,
    device: String,
    mountpoint: PathBuf,
    mounted: bool,
}

impl KernelMount {
    /// Connect to the `--unix` server at `socket`, and mount its disk at
    /// `dir/<name>-mnt`.
    pub fn new(dir: &TestDir, name: &str, socket: &Path) -> KernelMount {
        Self::with_export(dir, name, socket, "")
    }

    /// Like [`KernelMount::new`], asking for the export `export_name`
    /// (which goes into qemu's option syntax as it is: no commas).
    pub fn with_export(dir: &TestDir, name: &str, socket: &Path, export_name: &str) -> KernelMount {
        require_root("it mounts a loop device");
        assert!(
            !export_name.contains(','),
            "test bug: {export_name:?} in qemu's option syntax"
        );
        require(&["qemu-storage-daemon", "losetup"]);
        let export = dir.join(&format!("{name}-export"));
        fs::write(&export, b"").unwrap();
        let mountpoint = dir.subdir(&format!("{name}-mnt"));
        let blockdev = format!(
            "driver=nbd,node-name=n0,server.type=unix,server.path={},discard=unmap,export={export_name}",
            socket.display()
        );
        let fuse = format!(
            "type=fuse,id=e0,node-name=n0,mountpoint={},writable=on",
            export.display()
        );
        let qsd = Proc::spawn(
            "qemu-storage-daemon",
            cmd(
                "qemu-storage-daemon",
                &["--blockdev", &blockdev, "--export", &fuse],
            ),
        );
        let mut m = KernelMount {
            qsd: Some(qsd),
            export,
            device: String::new(),
            mountpoint,
            mounted: false,
        };
        // The FUSE file is there once its size is the disk's.
        wait_until("the FUSE export", Duration::from_secs(20), || {
            fs::metadata(&m.export)
                .ok()
                .filter(|md| md.len() > 0)
                .map(|_| ())
        });
        let out = run_ok(
            "losetup",
            cmd("losetup", &["-f", "--show", m.export.to_str().unwrap()]),
        );
        m.device = out.stdout.trim().to_string();
        run_ok(
            "mount",
            cmd("mount", &[&m.device, m.mountpoint.to_str().unwrap()]),
        );
        m.mounted = true;
        m
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The loop device (to fsck once unmounted).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Unmount, keeping the device and the connection (to fsck the disk).
    pub fn unmount(&mut self) {
        if self.mounted {
            run_ok(
                "umount",
                cmd("umount", &[self.mountpoint.to_str().unwrap()]),
            );
            self.mounted = false;
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let quiet = |c: &str, args: &[&str]| {
            let _ = cmd(c, args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        if self.mounted {
            let m = self.mountpoint.to_str().unwrap_or_default().to_string();
            quiet("umount", &[&m]);
            quiet("umount", &["-l", &m]);
        }
        if !self.device.is_empty() {
            quiet("losetup", &["-d", &self.device]);
        }
        // SIGTERM lets qemu-storage-daemon unmount its FUSE export.
        if let Some(q) = &self.qsd {
            q.kill_group(libc::SIGTERM);
        }
        if let Some(mut q) = self.qsd.take() {
            let _ = q.wait_timeout(Duration::from_secs(10));
        }
        quiet("umount", &["-l", self.export.to_str().unwrap_or_default()]);
    }
}
