//! Named exports (`--exports FILE`): one socket, many kinds of disk. The
//! file (TOML, plus `FILE.d/*.toml` beside it, the systemd habit) defines
//! exports by name, each with its disk (size, type, label, mkfs options,
//! command, base image) and what a client may choose through the export
//! name (see [`crate::exportname`]): a size up to `max-size`, a type from
//! `types`, a label. The default export (the empty name) is the command
//! line's disk, or `default = "NAME"`.
//!
//! Everything is checked when the file is read, at start: a bad file never
//! reaches a client. Errors say `file:line: what is wrong`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::base::Base;
use crate::cli::{Common, DiskSpec, FsSpec, human_size, parse_size};
use crate::exportname::{self, Request};
use crate::mkfs;
use crate::nbd::wire::{REP_ERR_POLICY, REP_ERR_UNKNOWN};

/// One export, as the admin defined it.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    /// What NBD_OPT_LIST and NBD_INFO_DESCRIPTION say (written by the
    /// admin, or made from the disk).
    pub description: String,
    /// The disk a client gets when it chooses nothing.
    pub disk: DiskSpec,
    pub choice: Choice,
}

/// What a client may choose through the export name.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// A size up to this (none: the size is fixed).
    pub max_size: Option<u64>,
    /// Types it may ask for (empty: the type is fixed).
    pub types: Vec<String>,
    /// Whether it may set the label.
    pub labels: bool,
}

/// A client's disk: which export, and the disk with its choices applied.
#[derive(Debug, Clone)]
pub struct Shape {
    pub export: String,
    pub disk: DiskSpec,
    /// What NBD_INFO_DESCRIPTION says: the export's description, or what
    /// the client chose.
    pub description: String,
    /// The client's reconnect token, if it gave one.
    pub id: Option<String>,
}

/// Why a name gets no disk: an NBD option error and its message, which
/// says what is allowed.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reply: u32,
    pub message: String,
}

/// Every export this process serves.
#[derive(Debug, Clone)]
pub struct Catalog {
    default: Option<Export>,
    named: BTreeMap<String, Export>,
    /// Without an exports file every name is the default export, as
    /// before named exports existed.
    any_name: bool,
}

impl Catalog {
    /// The command line's disk, under every name.
    pub fn single(disk: DiskSpec) -> Catalog {
        Catalog {
            default: Some(Export::from_cli(disk)),
            named: BTreeMap::new(),
            any_name: true,
        }
    }

