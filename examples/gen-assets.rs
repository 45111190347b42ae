//! Generates what the packages ship besides the binary, from the one clap
//! definition of the command line (`tmpdisk::cli::Args`), so that the man
//! page and the shell completions can never disagree with `tmpdisk --help`:
//!
//! ```sh
//! cargo run --release --example gen-assets -- OUTDIR
//! ```
//!
//! writes `OUTDIR/tmpdisk.8` (the man page, section 8: a system daemon) and
//! `OUTDIR/completions/{tmpdisk.bash,_tmpdisk,tmpdisk.fish}`.
//! `packaging/build-packages` runs it.

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use tmpdisk::cli::Args;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: gen-assets OUTDIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path) -> io::Result<()> {
    let completions = out.join("completions");
    fs::create_dir_all(&completions)?;
    let mut page = Vec::new();
    man_page(&mut page)?;
    fs::write(out.join("tmpdisk.8"), page)?;
    for (shell, file) in [
        (Shell::Bash, "tmpdisk.bash"),
        (Shell::Zsh, "_tmpdisk"),
        (Shell::Fish, "tmpdisk.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut Args::command(), "tmpdisk", &mut text);
        fs::write(completions.join(file), text)?;
    }
    Ok(())
}

/// tmpdisk(8): clap's sections (name, synopsis, description, options with
/// their environment variables), then what only a man page says: how the
/// packaged units run it, the files involved, exit status, see also.
fn man_page(w: &mut dyn Write) -> io::Result<()> {
    let man = Man::new(Args::command())
        .section("8")
        .manual("System Administration")
        .source(format!("tmpdisk {}", env!("CARGO_PKG_VERSION")))
        .date(release_date());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;

    let mut r = Roff::new();
    r.control("SH", ["SYSTEMD"]);
    r.text([
        roman("The packages install "),
        bold("tmpdisk.socket"),
        roman(" (port 10809, "),
        bold("Accept=yes"),
        roman("), which starts one sandboxed, resource-limited "),
        bold("tmpdisk@.service"),
        roman(" instance per connection, in "),
        bold("tmpdisk.slice"),
        roman(". Nothing is enabled on installation; run"),
    ]);
    r.control("IP", []);
    r.text([bold("systemctl enable --now tmpdisk.socket")]);
    r.control("PP", []);
    r.text([
        roman("Instances read their options from "),
        italic("/etc/tmpdisk/tmpdisk.conf"),
        roman(" as "),
        bold("TMPDISK_*"),
        roman(" variables (see OPTIONS). Addresses, ports, a Unix socket and "),
        roman("client filtering are drop-ins for the socket ("),
        bold("systemctl edit tmpdisk.socket"),
        roman("); per-client limits are drop-ins for the template ("),
        bold("systemctl edit tmpdisk@.service"),
        roman("), limits on all clients together for the slice ("),
        bold("systemctl edit tmpdisk.slice"),
        roman("). Every client can use up to SIZE of disk space in "),
        italic("/var/tmp"),
        roman(", so MaxConnections= \u{d7} SIZE bounds the total."),
    ]);
    r.control("PP", []);
    r.text([
        roman("Each connection is logged to the journal with structured fields: "),
        bold("journalctl -t tmpdisk"),
        roman(", or "),
        bold("journalctl -u 'tmpdisk@*' -o verbose"),
        roman(" to see them."),
    ]);

    r.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/tmpdisk/tmpdisk.conf",
            "options for socket-activated instances (TMPDISK_SIZE=..., TMPDISK_TYPE=...)",
        ),
        (
            "/usr/lib/systemd/system/tmpdisk.socket",
            "the listening socket, one instance per connection",
        ),
        (
            "/usr/lib/systemd/system/tmpdisk@.service",
            "the per-connection instance: sandbox and per-client limits",
        ),
        (
            "/usr/lib/systemd/system/tmpdisk.slice",
            "limits on all clients together",
        ),
    ] {
        r.control("TP", []);
        r.text([italic(path)]);
        r.text([roman(what)]);
    }

    r.control("SH", ["EXIT STATUS"]);
    r.text([roman(
        "0 the client was served (or left, or misbehaved: logged as a warning); \
         1 the disk could not be built or served; 2 usage error.",
    )]);

    r.control("SH", ["SEE ALSO"]);
    let refs = [
        ("nbdinfo", "1"),
        ("nbdfuse", "1"),
        ("nbd-client", "8"),
        ("qemu-img", "1"),
        ("mkfs", "8"),
        ("systemd.socket", "5"),
        ("systemd.exec", "5"),
        ("systemd.resource-control", "5"),
    ];
    let mut line = Vec::new();
    for (i, (name, section)) in refs.iter().enumerate() {
        line.push(bold(*name));
        let sep = if i + 1 < refs.len() { "), " } else { ")" };
        line.push(roman(format!("({section}{sep}")));
    }
    r.text(line);
    r.to_writer(w)?;
    man.render_version_section(w)
}

/// The page's date: SOURCE_DATE_EPOCH when set (reproducible builds), else
/// none.
fn release_date() -> String {
    let Some(secs) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    else {
        return String::new();
    };
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
