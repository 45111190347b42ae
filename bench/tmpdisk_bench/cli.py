"""bench/run's command line and the wiring: options, rows, tools, the
binary, then the runs (each repeat: the ceiling, then the comparison)
inside a workspace (and, for the golden rows, their base image) and a set
of servers, then the report (a table per kind of row)."""

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time

from .common import REPO, SIGNALLED, log
from .config import Config, Options, Settings
from .golden import check_base, golden_images
from .machine import machine, versions
from .report import footer, golden_table, header, json_document, summarize, table
from .rows import BALANCER_PAIR, GROUPS, NAMED_PAIR, build_rows, select_rows
from .runner import run_once
from .servers import Servers
from .tools import find_tools
from .workloads import calibrate
from .workspace import workspace


def parse_args():
    ap = argparse.ArgumentParser(
        prog="bench/run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="tmpdisk against nbdkit's tmpdisk plugin: same start-up, same workloads, one table.",
        epilog="Row groups for --only: %s; or row ids / globs (see --list), e.g. "
               "--only 'unix.*,connect_1G_ext4'.  The golden rows are opt-in: only --only golden (or a "
               "golden.* id or glob) or --golden selects them; so are the named row and the balancer rows: only --only named "
               "or --only balancer (or such an id or glob).  See bench/README.md." % ", ".join(sorted(GROUPS)))
    ap.add_argument("--quick", action="store_true", help="~1 min: 3 connects per row, 1 seq run, 1G empty "
                    "read, 1 s fio jobs, 10 clients")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the whole comparison N times; report median ratio and min–max")
    ap.add_argument("--only", metavar="ROWS", help="comma list of row groups, ids or globs")
    ap.add_argument("--json", metavar="FILE", help="also write all samples and the summary as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    ap.add_argument("--list", action="store_true", help="list the row ids and exit")
    ap.add_argument("--runs", type=int, help="connects per latency row (default 11, quick 3)")
    ap.add_argument("--clients", type=int, help="simultaneous clients (default 50, quick 10)")
    ap.add_argument("--fio-runtime", type=float, help="seconds per fio job (default 5, quick 1)")
    ap.add_argument("--tmpdisk", help="tmpdisk binary (default: the one packaging/build-release builds, "
                    "the packages' build: target/<host>/release/tmpdisk)")
    ap.add_argument("--build", action="store_true", help="run packaging/build-release first")
    ap.add_argument("--scratch", metavar="DIR", default="/var/tmp",
                    help="where both servers put their images: a fresh directory is made under DIR "
                         "and removed at the end (default /var/tmp, both servers' default)")
    ap.add_argument("--tmpfs", action="store_true",
                    help="mount a dedicated tmpfs as the scratch dir for the run (needs root)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (path printed)")
    ap.add_argument("--golden", action="store_true",
                    help="also the golden-image rows (tmpdisk --base vs qemu-nbd --snapshot and nbd-server "
                         "copyonwrite; root for the clone path): opt-in, or select them with --only golden")
    a = ap.parse_args()
    return Options(settings=Settings.of(a.quick, a.runs, a.clients, a.fio_runtime),
                   repeat=a.repeat, only=a.only, json=a.json, markdown=a.markdown, list=a.list,
                   tmpdisk=a.tmpdisk, build=a.build, scratch=a.scratch, tmpfs=a.tmpfs,
                   keep_logs=a.keep_logs, golden=a.golden)


def tmpdisk_binary(opts):
    """The binary to measure (built first with --build), and whether it is
    older than the newest file in src/.  By default the packages' build
    (packaging/build-release: a musl (or glibc) static-pie, which starts faster
    than `cargo build --release`'s), so that the table measures what is
    deployed."""
    release = os.path.join(REPO, "packaging", "build-release")
    if opts.build or not opts.tmpdisk:
        log("packaging/build-release" + ("" if opts.build else " --print-path"))
        r = subprocess.run([release] + ([] if opts.build else ["--print-path"]), cwd=REPO,
                           stdout=subprocess.PIPE, text=True, timeout=3600)
        if r.returncode != 0:
            sys.exit("bench/run: packaging/build-release failed")
        built = r.stdout.strip()
    tmpdisk = os.path.realpath(opts.tmpdisk or built)
    if not os.access(tmpdisk, os.X_OK):
        sys.exit("bench/run: no tmpdisk binary at %s: run packaging/build-release in %s (or pass --build)"
                 % (tmpdisk, REPO))
    newest = 0
    for dp, _d, fns in os.walk(os.path.join(REPO, "src")):
        for fn in fns:
            newest = max(newest, os.path.getmtime(os.path.join(dp, fn)))
    stale = newest > os.path.getmtime(tmpdisk)
    if stale:
        log("WARNING: %s is older than the newest file in src/: you are measuring an old build "
            "(packaging/build-release, or --build)" % tmpdisk)
    return tmpdisk, stale


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP unwind like Ctrl-C (KeyboardInterrupt), so that
    every `with` on the way out stops its servers and removes its files."""
    def on_signal(signum, _frame):
        SIGNALLED.append(signum)
        raise KeyboardInterrupt("signal %d" % signum)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main():
    opts = parse_args()
    rows = build_rows(opts.settings)
    if opts.list:
        for r in rows:
            if r.peers:  # opt-in (--only golden, --golden); wider ids and labels
                print("%-30s %-49s %-5s %-6s target %s %s" % (
                    r.id, r.label, r.unit, r.better, r.target_text, "(tmpdisk's own value)" if r.absolute
                    else "the faster of " + " and ".join(r.peers)))
            elif r.optin:  # opt-in (--only named): a longer label; what the ratio is of
                print("%-24s %s  %-5s %-6s target %s (%s/%s)" % (
                    (r.id, r.label, r.unit, r.better, r.target_text) + r.pair))
            else:
                print("%-24s %-42s %-5s %-6s target %s" % (r.id, r.label, r.unit, r.better, r.target_text))
        return 0
    rows = select_rows(rows, opts.only, opts.golden)
    if opts.repeat < 1:
        sys.exit("bench/run: --repeat must be at least 1")
    nbdkit_rows = any(not r.optin for r in rows)
    golden_rows = any(r.peers for r in rows)
    named = any(r.optin == "named" for r in rows)
    balancer = any(r.optin == "balancer" for r in rows)
    clone = any(r.id.startswith("golden.clone.") for r in rows)
    if clone and os.geteuid() != 0:
        sys.exit("bench/run: the golden clone rows loop-mount an xfs (reflink=1): run them as root, "
                 "or select only the overlay ones (--only 'golden.overlay.*')")
    tools = find_tools(rows)
    tmpdisk, stale = tmpdisk_binary(opts)

    calib = []  # per repeat: {transport: ceiling}
    runs = []
    interrupted = False
    base_check = None
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mach = machine()
    t_start = time.monotonic()
    ceiling_trs = [tr for tr in ("tcp", "unix") if any(r.id.startswith(tr + ".seq_") for r in rows)]
    tls = any(r.id.startswith("tls.") for r in rows)
    try:
        with signals_interrupt(), \
                workspace(tmpdisk, stale, opts.scratch, opts.tmpfs, tools.openssl if tls else None,
                          opts.keep_logs) as work, \
                (golden_images(work, tools, opts.settings, clone) if golden_rows
                 else contextlib.nullcontext()) as golden, \
                Servers() as servers:
            cfg = Config(settings=opts.settings, tools=tools, work=work, golden=golden)
            try:
                ver = versions(cfg)
                for rep in range(opts.repeat):
                    if opts.repeat > 1:
                        log("=== repeat %d of %d" % (rep + 1, opts.repeat))
                    if ceiling_trs:
                        calib.append({})
                        for tr in ceiling_trs:
                            log("ceiling: the seq loop against nbdkit's null plugin over %s" % tr)
                            calib[-1][tr] = calibrate(cfg, servers, tr)
                    runs.append({})
                    run_once(cfg, servers, rows, rep, runs[-1])
            except KeyboardInterrupt as e:
                interrupted = True
                log("interrupted (%s): stopping the servers" % (e or "Ctrl-C"))
            if golden:  # every server is stopped by now: did any write to the base?
                try:
                    base_check = check_base(golden)
                    log("golden: the base after the run: %s" % base_check)
                except KeyboardInterrupt:
                    interrupted = True
    except KeyboardInterrupt as e:  # before the runs began (making the workspace): nothing to report
        log("interrupted (%s)" % (e or "Ctrl-C"))
        return 130

    if not runs:
        return 130 if interrupted else 1
    summary = summarize(rows, runs)
    mach["load_end"] = os.getloadavg()
    print(header(cfg, mach, ver, date, len(runs), opts.markdown, nbdkit_rows, named, balancer))
    if nbdkit_rows:
        print()
        print(table(summary, len(runs), opts.markdown))
    if named:
        print()
        print(table(summary, len(runs), opts.markdown, NAMED_PAIR))
    if balancer:
        print()
        print(table(summary, len(runs), opts.markdown, BALANCER_PAIR))
    if golden_rows:
        print()
        print(golden_table(summary, len(runs), opts.markdown))
    elapsed = time.monotonic() - t_start
    print()
    print(footer(summary, calib, elapsed, mach["load_end"], interrupted, opts.markdown, base_check))
    if opts.keep_logs:
        print("server logs: %s" % cfg.work.workdir)
    sys.stdout.flush()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(json_document(cfg, date, mach, ver, runs, elapsed, interrupted, calib, summary,
                                    base_check), f, indent=1, default=str)
        log("JSON written to %s" % opts.json)
    return 130 if interrupted else 0
