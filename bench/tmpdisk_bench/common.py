"""Small things every module uses: units, the log, the workload error,
sizes as text, the median of what was measured, where the repository is."""

import contextlib
import os
import signal
import statistics
import sys
import time

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# bench/tmpdisk_bench/common.py -> the repository
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# signals received (cli.signals_interrupt): one that arrives while libnbd
# runs a completion callback raises KeyboardInterrupt inside the callback,
# where libnbd reports and drops it, so the aio loop looks here too
SIGNALLED = []


class BenchError(Exception):
    """A workload or a server failed; the row gets no value for that server."""


def size_str(n):
    for unit, m in (("T", 1 << 40), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= m and n % m == 0:
            return "%d%s" % (n // m, unit)
    return str(n)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


@contextlib.contextmanager
def uninterrupted():
    """SIGINT, SIGTERM and SIGHUP are ignored for the duration: a clean-up
    cut short by a second Ctrl-C would leave servers or files behind (and
    every wait in a clean-up has its own deadline)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = [signal.signal(s, signal.SIG_IGN) for s in sigs]
    try:
        yield
    finally:
        for s, handler in zip(sigs, before):
            signal.signal(s, handler)
