"""Starting and stopping the servers: tmpdisk, nbdkit's tmpdisk plugin and
nbdkit's null plugin (the ceiling), each for one transport, size and type;
and for the golden rows (transport "golden"), tmpdisk --base on its two
paths (tmpdisk-overlay, tmpdisk-clone), qemu-nbd --snapshot and nbd-server
with copyonwrite; for the named row (transport "named"), tmpdisk with
an exports file; and for the balancer rows (transport "balancer"), tmpdisk
taking PROXY headers and HAProxy in front of it.  A Servers object owns every server of a run: each is
stopped when its `with` block ends, and whatever is still running when the
Servers block ends (an exception, Ctrl-C, SIGTERM, a stop cut short) is
stopped then."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from .common import GiB, BenchError, log, size_str, uninterrupted
from .config import SERVER_PATH
from .nbdclient import connect, disconnect
from .procs import comm, proc_state, start_time, tree

from .rows import GOLDEN_PATHS

# the golden rows' tmpdisk servers, one per path; the peers' export name (nbd-server needs one)
GOLDEN_TMPDISK = tuple("tmpdisk-" + p for p in GOLDEN_PATHS)
GOLDEN_EXPORT = "golden"
# The named row's exports file (tmpdisk --exports), and the export names
# its clients send for each column: the same disk, 16 GiB xfs, shaped by
# the client on an export that lets it choose, or fixed by the admin.
NAMED_EXPORTS = """\
[export.scratch]
size = "1G"
type = "ext4"
max-size = "16G"
types = ["xfs", "ext4"]
labels = true

[export.xfs16]
size = "16G"
type = "xfs"
"""
NAMED_CLIENTS = {"chosen": "scratch:size=16G:type=xfs", "fixed": "xfs16"}
NAMED_SHAPE = (16 * GiB, "xfs")
# The C-client read row's disk (fstype FILLED): filled by a command, as a
# disk prepared with data would be, the same for tmpdisk (--command) and
# nbdkit tmpdisk (command=); `yes` makes it quickly and all of it data.
FILLED = "filled"
FILL_COMMAND = 'yes tmpdisk | head -c "$size" > "$disk"'
# The balancer rows: HAProxy connects to tmpdisk from this address, the one
# --proxy-from lists, so that direct clients (from 127.0.0.1) are not taken
# for the balancer.
BALANCER_SOURCE = "127.0.0.2"
# HAProxy as the README's haproxy.cfg runs it, with one server: TCP mode,
# splicing with 1 MiB pipes, leastconn, the client's address sent with
# PROXY v2, a TCP check.
HAPROXY_CFG = """\
global
    maxconn 4096
    tune.pipesize 1048576

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    option splice-request
    option splice-response

frontend nbd
    bind {bind}
    default_backend tmpdisk

backend tmpdisk
    balance leastconn
    source {source}
    server s1 {backend} send-proxy-v2 check check-send-proxy inter 5s