    /// The exports in `path` (and `path.d/*.toml`), with `cli` as the
    /// default export unless the file names one. `common` gives what every
    /// export shares (tmpdir, free space, setup timeout).
    pub fn load(
        path: &Path,
        cli: Option<DiskSpec>,
        common: &Common,
    ) -> Result<Catalog, ConfigError> {
        let mut files = vec![path.to_path_buf()];
        let drop_ins = path.with_extension("d");
        let unreadable = |file: &Path, e: std::io::Error| ConfigError {
            file: file.to_path_buf(),
            line: 0,
            what: e.to_string(),
        };
        match std::fs::read_dir(&drop_ins) {
            Ok(dir) => {
                let mut more = Vec::new();
                for entry in dir {
                    let p = entry.map_err(|e| unreadable(&drop_ins, e))?.path();
                    if p.extension().is_some_and(|x| x == "toml") {
                        more.push(p);
                    }
                }
                more.sort();
                files.extend(more);
            }
            // The drop-in directory is optional; any other error is not.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unreadable(&drop_ins, e)),
        }
        let mut texts = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| unreadable(&file, e))?;
            texts.push((file, text));
        }
        Catalog::from_texts(&texts, cli, common)
    }

    /// The exports in these (file, text) pairs, read in order: what
    /// [`Catalog::load`] does once it has read the files (and what the
    /// fuzz harness builds its catalog with).
    pub fn from_texts(
        texts: &[(PathBuf, String)],
        cli: Option<DiskSpec>,
        common: &Common,
    ) -> Result<Catalog, ConfigError> {
        let mut default_name: Option<(String, PathBuf, usize)> = None;
        let mut named: BTreeMap<String, Export> = BTreeMap::new();
        for (file, text) in texts {
            let at = |span: std::ops::Range<usize>, what: String| ConfigError {
                file: file.clone(),
                line: line_of(text, span.start),
                what,
            };
            let parsed: FileDef = toml::from_str(text).map_err(|e| ConfigError {
                file: file.clone(),
                line: e.span().map_or(0, |s| line_of(text, s.start)),
                what: e.message().to_string(),
            })?;
            if let Some(d) = parsed.default {
                default_name = Some((
                    d.get_ref().clone(),
                    file.clone(),
                    line_of(text, d.span().start),
                ));
            }
            for (name, def) in parsed.export {
                let span = name.span();
                let name = name.into_inner();
                if !exportname::valid_export(&name) {
                    return Err(at(
                        span,
                        format!(
                            "export name {name:?}: 1-{} characters of A-Z a-z 0-9 . _ -",
                            exportname::MAX_EXPORT_NAME
                        ),
                    ));
                }
                if named.contains_key(&name) {
                    return Err(at(span, format!("export {name:?} is defined twice")));
                }
                let export = def.resolve(&name, span.clone(), common, &|s, w| at(s, w))?;
                named.insert(name, export);
            }
        }
        let default = match default_name {
            Some((name, file, line)) => Some(named.get(&name).cloned().ok_or(ConfigError {
                file,
                line,
                what: format!("default = {name:?} names no export"),
            })?),
            None => cli.map(Export::from_cli),
        };
        Ok(Catalog {
            default,
            named,
            any_name: false,
        })
    }

    /// The export and disk a client's export name asks for.
    pub fn resolve(&self, name: &str) -> Result<Shape, Refusal> {
        let parsed = exportname::parse(name);
        let (export, req) = match (&self.default, self.any_name) {
            // No exports file: every name is the one disk, as before named
            // exports (only a well-formed choice is heard, and refused),
            // except a bad reconnect token: ignoring it would promise a
            // client a reconnect it will not get.
            (Some(default), true) => match parsed {
                Ok(req) => (default, req),
                Err(e) if name.split(':').skip(1).any(|p| p.starts_with("id=")) => {
                    return Err(Refusal {
                        reply: REP_ERR_UNKNOWN,
                        message: e.0,
                    });
                }
                Err(_) => (default, Request::default()),
            },
            _ => {
                let req = parsed.map_err(|e| Refusal {
                    reply: REP_ERR_UNKNOWN,
                    message: e.0,
                })?;
                let export = match req.export.as_str() {
                    "" => self.default.as_ref(),
                    n => self.named.get(n),
                }
                .ok_or_else(|| Refusal {
                    reply: REP_ERR_UNKNOWN,
                    message: format!(
                        "no export {:?} here; exports: {}",
                        req.export,
                        self.names().join(", ")
                    ),
                })?;
                (export, req)
            }
        };
        let disk = export.apply(&req)?;
        let description = match req.has_choices() {
            true => describe(&disk, &Choice::default()),
            false => export.description.clone(),
        };
        Ok(Shape {
            export: export.name.clone(),
            disk,
            description,
            id: req.id,
        })
    }

    /// The size of a new client's disk, as the capacity agent plans for:
    /// the default export's, else the smallest export's.
    pub fn new_client_size(&self) -> u64 {
        match &self.default {
            Some(d) => d.disk.size,
            None => self.named.values().map(|e| e.disk.size).min().unwrap_or(0),
        }
    }

    /// The export names, for a refusal's message: `"" (default)` for the
    /// default export.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if self.default.is_some() {
            v.push("\"\" (default)".into());
        }
        v.extend(self.named.keys().cloned());
        v
    }

    /// (name, description) of every export, for NBD_OPT_LIST.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if let Some(d) = &self.default {
            v.push((String::new(), d.description.clone()));
        }
        v.extend(
            self.named
                .iter()
                .map(|(n, e)| (n.clone(), e.description.clone())),
        );
        v
    }

    /// What start-up does not check, because only a client's disk needs
    /// it: an mkfs program each export's types need that is not installed.
    /// One line per problem, for `--check-config`.
    pub fn missing_programs(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.default.iter().chain(self.named.values()) {
            let own = (e.disk.base.is_none() && e.disk.fs.command.is_none())
                .then_some(&e.disk.fs.fs_type);
            for t in own.into_iter().chain(&e.choice.types) {
                if t != mkfs::BLANK
                    && let Err(why) = mkfs::find_mkfs(t)
                {
                    let name = match e.name.as_str() {
                        "" => "the default export".to_string(),
                        n => format!("export {n:?}"),
                    };
                    out.push(format!("{name}, type {t}: {why}"));
                }
            }
        }
        out
    }

    /// The exports as a table, for `--check-config`.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "EXPORT".to_string(),
            "DISK".to_string(),
            "CLIENTS MAY CHOOSE".to_string(),
        ]];
        if let Some(e) = &self.default {
            let name = match (self.any_name, e.name.as_str()) {
                (true, _) => "(any name)".to_string(),
                (false, "") => "(default)".to_string(),
                (false, n) => format!("(default) = {n}"),
            };
            rows.push([name, shape_of(&e.disk), choices_of(&e.choice)]);
        }
        for (name, e) in &self.named {
            rows.push([name.clone(), shape_of(&e.disk), choices_of(&e.choice)]);
        }
        let w0 = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r[1].chars().count()).max().unwrap_or(0);
        rows.iter()
            .map(|r| format!("{:w0$}  {:w1$}  {}\n", r[0], r[1], r[2]).replace("  \n", "\n"))
            .collect()
    }
}

