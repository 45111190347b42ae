"""The NBD client side, in-process with libnbd: connecting (one client, or
many at once), disconnecting, and the sequential aio loop of the seq rows
and the ceiling.  Every wait is bounded."""

import select
import time

import nbd

from .common import SIGNALLED, BenchError


def connect(uri, timeout, meta=False):
    """libnbd connect in-process until the handshake is done, bounded.
    Returns (handle, seconds)."""
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # nbds:// URIs name the CA's directory
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    t0 = time.perf_counter()
    end = t0 + timeout
    try:
        h.aio_connect_uri(uri)
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise BenchError("connection died during the handshake")
            left = end - time.perf_counter()
            if left <= 0:
                raise BenchError("handshake not done after %.0f s" % timeout)
            h.poll(max(1, int(min(left, 1.0) * 1000)))
    except nbd.Error as e:
        raise BenchError(str(e))
    return h, time.perf_counter() - t0


def disconnect(*handles, timeout=10.0):
    """NBD_CMD_DISC on every handle, then wait (bounded) until they are closed;
    dropping the handle afterwards closes the socket whatever happened."""
    open_ = []
    for h in handles:
        try:
            if h.aio_is_ready() and h.aio_in_flight() == 0:
                h.aio_disconnect(0)
                open_.append(h)
        except nbd.Error:
            pass
    end = time.monotonic() + timeout
    for h in open_:
        try:
            while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < end:
                h.poll(100)
        except nbd.Error:
            pass


def wait_command(h, cookie, deadline, what):
    """Poll until an aio command completes; raise if it fails or the deadline passes."""
    try:
        while not h.aio_command_completed(cookie):
            if time.monotonic() > deadline:
                raise BenchError("%s: no reply before the deadline" % what)
            h.poll(1000)
    except nbd.Error as e:
        raise BenchError("%s: %s" % (what, e))


def connect_many(uri, n, timeout):
    """n clients connect at once (all started before any completes); returns
    (handles, per-client seconds, wall seconds until all ready, errors)."""
    hs = [nbd.NBD() for _ in range(n)]
    ready = [None] * n
    errors = []
    t0 = time.perf_counter()
    pending = set(range(n))
    for i, h in enumerate(hs):
        try:
            h.aio_connect_uri(uri)
        except nbd.Error as e:
            errors.append(str(e))
            pending.discard(i)
    end = t0 + timeout
    while pending:
        left = end - time.perf_counter()
        if left <= 0:
            errors.append("%d clients not ready after %.0f s" % (len(pending), timeout))
            break
        p = select.poll()
        byfd = {}
        for i in list(pending):
            h = hs[i]
            if h.aio_is_ready():
                ready[i] = time.perf_counter() - t0
                pending.discard(i)
                continue
            if h.aio_is_dead() or h.aio_is_closed():
                errors.append("client %d: connection died" % i)
                pending.discard(i)
                continue
            d = h.aio_get_direction()
            ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                 (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            fd = h.aio_get_fd()
            byfd[fd] = i
            p.register(fd, ev or select.POLLIN)
        if not pending:
            break
        for fd, ev in p.poll(max(1, int(min(left, 1.0) * 1000))):
            i = byfd[fd]
            h = hs[i]
            try:
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                elif ev & select.POLLOUT:
                    h.aio_notify_write()
            except nbd.Error as e:
                errors.append("client %d: %s" % (i, e))
                pending.discard(i)
            if h.aio_is_ready() and ready[i] is None:
                ready[i] = time.perf_counter() - t0
                pending.discard(i)
    wall = max([r for r in ready if r is not None], default=None)
    ok = [h for h, r in zip(hs, ready) if r is not None]
    return ok, [r for r in ready if r is not None], wall, errors


def aio_run(h, total, rs, depth, write, pats, deadline, verify, expect=None):
    """Sequential aio over [0, total) in rs-byte requests, depth in flight.
    Writes pats[(off // rs) % len(pats)]; reads check the blocks in verify
    against the same pattern, or against expect[off] when expect (a dict
    of offset -> bytes) is given.  Returns (seconds, bad blocks)."""
    errs, bad = [], []
    off = 0
    if write:
        wbufs = [nbd.Buffer.from_bytearray(bytearray(p)) for p in pats]
    else:
        pool = [nbd.Buffer(rs) for _ in range(depth)]
        free = list(range(depth))
    t0 = time.perf_counter()
    while off < total or h.aio_in_flight() > 0:
        while off < total and h.aio_in_flight() < depth:
            if write:
                def wcb(err):
                    if err.value:
                        errs.append(err.value)
                    return 1
                h.aio_pwrite(wbufs[(off // rs) % len(pats)], off, completion=wcb)
            else:
                i = free.pop()

                def rcb(err, i=i, off=off):
                    if err.value:
                        errs.append(err.value)
                    elif off in verify and bytes(pool[i].to_bytearray()) != (
                            pats[(off // rs) % len(pats)] if expect is None else expect[off]):
                        bad.append(off)
                    free.append(i)
                    return 1
                h.aio_pread(pool[i], off, completion=rcb)
            off += rs
        if time.monotonic() > deadline:
            raise BenchError("sequential %s not done before its deadline" % ("write" if write else "read"))
        h.poll(1000)
        if SIGNALLED:  # raised in a completion callback, and dropped there by libnbd
            raise KeyboardInterrupt("signal %d" % SIGNALLED[-1])
    dt = time.perf_counter() - t0
    if errs:
        raise BenchError("%d I/O errors (first errno %d)" % (len(errs), errs[0]))
    return dt, bad
