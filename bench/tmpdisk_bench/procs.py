"""What /proc says about a server's process tree: its pids (and their
start times, to tell a recycled pid), states and names, its memory (PSS)
and the disk images it holds open."""

import os


def ppid_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid):
    """pid and all its descendants (that exist now)."""
    kids = ppid_map()
    out, i = [pid], 0
    while i < len(out):
        out.extend(kids.get(out[i], []))
        i += 1
    return out


def start_time(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_state(pid):
    """(state letter, parent pid) of a process, or ("?", "?")."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            f = f.read().rsplit(")", 1)[1].split()
        return f[0], f[1]
    except (OSError, IndexError):
        return "?", "?"


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


def tree_pss(pid):
    """(PSS bytes, number of processes) summed over pid's process tree."""
    total = n = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        n += 1
                        break
        except OSError:
            pass
    return total, n


def images(pid, scratch):
    """{(dev, ino): allocated bytes} of the files in the scratch dir that the
    server's process tree holds open (both servers unlink their images and
    keep them open: tmpdisk's are O_TMPFILE "#NNN (deleted)", nbdkit's
    "tmpdiskXXXXXX/disk (deleted)"), plus any file still named there."""
    prefix = os.path.realpath(scratch) + "/"
    out = {}
    for p in tree(pid):
        try:
            fds = os.listdir("/proc/%d/fd" % p)
        except OSError:
            continue
        for fd in fds:
            path = "/proc/%d/fd/%s" % (p, fd)
            try:
                if not os.readlink(path).startswith(prefix):
                    continue
                st = os.stat(path)
            except OSError:
                continue
            if st.st_mode & 0o170000 == 0o100000:
                out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    for dp, _dns, fns in os.walk(scratch):
        for fn in fns:
            try:
                st = os.lstat(os.path.join(dp, fn))
            except OSError:
                continue
            if st.st_mode & 0o170000 == 0o100000:
                out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return out
