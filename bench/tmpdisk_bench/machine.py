"""What the header says about where and what was measured: the machine
(CPU, cores, kernel, RAM, load), the scratch dir's file system, and the
versions of tmpdisk (with its git revision), nbdkit, libnbd and fio (and
for the golden rows qemu-nbd and nbd-server)."""

import os
import platform
import socket
import subprocess

import nbd

from .common import GiB, REPO


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    # TCP rows move with it: BBR paces loopback sockets too (bench/README.md)
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            tcp_cc = f.read().strip()
    except OSError:
        tcp_cc = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "ram_gib": round(mem / GiB, 1), "host": socket.gethostname(),
            "load_start": os.getloadavg(), "tcp_cc": tcp_cc}


def versions(cfg):
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return r.stdout.strip().splitlines()[0] if r.stdout.strip() else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"
    rev = out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    t = cfg.tools
    ver = {"tmpdisk": out([cfg.work.tmpdisk, "--version"]),
           "tmpdisk_git": rev + ("+dirty" if dirty not in ("", "?") else ""),
           "nbdkit": out([t.nbdkit, "--version"]) if t.nbdkit else "nbdkit ?",
           "libnbd": nbd.NBD().get_version(),
           "fio": out([t.fio, "--version"])}
    if t.qemu_nbd:  # "/usr/bin/qemu-nbd 10.0.2 (Debian ...)"
        ver["qemu-nbd"] = "qemu-nbd " + (out([t.qemu_nbd, "--version"]).split() + ["?", "?"])[1]
    if t.nbd_server:  # "This is nbd-server version 3.24"
        ver["nbd-server"] = "nbd-server " + (out([t.nbd_server, "-V"]).split() or ["?"])[-1]
    if t.haproxy:  # "HAProxy version 2.6.12-1+deb12u1 2023/12/16 - https://haproxy.org/"
        ver["haproxy"] = "haproxy " + (out([t.haproxy, "-v"]).split() + ["?"] * 3)[2]
    return ver


def fs_of(path):
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", path],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return " on ".join(out) or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"
