"""The table's rows: their ids, labels, units, better direction and
targets (issue 4; the golden rows: issue 11; the named row: named
exports), the groups --only accepts, and choosing rows."""

import fnmatch
import sys

from .common import MiB, size_str

# the golden rows' peers, each measured once per repeat and shown in the rows of both tmpdisk paths
GOLDEN_PEERS = ("qemu-nbd", "nbd-server")
GOLDEN_PATHS = ("clone", "overlay")
# the named row's two columns: the export a client shapes by name, and the fixed one of the same shape
NAMED_PAIR = ("chosen", "fixed")
# the balancer rows' two columns: one tmpdisk reached through HAProxy, and the same one directly
BALANCER_PAIR = ("haproxy", "direct")


class Row:
    """One figure of the table.  better: 'lower' or 'higher'.  target: the
    bound the ratio tmpdisk/nbdkit must meet, or with absolute=True the bound
    tmpdisk's own value must meet (in the row's unit).  A golden row has
    peers instead of nbdkit: its ratio is tmpdisk / the faster (better)
    peer.  pair: the two columns of the ratio (value / reference).  optin:
    the group of an opt-in row ("golden", "named"), which only a pattern
    naming that group selects (select_rows)."""

    def __init__(self, rid, label, unit, better, target, absolute=False, target_text=None, info=False,
                 peers=None, pair=("tmpdisk", "nbdkit"), optin=None, added=False):
        self.id, self.label, self.unit, self.better = rid, label, unit, better
        self.target, self.absolute, self.info = target, absolute, info
        # added: the target bounds the difference of the pair's medians per
        # repeat (value - reference, in the row's unit), not their ratio
        self.added = added
        self.peers, self.pair = peers, pair
        self.optin = optin or ("golden" if peers else None)
        if info:
            target_text = "(for comparison)"
        op = "≤" if better == "lower" else "≥"
        self.target_text = target_text or (
            "%s %s %s" % (op, tnum(target), unit) if absolute
            else "%s +%s %s" % (op, tnum(target), unit) if added else "%s %s×" % (op, tnum(target)))

    def met(self, tval, ratio):
        if self.info:
            return None
        v = tval if self.absolute else ratio
        if v is None:
            return None
        return v <= self.target if self.better == "lower" else v >= self.target


def tnum(t):
    return "%.1f" % t if abs(t * 10 - round(t * 10)) < 1e-9 else "%g" % t


