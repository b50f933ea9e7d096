"""Process start-up of a multi-process (multi-host) run: `jax.distributed` and its settings.

    dist, argv = parse_flags(sys.argv[1:])   # --coordinator-address / --num-processes / --process-id
    initialize(dist)                          # before anything touches a JAX backend

Launching. TPU pod slices, Slurm and Open MPI are detected by JAX itself (no flags). Anywhere else
(GPU clusters, several CPU processes) give the coordinator `host:port` (process 0's address), the
process count and this process's id, as flags or as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID. CPU processes exchange data through gloo collectives. With none of these, the run is
a single process and nothing is initialised.

What keeps every process's view of the run identical to the single-process run lives with what it
moves: host <-> global arrays in `sharding/host.py`, each process's rows of a global batch and their
merge in `data/process_rows.py`, placement on the mesh in `sharding/placement.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
CPU_COLLECTIVES = ("gloo", "mpi", "none")
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID", "mode": "ZIPR1_DISTRIBUTED"}


class DistributedError(RuntimeError):
    """Bad multi-process launch settings, or processes that disagree."""


# ---------------------------------------------------------------------- launch settings
@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    mode: "auto" initialises when any setting below is given or JAX detects a cluster (TPU pod,
      Slurm, Open MPI); "on" always initialises (JAX fills in what is missing); "off" never.
    """

    mode: str = "auto"
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"  # cross-process collectives of the CPU backend
    timeout_s: int = 300

    def __post_init__(self):
        if self.mode not in MODES:
            raise DistributedError(f"distributed mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise DistributedError(f"cpu_collectives must be one of {list(CPU_COLLECTIVES)}, got "
                                   f"{self.cpu_collectives!r}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise DistributedError(f"coordinator address must look like host:port, got {self.coordinator_address!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise DistributedError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None:
            if self.process_id < 0:
                raise DistributedError(f"process_id must be >= 0, got {self.process_id}")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise DistributedError(f"process_id {self.process_id} is not below num_processes {self.num_processes}")
        if self.timeout_s < 1:
            raise DistributedError(f"timeout_s must be >= 1, got {self.timeout_s}")

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def from_env(environ: Mapping[str, str] | None = None, **overrides) -> DistributedConfig:
    """Settings from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID /
    ZIPR1_DISTRIBUTED; keyword overrides (flags) that are not None win."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {
        "coordinator_address": environ.get(ENV["coordinator_address"]) or None,
        "num_processes": _env_int(environ, ENV["num_processes"]),
        "process_id": _env_int(environ, ENV["process_id"]),
        "mode": environ.get(ENV["mode"]) or "auto",
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DistributedConfig(**values)


def parse_flags(argv: Sequence[str], environ: Mapping[str, str] | None = None
                ) -> tuple[DistributedConfig, list[str]]:
    """Take the distributed flags out of `argv`; returns (settings, the remaining arguments)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--coordinator-address", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", choices=MODES, default=None, dest="mode")
    p.add_argument("--cpu-collectives", choices=CPU_COLLECTIVES, default=None)
    known, rest = p.parse_known_args(list(argv))
    return from_env(environ, **vars(known)), rest


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX would auto-configure from (TPU pod, Slurm, Open MPI), or
    None. Uses JAX's own detectors so the answer matches what `jax.distributed.initialize()` does."""
    try:
        from jax._src import clusters  # noqa: PLC0415 (private, hence guarded)

        for env in clusters.ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return env.__name__
    except Exception as e:  # a JAX refactor must not break single-process runs
        log.debug("cluster detection unavailable: %s", e)
    return None


def initialize(config: DistributedConfig | None = None) -> tuple[int, int]:
    """Join the run described by `config` (default: from the environment); returns (process index,
    process count). Call before any JAX computation. A no-op when already initialised."""
    config = from_env() if config is None else config
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if config.mode == "off":
        return 0, 1
    cluster = None
    if config.mode == "auto" and not config.explicit:
        cluster = detected_cluster()
        if cluster is None:
            return 0, 1
    if config.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id,
                                   initialization_timeout=config.timeout_s)
    except (ValueError, RuntimeError) as e:
        where = f"cluster {cluster}" if cluster else (
            f"coordinator {config.coordinator_address}, num_processes {config.num_processes}, "
            f"process_id {config.process_id}")
        raise DistributedError(f"jax.distributed.initialize failed ({where}): {e}. Outside TPU pods / Slurm / "
                               "Open MPI pass --coordinator-address HOST:PORT --num-processes N --process-id I "
                               "(or the JAX_* environment variables) to every process") from e
    if config.num_processes is not None and jax.process_count() != config.num_processes:
        raise DistributedError(f"asked for {config.num_processes} processes but JAX sees {jax.process_count()}")
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_index(), jax.process_count()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here (no-op with one process)."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)
