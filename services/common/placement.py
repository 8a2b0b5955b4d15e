"""CPU threads for services that share a host: a host-local registry of who runs where.

Left to themselves an encode replica and a language service on one host each start one
intra-op thread per core, so while the vision tower runs beside a model step the host runs
twice as many busy threads as it has cores. Each CPU service without an explicit thread count
registers its role in a directory under /dev/shm (a file per process and role, removed on
exit; a dead process's file is ignored and swept) and takes its share of the usable cores,
re-read every few seconds, so a service started later takes its share at once and the others
adjust at their next step:

- services of one role split the cores evenly between them;
- beside a language service, the encode replicas take a quarter of the cores together (at
  least one each): the tower runs in bursts, decode steps all the time.

The language services keep every core: a strict split (language 1 and encode 1 of 2 cores)
served 25% fewer tokens at 32 concurrent image requests than language 2 and encode 2 (494.7 vs
664.3 tok/s, `bench.peer_serve`, medium shape, fp32, 2-core AVX512 EPYC), because the tower is
idle most of the time; encode 1 and language 2 served as many as 2 and 2 (686.0 vs 694.0).

Explicit counts (the language service's --threads, $OMP_NUM_THREADS for either) opt out, as
does ``SPLITVL_PLACEMENT=off``. ``torch.set_num_threads`` holds per thread, so the thread that
runs the model applies the share (`apply_share`) before each step.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROLES = ("encode", "language")
ENCODE_SHARE = 0.25  # of the cores, for the encode replicas beside a language service
REFRESH_S = 2.0
DIR_ENV = "SPLITVL_PLACEMENT_DIR"
OFF_ENV = "SPLITVL_PLACEMENT"


def default_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(os.environ.get(DIR_ENV, base / "splitvl-placement"))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share(role: str, live: dict[str, int], cores: int) -> int:
    """Threads for one service of `role` among `live` services per role (itself included)."""
    mine = max(1, live.get(role, 0))
    if role == "encode" and live.get("language", 0):
        return max(1, round(cores * ENCODE_SHARE) // mine)
    return max(1, cores // mine)


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), so a reused pid is not taken for the
    process that registered; None where /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Claim:
    pid: int
    role: str
    started: int | None  # start_time(pid) when it registered

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            pass
        return self.started is None or start_time(self.pid) == self.started


def write_claim(directory: Path, claim: Claim) -> Path:
    """Register `claim` (atomically: readers never see half a file); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{claim.pid}-{claim.role}.json"  # one process may run both (tests)
    tmp = directory / f".{claim.pid}-{claim.role}.tmp"
    tmp.write_text(json.dumps({"pid": claim.pid, "role": claim.role, "started": claim.started}))
    os.replace(tmp, path)
    return path


def live_claims(directory: Path) -> list[Claim]:
    """The registered services whose process still runs; the files of dead ones are removed."""
    claims = []
    for path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            data = json.loads(path.read_text())
            claim = Claim(int(data["pid"]), str(data["role"]), data.get("started"))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        if claim.role not in ROLES:
            continue
        if claim.alive():
            claims.append(claim)
        else:
            path.unlink(missing_ok=True)
    return claims


class CorePlacement:
    """This process's entry in the registry and its current share of the cores."""

    def __init__(self, role: str, directory: Path | None = None, cores: int | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.directory = directory or default_dir()
        self.cores = cores or usable_cores()
        self._path: Path | None = None
        pid = os.getpid()
        try:
            self._path = write_claim(self.directory, Claim(pid, role, start_time(pid)))
        except OSError as exc:  # a read-only /dev/shm: serve on every core, as before
            log.warning("CPU placement off (%s): %d threads", exc, self.cores)
        else:
            atexit.register(self.close)
        self._threads = self.cores
        self._read_at = -float("inf")

    def threads(self) -> int:
        """The share now (the registry re-read at most every REFRESH_S seconds)."""
        now = time.monotonic()
        if self._path is not None and now - self._read_at >= REFRESH_S:
            self._read_at = now
            live: dict[str, int] = {}
            for claim in live_claims(self.directory):
                live[claim.role] = live.get(claim.role, 0) + 1
            live[self.role] = max(1, live.get(self.role, 0))
            threads = share(self.role, live, self.cores)
            if threads != self._threads:
                log.info(
                    "CPU placement: %d of %d cores for this %s service (%s on this host)",
                    threads,
                    self.cores,
                    self.role,
                    ", ".join(f"{n} {r}" for r, n in sorted(live.items())),
                )
            self._threads = threads
        return self._threads

    def close(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


def for_service(role: str, device: str, threads: int | None = None) -> CorePlacement | None:
    """A registered placement for a CPU service of `role`, or None: not a CPU, a thread count
    given (`threads`, $OMP_NUM_THREADS), or $SPLITVL_PLACEMENT=off."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if device.split(":")[0] != "cpu" or threads is not None or omp.isdigit():
        return None
    if os.environ.get(OFF_ENV, "").strip().lower() == "off":
        return None
    return CorePlacement(role)


def apply_share(placement: CorePlacement | None) -> None:
    """On the thread that runs the model: set its intra-op threads to the current share."""
    if placement is not None:
        threads = placement.threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
