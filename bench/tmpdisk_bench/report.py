"""What is printed: the summary of the runs (medians, ratios, targets
met), the table as text or Markdown with its header and footer (targets
missed, rows without a result, the ceiling), and the JSON document."""

import dataclasses

from .common import MiB, median, size_str


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "%" and abs(v) < 10:
        return "%.2f" % v
    if abs(v) >= 1000:
        return "%.0f" % v
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    if abs(v) >= 1:
        return "%.2f" % v
    if v == 0:
        return "0"
    return "%.3g" % v


def fmt_ratio(r):
    if r is None:
        return "-"
    if r >= 10:
        return "%.0f×" % r
    if r >= 0.1:
        return "%.3f×" % r  # 3 decimals: "1.50× NO" for 1.497 would confuse
    return "%.2g×" % r


def summarize(rows, runs):
    out = []
    for r in rows:
        if r.peers:
            out.append(summarize_golden(r, runs))
            continue
        a, b = r.pair  # tmpdisk and nbdkit; the named row: chosen and fixed
        tv = [run[r.id].get(a, (None,))[0] for run in runs]
        nv = [run[r.id].get(b, (None,))[0] for run in runs]
        ratios = [t / n for t, n in zip(tv, nv) if t is not None and n]
        failed = any(run[r.id].get(a, (None, {}))[1].get("failed") for run in runs)
        tmed, nmed, rmed = median(tv), median(nv), median(ratios)
        met = r.met(tmed, rmed)
        target = r.target_text
        if r.added:  # the bound is on the difference, per repeat, then the median
            added = median([t - n for t, n in zip(tv, nv) if t is not None and n is not None])
            met = None if added is None else added <= r.target
            target = "%s (%s %+.2f)" % (target, "added" if added is not None else "", added or 0)
        met = None if met is None else ("yes" if met else "NO")
        if r.id.endswith(".empty_read") and r.label.find("16G") < 0 and met:
            met += " (target is for 16G)"
        out.append({
            "id": r.id, "label": r.label, "unit": r.unit, "better": r.better,
            a: tmed, b: nmed, "pair": r.pair, "ratio": rmed,
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "runs_with_ratio": len(ratios), "target": target, "absolute_target": r.absolute,
            "met": "FAIL (data)" if failed else met, "info": r.info,
        })
    return out


def summarize_golden(r, runs):
    """A golden row: tmpdisk's path and each peer, and per repeat the ratio
    of tmpdisk to the faster (better) peer of that repeat."""
    pick = min if r.better == "lower" else max
    tv = [run[r.id].get("tmpdisk", (None,))[0] for run in runs]
    pv = {p: [run[r.id].get(p, (None,))[0] for run in runs] for p in r.peers}
    ratios, best = [], []
    for i, t in enumerate(tv):
        vals = [pv[p][i] for p in r.peers if pv[p][i] is not None]
        if vals:
            b = pick(vals)
            best.append(r.peers[[pv[p][i] for p in r.peers].index(b)])
            if t is not None and b:
                ratios.append(t / b)
    failed = any(run[r.id].get("tmpdisk", (None, {}))[1].get("failed") for run in runs)
    tmed, rmed = median(tv), median(ratios)
    met = r.met(tmed, rmed)
    met = None if met is None else ("yes" if met else "NO")
    return {"id": r.id, "label": r.label, "unit": r.unit, "better": r.better,
            "tmpdisk": tmed, "peers": {p: median(v) for p, v in pv.items()},
            "faster_peer": max(set(best), key=best.count) if best else None, "ratio": rmed,
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "runs_with_ratio": len(ratios), "target": r.target_text, "absolute_target": r.absolute,
            "met": "FAIL (data)" if failed else met, "info": r.info}


def table(summary, repeat, markdown, pair=("tmpdisk", "nbdkit")):
    """The rows whose ratio is of these two columns: tmpdisk/nbdkit, or the
    named row's chosen/fixed (the golden ones have a table of their own)."""
    summary = [s for s in summary if s.get("pair") == pair]
    a, b = pair
    ratio = "ratio %s/%s" % (a[0], b[0])
    spread = repeat > 1
    head = ["row", "unit", "better", a, b, ratio]
    if spread:
        head.append("ratio min–max")
    head += ["target", "met"]
    lines = []
    for s in summary:
        cells = [s["label"], s["unit"], s["better"], fmt(s[a], s["unit"]),
                 fmt(s[b], s["unit"]), fmt_ratio(s["ratio"])]
        if spread:
            cells.append("%s–%s" % (fmt_ratio(s["ratio_min"]).rstrip("×"), fmt_ratio(s["ratio_max"]))
                         if s["ratio_min"] is not None else "-")
        cells += [s["target"] + (" (tmpdisk)" if s["absolute_target"] else ""), s["met"] or ("-" if s["info"] else "?")]
        lines.append(cells)
    return render(head, lines, {a, b, ratio, "ratio min–max"}, markdown)


