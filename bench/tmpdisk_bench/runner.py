"""One whole comparison: which server configurations (transport, size,
type) the selected rows need and which workloads run on each; every
configuration is started fresh on both servers, in alternating order.
Then the named row: one tmpdisk with an exports file, its chosen and its
fixed export in an order that alternates between repeats.  Then the
balancer rows: one tmpdisk with HAProxy in front, reached both ways in an
order that alternates between repeats.  Then the golden
rows: tmpdisk --base on each path and both peers, each started fresh, in
an order that rotates from one repeat to the next."""

import subprocess

import nbd

from .common import GiB, BenchError, log, size_str
from .report import fmt
from .rows import GOLDEN_PATHS, GOLDEN_PEERS
from .servers import NAMED_CLIENTS, NAMED_SHAPE
from .servers import FILLED
from .workloads import (settle, w_clients, w_connect, w_cseq, w_empty, w_fio, w_golden_disk,
                        w_golden_fio_read, w_golden_seq, w_named_connect, w_seq)

SERVERS = ("tmpdisk", "nbdkit")


def plan(settings, rows):
    """Server configurations (transport, size, type) and the workloads each
    runs, for the selected rows; every configuration runs on both servers,
    freshly started."""
    want = {r.id for r in rows}
    phases = {}  # (transport, size, type) -> [(job, row ids)], in insertion order

    def add(tr, size, fstype, job, ids):
        ids = set(ids) & want
        if ids:
            phases.setdefault((tr, size, fstype), []).append((job, ids))

    big = settings.big_size
    add("tcp", GiB, "ext4", "connect", ["tcp.connect_1G_ext4"])
    add("tcp", GiB, "ext4", "clients", ["tcp.mem_per_client", "tcp.disk_per_client", "tcp.ready_all"])
    add("tcp", GiB, "ext4", "seq", ["tcp.seq_write", "tcp.seq_read"])
    for tr in ("tcp", "unix"):
        add(tr, GiB, "ext4", "cseq", [tr + ".fio_write", tr + ".fio_verify", tr + ".nbdcopy_in",
                                      tr + ".fio_write_ceiling", tr + ".fio_overwrite",
                                      tr + ".fio_overwrite_ceiling"])
        add(tr, GiB, FILLED, "cread", [tr + ".fio_read", tr + ".fio_read_ceiling"])
    add("tcp", GiB, "ext4", "fio", ["tcp.randread_qd1", "tcp.randread_qd16",
                                    "tcp.randwrite_qd1", "tcp.randwrite_qd16"])
    add("tcp", GiB, "xfs", "connect", ["tcp.connect_1G_xfs"])
    add("tcp", GiB, "vfat", "connect", ["tcp.connect_1G_vfat"])
    add("tcp", 16 * GiB, "ext4", "connect", ["tcp.connect_16G_ext4"])
    add("tcp", big, "ext4", "empty", ["tcp.empty_read", "tcp.empty_data"])
    add("unix", GiB, "ext4", "seq", ["unix.seq_write", "unix.seq_read"])
    add("unix", GiB, "ext4", "fio", ["unix.randread_qd1", "unix.randread_qd16",
                                     "unix.randwrite_qd1", "unix.randwrite_qd16"])
    add("unix", big, "ext4", "empty", ["unix.empty_read", "unix.empty_data"])
    add("tls", GiB, "ext4", "seq", ["tls.seq_write", "tls.seq_read"])
    return [(tr, size, fstype, jobs) for (tr, size, fstype), jobs in phases.items()]


def run_job(srv, cfg, job, ids):
    kind = job
    if kind == "connect":
        (rid,) = ids
        return w_connect(srv, cfg, rid)
    if kind == "clients":
        return w_clients(srv, cfg, ids)
    if kind == "seq":
        return w_seq(srv, cfg, srv.transport)
    if kind == "empty":
        return w_empty(srv, cfg, srv.transport, ids)
    if kind == "fio":
        return w_fio(srv, cfg, srv.transport, ids)
    if kind in ("cseq", "cread"):
        return w_cseq(srv, cfg, srv.transport, ids)
    raise ValueError(kind)


