//! The client's disk: nothing until the client first asks for it (INFO,
//! GO or EXPORT_NAME), then built once and kept, or the reason it could
//! not be built, told to every later ask. Building checks the file size
//! limit and free space (`--min-free`), creates the nameless image, and
//! either runs mkfs or the command on it (giving back space mkfs reserved
//! but left reading as zeroes), or makes it the client's copy of the base
//! image: an overlay whose delta it is, on any filesystem (a reflink clone
//! lost to it on every count: see `crate::overlay`); for a command, which
//! needs the copy as one file, a reflink clone where the tmpdir allows
//! (served afterwards as an overlay over what the command left unchanged),
//! a full copy elsewhere.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, error, info, warn};

use crate::base::{Base, Compared};
use crate::cli::{DiskSpec, human_size};
use crate::exports::{Catalog, Shape};
use crate::handover::{Kind, Offer};
use crate::image::{Anonymity, Image};
use crate::mkfs::{self, SetupError};
use crate::nbd::negotiate::{Exports, OpenError, Purpose};
use crate::nbd::storage::Storage;
use crate::nbd::wire::{REP_ERR_POLICY, REP_ERR_UNKNOWN};
use crate::overlay::Overlay;
use crate::reconnect::{self, Claim, Holder, Key};
use crate::{registry, status, sys};

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
    /// The base image could not be copied.
    Copy(String),
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
            BuildError::NoSpace(why) | BuildError::Create(why) | BuildError::Copy(why) => {
                f.write_str(why)
            }
            BuildError::Setup(e) => write!(f, "{e}"),
            BuildError::Stat(e) => write!(f, "cannot stat the disk after the command: {e}"),
        }
    }
}

/// What holds a client's disk once it is built.
pub enum Served {
    /// A nameless image: made by mkfs or a command, or a copy of the base
    /// (a reflink clone, or a full copy for a command).
    Image(Image, Copy),
    /// The base plus the client's own blocks.
    Overlay(Overlay),
}

/// How a copy of the base was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// Not a copy: mkfs or a command made it.
    None,
    /// FICLONE: the base's extents, shared.
    Clone,
    /// copy_file_range of the base's data (no clone possible, and a command
    /// needed the copy as one file).
    Full,
}

impl Served {
    pub fn storage(&self) -> &dyn Storage {
        match self {
            Served::Image(i, _) => i,
            Served::Overlay(o) => o,
        }
    }

    /// Real disk space it takes in the tmpdir.
    pub fn allocated(&self) -> u64 {
        match self {
            Served::Image(i, _) => i.allocated(),
            Served::Overlay(o) => o.allocated(),
        }
    }

    /// The file whose space [`Served::allocated`] counts (shared, not
    /// duplicated), for the registry to watch.
    fn space_file(&self) -> Arc<std::fs::File> {
        match self {
            Served::Image(i, _) => i.shared_file(),
            Served::Overlay(o) => o.delta().shared_file(),
        }
    }

    /// How the base was copied: "clone", "overlay" or "copy"; "" without
    /// a base.
    pub fn copy(&self) -> &'static str {
        match self {
            Served::Image(_, Copy::None) => "",
            Served::Image(_, Copy::Clone) => "clone",
            Served::Image(_, Copy::Full) => "copy",
            Served::Overlay(o) if o.is_clone() => "clone",
            Served::Overlay(_) => "overlay",
        }
    }

    /// Bytes of the base the client replaced (and, on a command's clone,
    /// the command), where that is known (the overlay keeps count).
    pub fn changed(&self) -> Option<u64> {
        match self {
            Served::Overlay(o) => Some(o.owned_bytes()),
            Served::Image(..) => None,
        }
    }
}

enum State {
    Empty,
    Ready(Served),
    Failed(OpenError),
    /// The client left while its disk was being built.
    Abandoned,
}

/// The export name the client last asked for, and the disk it names.
struct Chosen {
    name: String,
    shape: Shape,
}

