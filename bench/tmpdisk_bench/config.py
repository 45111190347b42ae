"""The benchmark's configuration, typed and frozen, each part built once:
Settings (how much to measure: --quick and the options overriding it),
Options (the whole command line), Tools (where the programs are),
Workspace (this run's directories and the binary it measures), Golden
(the golden-image rows' base image and tmpdirs), and Config, what the
servers and workloads read."""

from dataclasses import dataclass
from typing import Optional

from .common import GiB, MiB

# The PATH both servers get (the same for both, whatever the user's is),
# also where the tools are looked up: the mkfs tools live in sbin.
SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Settings:
    """How much to measure and how long to wait; --quick sets smaller
    defaults, --runs, --clients and --fio-runtime override them."""
    quick: bool
    runs: int              # connects per latency row
    clients: int           # clients connected at once (memory, disk, all-ready rows)
    fio_runtime: float     # seconds per fio job
    seq_runs: int          # fresh connections per seq row (and for the ceiling)
    big_size: int          # the never-written disk of the empty rows
    empty_runs: int        # nbdcopy runs per empty-read row
    empty_budget: float    # no new nbdcopy run after this many seconds
    settle_timeout: float  # longest wait for Dirty+Writeback to drain
    empty_timeout: float = 300  # one nbdcopy run (nbdkit: ~15 s for 16G when idle)
    io_timeout: float = 120
    clients_timeout: float = 120
    start_timeout: float = 30
    settle_mib: int = 32
    golden_size: int = 4 * GiB    # the golden rows' base image
    golden_data: int = 700 * MiB  # the random data in its files
    golden_disk_runs: int = 3     # fresh clients per golden disk row

    @classmethod
    def of(cls, quick, runs, clients, fio_runtime):
        """None (or 0) for runs, clients or fio_runtime: the default."""
        return cls(quick=quick,
                   runs=runs or (3 if quick else 11),
                   clients=clients or (10 if quick else 50),
                   fio_runtime=fio_runtime or (1 if quick else 5),
                   seq_runs=1 if quick else 3,
                   big_size=GiB if quick else 16 * GiB,
                   empty_runs=1 if quick else 3,
                   empty_budget=20 if quick else 40,
                   settle_timeout=8 if quick else 20)


@dataclass(frozen=True)
class Options:
    """The command line (see cli.parse_args)."""
    settings: Settings
    repeat: int
    only: Optional[str]
    json: Optional[str]
    markdown: bool
    list: bool
    tmpdisk: str
    build: bool
    scratch: str
    tmpfs: bool
    keep_logs: bool
    golden: bool         # --golden: the golden rows as well


@dataclass(frozen=True)
class Tools:
    """The programs the selected rows run (tools.find_tools)."""
    socket_activate: str
    nbdkit: Optional[str]    # only for the nbdkit rows (all but the golden ones)
    fio: str                 # plain "fio" when absent and no fio row runs: its version shows "?"
    nbdcopy: Optional[str]   # only for the empty-read rows
    openssl: Optional[str]   # only for the TLS rows
    qemu_nbd: Optional[str] = None     # only for the golden rows
    nbd_server: Optional[str] = None   # only for the golden rows
    mkfs_xfs: Optional[str] = None     # for the golden clone rows (and the xfs connect row)
    haproxy: Optional[str] = None      # only for the balancer rows


@dataclass(frozen=True)
class Tls:
    """Certificate directories: the server's (CA, certificate and key, in
    the layout both servers read) and the client's (the CA alone)."""
    server: str
    client: str


@dataclass(frozen=True)
class Workspace:
    """This run's directories and the binary it measures (workspace.py)."""
    workdir: str         # logs, sockets, certificates, fio output, the pinned binary
    scratch: str         # where both servers put their images
    scratch_where: str   # for the header: the --scratch directory, or "a dedicated tmpfs"
    scratch_fs: str      # for the header: file system and device of the scratch dir
    tmpdisk: str         # the pinned copy that is run
    tmpdisk_source: str  # the binary it was copied from
    tmpdisk_built: str   # its mtime
    stale: bool          # older than the newest file in src/
    tls: Optional[Tls]   # only for the TLS rows


@dataclass(frozen=True)
class Golden:
    """The golden-image rows' files (golden.py), all under the scratch dir:
    the base image, the tmpdir of the overlay path and of both peers, and,
    for the clone path, a loop-mounted xfs (reflink=1) holding a copy of the
    base and that path's tmpdir."""
    base: str                  # the 4 GiB raw ext4 image every server serves
    size: int                  # its size
    data: int                  # bytes of it that are data (SEEK_DATA), not holes
    extents: int               # its data extents
    sha256: str                # of its content, checked unchanged at the end (golden.content_hash)
    tmpdir: str                # tmpdisk overlay's TMPDIR, qemu-nbd's TMPDIR, nbd-server's cowdir
    tmpdir_fs: str             # for the header
    clone_base: Optional[str]  # the copy of the base on the xfs (None without clone rows)
    clone_tmpdir: Optional[str]
    clone_mount: Optional[str]
    clone_fs: Optional[str]    # for the header


@dataclass(frozen=True)
class Config:
    settings: Settings
    tools: Tools
    work: Workspace
    golden: Optional[Golden] = None  # only with golden rows