def run_once(cfg, servers, rows, rep, res):
    """One whole comparison, into res: {row id: {server: (value, details)}}
    (filled as it goes, so an interrupted run still shows what it measured)."""
    res.update({r.id: {} for r in rows})
    for r in rows:  # a ceiling row's share is of its figure: measure that too
        if r.id.endswith("_ceiling"):
            res.setdefault(r.id[:-len("_ceiling")], {})
    for pi, (tr, size, fstype, jobs) in enumerate(plan(cfg.settings, rows)):
        # alternate which server goes first, so slow drift of the machine
        # does not always favour the same one
        order = SERVERS if (pi + rep) % 2 == 0 else SERVERS[::-1]
        if any(job in ("cseq", "cread") for job, _ in jobs):
            order = order + ("null",)  # the ceiling: the same C-client jobs against nbdkit null
        for name in order:
            log("%s: %s %s %s: %s" % (name, tr, size_str(size), fstype, ", ".join(j for j, _ in jobs)))
            try:
                with servers.start(cfg, name, tr, size, fstype) as srv:
                    for job, ids in jobs:
                        try:
                            got = run_job(srv, cfg, job, ids)
                        except (BenchError, nbd.Error, OSError, subprocess.SubprocessError) as e:
                            log("%s %s %s failed: %s" % (name, tr, job, e))
                            got = {i: (None, {"error": str(e)}) for i in ids}
                        for rid, (v, det) in got.items():
                            if rid in res:
                                res[rid][name] = (v, det)
                                log("  %-24s %-7s %s" % (rid, name, fmt(v)))
            except BenchError as e:  # it did not start
                log(str(e))
                for _job, ids in jobs:
                    for rid in ids:
                        if rid in res:
                            res[rid][name] = (None, {"error": str(e).splitlines()[0]})
    ceiling_shares(res)
    for r in rows:
        if r.optin == "named":
            run_named(cfg, servers, r, rep, res)
    balancer = [r for r in rows if r.optin == "balancer"]
    if balancer:
        run_balancer(cfg, servers, balancer, rep, res)
    if any(r.peers for r in rows):
        run_golden(cfg, servers, [r for r in rows if r.peers], rep, res)


def ceiling_shares(res):
    """The ceiling rows: each server's fio figure as a percentage of nbdkit
    null's in the same run (its `null` column, which the table does not
    show)."""
    for rid in list(res):
        if not rid.endswith("_ceiling"):
            continue
        of = res.get(rid[:-len("_ceiling")], {})
        null = of.get("null", (None,))[0]
        for name in SERVERS:
            v = of.get(name, (None,))[0]
            res[rid][name] = ((100.0 * v / null) if v is not None and null else None,
                              {"null_MBps": null, "MBps": v})


def run_named(cfg, servers, row, rep, res):
    """The named row: one tmpdisk started as for the tcp rows, with an
    exports file (servers.NAMED_EXPORTS) and the usual 1G ext4 default;
    connect-to-ready of each column's export (row.pair: chosen by name,
    fixed) on that same server, one after the other, the first alternating
    between repeats so that drift does not favour one."""
    order = row.pair if rep % 2 == 0 else row.pair[::-1]
    log("tmpdisk-named: tcp 1G ext4 --exports: connect %s" % ", ".join(
        "%s (%s)" % (col, NAMED_CLIENTS[col]) for col in order))
    try:
        with servers.start(cfg, "tmpdisk-named", "named", GiB, "ext4") as srv:
            for col in order:
                try:
                    got = w_named_connect(srv, cfg, row.id, NAMED_CLIENTS[col], NAMED_SHAPE)
                except (BenchError, nbd.Error, OSError, subprocess.SubprocessError) as e:
                    log("tmpdisk-named %s failed: %s" % (col, e))
                    got = {row.id: (None, {"error": str(e)})}
                res[row.id][col] = got[row.id]
                log("  %-24s %-7s %s" % (row.id, col, fmt(got[row.id][0])))
    except BenchError as e:  # it did not start
        log(str(e))
        for col in row.pair:
            res[row.id][col] = (None, {"error": str(e).splitlines()[0]})