/// One client's disk (see the module comment).
pub struct Disk<'a> {
    exports: &'a Catalog,
    /// The client's connection (read side), watched while mkfs runs and
    /// duplicated for a reconnect holder; kept until negotiation ends.
    client: Option<OwnedFd>,
    chosen: Option<Chosen>,
    /// The last name refused, logged once however often the client asks
    /// (libnbd asks INFO, then GO).
    refused: Option<String>,
    state: State,
    mkfs_ms: u64,
    /// Keeping tokened disks for reconnects (None: off).
    reconnect: Option<&'a reconnect::Settings>,
    /// The client's certificate subject (DER): a reconnect must show the
    /// same.
    tls_subject: Option<Vec<u8>>,
    /// Listening for a reconnect of this (tokened) disk.
    holder: Option<Holder>,
    /// Where the disk is registered for the capacity agent.
    registry: &'a std::path::Path,
    /// The disk's registry entry, while it is ready.
    entry: Option<registry::Entry>,
}

impl<'a> Disk<'a> {
    /// The disk one of `exports` that the client reading on `client` will
    /// name.
    pub fn new(
        exports: &'a Catalog,
        client: Option<OwnedFd>,
        reconnect: Option<&'a reconnect::Settings>,
        registry: &'a std::path::Path,
    ) -> Self {
        Disk {
            exports,
            client,
            chosen: None,
            refused: None,
            state: State::Empty,
            mkfs_ms: 0,
            reconnect,
            tls_subject: None,
            holder: None,
            registry,
            entry: None,
        }
    }

    /// Keep the registry entry in step with the state: a ready disk has
    /// one, anything else none. A disk that cannot be registered is still
    /// served (the agent then undercounts this host: logged).
    fn sync_registry(&mut self) {
        let State::Ready(served) = &self.state else {
            self.entry = None;
            return;
        };
        if self.entry.is_some() {
            return;
        }
        let size = served.storage().size();
        // A copy of the base may share all it holds with the base (a
        // reflink clone, or a copy the filesystem cloned): none of that is
        // the client's yet, and all of it may be copied on write.
        let shared = match served {
            Served::Image(i, Copy::Clone | Copy::Full) => i.allocated(),
            // What the comparison could not vouch for may still be shared
            // (btrfs's compressed extents, a punch that failed).
            Served::Overlay(o) if o.is_clone() => o.allocated(),
            _ => 0,
        };
        match registry::Entry::register(self.registry, size, served.space_file(), shared) {
            Ok(entry) => self.entry = Some(entry),
            Err(e) => warn!(
                dir = %self.registry.display(),
                error = %e,
                "cannot register the disk: the capacity agent will not count it"
            ),
        }
    }

    /// Negotiation is over: the connection is watched no more (a later
    /// build, of another name or after STARTTLS, and the holder of a
    /// tokened disk need it until then).
    pub fn stop_watching(&mut self) {
        self.client = None;
    }

    /// The client's TLS identity, once it has one. Negotiation starts over
    /// after STARTTLS, and so does the disk: what was chosen (and held for
    /// a reconnect) before it was chosen by an anonymous client.
    pub fn set_tls_subject(&mut self, subject: Option<Vec<u8>>) {
        self.tls_subject = subject;
        self.holder = None;
        self.chosen = None;
        self.state = State::Empty;
        self.entry = None;
    }

    /// The reconnect key of the chosen name, if it carries a token; a
    /// refusal if this server keeps no disks for reconnects.
    fn reconnect_key(&self) -> Result<Option<(Key, &'a reconnect::Settings)>, OpenError> {
        let Some(chosen) = &self.chosen else {
            return Ok(None);
        };
        if chosen.shape.id.is_none() {
            return Ok(None);
        }
        let Some(settings) = self.reconnect else {
            info!(
                export = %crate::exportname::redacted(&chosen.name),
                "export refused: a reconnect token, and reconnects are off"
            );
            return Err(OpenError {
                reply: REP_ERR_POLICY,
                message: "this server keeps no disk for reconnects (--reconnect-grace 0): \
                          ask without id="
                    .into(),
                refused: true,
            });
        };
        Ok(Some((
            Key::new(&chosen.name, self.tls_subject.as_deref()),
            settings,
        )))
    }

