"""Two small process supervisors for the golden-image peers, run as a
separate program (`python3 activate.py MODE ...`, standard library only,
no import of the package) so that the server, this supervisor and every
process it starts form one process tree the bench can see and stop.

respawn -l ADDR:PORT -- CMD...
    systemd's socket activation with Accept=no, as a socket unit and a
    service that exits with its one client would run it: listen on
    ADDR:PORT; whenever a connection is pending and no instance runs,
    start CMD with the listening socket as fd 3 (LISTEN_FDS=1,
    LISTEN_PID), wait for it to exit, repeat.  For `qemu-nbd --snapshot`,
    which takes a listening socket from systemd (not a connected one, so
    not Accept=yes) and exits when its client leaves: a fresh instance,
    and so a fresh snapshot, per client.

reap -- CMD...
    Become a child subreaper (prctl PR_SET_CHILD_SUBREAPER), run CMD and
    reap whatever it leaves, until nothing is left.  For nbd-server 3.24,
    which always daemonizes (daemon(3): its own session, parent gone) and
    forks a child per client: the daemon is re-parented here instead of to
    init, so it stays in our tree.  SIGTERM is passed on to our children
    (the daemon), and we exit once they are all reaped.
"""

import ctypes
import os
import select
import signal
import socket
import sys

PR_SET_CHILD_SUBREAPER = 36


def respawn(addr, cmd):
    host, port = addr.rsplit(":", 1)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(128)
    ls.set_inheritable(True)
    print("respawn: listening on %s, one `%s` per client" % (addr, " ".join(cmd)), file=sys.stderr, flush=True)
    p = select.poll()
    p.register(ls.fileno(), select.POLLIN)
    n = failed = 0
    while True:
        p.poll()  # a connection is pending (systemd: the socket unit triggers the service)
        n += 1
        pid = os.fork()
        if pid == 0:
            try:
                if ls.fileno() != 3:
                    os.dup2(ls.fileno(), 3)  # dup2 leaves fd 3 inheritable
                env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
                os.execvpe(cmd[0], cmd, env)
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print("respawn: instance %d (pid %d) exited with %d" % (n, pid, code), file=sys.stderr, flush=True)
        # like systemd's start limit: an instance that keeps failing is not started for ever
        failed = failed + 1 if code != 0 else 0
        if failed >= 5:
            sys.exit("respawn: %d instances in a row failed; giving up" % failed)


def reap(cmd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("reap: prctl(PR_SET_CHILD_SUBREAPER): %s" % os.strerror(ctypes.get_errno()))

    def on_term(_sig, _frame):  # pass it on to our children; the wait loop reaps them
        me = os.getpid()
        for d in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % d) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == me:
                    os.kill(int(d), signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                pass
    signal.signal(signal.SIGTERM, on_term)  # exec gives the command the default again
    first = os.fork()
    if first == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # nothing left
            return code
        if pid == first:
            code = os.waitstatus_to_exitcode(status)


def main(argv):
    if len(argv) >= 4 and argv[0] == "respawn" and argv[1] == "-l" and argv[3] == "--":
        respawn(argv[2], argv[4:])
    elif len(argv) >= 2 and argv[0] == "reap" and argv[1] == "--":
        return reap(argv[2:])
    sys.exit("usage: activate.py respawn -l ADDR:PORT -- CMD... | reap -- CMD...")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
