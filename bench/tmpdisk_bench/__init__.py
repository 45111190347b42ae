"""tmpdisk against nbdkit's tmpdisk plugin, side by side: the package
behind bench/run (see bench/README.md for what every row measures).

Most modules import libnbd's Python module, so its absence is reported
here, once, before any of them is loaded, naming the Debian package."""

import importlib
import sys

from .tools import package_of

try:
    importlib.import_module("nbd")
except ImportError:
    sys.exit("bench/run: the Python libnbd module is missing: apt-get install %s, "
             "and run this with Debian's /usr/bin/python3 (not a pyenv/venv python)"
             % package_of("python3-nbd"))
