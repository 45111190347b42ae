"""The files of one run: a work dir (server logs, Unix sockets, TLS
certificates, fio output, and a pinned copy of the tmpdisk binary) and a
fresh scratch dir where both servers put their images (a dedicated tmpfs
with --tmpfs); made on entry, removed on every way out."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .common import BenchError, uninterrupted
from .config import Tls, Workspace
from .machine import fs_of


@contextlib.contextmanager
def workspace(tmpdisk, stale, scratch, tmpfs, openssl, keep_logs):
    """Yields the config.Workspace.  tmpdisk: the binary to measure (stale:
    older than src/); scratch: the parent of the scratch dir; openssl: to
    make certificates for the TLS rows, None without them; keep_logs: leave
    the work dir for the user."""
    workdir = tempfile.mkdtemp(prefix="tmpdisk-bench.", dir="/tmp")
    scratch_dir = None
    mounted = False
    try:
        # pin the build: a cargo build during the run must not change what later rows measure
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(tmpdisk)))
        pinned = os.path.join(workdir, "tmpdisk")
        shutil.copy2(tmpdisk, pinned)
        scratch_where = os.path.realpath(scratch)
        scratch_dir = tempfile.mkdtemp(prefix="tmpdisk-bench.", dir=scratch_where)
        if tmpfs:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpdisk-bench", scratch_dir],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                sys.exit("bench/run: --tmpfs: mount failed: %s" % r.stderr.strip())
            mounted = True
            scratch_where = "a dedicated tmpfs"
        yield Workspace(workdir=workdir, scratch=scratch_dir, scratch_where=scratch_where,
                        scratch_fs=fs_of(scratch_dir), tmpdisk=pinned, tmpdisk_source=tmpdisk,
                        tmpdisk_built=built, stale=stale,
                        tls=make_certificates(openssl, workdir) if openssl else None)
    finally:
        with uninterrupted():
            if mounted:
                subprocess.run(["umount", scratch_dir], timeout=60)
            if scratch_dir:
                shutil.rmtree(scratch_dir, ignore_errors=True)
            if not keep_logs:
                shutil.rmtree(workdir, ignore_errors=True)


def make_certificates(openssl, workdir):
    """A CA and a server certificate for localhost, in the layout both
    servers read (ca-cert.pem, server-cert.pem, server-key.pem); the client
    directory holds the CA alone."""
    d = os.path.join(workdir, "pki")
    tls = Tls(server=os.path.join(d, "server"), client=os.path.join(d, "client"))
    for x in (tls.server, tls.client):
        os.makedirs(x)

    def run(*args):
        r = subprocess.run([openssl] + list(args), cwd=d, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise BenchError("openssl %s: %s" % (args[0], r.stderr.strip()))
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca-key.pem",
        "-out", "ca-cert.pem", "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server/server-key.pem", "-out", "server.csr",
        "-subj", "/CN=localhost")
    run("x509", "-req", "-days", "2", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server/server-cert.pem", "-extfile", "server.ext")
    for x in (tls.server, tls.client):
        shutil.copy(os.path.join(d, "ca-cert.pem"), x)
    return tls