def run_balancer(cfg, servers, rows, rep, res):
    """The balancer rows: one tmpdisk (as for the tcp rows, taking PROXY
    headers from HAProxy's address) and HAProxy in front of it; each row's
    workload through HAProxy and directly, on the same server, the first
    alternating between repeats."""
    pair = rows[0].pair
    order = pair if rep % 2 == 0 else pair[::-1]
    want = {r.id for r in rows}
    log("tmpdisk-balancer: tcp 1G ext4 --proxy-protocol, haproxy in front: %s" % ", ".join(sorted(want)))
    try:
        with servers.start(cfg, "tmpdisk-balancer", "balancer", GiB, "ext4") as srv, \
                servers.start(cfg, "haproxy", "balancer", GiB, "ext4",
                              backend=srv.uri[len("nbd://"):]) as hp:
            uris = {"haproxy": hp.uri, "direct": srv.uri}
            for col in order:
                got = {}
                try:
                    if "balancer.connect_1G_ext4" in want:
                        got.update(w_connect(srv, cfg, "balancer.connect_1G_ext4", uri=uris[col]))
                    if want & {"balancer.seq_write", "balancer.seq_read"}:
                        got.update(w_seq(srv, cfg, "balancer", uri=uris[col]))
                except (BenchError, nbd.Error, OSError, subprocess.SubprocessError) as e:
                    log("balancer %s failed: %s" % (col, e))
                    got.update({i: (None, {"error": str(e)}) for i in want if i not in got})
                for rid in want:
                    res[rid][col] = got.get(rid, (None, {"error": "not measured"}))
                    log("  %-24s %-7s %s" % (rid, col, fmt(res[rid][col][0])))
    except BenchError as e:  # it did not start
        log(str(e))
        for rid in want:
            for col in pair:
                res[rid].setdefault(col, (None, {"error": str(e).splitlines()[0]}))


# the golden workloads, in the order they run on each server, and the measures (row id tails) of each
GOLDEN_JOBS = (("connect", ("connect",)), ("disk", ("disk_per_client",)),
               ("seq", ("seq_read", "seq_write")), ("cread", ("fio_read",)),
               ("fio", ("randread_qd1", "randread_qd16", "randwrite_qd1", "randwrite_qd16")))


def golden_targets(name, measure, want):
    """(row id, column) pairs a golden server's value of one measure goes
    to: tmpdisk's path to its own row; a peer's to the rows of both paths."""
    if name.startswith("tmpdisk-"):
        pairs = [("golden.%s.%s" % (name.split("-", 1)[1], measure), "tmpdisk")]
    else:
        pairs = [("golden.%s.%s" % (path, measure), name) for path in GOLDEN_PATHS]
    return [(rid, col) for rid, col in pairs if rid in want]


def run_golden(cfg, servers, rows, rep, res):
    """The golden rows: each server that the selected rows need, started
    fresh, runs the selected workloads (as generic ids "golden.MEASURE"),
    whose values go to the rows of its path (tmpdisk) or of both (peers)."""
    want = {r.id for r in rows}
    names = ["tmpdisk-" + p for p in GOLDEN_PATHS if any(r.startswith("golden.%s." % p) for r in want)]
    names += list(GOLDEN_PEERS)
    names = names[rep % len(names):] + names[:rep % len(names)]  # who goes first rotates between repeats
    for name in names:
        jobs = [(job, [m for m in ms if golden_targets(name, m, want)]) for job, ms in GOLDEN_JOBS]
        jobs = [(job, ms) for job, ms in jobs if ms]
        if not jobs:
            continue
        log("%s: golden %s base: %s" % (name, size_str(cfg.golden.size), ", ".join(j for j, _ in jobs)))
        try:
            with servers.start(cfg, name, "golden", cfg.golden.size, "base") as srv:
                for job, ms in jobs:
                    ids = {"golden." + m for m in ms}
                    try:
                        if job == "connect":
                            got = w_connect(srv, cfg, "golden.connect", idle=True)
                        elif job == "disk":
                            got = w_golden_disk(srv, cfg)
                        elif job == "seq":
                            got = w_golden_seq(srv, cfg, ids)
                        elif job == "cread":
                            got = w_golden_fio_read(srv, cfg)
                        else:
                            settle(cfg.settings)  # the seq job's writes: not the fio jobs' to pay for
                            got = w_fio(srv, cfg, "golden", ids)
                    except (BenchError, nbd.Error, OSError, subprocess.SubprocessError) as e:
                        log("%s golden %s failed: %s" % (name, job, e))
                        got = {i: (None, {"error": str(e)}) for i in ids}
                    for gid, (v, det) in got.items():
                        for rid, col in golden_targets(name, gid.split(".", 1)[1], want):
                            res[rid][col] = (v, det)
                        log("  %-24s %-15s %s" % (gid, name, fmt(v)))
        except BenchError as e:  # it did not start
            log(str(e))
            for _job, ms in jobs:
                for m in ms:
                    for rid, col in golden_targets(name, m, want):
                        res[rid][col] = (None, {"error": str(e).splitlines()[0]})