    /// Take the disk of `key` over from the process holding it, if there
    /// is one. Ok(true): the disk is ours (State::Ready).
    fn take_over(
        &mut self,
        key: &Key,
        settings: &reconnect::Settings,
        spec: &DiskSpec,
    ) -> Result<bool, OpenError> {
        let failed = |message: String| OpenError {
            reply: REP_ERR_UNKNOWN,
            message,
            refused: false,
        };
        let handed = match reconnect::claim(settings, key, spec.size) {
            Ok(Claim::Nothing) => return Ok(false),
            Ok(Claim::Gone) => {
                info!(key = %key.short(), "reconnect to a disk that is gone: refused");
                return Err(OpenError {
                    reply: REP_ERR_UNKNOWN,
                    message: "no disk for this name here: it is gone (its client did not come \
                              back within the grace period, or another connection took it)"
                        .into(),
                    refused: true,
                });
            }
            Ok(Claim::Disk(h)) => h,
            Err(e) => {
                return Err(failed(format!(
                    "cannot reach the disk to reconnect to: {e}"
                )));
            }
        };
        let waited_ms = handed.waited_ms;
        let listener = handed.listener;
        let mut files = handed.files.into_iter();
        let mut adopt = || -> Result<Served, String> {
            Ok(match (handed.offer.kind, files.next(), files.next()) {
                (Kind::Image, Some(image), None) => {
                    Served::Image(Image::adopt(image).map_err(|e| e.to_string())?, Copy::None)
                }
                (Kind::Overlay { clone }, Some(delta), Some(base)) => {
                    let path = spec
                        .base
                        .as_ref()
                        .map_or_else(PathBuf::new, |b| b.path().to_path_buf());
                    let base = Base::adopt(base, &path).map_err(|e| e.to_string())?;
                    let delta = Image::adopt(delta).map_err(|e| e.to_string())?;
                    Served::Overlay(
                        Overlay::adopt(Arc::new(base), delta, &handed.owned, clone)
                            .map_err(|e| e.to_string())?,
                    )
                }
                _ => return Err("the wrong files for the disk".into()),
            })
        };
        let served =
            adopt().map_err(|e| failed(format!("cannot adopt the disk to reconnect to: {e}")))?;
        if served.storage().size() != handed.offer.size {
            return Err(failed(
                "the disk handed over is not the size it said".into(),
            ));
        }
        // Hold it from here on, on the listening socket that came with it.
        let connection = self.connection_dup().map_err(|e| failed(e.to_string()))?;
        let holder = Holder::adopt(listener, key, connection)
            .map_err(|e| failed(format!("cannot keep the disk for reconnects: {e}")))?;
        info!(key = %key.short(), waited_ms, size = handed.offer.size, "client reconnected to its disk");
        self.holder = Some(holder);
        self.state = State::Ready(served);
        Ok(true)
    }

    /// A duplicate of the client's connection, for a holder to shut down.
    fn connection_dup(&self) -> std::io::Result<OwnedFd> {
        self.client
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no connection to watch"))?
            .try_clone()
    }

