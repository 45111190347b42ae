"""One whole comparison: which server configurations (transport, size,
type) the selected rows need and which workloads run on each; every
configuration is started fresh on both servers, in alternating order."""

import subprocess

import nbd

from .common import GiB, BenchError, log, size_str
from .report import fmt
from .workloads import w_clients, w_connect, w_empty, w_fio, w_seq

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
    raise ValueError(kind)


def run_once(cfg, servers, rows, rep, res):
    """One whole comparison, into res: {row id: {server: (value, details)}}
    (filled as it goes, so an interrupted run still shows what it measured)."""
    res.update({r.id: {} for r in rows})
    for pi, (tr, size, fstype, jobs) in enumerate(plan(cfg.settings, rows)):
        # alternate which server goes first, so slow drift of the machine
        # does not always favour the same one
        order = SERVERS if (pi + rep) % 2 == 0 else SERVERS[::-1]
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
