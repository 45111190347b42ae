"""Starting and stopping the servers: tmpdisk, nbdkit's tmpdisk plugin and
nbdkit's null plugin (the ceiling), each for one transport, size and type.
A Servers object owns every server of a run: each is stopped when its
`with` block ends, and whatever is still running when the Servers block
ends (an exception, Ctrl-C, SIGTERM, a stop cut short) is stopped then."""

import contextlib
import os
import signal
import socket
import subprocess
import time

from .common import BenchError, log, size_str, uninterrupted
from .config import SERVER_PATH
from .nbdclient import connect, disconnect
from .procs import comm, proc_state, start_time, tree


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Servers:
    """The servers of one run, stopped at the latest when its block ends."""

    def __init__(self):
        self.live = []

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        with uninterrupted():
            for s in list(self.live):
                try:
                    s.stop()
                except Exception as e:  # keep stopping the others
                    log("cleanup: %s: %s" % (s.name, e))
            self.live.clear()

    @contextlib.contextmanager
    def start(self, cfg, name, transport, size, fstype):
        """A server started now (BenchError if it does not come up), stopped
        when the `with` block ends."""
        srv = Server(cfg, name, transport, size, fstype)
        self.live.append(srv)
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()
            # only once it is stopped: a stop cut short is finished by __exit__
            self.live.remove(srv)


class Server:
    """One server (tmpdisk or nbdkit) for one transport, size and type."""

    def __init__(self, cfg, name, transport, size, fstype):
        self.cfg, self.name, self.transport = cfg, name, transport
        self.size, self.fstype = size, fstype
        self.proc = None
        self.known = {}  # pid -> start time of every process seen in our tree, for the final kill
        self.scratch = cfg.work.scratch
        self.logpath = os.path.join(cfg.work.workdir, "%s.log" % name)

    def argv(self, endpoint):
        tools, tmpdisk = self.cfg.tools, self.cfg.work.tmpdisk
        size, t = size_str(self.size), self.fstype
        env = ["-E", "TMPDIR=" + self.scratch, "-E", "PATH=" + SERVER_PATH]
        if self.transport in ("tcp", "tls"):
            tls = self.cfg.work.tls if self.transport == "tls" else None
            if self.name == "tmpdisk":
                # one process per connection: our deployment model (tmpdisk.socket, Accept=yes)
                return ([tools.socket_activate, "--accept", "-l", endpoint] + env
                        + [tmpdisk, "-t", t, size]
                        + (["--tls", "require", "--tls-certificates", tls.server] if tls else []))
            if self.name == "null":  # the ceiling, started like nbdkit tmpdisk (below)
                return [tools.socket_activate, "-l", endpoint] + env + [tools.nbdkit, "null", size]
            # nbdkit's own socket activation: one process, a thread per client
            return ([tools.socket_activate, "-l", endpoint] + env
                    + [tools.nbdkit]
                    + (["--tls=require", "--tls-certificates=" + tls.server] if tls else [])
                    + ["tmpdisk", size, "type=" + t])
        if self.name == "null":  # the ceiling: a server that stores nothing
            return [tools.nbdkit, "-f", "-U", endpoint, "null", size]
        if self.name == "tmpdisk":
            return [tmpdisk, "--unix", endpoint, "-t", t, size]
        return [tools.nbdkit, "-f", "-U", endpoint, "tmpdisk", size, "type=" + t]

    def start(self):
        last = None
        for attempt in range(3):
            if self.transport == "tcp":
                port = free_port()
                endpoint = "127.0.0.1:%d" % port
                self.uri = "nbd://127.0.0.1:%d" % port
            elif self.transport == "tls":
                port = free_port()
                endpoint = "127.0.0.1:%d" % port
                self.uri = "nbds://localhost:%d/?tls-certificates=%s" % (port, self.cfg.work.tls.client)
            else:
                endpoint = os.path.join(self.cfg.work.workdir, "%s.sock" % self.name)
                if os.path.lexists(endpoint):
                    os.unlink(endpoint)
                self.uri = "nbd+unix:///?socket=" + endpoint
            argv = self.argv(endpoint)
            # the same minimal environment for both (systemd-socket-activate passes on only -E)
            env = {"PATH": SERVER_PATH, "TMPDIR": self.scratch, "LANG": "C.UTF-8"}
            with open(self.logpath, "ab") as lf:
                lf.write(("\n=== %s %s\n" % (time.strftime("%H:%M:%S"), " ".join(argv))).encode())
                lf.flush()
                self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=lf,
                                             stderr=lf, start_new_session=True, cwd=self.scratch)
            self.known[self.proc.pid] = start_time(self.proc.pid)
            try:
                self.warm_up()
                return
            except BenchError as e:
                last = e
                self.stop()
                if self.transport not in ("tcp", "tls"):
                    break
                log("%s did not come up (attempt %d): %s" % (self.name, attempt + 1, e))
        raise BenchError("%s failed to start: %s\n%s" % (self.name, last, self.log_tail()))

    def warm_up(self):
        """Wait (bounded) until the server completes one NBD handshake.  This
        is also the warm-up connection (first exec, cold caches), and under
        nbdkit's socket activation the one that execs nbdkit."""
        deadline = time.monotonic() + self.cfg.settings.start_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError("exited with status %s" % self.proc.returncode)
            try:
                h, _ = connect(self.uri, min(30.0, deadline - time.monotonic()))
                disconnect(h)
                return
            except BenchError as e:
                last = e
                time.sleep(0.05)
        raise BenchError("no NBD handshake within %.0f s (%s)" % (self.cfg.settings.start_timeout, last))

    def pids(self):
        ps = tree(self.proc.pid) if self.proc else []
        for p in ps:
            self.known.setdefault(p, start_time(p))
        return ps

    def log_tail(self, n=1500):
        try:
            with open(self.logpath, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        pid = self.proc.pid
        self.pids()

        def others():  # a zombie (state Z) is dead already: only its parent can reap it
            return [p for p in self.known if p != pid and self.is_ours(p) and proc_state(p)[0] != "Z"]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is None:  # not reaped yet, so the group id is still ours
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
            # per-connection children may have left the group: kill them by pid
            for p in others():
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + 5
            while time.monotonic() < end and (self.proc.poll() is None or others()):
                time.sleep(0.05)
            if self.proc.poll() is not None and not others():
                break
            if sig == signal.SIGTERM:
                left = ([pid] if self.proc.poll() is None else []) + others()
                log("%s: still there 5 s after SIGTERM, sending SIGKILL: %s" % (self.name, ", ".join(
                    "%d %s (state %s, parent %s %s)" % ((p, comm(p)) + proc_state(p) + (comm(int(proc_state(p)[1])) if proc_state(p)[1].isdigit() else "",)) for p in left)))
        if self.proc.poll() is None or others():
            left = ([pid] if self.proc.poll() is None else []) + others()
            log("warning: %s: still there 5 s after SIGKILL: %s" % (self.name, ", ".join(
                "%d %s (state %s, parent %s)" % ((p, comm(p)) + proc_state(p)) for p in left)))
        self.proc = None

    def is_ours(self, p):
        """p still exists and is the process we saw in our tree (same start
        time, so not a recycled pid)."""
        st = start_time(p)
        return st is not None and st == self.known.get(p)