    /// Listen for the next reconnect of this tokened disk.
    fn hold(&mut self, key: &Key, settings: &reconnect::Settings) -> Result<(), OpenError> {
        match self
            .connection_dup()
            .and_then(|c| Holder::listen(settings, key, c))
        {
            Ok(h) => {
                self.holder = Some(h);
                Ok(())
            }
            // The name exists: another connection made a disk under it at
            // the same moment, or its disk has ended (a token is for one
            // disk).
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: "no disk for this name here: it is gone or taken (a token is for \
                          one disk)"
                    .into(),
                refused: true,
            }),
            Err(e) => Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: format!(
                    "cannot keep the disk for reconnects in {}: {e}",
                    settings.dir.display()
                ),
                refused: false,
            }),
        }
    }

    /// After the session: a tokened disk whose connection ended without
    /// NBD_CMD_DISC (or that a reconnect came for) waits for its client,
    /// up to the grace period, and goes to it; anything else ends here.
    pub fn finish(mut self, clean: bool) {
        let (Some(holder), Some(settings)) = (self.holder.take(), self.reconnect) else {
            return;
        };
        // A clean end, or no disk: dropping the holder leaves the name
        // unanswered, so the token cannot start a fresh disk later.
        if clean && !holder.taken() {
            return;
        }
        let State::Ready(served) = &self.state else {
            return;
        };
        let short = holder.key_short().to_string();
        let grace = settings.grace.as_secs();
        if !holder.taken() {
            info!(key = %short, grace_s = grace, "connection lost: keeping the disk for its client");
        }
        let started = Instant::now();
        let taker = holder.wait(settings.grace, |left| {
            status::status(&format!(
                "waiting for reconnect ({} s left)",
                left.as_secs()
            ))
        });
        let Some(taker) = taker else {
            // The name stays, unanswered: a late reconnect is refused.
            info!(key = %short, grace_s = grace, "no reconnect within the grace period: disk dropped");
            return;
        };
        let waited_ms = started.elapsed().as_millis() as u64;
        let sent = match served {
            Served::Image(image, _) => holder.hand_over(
                taker,
                &Offer {
                    kind: Kind::Image,
                    size: image.size(),
                    leaves: 0,
                    waited_ms,
                },
                &[image.as_fd()],
                &[],
            ),
            Served::Overlay(o) => {
                let (delta, base, leaves, map) = o.parts();
                holder.hand_over(
                    taker,
                    &Offer {
                        kind: Kind::Overlay {
                            clone: o.is_clone(),
                        },
                        size: delta.size(),
                        leaves,
                        waited_ms,
                    },
                    &[delta.as_fd(), base.as_fd()],
                    &map,
                )
            }
        };
        match sent {
            Ok(()) => info!(key = %short, waited_ms, "disk handed to its reconnecting client"),
            Err(e) => warn!(key = %short, error = %e, "cannot hand the disk over: dropped"),
        }
    }

    /// What transmission serves: the disk, with its registry entry kept
    /// in step with what the client writes.
    pub fn storage(&self) -> Option<registry::Tracked<'_>> {
        self.served().map(|s| registry::Tracked {
            disk: s.storage(),
            entry: self.entry.as_ref(),
        })
    }

    pub fn served(&self) -> Option<&Served> {
        match &self.state {
            State::Ready(s) => Some(s),
            _ => None,
        }
    }

    /// What the client's export name resolved to, once it named one.
    pub fn shape(&self) -> Option<&Shape> {
        self.chosen.as_ref().map(|c| &c.shape)
    }

    /// The disk could not be built: the server failed (exit status 1).
    pub fn failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// The client left before its disk was ready.
    pub fn abandoned(&self) -> bool {
        matches!(self.state, State::Abandoned)
    }

    /// How long mkfs, the command or the copy took.
    pub fn mkfs_ms(&self) -> u64 {
        self.mkfs_ms
    }

    /// "ext4", "xfs", "swap", "none"..., "command", or "base"; "" before
    /// the client named an export.
    pub fn kind(&self) -> &str {
        let Some(shape) = self.shape() else {
            return "";
        };
        match (&shape.disk.base, &shape.disk.fs.command) {
            (Some(_), _) => "base",
            (None, Some(_)) => "command",
            (None, None) => &shape.disk.fs.fs_type,
        }
    }

    /// The base image's path, if there is one.
    pub fn base(&self) -> Option<&std::path::Path> {
        self.shape()?.disk.base.as_deref().map(Base::path)
    }

    /// Resolve `name` (refusing what the exports do not allow) unless it
    /// is the name already resolved; a new name drops the disk built for
    /// the last one.
    fn choose(&mut self, name: &str) -> Result<(), OpenError> {
        if self.chosen.as_ref().is_some_and(|c| c.name == name) {
            return Ok(());
        }
        let shape = match self.exports.resolve(name) {
            Ok(shape) => shape,
            Err(r) => {
                if self.refused.as_deref() != Some(name) {
                    info!(
                        export = %crate::exportname::redacted(name),
                        reason = %r.message,
                        "export refused"
                    );
                    self.refused = Some(name.to_string());
                }
                return Err(OpenError {
                    reply: r.reply,
                    message: r.message,
                    refused: true,
                });
            }
        };
        if matches!(self.state, State::Ready(_) | State::Failed(_)) {
            self.state = State::Empty;
            self.entry = None;
        }
        // A disk held under the last name is gone with it.
        self.holder = None;
        self.chosen = Some(Chosen {
            name: name.to_string(),
            shape,
        });
        Ok(())
    }

    fn build(&mut self, spec: &DiskSpec, pipelined: bool) -> Result<Served, BuildError> {
        if let Some(limit) = sys::file_size_limit().filter(|&l| l < spec.size) {
            return Err(BuildError::FileSizeLimit {
                size: spec.size,
                limit,
            });
        }
        check_free_space(spec)?;
        // A clone on xfs is faster to write in a file unlinked at once than
        // in an O_TMPFILE (see Image::create_as); only a command's copy is
        // a clone.
        let command = spec.fs.command.is_some();
        let how = match &spec.base {
            Some(base) if command && base.may_clone_on_xfs(&spec.tmpdir) => Anonymity::Unlinked,
            _ => Anonymity::Tmpfile,
        };
        let (mut image, how) = Image::create_as(&spec.tmpdir, spec.size, how).map_err(|e| {
            BuildError::Create(format!(
                "cannot create the disk in {}: {e}",
                spec.tmpdir.display()
            ))
        })?;
        status::status(&format!("building {}", self.description()));
        let t = Instant::now();
        let copy = match &spec.base {
            Some(base) => match copy_base(base, &mut image, spec)? {
                Some(copy) => copy,
                None => {
                    self.mkfs_ms = t.elapsed().as_millis() as u64;
                    debug!(anonymity = ?how, ms = self.mkfs_ms, "overlay on the base");
                    return Ok(Served::Overlay(Overlay::new(base.clone(), image)));
                }
            },
            None => Copy::None,
        };
        if copy == Copy::None || spec.fs.command.is_some() {
            let client = self.client.as_ref().map(|c| c.as_fd());
            mkfs::run(&image, &spec.fs, spec.setup_timeout, client, pipelined)
                .map_err(BuildError::Setup)?;
        }
        self.mkfs_ms = t.elapsed().as_millis() as u64;
        if spec.fs.command.is_some() {
            // The command may have resized the file: serve what it made.
            image.refresh_size().map_err(BuildError::Stat)?;
        }
        // A clone is served as an overlay over its unchanged part, unless
        // the command resized it: a reconnecting client's overlay must be
        // the export's size (see crate::reconnect), an image need not.
        let resized = image.size() != spec.size;
        if let (Copy::Clone, Some(base), false) = (copy, &spec.base, resized) {
            match base.compare_clone(&image) {
                Ok(Compared::Parts(parts)) => {
                    let o = Overlay::over_clone(base.clone(), image, &parts);
                    debug!(anonymity = ?how, mkfs_ms = self.mkfs_ms, changed = o.owned_bytes(),
                        "the command's clone served as an overlay");
                    return Ok(Served::Overlay(o));
                }
                Ok(Compared::TooManyExtents) => {
                    debug!("too many extents to compare: the clone is served whole")
                }
                Ok(Compared::TooMuchToWriteBack(dirty)) => debug!(
                    dirty,
                    "the command left too much unwritten to compare: the clone is served whole"
                ),
                Err(e) => debug!(error = %e, "cannot map the clone: it is served whole"),
            }
        }
        // Space mkfs reserved but left reading as zeroes (xfs's log) would
        // otherwise stay allocated for the client's whole session. A user's
        // --command may preallocate on purpose (so that the client never
        // meets ENOSPC): its image is left as it made it; a copy of the
        // base has nothing of the kind.
        if spec.fs.command.is_none() && copy == Copy::None {
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
        debug!(anonymity = ?how, mkfs_ms = self.mkfs_ms, ?copy, "disk built");
        Ok(Served::Image(image, copy))
    }
}