def golden_table(summary, repeat, markdown):
    """The golden rows: tmpdisk's path, both peers, the ratio to the faster
    peer (per repeat, then the median), target and verdict."""
    summary = [s for s in summary if "peers" in s]
    peers = list(summary[0]["peers"]) if summary else []
    spread = repeat > 1
    ratio = "ratio t/faster peer"
    head = ["row", "unit", "better", "tmpdisk"] + peers + [ratio]
    if spread:
        head.append("ratio min–max")
    head += ["target", "met"]
    lines = []
    for s in summary:
        cells = [s["label"], s["unit"], s["better"], fmt(s["tmpdisk"], s["unit"])]
        cells += [fmt(s["peers"][p], s["unit"]) for p in peers] + [fmt_ratio(s["ratio"])]
        if spread:
            cells.append("%s–%s" % (fmt_ratio(s["ratio_min"]).rstrip("×"), fmt_ratio(s["ratio_max"]))
                         if s["ratio_min"] is not None else "-")
        cells += [s["target"] + (" (tmpdisk)" if s["absolute_target"] else ""), s["met"] or "?"]
        lines.append(cells)
    return render(head, lines, {"tmpdisk", ratio, "ratio min–max"} | set(peers), markdown)


def render(head, lines, right, markdown):
    """A table as Markdown, or as aligned text (the columns in right
    right-aligned)."""
    if markdown:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join("--:" if h in right else "---" for h in head) + "|"]
        for c in lines:
            out.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
        return "\n".join(out)
    w = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    num = {i for i, h in enumerate(head) if h in right}

    def line(c):
        return "  ".join(x.rjust(w[i]) if i in num else x.ljust(w[i]) for i, x in enumerate(c)).rstrip()
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(c) for c in lines])


def header(cfg, mach, ver, date, repeat, markdown, nbdkit_rows=True, named=False, balancer=False):
    """nbdkit_rows: rows against nbdkit were selected; named: the named
    row was; balancer: the balancer rows were; cfg.golden is set when
    golden rows were."""
    st, work, g = cfg.settings, cfg.work, cfg.golden
    mode = "quick" if st.quick else "full"
    title = ", ".join(([] if not nbdkit_rows else ["tmpdisk vs nbdkit tmpdisk"])
                      + ([] if not g else ["%stmpdisk --base vs qemu-nbd --snapshot and nbd-server copyonwrite"
                                           % ("and " if nbdkit_rows else "")])
                      + ([] if not named else ["%stmpdisk: a disk chosen by export name vs a fixed export"
                                               % ("and " if nbdkit_rows or g else "")])
                      + ([] if not balancer else ["%stmpdisk through HAProxy vs direct"
                                                  % ("and " if nbdkit_rows or g or named else "")]))
    peers = ([ver["nbdkit"]] if nbdkit_rows else []) + ([ver["qemu-nbd"], ver["nbd-server"]] if g else [])
    lines = [
        "%s, %s, %s run%s" % (title, date, mode, ", median of %d repeats" % repeat if repeat > 1 else ""),
        "machine: %s, %d cores, kernel %s, %.1f GiB RAM, TCP congestion control %s, load %.2f %.2f %.2f at start" % (
            mach["cpu"], mach["cores"], mach["kernel"], mach["ram_gib"], mach["tcp_cc"],
            *mach["load_start"]),
        "; ".join(["tmpdisk %s (git %s, built %s)%s" % (
            ver["tmpdisk"].split()[-1], ver["tmpdisk_git"], work.tmpdisk_built,
            " [binary older than src/: rebuild!]" if work.stale else "")]
            + peers + ["libnbd %s" % ver["libnbd"], ver["fio"]]),
    ]
    if nbdkit_rows:
        lines += [
            "tcp = systemd-socket-activate on 127.0.0.1 (tmpdisk: --accept, a process per client; nbdkit: its own "
            "socket activation); unix = tmpdisk --unix vs nbdkit -f -U; images in %s (%s)"
            % (work.scratch_where, work.scratch_fs),
            "ratio = tmpdisk/nbdkit; connect: median of %d; seq: %d run(s), 1 GiB each; fio %gs per job; "
            "%d clients" % (st.runs, st.seq_runs, st.fio_runtime, st.clients),
        ]
    if named:
        lines += [
            "named: one tmpdisk --exports FILE -t ext4 1G under systemd-socket-activate --accept on 127.0.0.1 "
            "(a process per client), images in %s (%s); FILE: export scratch (1G ext4; clients may choose "
            "max-size 16G, types xfs|ext4, labels) and export xfs16 (16G xfs)" % (work.scratch_where, work.scratch_fs),
            "named: ratio = chosen/fixed; chosen = nbd://…/scratch:size=16G:type=xfs, fixed = nbd://…/xfs16; "
            "connect: median of %d each (after a warm-up connect each), the order alternating between repeats"
            % st.runs,
        ]
    if balancer:
        lines += [
            "balancer: one tmpdisk -t ext4 1G --proxy-protocol --proxy-from 127.0.0.2 under "
            "systemd-socket-activate --accept on 127.0.0.1 (a process per client), images in %s (%s); "
            "haproxy = %s in TCP mode in front (splice both ways, 1 MiB pipes, balance leastconn, "
            "send-proxy-v2, source 127.0.0.2, a TCP check every 5 s), direct = the same socket; ratio = haproxy/direct; connect: median of %d each, "
            "the order alternating between repeats; seq: %d run(s), 1 GiB each (the libnbd loop: client-bound)"
            % (work.scratch_where, work.scratch_fs, ver.get("haproxy", "haproxy"), st.runs, st.seq_runs),
        ]
    if g:
        lines += [
            "golden: base = %s raw ext4 image, %.0f MiB of data in %d extents (random files, mkfs.ext4 -d), "
            "content sha256 %s; overlay path: tmpdir in %s (%s)%s"
            % (size_str(g.size), g.data / MiB, g.extents, g.sha256[:16], work.scratch_where,
               g.tmpdir_fs, "; clone path: tmpdir and a copy of the base on %s" % g.clone_fs if g.clone_fs else ""),
            "golden servers, all on 127.0.0.1: tmpdisk --base IMAGE under systemd-socket-activate --accept (a process "
            "per client); qemu-nbd --snapshot -f raw, socket-activated Accept=no (it takes a listening socket), a fresh "
            "instance per client; nbd-server with copyonwrite = true, its own listener and a child per client, "
            "diffs (and qemu-nbd's snapshots) in the overlay path's tmpdir",
            "golden: ratio = tmpdisk / the faster peer (per repeat); connect: median of %d; seq: %d run(s), "
            "each a fresh client reading the whole %s disk, then writing 1 GiB; fio %gs per job on the whole disk; "
            "disk: median of %d fresh clients" % (st.runs, st.seq_runs, size_str(g.size), st.fio_runtime,
                                                  st.golden_disk_runs),
        ]
    if markdown:
        return "\n".join("_%s_  " % l if i == 0 else l + "  " for i, l in enumerate(lines))
    return "\n".join(lines)