/// "8 GiB xfs label=build", "4 GiB copy of /srv/ci.img", for the table.
fn shape_of(disk: &DiskSpec) -> String {
    let size = human_size(disk.size);
    let mut s = match (&disk.base, &disk.fs.command) {
        (Some(b), _) => format!("{size} copy of {}", b.path().display()),
        (None, Some(_)) => format!("{size} by command"),
        (None, None) if disk.fs.fs_type == mkfs::BLANK => format!("{size} blank"),
        (None, None) => format!("{size} {}", disk.fs.fs_type),
    };
    if let Some(l) = &disk.fs.label {
        s.push_str(&format!(" label={}", l.to_string_lossy()));
    }
    if disk.base.is_some() && disk.fs.command.is_some() {
        s.push_str(" + command");
    }
    s
}

/// "size<=64 GiB type=xfs|ext4 label", "-" when nothing.
fn choices_of(c: &Choice) -> String {
    let mut v = Vec::new();
    if let Some(m) = c.max_size {
        v.push(format!("size<={}", human_size(m)));
    }
    if !c.types.is_empty() {
        v.push(format!("type={}", c.types.join("|")));
    }
    if c.labels {
        v.push("label".to_string());
    }
    match v.is_empty() {
        true => "-".into(),
        false => v.join(" "),
    }
}

impl Export {
    /// The command line's disk, as the default export.
    fn from_cli(disk: DiskSpec) -> Export {
        let choice = Choice::default();
        Export {
            name: String::new(),
            description: describe(&disk, &choice),
            disk,
            choice,
        }
    }

    /// The disk for `req`, whose export this is: the export's own with the
    /// client's choices applied, within what the admin allows.
    fn apply(&self, req: &Request) -> Result<DiskSpec, Refusal> {
        let policy = |message: String| Refusal {
            reply: REP_ERR_POLICY,
            message,
        };
        let mut disk = self.disk.clone();
        if let Some(size) = req.size {
            match self.choice.max_size {
                Some(max) if size <= max => {
                    if let Some(base) = &disk.base
                        && size < base.size()
                    {
                        return Err(policy(format!(
                            "export {:?}: size {} is smaller than its image ({})",
                            self.name,
                            human_size(size),
                            human_size(base.size())
                        )));
                    }
                    disk.size = size;
                }
                Some(max) => {
                    return Err(policy(format!(
                        "export {:?}: size {} is over its limit of {}",
                        self.name,
                        human_size(size),
                        human_size(max)
                    )));
                }
                None => {
                    return Err(policy(format!(
                        "export {:?} has a fixed size ({}); it takes no size= in its name",
                        self.name,
                        human_size(disk.size)
                    )));
                }
            }
        }
        if let Some(t) = &req.fs_type {
            if !self.choice.types.iter().any(|x| x == t) {
                return Err(policy(match self.choice.types.is_empty() {
                    true => format!(
                        "export {:?} has a fixed type; it takes no type= in its name",
                        self.name
                    ),
                    false => format!(
                        "export {:?} offers the types {}, not {t:?}",
                        self.name,
                        self.choice.types.join(", ")
                    ),
                }));
            }
            disk.fs.fs_type = t.clone();
        }
        if let Some(l) = &req.label {
            if !self.choice.labels {
                return Err(policy(format!(
                    "export {:?} takes no label= in its name",
                    self.name
                )));
            }
            disk.fs.label = Some(l.into());
        }
        // The label must fit whatever type the disk ends up with.
        if let Some(label) = &disk.fs.label
            && disk.fs.command.is_none()
        {
            mkfs::check_label(&disk.fs.fs_type, label)
                .map_err(|e| policy(format!("export {:?}: {e}", self.name)))?;
        }
        if disk.fs.fs_type == mkfs::BLANK && disk.fs.label.is_some() && disk.fs.command.is_none() {
            return Err(policy(format!(
                "export {:?}: a blank disk (type none) has no label",
                self.name
            )));
        }
        Ok(disk)
    }
}