def build_rows(settings):
    """All rows, in table order, for these settings."""
    big, n = size_str(settings.big_size), settings.clients
    rows = []
    for t in ("ext4", "xfs", "vfat"):
        rows.append(Row("tcp.connect_1G_%s" % t, "connect-to-ready 1G %s" % t, "ms", "lower", 1.0))
    rows.append(Row("tcp.connect_16G_ext4", "connect-to-ready 16G ext4", "ms", "lower", 0.5))
    mem_rows = [
        Row("tcp.mem_per_client", "memory per client (PSS, %d clients)" % n, "MiB", "lower", 0.5, absolute=True),
        Row("tcp.disk_per_client", "real disk per fresh 1G ext4 client", "MiB", "lower", 0.125,
            target_text="≤ 0.125× (1/8)"),
        Row("tcp.ready_all", "%d clients at once, all ready" % n, "s", "lower", 1.0),
    ]
    for tr in ("tcp", "unix"):
        p = "" if tr == "tcp" else "unix: "
        rows += [
            Row(tr + ".seq_write", p + "seq write 1G (libnbd loop, 256K ×16)", "MB/s", "higher", 1.2),
            Row(tr + ".seq_read", p + "seq read-back 1G (libnbd loop)", "MB/s", "higher", 1.5),
            # issue 14: what a C client sees (fio's nbd engine, nbdcopy),
            # and the same fio jobs against nbdkit null as the ceiling
            Row(tr + ".fio_write", p + "seq write 1G (fio 256K ×16)", "MB/s", "higher", 1.2),
            Row(tr + ".fio_write_ceiling", p + "seq write (fio): share of the ceiling", "%", "higher", 70,
                absolute=True, target_text="≥ 70 % of nbdkit null"),
            # the write rows above into blocks already written: what the
            # server's path costs without the fresh page cache pages of a
            # first write (their cost moves with this VM's phases); no target
            Row(tr + ".fio_overwrite", p + "seq overwrite, 256M written again for 5 s (fio 256K ×16)", "MB/s",
                "higher", 1.0, info=True),
            Row(tr + ".fio_overwrite_ceiling", p + "seq overwrite (fio): share of the ceiling", "%", "higher", 0,
                absolute=True, info=True),
            Row(tr + ".fio_verify", p + "read-back 1G, fio verify pass (crc32c)", "MB/s", "higher", 1.2),
            Row(tr + ".fio_read", p + "seq read of a filled 1G (fio 256K ×16)", "MB/s", "higher", 1.0),
            Row(tr + ".fio_read_ceiling", p + "seq read (fio): share of the ceiling", "%", "higher", 85,
                absolute=True, target_text="≥ 85 % of nbdkit null"),
            Row(tr + ".nbdcopy_in", p + "nbdcopy a 1G file into a fresh disk", "MB/s", "higher", 1.0),
            Row(tr + ".empty_read", p + "read never-written %s disk" % big, "s", "lower", 0.01,
                target_text="≤ 0.01× (100× faster)"),
            Row(tr + ".empty_data", p + "%s fresh disk called data" % big, "%", "lower", 1.0, absolute=True),
            Row(tr + ".randread_qd1", p + "randread 4k QD1 (fio)", "IOPS", "higher", 1.2),
            Row(tr + ".randread_qd16", p + "randread 4k QD16 (fio)", "IOPS", "higher", 1.0),
            Row(tr + ".randwrite_qd1", p + "randwrite 4k QD1 (fio)", "IOPS", "higher", 1.2),
            Row(tr + ".randwrite_qd16", p + "randwrite 4k QD16 (fio)", "IOPS", "higher", 1.0),
        ]
        if tr == "tcp":
            rows += mem_rows
    # TLS throughput next to plaintext (same socket activation as tcp, TLS
    # required, no client certificate); no target, for comparison.
    rows += [
        Row("tls.seq_write", "TLS: seq write 1G (256K ×16)", "MB/s", "higher", 1.0, info=True),
        Row("tls.seq_read", "TLS: seq read-back 1G (256K ×16)", "MB/s", "higher", 1.0, info=True),
    ]
    return rows + golden_rows(settings) + named_rows() + balancer_rows()


def golden_rows(settings):
    """Issue 11: tmpdisk --base on each path against the faster of
    qemu-nbd --snapshot and nbd-server copyonwrite, same base.  Opt-in
    (--only golden, or --golden): they need root and take a few minutes."""
    base = size_str(settings.golden_size)
    per_path = [
        ("connect", "connect-to-ready %s base" % base, "ms", "lower", 0.2),
        ("seq_read", "seq read whole %s base (libnbd loop)" % base, "MB/s", "higher", 1.5),
        ("fio_read", "seq read whole %s base (fio 256K ×16)" % base, "MB/s", "higher", 1.5),
        ("seq_write", "seq write 1G (256K ×16)", "MB/s", "higher", 1.2),
        ("randread_qd1", "randread 4k QD1 (fio)", "IOPS", "higher", 1.2),
        ("randread_qd16", "randread 4k QD16 (fio)", "IOPS", "higher", 1.2),
        ("randwrite_qd1", "randwrite 4k QD1 (fio)", "IOPS", "higher", 1.2),
        ("randwrite_qd16", "randwrite 4k QD16 (fio)", "IOPS", "higher", 1.2),
    ]
    rows = []
    for mid, label, unit, better, target in per_path:
        for path in GOLDEN_PATHS:
            rows.append(Row("golden.%s.%s" % (path, mid), "golden %s: %s" % (path, label), unit, better,
                            target, peers=GOLDEN_PEERS))
    # real disk per fresh client: tmpdisk's own value; 1 MiB (clone), 0.1 % of the base (overlay)
    tenth = settings.golden_size * 0.001 / MiB
    rows.append(Row("golden.clone.disk_per_client", "golden clone: real disk per fresh client", "MiB",
                    "lower", 1.0, absolute=True, peers=GOLDEN_PEERS))
    rows.append(Row("golden.overlay.disk_per_client", "golden overlay: real disk per fresh client", "MiB",
                    "lower", tenth, absolute=True, peers=GOLDEN_PEERS,
                    target_text="≤ %.1f MiB (0.1 %% of the base)" % tenth))
    return rows


