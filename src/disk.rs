//! The client's disk: nothing until the client first asks for it (INFO,
//! GO or EXPORT_NAME), then built once and kept, or the reason it could
//! not be built, told to every later ask. Building checks the file size
//! limit and free space (`--min-free`), creates the nameless image, runs
//! mkfs or the command, and gives back space mkfs reserved but left
//! reading as zeroes.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use tracing::{debug, error, info, warn};

use crate::cli::{DiskSpec, human_size};
use crate::image::Image;
use crate::mkfs::{self, SetupError};
use crate::nbd::negotiate::{Exports, OpenError};
use crate::nbd::storage::Storage;
use crate::nbd::wire::REP_ERR_UNKNOWN;
use crate::{status, sys};

/// Space reserved beyond the data that is not worth a punch per hole after
/// mkfs (mke2fs leaves 64 KiB; mkfs.xfs leaves its whole log).
const RELEASE_SLACK: u64 = 1 << 20;

/// Why a disk could not be built; the text is the client's option error.
#[derive(Debug)]
pub enum BuildError {
    /// SIZE is beyond RLIMIT_FSIZE (systemd's LimitFSIZE=).
    FileSizeLimit { size: u64, limit: u64 },
    /// The tmpdir is below `--min-free`: no new client now.
    NoSpace(String),
    /// The image could not be created in the tmpdir.
    Create(String),
    /// mkfs or the command failed (or the client left while it ran).
    Setup(SetupError),
    /// The image could not be looked at after the command.
    Stat(std::io::Error),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::FileSizeLimit { size, limit } => write!(
                f,
                "disk size {} exceeds this process's file size limit (LimitFSIZE=) of {}",
                human_size(*size),
                human_size(*limit)
            ),
            BuildError::NoSpace(why) | BuildError::Create(why) => f.write_str(why),
            BuildError::Setup(e) => write!(f, "{e}"),
            BuildError::Stat(e) => write!(f, "cannot stat the disk after the command: {e}"),
        }
    }
}

enum State {
    Empty,
    Ready(Image),
    Failed(OpenError),
    /// The client left while its disk was being built.
    Abandoned,
}

/// One client's disk (see the module comment).
pub struct Disk<'a> {
    spec: &'a DiskSpec,
    /// The client's connection (read side), watched while mkfs runs.
    client: Option<OwnedFd>,
    state: State,
    mkfs_ms: u64,
}

impl<'a> Disk<'a> {
    /// A disk made as `spec` says, for the client reading on `client`.
    pub fn new(spec: &'a DiskSpec, client: Option<OwnedFd>) -> Self {
        Disk {
            spec,
            client,
            state: State::Empty,
            mkfs_ms: 0,
        }
    }

    pub fn image(&self) -> Option<&Image> {
        match &self.state {
            State::Ready(i) => Some(i),
            _ => None,
        }
    }

    /// The disk could not be built: the server failed (exit status 1).
    pub fn failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// The client left before its disk was ready.
    pub fn abandoned(&self) -> bool {
        matches!(self.state, State::Abandoned)
    }

    /// How long mkfs (or the command) took.
    pub fn mkfs_ms(&self) -> u64 {
        self.mkfs_ms
    }

    /// "ext4", "xfs"..., or "command".
    pub fn kind(&self) -> &str {
        match self.spec.fs.command {
            Some(_) => "command",
            None => &self.spec.fs.fs_type,
        }
    }

