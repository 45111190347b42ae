"""The programs the selected rows need: found on the servers' PATH, or
reported missing with the Debian package that ships them, which is read
from tests/tools, the project's one tool -> package table."""

import os
import shutil
import subprocess
import sys

from .common import REPO
from .config import SERVER_PATH, Tools

TABLE = os.path.join(REPO, "tests", "tools")


def packages():
    """{tool: Debian package} from the table: lines `tool  package`, with
    `bench-only` after the tools tests/run does not install, and `#`
    comments."""
    try:
        with open(TABLE) as f:
            lines = f.read().splitlines()
    except OSError as e:
        sys.exit("bench/run: cannot read the tool -> package table %s: %s" % (TABLE, e.strerror))
    table = {}
    for n, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3) or words[2:] not in ([], ["bench-only"]):
            sys.exit("bench/run: %s:%d: expected `tool  package [bench-only]`, not %r" % (TABLE, n, line))
        table[words[0]] = words[1]
    return table


def package_of(tool, table=None):
    table = packages() if table is None else table
    if tool not in table:
        sys.exit("bench/run: %s names no package for %s: add a line `%s  PACKAGE`" % (TABLE, tool, tool))
    return table[tool]


def find_tools(rows):
    """The programs for these rows; exits naming every missing package."""
    table = packages()

    def install(tool):
        return "%s (apt-get install %s)" % (tool, package_of(tool, table))
    ids = {r.id for r in rows}
    fio_rows = any(".rand" in i or ".fio_" in i for i in ids)
    nbdkit_rows = any(not r.optin for r in rows)
    need = ["systemd-socket-activate"] + (["nbdkit"] if nbdkit_rows else [])
    if any(".empty_read" in i or ".nbdcopy_in" in i for i in ids):
        need.append("nbdcopy")
    need.append("fio")  # without fio rows, only for the version line: optional
    need.append("mkfs.ext4")
    if "tcp.connect_1G_xfs" in ids or "named.connect_16G_xfs" in ids:
        need.append("mkfs.xfs")
    if "tcp.connect_1G_vfat" in ids:
        need.append("mkfs.vfat")
    if any(r.optin == "balancer" for r in rows):
        need.append("haproxy")
    if any(r.peers for r in rows):  # golden: the peers, and for the clone path an xfs on a loop device
        need += ["qemu-nbd", "nbd-server"]
        if any(i.startswith("golden.clone.") for i in ids):
            need += ["mkfs.xfs", "mount", "umount"]
    missing = []
    found = {}
    for tool in need:
        if tool in found:
            continue
        found[tool] = shutil.which(tool, path=SERVER_PATH)
        if not found[tool] and (tool != "fio" or fio_rows):
            missing.append(install(tool))
    if found.get("nbdkit"):
        r = subprocess.run([found["nbdkit"], "tmpdisk", "--version"], capture_output=True, timeout=20)
        if r.returncode != 0:
            missing.append("nbdkit's tmpdisk plugin (apt-get install %s)" % package_of("nbdkit", table))
    if fio_rows and found["fio"]:
        r = subprocess.run([found["fio"], "--enghelp=nbd"], capture_output=True, timeout=20)
        if r.returncode != 0:
            missing.append("fio's nbd engine (apt-get install %s: Debian's fio has it)" % package_of("fio", table))
    openssl = None
    if any(i.startswith("tls.") for i in ids):
        openssl = shutil.which("openssl", path=SERVER_PATH)
        if not openssl:
            missing.append(install("openssl"))
    if missing:
        sys.exit("bench/run: missing: " + "; ".join(missing))
    return Tools(socket_activate=found["systemd-socket-activate"], nbdkit=found.get("nbdkit"),
                 fio=found["fio"] or "fio", nbdcopy=found.get("nbdcopy"), openssl=openssl,
                 qemu_nbd=found.get("qemu-nbd"), nbd_server=found.get("nbd-server"),
                 mkfs_xfs=found.get("mkfs.xfs"), haproxy=found.get("haproxy"))