def named_rows():
    """Named exports: a 16G xfs disk that the client chooses by export name
    (scratch:size=16G:type=xfs) against a fixed 16G xfs export, on the same
    server.  Choosing must cost nothing: within 10 %.  Opt-in (--only
    named): it compares tmpdisk with itself, not with nbdkit."""
    return [Row("named.connect_16G_xfs", "named: connect-to-ready xfs 16G, chosen by name vs fixed export",
                "ms", "lower", 1.1, pair=NAMED_PAIR, optin="named")]


def balancer_rows():
    """Many machines: one tmpdisk (socket-activated, --proxy-protocol) reached
    through HAProxy (TCP mode, send-proxy-v2, as the README's haproxy.cfg)
    and directly.  Connect-to-ready may cost at most 1 ms more at the median;
    sequential throughput through the balancer is reported as a ratio of
    direct.  Opt-in (--only balancer): it compares tmpdisk with itself."""
    return [Row("balancer.connect_1G_ext4", "balancer: connect-to-ready 1G ext4, through HAProxy vs direct",
                "ms", "lower", 1.0, pair=BALANCER_PAIR, optin="balancer", added=True),
            Row("balancer.seq_write", "balancer: seq write 1G (libnbd loop), through HAProxy vs direct",
                "MB/s", "higher", None, info=True, pair=BALANCER_PAIR, optin="balancer"),
            Row("balancer.seq_read", "balancer: seq read 1G (libnbd loop), through HAProxy vs direct",
                "MB/s", "higher", None, info=True, pair=BALANCER_PAIR, optin="balancer")]


GROUPS = {
    "latency": ["*.connect_*"],
    "connect": ["*.connect_*"],
    "seq": ["*.seq_*", "*.fio_*", "*.nbdcopy_in"],
    "cseq": ["*.fio_*", "*.nbdcopy_in"],
    "empty": ["*.empty_*"],
    "fio": ["*.rand*"],
    "rand": ["*.rand*"],
    "mem": ["*.mem_per_client", "*.disk_per_client", "*.ready_all"],
    "disk": ["*.disk_per_client"],
    "ready": ["*.ready_all"],
    "tcp": ["tcp.*"],
    "unix": ["unix.*"],
    "tls": ["tls.*"],
    "io": ["*.seq_*", "*.fio_*", "*.nbdcopy_in", "*.empty_*", "*.rand*"],
    "golden": ["golden.*"],
    "named": ["named.*"],
    "balancer": ["balancer.*"],
}


def select_rows(rows, only, golden=False):
    """The rows --only names (all without it).  The opt-in rows (golden,
    named) are picked only by a pattern that starts with their group's name
    (the group, an id, a glob), so `--only connect` stays tmpdisk against
    nbdkit; golden=True (--golden) adds all golden rows."""
    if not only:
        return [r for r in rows if not r.optin or (golden and r.optin == "golden")]
    pats = []
    for w in only.split(","):
        w = w.strip()
        if not w:
            continue
        if w in GROUPS:
            pats += GROUPS[w]
        elif "." in w:
            pats.append(w)
        else:
            pats.append("*." + w)
    picked = [r for r in rows if (golden and r.optin == "golden") or any(
        fnmatch.fnmatchcase(r.id, p) for p in pats if not r.optin or p.startswith(r.optin))]
    if not picked:
        sys.exit("bench/run: --only %r selects no row (see --list)" % only)
    return picked
