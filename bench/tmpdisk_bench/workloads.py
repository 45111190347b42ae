"""The measurements: each workload runs on one started server and returns
{row id: (value, details)} for the rows it measures; the ceiling of the
seq rows, the same loop against nbdkit's null plugin; the golden-image
workloads (a whole-base read and a 1 GiB write, real disk per fresh client);
and the named row's connects to one export of a server with an exports file."""

import ctypes
import json
import os
import random
import subprocess
import threading
import time

import nbd

from .common import GiB, KiB, MiB, BenchError, log, median
from .golden import data_extents
from .nbdclient import aio_run, connect, connect_many, disconnect, wait_command
from .procs import comm, images, tree_pss


def settle(settings):
    """Bounded wait for the page cache's Dirty+Writeback to drain, so that a
    latency figure does not include writeback left by an earlier workload."""
    t0 = time.monotonic()
    # kick writeback now rather than waiting for dirty_expire (30 s): sync(2)
    # in a thread so that a slow disk cannot hang us past the bound
    threading.Thread(target=os.sync, daemon=True).start()
    while True:
        dirty = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(("Dirty:", "Writeback:")):
                    dirty += int(line.split()[1]) * 1024
        waited = time.monotonic() - t0
        if dirty <= settings.settle_mib * MiB:
            return waited
        if waited > settings.settle_timeout:
            log("settle: Dirty+Writeback still %d MiB after %.0f s; going on" % (dirty // MiB, waited))
            return waited
        time.sleep(0.1)


def w_connect(srv, cfg, rid, idle=False, uri=None):
    """idle: before each connect, also wait until the last client's server
    processes are gone (the golden rows: qemu-nbd starts its next instance
    only then).  uri: another export of the server than srv.uri's (the
    named row)."""
    settle(cfg.settings)
    samples, errors = [], []
    for _ in range(cfg.settings.runs):
        if idle:
            srv.wait_idle()
        try:
            h, dt = connect(uri or srv.uri, 30)
            samples.append(dt * 1000)
            disconnect(h)
            del h
        except BenchError as e:
            errors.append(str(e))
        time.sleep(0.05)  # the same pause for both: the last client's server side winds down
    if not samples:
        raise BenchError("no connection succeeded: %s" % errors[:1])
    return {rid: (median(samples), {"samples_ms": samples, "errors": errors})}


def w_named_connect(srv, cfg, rid, export, shape):
    """Connect-to-ready of one export of the named row's server, as the
    connect rows measure it, after a warm-up connect of its own (each
    configuration of the connect rows gets one: the first mkfs of a shape
    is not what is compared).  The warm-up also checks that the client got
    shape (size, type), by its size and the server's `client served` line:
    a chosen name the server shaped otherwise compares nothing."""
    uri = "%s/%s" % (srv.uri, export)
    h, _ = connect(uri, 30)
    try:
        size = h.get_size()
    finally:
        disconnect(h)
        del h
    fstype = srv.served(export).get("fs_type")
    if (size, fstype) != shape:
        raise BenchError("export %s: got a %d-byte %s disk, not %d-byte %s" % ((export, size, fstype) + shape))
    return w_connect(srv, cfg, rid, uri=uri)


def w_seq(srv, cfg, tr, uri=None):
    """uri: another way to the same server than srv.uri (the balancer rows)."""
    rs, depth, npat = 256 * KiB, 16, 17
    pats = [os.urandom(rs) for _ in range(npat)]
    wr, rd, bad, notes = [], [], 0, []
    for _ in range(cfg.settings.seq_runs):
        h, _ = connect(uri or srv.uri, 30)
        try:
            size = h.get_size()
            total = min(GiB, size - size % rs)
            nblk = total // rs
            verify = set(random.sample(range(0, total, rs), min(64, nblk)) + [0, total - rs])
            dl = time.monotonic() + cfg.settings.io_timeout
            dt, _ = aio_run(h, total, rs, depth, True, pats, dl, set())
            wr.append(total / dt / 1e6)
            dl = time.monotonic() + cfg.settings.io_timeout
            dt, badblk = aio_run(h, total, rs, depth, False, pats, dl, verify)
            rd.append(total / dt / 1e6)
            bad += len(badblk)
            notes.append("verified %d blocks, %d bad" % (len(verify), len(badblk)))
        finally:
            disconnect(h)
            del h
    det = {"runs": len(wr), "verify": "ok" if bad == 0 else "FAIL (%d bad blocks)" % bad, "notes": notes}
    return {tr + ".seq_write": (median(wr), dict(det, samples=wr)),
            tr + ".seq_read": (median(rd), dict(det, samples=rd, failed=bad > 0))}


def w_empty(srv, cfg, tr, want):
    out = {}
    if tr + ".empty_data" in want:
        h, _ = connect(srv.uri, 60, meta=True)
        try:
            size = h.get_size()
            if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
                out[tr + ".empty_data"] = (100.0, {"note": "no base:allocation: every byte is data to a client"})
            else:
                data = pos = 0
                t0 = time.monotonic()
                while pos < size:
                    if time.monotonic() - t0 > cfg.settings.io_timeout:
                        raise BenchError("block status walk not done in %d s" % cfg.settings.io_timeout)
                    got = []

                    def cb(ctx, off, entries, err):
                        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                            got.extend(entries)
                        return 0
                    c = h.aio_block_status(min(size - pos, 1 << 30), pos, cb)
                    wait_command(h, c, t0 + cfg.settings.io_timeout, "block status")
                    if not got:
                        raise BenchError("empty block status reply at %d" % pos)
                    for i in range(0, len(got), 2):
                        ln = min(got[i], size - pos)
                        if not got[i + 1] & nbd.STATE_HOLE:
                            data += ln
                        pos += ln
                        if pos >= size:
                            break
                out[tr + ".empty_data"] = (100.0 * data / size, {"data_bytes": data, "size": size,
                                                                 "walk_s": time.monotonic() - t0})
        finally:
            disconnect(h)
            del h
    if tr + ".empty_read" in want:
        samples = []
        t_start = time.monotonic()
        for _ in range(cfg.settings.empty_runs):
            t0 = time.perf_counter()
            try:
                r = subprocess.run([cfg.tools.nbdcopy, "-C", "1", srv.uri, "null:"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, timeout=cfg.settings.empty_timeout)
            except subprocess.TimeoutExpired:
                raise BenchError("nbdcopy still running after %d s" % cfg.settings.empty_timeout)
            dt = time.perf_counter() - t0
            if r.returncode != 0:
                raise BenchError("nbdcopy failed: %s" % r.stderr.decode(errors="replace").strip()[:300])
            samples.append(dt)
            if time.monotonic() - t_start + dt > cfg.settings.empty_budget:
                break
        out[tr + ".empty_read"] = (median(samples), {"samples_s": samples,
                                                     "GB_per_s": srv.size / median(samples) / 1e9})
    return out


def w_fio(srv, cfg, tr, want):
    out = {}
    for rw in ("randread", "randwrite"):
        for qd in (1, 16):
            rid = "%s.%s_qd%d" % (tr, rw, qd)
            if rid not in want:
                continue
            args = ["--rw=" + rw, "--bs=4k", "--iodepth=%d" % qd, "--numjobs=1", "--size=%d" % srv.size,
                    "--runtime=%g" % cfg.settings.fio_runtime, "--time_based", "--norandommap",
                    "--randrepeat=0"]
            try:
                job = run_fio(cfg, srv.uri, args, cfg.settings.fio_runtime + 60)
            except BenchError as e:
                out[rid] = (None, {"error": str(e)})
                continue
            d = job["read" if rw == "randread" else "write"]
            lat = d.get("clat_ns", {})
            out[rid] = (d["iops"], {"clat_mean_us": lat.get("mean", 0) / 1000,
                                    "clat_p99_us": lat.get("percentile", {}).get("99.000000", 0) / 1000,
                                    "runtime_s": cfg.settings.fio_runtime})
    return out


# the C-client seq jobs: fio's nbd engine, 256 KiB requests, 16 in flight, 1 GiB
FIO_SEQ = ["--bs=256k", "--iodepth=16", "--numjobs=1", "--size=1g"]
# the same requests over a 256 MiB region, for 5 s: written 50-80 times at the
# 2.7-4.1 GB/s measured (bench/README.md)
FIO_SEQ_OVERWRITE = ["--bs=256k", "--iodepth=16", "--numjobs=1", "--size=256m", "--rw=write",
                     "--time_based", "--runtime=5"]


def run_fio(cfg, uri, args, timeout=None):
    """One fio job (fio's nbd engine on uri, with args) within timeout
    seconds (default: the settings' io_timeout): its JSON job record."""
    timeout = timeout or cfg.settings.io_timeout
    jf = os.path.join(cfg.work.workdir, "fio.json")
    if os.path.exists(jf):
        os.unlink(jf)
    cmd = ([cfg.tools.fio, "--name=bench", "--ioengine=nbd", "--uri=" + uri] + args
           + ["--output-format=json", "--output=" + jf])
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError("fio %s did not finish in %d s" % (" ".join(args), timeout))
    try:
        with open(jf) as f:
            job = json.load(f)["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError("fio: %s %s" % (e, r.stderr.decode(errors="replace")[:300]))
    if r.returncode != 0 or job.get("error"):
        raise BenchError("fio exit %d: %s" % (r.returncode, r.stderr.decode(errors="replace")[:300]))
    return job


def nbdcopy_source(cfg):
    """A 1 GiB file of random bytes in the work dir, made once per run."""
    path = os.path.join(cfg.work.workdir, "nbdcopy-source")
    if not os.path.exists(path) or os.path.getsize(path) != GiB:
        with open(path + ".new", "wb") as f:
            for _ in range(GiB // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
        os.rename(path + ".new", path)
    return path


def w_cseq(srv, cfg, tr, want):
    """The C-client seq rows on one server (each job a fresh connection, so
    a fresh disk): fio write, fio write then verify read-back on the same
    connection, nbdcopy of a 1 GiB file in; or, on a FILLED disk, fio
    read.  nbdkit null (the ceiling) cannot verify: no verify there."""
    out = {}
    if want & {tr + ".fio_write", tr + ".fio_write_ceiling"}:
        settle(cfg.settings)
        w = run_fio(cfg, srv.uri, FIO_SEQ + ["--rw=write"])["write"]
        out[tr + ".fio_write"] = (w["bw_bytes"] / 1e6, {"runtime_ms": w["runtime"]})
    if want & {tr + ".fio_overwrite", tr + ".fio_overwrite_ceiling"}:
        # a fresh connection (a fresh disk): 256 MiB written, then written
        # again and again; only the first pass takes fresh pages
        settle(cfg.settings)
        w = run_fio(cfg, srv.uri, FIO_SEQ_OVERWRITE)["write"]
        out[tr + ".fio_overwrite"] = (w["bw_bytes"] / 1e6, {"runtime_ms": w["runtime"], "io_MiB": w["io_bytes"] / MiB})
    if tr + ".fio_verify" in want and srv.name != "null":
        settle(cfg.settings)
        job = run_fio(cfg, srv.uri, FIO_SEQ + ["--rw=write", "--do_verify=1", "--verify=crc32c", "--verify_state_save=0",
                                                "--verify_fatal=1"])
        out[tr + ".fio_verify"] = (job["read"]["bw_bytes"] / 1e6,
                                   {"write_MBps": job["write"]["bw_bytes"] / 1e6, "verify": "ok"})
    if tr + ".nbdcopy_in" in want:
        src = nbdcopy_source(cfg)
        settle(cfg.settings)
        t0 = time.monotonic()
        r = subprocess.run([cfg.tools.nbdcopy, src, srv.uri], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=cfg.settings.io_timeout)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            raise BenchError("nbdcopy exit %d: %s" % (r.returncode, r.stderr.decode(errors="replace")[:300]))
        out[tr + ".nbdcopy_in"] = (GiB / dt / 1e6, {"seconds": dt})
    if want & {tr + ".fio_read", tr + ".fio_read_ceiling"}:
        settle(cfg.settings)
        rd = run_fio(cfg, srv.uri, FIO_SEQ + ["--rw=read"])["read"]
        out[tr + ".fio_read"] = (rd["bw_bytes"] / 1e6, {"runtime_ms": rd["runtime"]})
    return out


def calibrate(cfg, servers, transport):
    """The ceiling for the seq write rows on one transport: the same aio loop
    against nbdkit's null plugin (no storage, no mkfs; reads are memset
    zeroes), started the way nbdkit tmpdisk is, seq_runs times.  For
    writes it is the client, the transport and a server that receives and
    discards: no server that stores the data can be expected to go faster,
    so it bounds the write ratio any server can show against nbdkit tmpdisk
    here.  Its reads are only a reference (a zero-copy server beats memset)."""
    io_timeout = cfg.settings.io_timeout
    try:
        with servers.start(cfg, "null", transport, GiB, "") as srv:
            rs = 256 * KiB
            pats = [os.urandom(rs) for _ in range(17)]
            w, r = [], []
            for _ in range(cfg.settings.seq_runs):
                h, _ = connect(srv.uri, 30)
                try:
                    w.append(GiB / aio_run(h, GiB, rs, 16, True, pats, time.monotonic() + io_timeout, set())[0] / 1e6)
                    r.append(GiB / aio_run(h, GiB, rs, 16, False, pats, time.monotonic() + io_timeout, set())[0] / 1e6)
                finally:
                    disconnect(h)
            return {"write_MBps": median(w), "read_MBps": median(r), "write_samples": w, "read_samples": r}
    except (BenchError, nbd.Error, OSError) as e:
        log("ceiling (%s) failed: %s" % (transport, e))
        return None


def wait_quiet(srv, timeout=10.0):
    """Wait until no mkfs (or shell) runs in the server's tree any more."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(comm(p).startswith(("mkfs", "mke2fs", "sh")) for p in srv.pids()):
            return
        time.sleep(0.05)


def w_clients(srv, cfg, want):
    """memory and real disk per client, and N clients connecting at once."""
    out = {}
    settle(cfg.settings)
    wait_quiet(srv)
    time.sleep(0.2)
    pss0, n0 = tree_pss(srv.proc.pid)
    hs, per, wall, errors = connect_many(srv.uri, cfg.settings.clients, cfg.settings.clients_timeout)
    try:
        if len(hs) < cfg.settings.clients:
            raise BenchError("%d of %d clients ready; %s" % (len(hs), cfg.settings.clients, errors[:2]))
        out["tcp.ready_all"] = (wall, {"per_client_median_ms": median(per) * 1000,
                                       "per_client_max_ms": max(per) * 1000})
        wait_quiet(srv)
        time.sleep(0.3)
        pss1, n1 = tree_pss(srv.proc.pid)
        out["tcp.mem_per_client"] = ((pss1 - pss0) / len(hs) / MiB, {
            "idle_pss_mib": pss0 / MiB, "idle_processes": n0,
            "loaded_pss_mib": pss1 / MiB, "loaded_processes": n1, "clients": len(hs)})
        imgs = images(srv.proc.pid, srv.scratch)
        if len(imgs) != len(hs):
            log("%s: %d images for %d clients" % (srv.name, len(imgs), len(hs)))
        if imgs:
            out["tcp.disk_per_client"] = (sum(imgs.values()) / len(imgs) / MiB, {
                "images": len(imgs), "total_mib": sum(imgs.values()) / MiB,
                "min_mib": min(imgs.values()) / MiB, "max_mib": max(imgs.values()) / MiB})
        else:
            out["tcp.disk_per_client"] = (None, {"error": "no image found in the scratch dir"})
    finally:
        disconnect(*hs)
        del hs
    end = time.monotonic() + 10
    left = None
    while time.monotonic() < end:
        left = images(srv.proc.pid, srv.scratch)
        if not left:
            break
        time.sleep(0.1)
    if left:
        log("warning: %s still holds %d images 10 s after its clients left" % (srv.name, len(left)))
        out.setdefault("tcp.disk_per_client", (None, {}))[1]["left_after_disconnect"] = len(left)
    return {k: v for k, v in out.items() if k in want}


def w_golden_seq(srv, cfg, want):
    """The golden seq rows, on seq_runs fresh clients each: read the whole
    disk (the base: holes included, as a client reading its disk end to end
    would) in 256 KiB requests, 16 in flight, checking 66 blocks (first,
    last, 64 random ones holding the base's data) against the base; then
    write 1 GiB from the start the same way, and read 66 of the written
    blocks back."""
    g, rs, depth = cfg.golden, 256 * KiB, 16
    settle(cfg.settings)
    fd = os.open(g.base, os.O_RDONLY)
    try:
        blocks = sorted({o for s, e in data_extents(fd) for o in range(s - s % rs, e, rs)})
        offs = random.sample(blocks, min(64, len(blocks))) + [0, g.size - rs]
        expect = {o: os.pread(fd, rs, o) for o in offs}
    finally:
        os.close(fd)
    pats = [os.urandom(rs) for _ in range(17)]
    rd, wr, bad_rd, bad_wr = [], [], 0, 0
    for _ in range(cfg.settings.seq_runs):
        srv.wait_idle()
        h, _ = connect(srv.uri, 30)
        try:
            size = h.get_size()
            if size != g.size:
                raise BenchError("the disk is %d bytes, the base %d" % (size, g.size))
            dt, badblk = aio_run(h, size, rs, depth, False, pats, time.monotonic() + cfg.settings.io_timeout,
                                 set(expect), expect=expect)
            rd.append(size / dt / 1e6)
            bad_rd += len(badblk)
            dt, _ = aio_run(h, GiB, rs, depth, True, pats, time.monotonic() + cfg.settings.io_timeout, set())
            wr.append(GiB / dt / 1e6)
            for off in random.sample(range(0, GiB, rs), 64) + [0, GiB - rs]:
                if h.pread(rs, off) != pats[(off // rs) % len(pats)]:
                    bad_wr += 1
        except nbd.Error as e:
            raise BenchError(str(e))
        finally:
            disconnect(h)
            del h
    out = {"golden.seq_read": (median(rd), {"samples": rd, "bytes": g.size, "failed": bad_rd > 0,
                                            "verify": "ok" if bad_rd == 0 else "FAIL (%d bad blocks)" % bad_rd}),
           "golden.seq_write": (median(wr), {"samples": wr, "bytes": GiB, "failed": bad_wr > 0,
                                             "verify": "ok" if bad_wr == 0 else "FAIL (%d bad blocks)" % bad_wr})}
    return {k: v for k, v in out.items() if k in want}


def w_golden_fio_read(srv, cfg):
    """The golden C-client read: fio reads the whole disk (the base) on a
    fresh client, 256 KiB × 16, seq_runs times (fio checks nothing; the
    libnbd row checks the base's blocks)."""
    rd = []
    for _ in range(cfg.settings.seq_runs):
        srv.wait_idle()
        settle(cfg.settings)
        job = run_fio(cfg, srv.uri, FIO_SEQ + ["--rw=read", "--size=%d" % cfg.golden.size])
        rd.append(job["read"]["bw_bytes"] / 1e6)
    return {"golden.fio_read": (median(rd), {"samples": rd, "bytes": cfg.golden.size})}


def fs_used(path):
    """Bytes in use on path's file system, after syncfs(2), once three
    readings 50 ms apart agree (xfs frees a deleted clone's blocks in the
    background), or after 5 s."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen, end = [], time.monotonic() + 5
        while True:
            libc.syncfs(fd)
            st = os.fstatvfs(fd)
            seen.append((st.f_blocks - st.f_bfree) * st.f_frsize)
            if len(seen) >= 3 and len(set(seen[-3:])) == 1 or time.monotonic() > end:
                return seen[-1]
            time.sleep(0.05)
    finally:
        os.close(fd)


def w_golden_disk(srv, cfg):
    """Real disk used by one fresh client once connected, median of
    golden_disk_runs clients one after another.  The clone path: the xfs's
    used space (statvfs, after syncfs) with the client connected minus
    without it, because st_blocks of a reflink clone counts the extents it
    shares with the base.  Every other server: st_blocks of the files it
    holds open (or left named) in its tmpdir: tmpdisk's overlay delta,
    qemu-nbd's snapshot, nbd-server's diff file."""
    statvfs = srv.name == "tmpdisk-clone"
    samples, files, blocks = [], [], []
    for _ in range(cfg.settings.golden_disk_runs):
        srv.wait_idle()
        before = fs_used(cfg.golden.clone_mount) if statvfs else 0
        h, _ = connect(srv.uri, 30)
        try:
            time.sleep(0.1)
            imgs = images(srv.proc.pid, srv.scratch)
            used = fs_used(cfg.golden.clone_mount) - before if statvfs else sum(imgs.values())
        finally:
            disconnect(h)
            del h
        if not imgs:
            raise BenchError("no per-client file of %s found in %s" % (srv.name, srv.scratch))
        samples.append(used / MiB)
        files.append(len(imgs))
        blocks.append(sum(imgs.values()) / MiB)
    det = {"samples_mib": samples, "files": files, "st_blocks_mib": blocks,
           "measure": "statvfs of the xfs (used space with the client minus without)" if statvfs
           else "st_blocks of its files in %s" % srv.scratch}
    return {"golden.disk_per_client": (median(samples), det)}