/// Make `image` the client's copy of `base` if a command must run on it
/// (it needs the copy as one file): a reflink clone where the tmpdir
/// allows, else a full copy of the base's data. Without a command, nothing
/// (`None`: the caller serves an overlay, whose delta `image` is).
fn copy_base(base: &Base, image: &mut Image, spec: &DiskSpec) -> Result<Option<Copy>, BuildError> {
    if spec.fs.command.is_none() {
        return Ok(None);
    }
    let copied = |e: std::io::Error| {
        BuildError::Copy(format!(
            "cannot copy the base image {}: {e}",
            base.path().display()
        ))
    };
    match base.clone_into(image) {
        Ok(()) => {
            // The clone has the base's length; the disk may be larger.
            image.set_size(spec.size).map_err(copied)?;
            return Ok(Some(Copy::Clone));
        }
        Err(e) => debug!(error = %e, "no reflink clone of the base here"),
    }
    // A full copy must fit: check before writing anything.
    let need = base.data_bytes().map_err(copied)?;
    let free = free_space(&spec.tmpdir).map_err(BuildError::NoSpace)?.0;
    if need > free {
        return Err(BuildError::NoSpace(format!(
            "the base image {} holds {} of data and {} has {} free: no room for the copy \
             a --command needs (a tmpdir with reflink, such as xfs, needs none)",
            base.path().display(),
            human_size(need),
            spec.tmpdir.display(),
            human_size(free)
        )));
    }
    let t = Instant::now();
    let bytes = base.copy_into(image).map_err(copied)?;
    info!(
        bytes,
        ms = t.elapsed().as_millis() as u64,
        "copied the base for --command (no reflink in the tmpdir)"
    );
    Ok(Some(Copy::Full))
}