/// A problem in an exports file, where it is.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the file as a whole is the problem.
    pub line: usize,
    pub what: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.what),
            l => write!(f, "{}:{l}: {}", self.file.display(), self.what),
        }
    }
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

// --- the file's shape ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDef {
    default: Option<Spanned<String>>,
    #[serde(default)]
    export: BTreeMap<Spanned<String>, ExportDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportDef {
    description: Option<Spanned<String>>,
    size: Option<Spanned<Size>>,
    #[serde(rename = "type")]
    fs_type: Option<Spanned<String>>,
    label: Option<Spanned<String>>,
    #[serde(default)]
    mkfs_options: Vec<String>,
    command: Option<String>,
    base: Option<Spanned<PathBuf>>,
    max_size: Option<Spanned<Size>>,
    types: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    labels: bool,
}

/// A size: "8G" as on the command line, or a number of bytes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Text(String),
    Bytes(u64),
}

type At<'a> = dyn Fn(std::ops::Range<usize>, String) -> ConfigError + 'a;

impl ExportDef {
    fn resolve(
        self,
        name: &str,
        name_span: std::ops::Range<usize>,
        common: &Common,
        at: &At<'_>,
    ) -> Result<Export, ConfigError> {
        let size_of = |s: &Spanned<Size>| match s.get_ref() {
            Size::Text(t) => parse_size(t).map_err(|e| at(s.span(), e)),
            Size::Bytes(b) => parse_size(&b.to_string()).map_err(|e| at(s.span(), e)),
        };
        let base = match &self.base {
            Some(p) => {
                if self.fs_type.is_some() || self.label.is_some() || !self.mkfs_options.is_empty() {
                    return Err(at(
                        p.span(),
                        "base copies an image: type, label and mkfs-options cannot go with it"
                            .into(),
                    ));
                }
                Some(Arc::new(
                    Base::open(p.get_ref()).map_err(|e| at(p.span(), e.to_string()))?,
                ))
            }
            None => None,
        };
        let size = match (&self.size, &base) {
            (Some(s), Some(b)) => {
                let size = size_of(s)?;
                if size < b.size() {
                    return Err(at(
                        s.span(),
                        format!(
                            "size is smaller than the base image ({})",
                            human_size(b.size())
                        ),
                    ));
                }
                size
            }
            (Some(s), None) => size_of(s)?,
            (None, Some(b)) => b.size(),
            (None, None) => {
                return Err(at(
                    name_span,
                    format!("export {name:?} needs a size (or a base image)"),
                ));
            }
        };
        let fs_type = match (&self.fs_type, &base) {
            (_, Some(_)) => String::new(),
            (Some(t), None) => {
                crate::cli::parse_fs_type(t.get_ref()).map_err(|e| at(t.span(), e))?
            }
            (None, None) => "ext4".into(),
        };
        let max_size = match &self.max_size {
            Some(m) => {
                let max = size_of(m)?;
                if max < size {
                    return Err(at(
                        m.span(),
                        format!("max-size is below the export's size ({})", human_size(size)),
                    ));
                }
                Some(max)
            }
            None => None,
        };
        let types_span = self.types.as_ref().map_or(name_span.clone(), Spanned::span);
        let types = self.types.map(Spanned::into_inner).unwrap_or_default();
        for t in &types {
            crate::cli::parse_fs_type(t).map_err(|e| at(types_span.clone(), e))?;
        }
        if base.is_some() && (!types.is_empty() || self.labels) {
            return Err(at(
                types_span,
                "an export with a base image offers no types or labels".into(),
            ));
        }
        // mkfs options are one program's options: given to another type's
        // mkfs they would fail at the first client that chose it.
        if !self.mkfs_options.is_empty()
            && let Some(other) = types.iter().find(|t| **t != fs_type)
        {
            return Err(at(
                types_span,
                format!(
                    "mkfs-options are for {fs_type}: types may not offer {other:?} with them \
                     (define another export for it)"
                ),
            ));
        }
        let label: Option<OsString> = self.label.as_ref().map(|l| l.get_ref().into());
        if let (Some(l), None) = (&self.label, &self.command)
            && fs_type == mkfs::BLANK
        {
            return Err(at(l.span(), "a blank disk (type none) has no label".into()));
        }
        if let (Some(l), Some(span), None) = (
            &label,
            self.label.as_ref().map(Spanned::span),
            &self.command,
        ) {
            mkfs::check_label(&fs_type, l).map_err(|e| at(span, e))?;
        }
        let disk = common.disk(
            size,
            FsSpec {
                fs_type,
                label,
                mkfs_options: self.mkfs_options.into_iter().map(Into::into).collect(),
                command: self.command.map(Into::into),
            },
            base,
        );
        let choice = Choice {
            max_size,
            types,
            labels: self.labels,
        };
        let description = match self.description {
            Some(d) => {
                check_description(d.get_ref()).map_err(|e| at(d.span(), e))?;
                d.into_inner()
            }
            None => describe(&disk, &choice),
        };
        Ok(Export {
            name: name.to_string(),
            description,
            disk,
            choice,
        })
    }
}