    fn build(&mut self, pipelined: bool) -> Result<Image, BuildError> {
        let spec = self.spec;
        if let Some(limit) = sys::file_size_limit().filter(|&l| l < spec.size) {
            return Err(BuildError::FileSizeLimit {
                size: spec.size,
                limit,
            });
        }
        check_free_space(spec)?;
        let (mut image, how) = Image::create(&spec.tmpdir, spec.size).map_err(|e| {
            BuildError::Create(format!(
                "cannot create the disk in {}: {e}",
                spec.tmpdir.display()
            ))
        })?;
        status::status(&format!("building {}", self.description()));
        let t = Instant::now();
        let client = self.client.as_ref().map(|c| c.as_fd());
        mkfs::run(&image, &spec.fs, spec.setup_timeout, client, pipelined)
            .map_err(BuildError::Setup)?;
        self.mkfs_ms = t.elapsed().as_millis() as u64;
        if spec.fs.command.is_some() {
            // The command may have resized the file: serve what it made.
            image.refresh_size().map_err(BuildError::Stat)?;
        }
        // Space mkfs reserved but left reading as zeroes (xfs's log) would
        // otherwise stay allocated for the client's whole session. A user's
        // --command may preallocate on purpose (so that the client never
        // meets ENOSPC): its image is left as it made it.
        if spec.fs.command.is_none() {
            let t0 = Instant::now();
            match image.release_holes(RELEASE_SLACK) {
                Ok(freed) => debug!(
                    freed,
                    micros = t0.elapsed().as_micros() as u64,
                    "released unwritten space"
                ),
                Err(e) => warn!(error = %e, "cannot release the disk's unwritten space"),
            }
        }
        debug!(anonymity = ?how, mkfs_ms = self.mkfs_ms, "disk built");
        Ok(image)
    }
}

/// Admission control: refuse a new client while the tmpdir is short of
/// space (`--min-free`), before anything is created there.
fn check_free_space(spec: &DiskSpec) -> Result<(), BuildError> {
    let st = nix::sys::statvfs::statvfs(&spec.tmpdir).map_err(|e| {
        BuildError::NoSpace(format!(
            "cannot check free space in {}: {e}",
            spec.tmpdir.display()
        ))
    })?;
    let frsize = st.fragment_size() as u64;
    let free = (st.blocks_available() as u64).saturating_mul(frsize);
    let total = (st.blocks() as u64).saturating_mul(frsize);
    let need = spec.min_free.bytes(total);
    if free < need {
        warn!(
            tmpdir = %spec.tmpdir.display(),
            free,
            min_free = need,
            "refusing a client: not enough free space"
        );
        return Err(BuildError::NoSpace(format!(
            "not enough free space for a new disk: {} free in {}, --min-free is {} ({}); try again later",
            human_size(free),
            spec.tmpdir.display(),
            spec.min_free,
            human_size(need)
        )));
    }
    Ok(())
}

impl Exports for Disk<'_> {
    fn open(&mut self, pipelined: bool) -> Result<u64, OpenError> {
        if let State::Empty = self.state {
            status::committed();
            self.state = match self.build(pipelined) {
                Ok(image) => {
                    status::ready(&format!("ready: {}", self.description()));
                    State::Ready(image)
                }
                Err(BuildError::Setup(SetupError::ClientLeft)) => {
                    info!("client left while its disk was being built; setup stopped");
                    State::Abandoned
                }
                Err(e) => {
                    let message = e.to_string();
                    error!(reason = %message, "cannot build the disk");
                    State::Failed(OpenError {
                        reply: REP_ERR_UNKNOWN,
                        message,
                    })
                }
            };
            // Only mkfs needed to watch the client.
            self.client = None;
        }
        match &self.state {
            State::Ready(image) => Ok(image.size()),
            State::Failed(e) => Err(e.clone()),
            State::Abandoned | State::Empty => Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: SetupError::ClientLeft.to_string(),
            }),
        }
    }

    fn description(&self) -> String {
        let spec = self.spec;
        let size = human_size(self.image().map_or(spec.size, Image::size));
        let label = match &spec.fs.label {
            Some(l) => format!(" labelled {:?}", l.to_string_lossy()),
            None => String::new(),
        };
        match spec.fs.command {
            Some(_) => format!("fresh {size} disk prepared by a command, per connection"),
            None => format!(
                "fresh {size} {}{label} disk per connection",
                spec.fs.fs_type
            ),
        }
    }
}