/// (free, total) bytes of the filesystem holding `dir`.
pub(crate) fn free_space(dir: &std::path::Path) -> Result<(u64, u64), String> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| {
        format!(
            "cannot check free space in {}: {}",
            dir.display(),
            std::io::Error::from(e)
        )
    })?;
    let frsize = st.fragment_size() as u64;
    Ok((
        (st.blocks_available() as u64).saturating_mul(frsize),
        (st.blocks() as u64).saturating_mul(frsize),
    ))
}

/// Admission control: refuse a new client while the tmpdir is short of
/// space (`--min-free`), before anything is created there.
fn check_free_space(spec: &DiskSpec) -> Result<(), BuildError> {
    let (free, total) = free_space(&spec.tmpdir).map_err(BuildError::NoSpace)?;
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
    fn open(&mut self, name: &str, purpose: Purpose, pipelined: bool) -> Result<u64, OpenError> {
        if matches!(self.state, State::Abandoned) {
            return Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: SetupError::ClientLeft.to_string(),
                refused: false,
            });
        }
        self.choose(name)?;
        let Some(spec) = self.shape().map(|s| s.disk.clone()) else {
            return Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: "no export chosen".into(),
                refused: false,
            });
        };
        // INFO need not build: the size is known, unless a command makes
        // the disk (it may resize it). `nbdinfo --list` asks every export.
        if purpose == Purpose::Info
            && spec.fs.command.is_none()
            && matches!(self.state, State::Empty)
        {
            return Ok(spec.size);
        }
        let token = self.reconnect_key()?;
        if let (State::Empty, Some((key, settings))) = (&self.state, &token) {
            status::committed();
            let (key, settings) = (key.clone(), *settings);
            if self.take_over(&key, settings, &spec)? {
                // Ready as much as a disk just built: a Type=notify instance
                // that never says so is stopped at TimeoutStartSec.
                status::ready(&format!("ready: {} (reconnected)", self.description()));
            }
        }
        if let State::Empty = self.state {
            status::committed();
            self.state = match self.build(&spec, pipelined) {
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
                        refused: false,
                    })
                }
            };
            if let (State::Ready(_), Some((key, settings))) = (&self.state, &token) {
                let (key, settings) = (key.clone(), *settings);
                if let Err(e) = self.hold(&key, settings) {
                    self.state = State::Failed(e);
                }
            }
        }
        self.sync_registry();
        match &self.state {
            State::Ready(served) => Ok(served.storage().size()),
            State::Failed(e) => Err(e.clone()),
            State::Abandoned | State::Empty => Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: SetupError::ClientLeft.to_string(),
                refused: false,
            }),
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        self.exports.list()
    }

    fn description(&self) -> String {
        self.shape()
            .map_or_else(String::new, |s| s.description.clone())
    }
}