def ceilings_text(calib, summary):
    """One line per transport: the null plugin's median over all repeats, and
    what it is as a ratio to nbdkit tmpdisk's own median in the same rows."""
    parts = []
    for tr in ("tcp", "unix"):
        samples = [c[tr] for c in calib if c.get(tr)]
        if not samples:
            continue
        ws = [x for c in samples for x in c["write_samples"]]
        w, r = median(ws), median([x for c in samples for x in c["read_samples"]])
        n = {s["id"]: s.get("nbdkit") for s in summary}.get(tr + ".seq_write")
        rel = " = %.2f× nbdkit tmpdisk's" % (w / n) if n else ""
        parts.append("%s (%d runs) write %.0f MB/s%s (read %.0f MB/s, no bound)" % (tr, len(ws), w, rel, r))
    if not parts:
        return "ceiling: every run failed (see the log above)" if any(calib) else ""
    return ("ceiling: the same seq loop against nbdkit's null plugin, which stores nothing (median): %s"
            % "; ".join(parts))


def footer(summary, calib, elapsed, load_end, interrupted, markdown, base_check=None):
    """The line under the table: time, load, targets missed, rows without a
    result, the ceiling, whether the golden base is unchanged, and whether
    the run was cut short."""
    tail = "elapsed %.0f s; load %.2f %.2f %.2f at end" % (elapsed, *load_end)
    missed = [s["label"] for s in summary if s["met"] and not s["met"].startswith("yes")]
    unknown = [s["label"] for s in summary
               if not s["met"] and not (s["info"] and s.get(s.get("pair", ("tmpdisk",))[0]) is not None)]
    tail += "; targets missed: %s" % (", ".join(missed) if missed else "none")
    if unknown:
        tail += "; no result: %s" % ", ".join(unknown)
    ceiling = ceilings_text(calib, summary)
    if ceiling:
        tail += "; " + ceiling
    if base_check:
        ok = all(v == "unchanged" for v in base_check.values())
        tail += "; golden base %s after the run (content hash: %s)" % (
            "unchanged" if ok else "CHANGED", ", ".join("%s %s" % kv for kv in base_check.items()))
    if interrupted:
        tail += "; INTERRUPTED: partial results"
    return tail + ("  " if markdown else "")


def json_document(cfg, date, mach, ver, runs, elapsed, interrupted, calib, summary, base_check=None):
    """Everything: the settings, every sample per server and per repeat,
    the ceilings, the golden base and the summary."""
    st, work = cfg.settings, cfg.work
    doc = {"date": date, "machine": mach, "versions": ver, "quick": st.quick,
           "repeat": len(runs), "elapsed_s": elapsed, "interrupted": interrupted,
           "settings": {"tmpdisk": work.tmpdisk_source, "tmpdisk_built": work.tmpdisk_built,
                        "runs": st.runs, "clients": st.clients, "fio_runtime": st.fio_runtime,
                        "seq_runs": st.seq_runs, "big_size": st.big_size,
                        "scratch": work.scratch_where},
           "seq_ceiling_nbdkit_null": calib, "summary": summary,
           "runs": [{rid: {srv: {"value": v, "details": d} for srv, (v, d) in per.items()}
                     for rid, per in run.items()} for run in runs]}
    if cfg.golden:
        doc["golden"] = dict(dataclasses.asdict(cfg.golden), base_check=base_check)
    return doc