/// A description goes to clients as an NBD string (NBD_OPT_LIST,
/// NBD_INFO_DESCRIPTION): UTF-8, which TOML guarantees, with no NUL, at
/// most 4096 bytes.
fn check_description(d: &str) -> Result<(), String> {
    if d.contains('\0') {
        return Err("the description contains a NUL character".into());
    }
    if d.len() > crate::nbd::wire::MAX_STRING {
        return Err(format!(
            "the description is {} bytes: NBD allows at most {}",
            d.len(),
            crate::nbd::wire::MAX_STRING
        ));
    }
    Ok(())
}

/// A description made from the disk and what a client may choose: "8 GiB
/// xfs scratch disk, fresh per connection; size up to 64 GiB, type xfs or
/// ext4 by export name".
pub fn describe(disk: &DiskSpec, choice: &Choice) -> String {
    let size = human_size(disk.size);
    let what = match (&disk.base, &disk.fs.command, disk.fs.fs_type.as_str()) {
        (Some(b), _, _) => format!(
            "{size} copy of {}",
            b.path().file_name().map_or_else(
                || b.path().display().to_string(),
                |n| n.to_string_lossy().into()
            )
        ),
        (None, Some(_), _) => format!("{size} disk prepared by a command"),
        (None, None, "none") => format!("{size} blank disk"),
        (None, None, "swap") => format!("{size} swap disk"),
        (None, None, t) => format!("{size} {t} disk"),
    };
    let label = match &disk.fs.label {
        Some(l) => format!(" labelled {:?}", l.to_string_lossy()),
        None => String::new(),
    };
    let mut choices = Vec::new();
    if let Some(max) = choice.max_size {
        choices.push(format!("size up to {}", human_size(max)));
    }
    if !choice.types.is_empty() {
        choices.push(format!("type {}", choice.types.join(" or ")));
    }
    if choice.labels {
        choices.push("a label".to_string());
    }
    let choices = match choices.is_empty() {
        true => String::new(),
        false => format!("; {} by export name", choices.join(", ")),
    };
    format!("{what}{label}, fresh per connection{choices}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::MinFree;
    use std::ffi::OsStr;

    /// A directory of exports files, removed at the end.
    struct Files(PathBuf);

    impl Files {
        fn new(tag: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("tmpdisk-exports-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("exports.d")).expect("test dir");
            Files(dir)
        }
        fn put(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
        fn load(&self, text: &str) -> Result<Catalog, ConfigError> {
            let main = self.put("exports.toml", text);
            Catalog::load(&main, Some(cli_disk()), &common())
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn common() -> Common {
        Common {
            tmpdir: "/var/tmp".into(),
            min_free: MinFree::Bytes(0),
            setup_timeout: None,
        }
    }

    fn cli_disk() -> DiskSpec {
        common().disk(1 << 30, FsSpec::of_type("ext4"), None)
    }

    const SITE: &str = r#"
[export.scratch]
size = "8G"
type = "xfs"
max-size = "64G"
types = ["xfs", "ext4"]
labels = true

[export.firmware]
description = "a 512 MiB FAT stick"
size = "512M"
type = "vfat"
label = "FIRMWARE"

[export.swap]
size = "2G"
type = "swap"

[export.blank]
size = 1073741824
type = "none"
"#;

    fn refusal(c: &Catalog, name: &str) -> Refusal {
        match c.resolve(name) {
            Ok(s) => panic!("{name:?} was given {:?}", s.disk),
            Err(r) => r,
        }
    }

    #[test]
    fn clients_choose_within_the_limits() {
        let f = Files::new("choose");
        let c = f.load(SITE).expect("loads");
        let s = c.resolve("scratch:size=16G:type=ext4:label=build").unwrap();
        assert_eq!(s.export, "scratch");
        assert_eq!(s.disk.size, 16 << 30);
        assert_eq!(s.disk.fs.fs_type, "ext4");
        assert_eq!(s.disk.fs.label.as_deref(), Some(OsStr::new("build")));
        assert!(
            s.description.starts_with("16 GiB ext4 disk labelled"),
            "{}",
            s.description
        );
        let s = c.resolve("scratch").unwrap();
        assert_eq!((s.disk.size, s.disk.fs.fs_type.as_str()), (8 << 30, "xfs"));
        assert_eq!(
            s.description,
            "8 GiB xfs disk, fresh per connection; size up to 64 GiB, type xfs or ext4, \
             a label by export name"
        );
        assert_eq!(
            c.resolve("firmware").unwrap().description,
            "a 512 MiB FAT stick"
        );
        assert_eq!(c.resolve("swap").unwrap().disk.fs.fs_type, mkfs::SWAP);
        assert_eq!(c.resolve("blank").unwrap().disk.size, 1 << 30);
        // The empty name is the command line's disk.
        let d = c.resolve("").unwrap();
        assert_eq!((d.export.as_str(), d.disk.size), ("", 1 << 30));
    }

    #[test]
    fn refusals_say_what_is_allowed() {
        let f = Files::new("refuse");
        let c = f.load(SITE).expect("loads");
        for (name, reply, needle) in [
            (
                "nosuch",
                REP_ERR_UNKNOWN,
                "exports: \"\" (default), blank, firmware, scratch, swap",
            ),
            (
                "scratch:size=65G",
                REP_ERR_POLICY,
                "over its limit of 64 GiB",
            ),
            (
                "scratch:type=btrfs",
                REP_ERR_POLICY,
                "offers the types xfs, ext4, not \"btrfs\"",
            ),
            (
                "scratch:label=thirteen-long",
                REP_ERR_POLICY,
                "xfs labels hold at most 12",
            ),
            ("firmware:size=1G", REP_ERR_POLICY, "fixed size (512 MiB)"),
            ("firmware:type=ext4", REP_ERR_POLICY, "fixed type"),
            ("firmware:label=x", REP_ERR_POLICY, "takes no label="),
            ("scratch:size=1G:size=2G", REP_ERR_UNKNOWN, "twice"),
            ("scr\u{1b}[2J", REP_ERR_UNKNOWN, "\\u{1b}"),
        ] {
            let r = refusal(&c, name);
            assert_eq!(r.reply, reply, "{name:?}: {}", r.message);
            assert!(r.message.contains(needle), "{name:?}: {}", r.message);
        }
        // A label that fits xfs may not fit vfat: checked for the type chosen.
        assert!(c.resolve("scratch:label=twelve-chars").is_ok());
    }

    #[test]
    fn without_a_file_every_name_is_the_one_disk() {
        let c = Catalog::single(cli_disk());
        for name in ["", "anything", "scr atch", "\u{1b}[31m"] {
            assert_eq!(c.resolve(name).unwrap().disk.size, 1 << 30, "{name:?}");
        }
        // A well-formed choice is heard, and refused: the size is fixed.
        assert_eq!(refusal(&c, "x:size=2G").reply, REP_ERR_POLICY);
        assert_eq!(
            c.list(),
            vec![(
                String::new(),
                "1 GiB ext4 disk, fresh per connection".into()
            )]
        );
    }

    #[test]
    fn drop_ins_add_exports_in_name_order_and_default_may_point_at_one() {
        let f = Files::new("dropins");
        f.put("exports.d/20-b.toml", "[export.b]\nsize = \"1G\"\n");
        f.put(
            "exports.d/10-a.toml",
            "default = \"b\"\n[export.a]\nsize = \"2G\"\n",
        );
        f.put("exports.d/30-ignored.conf", "this is not toml");
        let c = f.load("[export.main]\nsize = \"3G\"\n").expect("loads");
        let names: Vec<String> = c.list().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["", "a", "b", "main"]);
        assert_eq!(c.resolve("").unwrap().export, "b");
        assert!(c.table().contains("(default) = b"), "{}", c.table());
        // Without an exports file the table says any name will do.
        assert!(Catalog::single(cli_disk()).table().contains("(any name)"));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let f = Files::new("errors");
        for (text, line, needle) in [
            (
                "[export.a]\nsize = \"1G\"\nsize = \"2G\"\n",
                3,
                "duplicate key",
            ),
            (
                "[export.a]\nsize = \"1G\"\ncolour = \"red\"\n",
                3,
                "unknown field `colour`",
            ),
            ("[export.a]\nsize = \"1Q\"\n", 2, "unknown suffix"),
            ("[export.a]\ntype = \"xfs\"\n", 1, "needs a size"),
            (
                "\n[export.\"a b\"]\nsize = \"1G\"\n",
                2,
                "export name \"a b\"",
            ),
            (
                "[export.a]\nsize = \"8G\"\nmax-size = \"4G\"\n",
                3,
                "below the export's size",
            ),
            (
                "[export.a]\nsize = \"1G\"\ntype = \"xfs\"\nlabel = \"thirteen-long\"\n",
                4,
                "at most 12",
            ),
            (
                "[export.a]\nsize = \"1G\"\ntype = \"x;y\"\n",
                3,
                "invalid filesystem type",
            ),
            (
                "[export.a]\nsize = \"1G\"\ntype = \"none\"\nlabel = \"x\"\n",
                4,
                "has no label",
            ),
            (
                "[export.a]\nsize = \"1G\"\ntype = \"xfs\"\nmkfs-options = [\"-m\", \"crc=1\"]\ntypes = [\"xfs\", \"ext4\"]\n",
                5,
                "mkfs-options are for xfs",
            ),
            (
                "default = \"nope\"\n[export.a]\nsize = \"1G\"\n",
                1,
                "names no export",
            ),
            (
                "[export.a]\nsize = \"1G\"\nbase = \"/nonexistent/base.img\"\n",
                3,
                "/nonexistent/base.img",
            ),
            (
                "[export.a]\nsize = \"1G\"\ndescription = \"a\\u0000b\"\n",
                3,
                "contains a NUL",
            ),
            (
                &format!(
                    "[export.a]\nsize = \"1G\"\ndescription = \"{}\"\n",
                    "é".repeat(2049)
                ),
                3,
                "4098 bytes: NBD allows at most 4096",
            ),
        ] {
            let e = f.load(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.what.contains(needle), "{text:?}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{}:{line}: ", e.file.display())),
                "{e}"
            );
        }
        // A name defined twice, across files: the second place is named.
        f.put("exports.d/a.toml", "\n[export.a]\nsize = \"1G\"\n");
        let e = f
            .load("[export.a]\nsize = \"1G\"\n")
            .expect_err("duplicate");
        assert!(e.file.ends_with("exports.d/a.toml") && e.line == 2, "{e}");
        assert!(e.what.contains("defined twice"), "{e}");
    }
}