"""
# bench/tmpdisk_bench/activate.py, run as a program of its own (see there)
ACTIVATE = os.path.join(os.path.dirname(os.path.realpath(__file__)), "activate.py")


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
    def start(self, cfg, name, transport, size, fstype, backend=None):
        """A server started now (BenchError if it does not come up), stopped
        when the `with` block ends.  backend: HAProxy's server (host:port)."""
        srv = Server(cfg, name, transport, size, fstype, backend)
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

    def __init__(self, cfg, name, transport, size, fstype, backend=None):
        self.cfg, self.name, self.transport = cfg, name, transport
        self.backend = backend
        self.size, self.fstype = size, fstype
        self.proc = None
        self.known = {}  # pid -> start time of every process seen in our tree, for the final kill
        self.scratch = cfg.work.scratch
        if transport == "golden":  # where this server's per-client files go (see golden.py)
            self.scratch = cfg.golden.clone_tmpdir if name == "tmpdisk-clone" else cfg.golden.tmpdir
        self.logpath = os.path.join(cfg.work.workdir, "%s.log" % name)

    def argv(self, endpoint):
        tools, tmpdisk = self.cfg.tools, self.cfg.work.tmpdisk
        size, t = size_str(self.size), self.fstype
        env = ["-E", "TMPDIR=" + self.scratch, "-E", "PATH=" + SERVER_PATH]
        if self.transport == "golden":
            return self.golden_argv(endpoint, env)
        if self.transport == "balancer":
            if self.name == "haproxy":
                conf = os.path.join(self.cfg.work.workdir, "haproxy.cfg")
                with open(conf, "w") as f:
                    f.write(HAPROXY_CFG.format(bind=endpoint, source=BALANCER_SOURCE, backend=self.backend))
                return [tools.haproxy, "-db", "-f", conf]
            # as tcp (a process per connection), taking PROXY headers from HAProxy only
            return ([tools.socket_activate, "--accept", "-l", endpoint] + env
                    + [tmpdisk, "--proxy-protocol", "--proxy-from", BALANCER_SOURCE, "-t", t, size])
        if self.transport == "named":  # as tcp (a process per connection), with the exports file
            exports = os.path.join(self.cfg.work.workdir, "exports.toml")
            with open(exports, "w") as f:
                f.write(NAMED_EXPORTS)
            return ([tools.socket_activate, "--accept", "-l", endpoint] + env
                    + [tmpdisk, "--exports", exports, "-t", t, size])
        if self.transport in ("tcp", "tls"):
            tls = self.cfg.work.tls if self.transport == "tls" else None
            if self.name == "tmpdisk":
                # one process per connection: our deployment model (tmpdisk.socket, Accept=yes)
                return ([tools.socket_activate, "--accept", "-l", endpoint] + env
                        + [tmpdisk] + self.shape_args(t) + [size]
                        + (["--tls", "require", "--tls-certificates", tls.server] if tls else []))
            if self.name == "null":  # the ceiling, started like nbdkit tmpdisk (below)
                return [tools.socket_activate, "-l", endpoint] + env + [tools.nbdkit, "null", size]
            # nbdkit's own socket activation: one process, a thread per client
            return ([tools.socket_activate, "-l", endpoint] + env
                    + [tools.nbdkit]
                    + (["--tls=require", "--tls-certificates=" + tls.server] if tls else [])
                    + ["tmpdisk", size, self.nbdkit_shape(t)])
        if self.name == "null":  # the ceiling: a server that stores nothing
            return [tools.nbdkit, "-f", "-U", endpoint, "null", size]
        if self.name == "tmpdisk":
            return [tmpdisk, "--unix", endpoint] + self.shape_args(t) + [size]
        return [tools.nbdkit, "-f", "-U", endpoint, "tmpdisk", size, self.nbdkit_shape(t)]

    @staticmethod
    def shape_args(t):
        """tmpdisk's arguments for a disk of type t (or FILLED)."""
        return ["-c", FILL_COMMAND] if t == FILLED else ["-t", t]

    @staticmethod
    def nbdkit_shape(t):
        """nbdkit tmpdisk's parameter for a disk of type t (or FILLED)."""
        return "command=" + FILL_COMMAND if t == FILLED else "type=" + t

    def golden_argv(self, endpoint, env):
        """The golden rows' servers, each started the way it is deployed:
        tmpdisk as for the tcp rows (a process per connection) with --base,
        and for the clone path the xfs copy of the base and --command true; qemu-nbd --snapshot by
        socket activation with Accept=no, one instance per client (it takes
        a listening socket from systemd, not a connected one); nbd-server
        listening itself, a child per client, under a subreaper (it always
        daemonizes)."""
        g, tools = self.cfg.golden, self.cfg.tools
        if self.name in GOLDEN_TMPDISK:
            # Only a command's copy is a clone (tmpdisk serves every other copy
            # as an overlay, on any filesystem); `true` changes nothing.
            if self.name == "tmpdisk-clone":
                extra = [g.clone_base, "--command", "true"]
            else:
                extra = [g.base]
            return [tools.socket_activate, "--accept", "-l", endpoint] + env + [self.cfg.work.tmpdisk, "--base"] + extra
        if self.name == "qemu-nbd":  # TMPDIR (its snapshot's directory) comes from the environment
            return [sys.executable, ACTIVATE, "respawn", "-l", endpoint, "--",
                    tools.qemu_nbd, "--snapshot", "-f", "raw", g.base]
        if self.name == "nbd-server":
            host, port = endpoint.rsplit(":", 1)
            conf = os.path.join(self.cfg.work.workdir, "nbd-server.conf")
            with open(conf, "w") as f:
                # no user/group: it stays who we are; an allow file that does not exist: anyone may connect
                f.write("[generic]\n    listenaddr = %s\n    port = %s\n"
                        "[%s]\n    exportname = %s\n    copyonwrite = true\n    cowdir = %s\n"
                        "    authfile = %s\n" % (host, port, GOLDEN_EXPORT, g.base, self.scratch,
                                                   os.path.join(self.cfg.work.workdir, "nbd-server.allow")))
            return [sys.executable, ACTIVATE, "reap", "--", tools.nbd_server, "-C", conf,
                    "-p", os.path.join(self.cfg.work.workdir, "nbd-server.pid")]
        raise ValueError(self.name)

    def start(self):
        last = None
        for attempt in range(3):
            if self.transport in ("tcp", "named", "balancer"):
                port = free_port()
                endpoint = "127.0.0.1:%d" % port
                self.uri = "nbd://127.0.0.1:%d" % port
            elif self.transport == "golden":
                port = free_port()
                endpoint = "127.0.0.1:%d" % port
                self.uri = "nbd://127.0.0.1:%d" % port + ("/" + GOLDEN_EXPORT if self.name == "nbd-server" else "")
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
                self.log_start = lf.tell()
                self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=lf,
                                             stderr=lf, start_new_session=True, cwd=self.scratch)
            self.known[self.proc.pid] = start_time(self.proc.pid)
            try:
                self.warm_up()
                if self.name in GOLDEN_TMPDISK:
                    self.check_copy()
                return
            except BenchError as e:
                last = e
                self.stop()
                if self.transport not in ("tcp", "tls", "golden", "named", "balancer"):
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

    def check_copy(self):
        """tmpdisk --base chose the path this server stands for: its log's
        `client served` line (of the warm-up connection) says copy=clone or
        copy=overlay."""
        want = self.name.split("-", 1)[1]
        end = time.monotonic() + 5
        while True:
            with open(self.logpath, "rb") as f:
                f.seek(self.log_start)
                got = re.findall(r'client served .*?copy="?(\w+)', f.read().decode(errors="replace"))
            if got:
                if got[-1] != want:
                    raise BenchError("tmpdisk served a %s, not a %s (see %s)" % (got[-1], want, self.logpath))
                return
            if time.monotonic() > end:
                raise BenchError("no `client served ... copy=` line in tmpdisk's log")
            time.sleep(0.05)

    def served(self, export, timeout=5.0):
        """The fields of the `client served` line this start's log has for
        a client of export (the name it sent), waiting (bounded) for it:
        the log says which disk a client got."""
        end = time.monotonic() + timeout
        while True:
            with open(self.logpath, "rb") as f:
                f.seek(self.log_start)
                lines = f.read().decode(errors="replace").splitlines()
            for line in reversed(lines):
                if "client served " in line:
                    fields = {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', line)}
                    if fields.get("export") == export:
                        return fields
            if time.monotonic() > end:
                raise BenchError("no `client served ... export=%s` line in %s" % (export, self.logpath))
            time.sleep(0.05)

    def idle_processes(self):
        """How many processes this server's tree has with no client: the
        socket activator (tmpdisk, qemu-nbd); nbd-server's subreaper and
        daemon."""
        return 2 if self.name == "nbd-server" else 1

    def wait_idle(self, timeout=10.0):
        """Wait (bounded) until the last client's processes are gone: a
        connect then measures a fresh client of an idle server, whoever
        takes longer to wind down (qemu-nbd's next instance only starts
        once the last one exited)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len([p for p in self.pids() if proc_state(p)[0] != "Z"]) <= self.idle_processes():
                return
            time.sleep(0.01)
        log("%s: the last client's processes still there after %.0f s" % (self.name, timeout))

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
        if self.transport == "golden":
            self.sweep()

    def sweep(self):
        """Every golden server keeps its per-client files in its tmpdir and
        removes them when the client leaves (tmpdisk's have no name at all;
        nbd-server unlinks its <export>-<client>-<pid>.diff, qemu-nbd its
        snapshot): whatever is still there once the server is stopped (a
        client cut off by SIGKILL) is reported and removed."""
        for fn in sorted(os.listdir(self.scratch)):
            path = os.path.join(self.scratch, fn)
            log("warning: %s left %s behind: removing it" % (self.name, path))
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def is_ours(self, p):
        """p still exists and is the process we saw in our tree (same start
        time, so not a recycled pid)."""
        st = start_time(p)
        return st is not None and st == self.known.get(p)
