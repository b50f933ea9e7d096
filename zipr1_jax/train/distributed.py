"""Multi-process (multi-host) training: start `jax.distributed`, and keep every process's view of
the run identical to the single-process run.

    dist, argv = parse_flags(sys.argv[1:])   # --coordinator-address / --num-processes / --process-id
    initialize(dist)                          # before anything touches a JAX backend

Launching. TPU pod slices, Slurm and Open MPI are detected by JAX itself (no flags). Anywhere else
(GPU clusters, several CPU processes) give the coordinator `host:port` (process 0's address), the
process count and this process's id, as flags or as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID. CPU processes exchange data through gloo collectives. With none of these, the run is
a single process and nothing is initialised.

Data. `data.batch_size` / `sft.batch_size` are GLOBAL batch sizes. Process i of P reads only its
rows of every global batch (`ProcessRows`): rows [i*B/P, (i+1)*B/P) of the batch the single-process
pipeline would have made (same shuffle, same epochs). Processes then exchange their collated rows
(`gather_batch`) so every host holds the same global host batch: the rollout sampler takes host
prompts, rewards need every response's text, and the vision inputs are replicated anyway. Placing
the batch on the mesh (`put_rows`) uses each leaf's global shape, so any device order works. The
losses of a P-process run therefore equal those of one process with the same mesh.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

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
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------- host <-> global arrays
def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a (possibly multi-process) array. Collective when `x` spans other
    processes' devices: every process must call it, in the same order."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_host_tree(tree: Any) -> Any:
    return jax.tree.map(to_host, tree)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order, on every process."""
    if not is_multiprocess():
        return [obj]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int32))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[:payload.size] = payload
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [P, max size]
    return [pickle.loads(stacked[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def put_rows(placement, arrays: dict) -> dict:
    """Place host arrays holding ALL rows of the batch (identical on every process) on the mesh,
    split over the batch axes like `Placement.put_batch` (which places process-local rows)."""
    if not is_multiprocess():
        return placement.put_batch(arrays)
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    mesh = placement.mesh
    axes = ("data", "fsdp")
    size = math.prod(mesh.shape[a] for a in axes)
    out = {}
    for name, x in arrays.items():
        x = np.asarray(x)
        spec = PartitionSpec(axes) if x.ndim >= 1 and x.shape[0] % size == 0 else PartitionSpec()
        # global_shape == local shape: every process holds the whole array, each device takes its slice.
        out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, x.shape)
    return out


def replicate(placement, tree: Any) -> Any:
    """`Placement.replicate` that also takes process-local jax.Arrays (e.g. PRNG keys) when the
    mesh spans several processes, where device_put only accepts host values: a jitted identity
    with a replicated output (the value must be the same on every process)."""
    if not is_multiprocess():
        return placement.replicate(tree)
    return jax.jit(lambda t: t, out_shardings=placement.replicated)(tree)


# ---------------------------------------------------------------------- data: rows per process
class ProcessRows:
    """Random-access view of one process's rows of the single-process example stream.

    The single-process pipeline reads `source` shuffled (grain, `seed`) and repeated forever, then
    batches `global_batch` consecutive examples. Element m of this view is example
    (m // b) * B + i * b + m % b of that stream (B = global_batch, b = B / count, i = index), so
    batch m of a pipeline over this view (batch size b, no shuffle) holds rows [i*b, (i+1)*b) of
    global batch m. The view is 2**40 examples long (endless in practice).
    """

    def __init__(self, source, *, global_batch: int, index: int, count: int, seed: int, shuffle: bool = True):
        import grain  # noqa: PLC0415

        if count < 1 or not 0 <= index < count:
            raise DistributedError(f"ProcessRows: index {index} must be in [0, count={count})")
        if global_batch % count:
            raise DistributedError(f"a global batch of {global_batch} examples does not split over {count} "
                                   f"processes: make the batch size a multiple of the process count")
        self.source, self.index, self.count = source, index, count
        self.global_batch, self.local_batch = global_batch, global_batch // count
        order = grain.MapDataset.range(len(source))
        if shuffle:
            order = order.shuffle(seed=seed)
        self._order = order.repeat(None)
        # Endless in practice; bounded so grain's own repeat / length arithmetic stays in int64.
        self._len = min(len(self._order), 2**40) // global_batch * self.local_batch

    def stream_index(self, m: int) -> int:
        b = self.local_batch
        return (m // b) * self.global_batch + self.index * b + m % b

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, m: int):
        return self.source[int(self._order[self.stream_index(int(m))])]

    def __repr__(self) -> str:
        return f"ProcessRows({self.source!r}, process {self.index}/{self.count}, batch {self.local_batch})"


# ---------------------------------------------------------------------- data: one global batch
# Keys of a collated batch (zipr1_jax/data/batching.py) by how they combine across processes.
TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")  # [R, L]
PIXEL_KEYS = {"pixel_values": "pixel_mask", "pixel_values_videos": "pixel_mask_videos"}
CONCAT_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # per image / video
VIDEO_KEYS = ("pixel_values_videos", "pixel_mask_videos", "video_grid_thw", "video_counts", "second_per_grid_ts")


def _pad_tokens(x: np.ndarray, length: int, side: str, value) -> np.ndarray:
    extra = length - x.shape[-1]
    if extra == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(extra, 0) if side == "left" else (0, extra)]
    return np.pad(x, pad, constant_values=value)


def _fill_missing_video(batches: list[dict]) -> list[dict]:
    """Batches without videos lack the video keys (batching.py); give them empty ones."""
    if not any("video_grid_thw" in b for b in batches):
        return batches
    width = next(b["pixel_values_videos"].shape[1] for b in batches if "pixel_values_videos" in b)
    out = []
    for b in batches:
        if "video_grid_thw" not in b:
            rows = np.asarray(b["input_ids"]).shape[0]
            b = dict(b, pixel_values_videos=np.zeros((0, width), np.float32), pixel_mask_videos=np.zeros((0,), bool),
                     video_grid_thw=np.zeros((0, 3), np.int64), video_counts=np.zeros((rows,), np.int32),
                     second_per_grid_ts=np.zeros((0,), np.float32))
        out.append(b)
    return out


def merge_batches(batches: Sequence[dict], *, padding_side: str, pad_id: int) -> dict:
    """One batch from per-process collated batches (process order), equal to what `collate` makes
    of all their examples at once: token arrays padded to the longest (= the common length
    bucket), pixel rows and grids concatenated, prompt indices renumbered."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batches = _fill_missing_video([dict(b) for b in batches])
    keys = list(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if set(b) != set(keys):
            raise DistributedError(f"process {i}'s batch has keys {sorted(b)}, process 0's {sorted(keys)}")
    if len(batches) == 1:
        return batches[0]
    length = max(np.asarray(b["input_ids"]).shape[1] for b in batches)
    out: dict[str, Any] = {}
    for key in keys:
        vals = [b[key] for b in batches]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            out[key] = np.concatenate([_pad_tokens(np.asarray(v), length, padding_side, fill) for v in vals])
        elif key == "position_ids":  # [3, R, L]; padding positions hold 0 (rope.get_rope_index)
            out[key] = np.concatenate([_pad_tokens(np.asarray(v), length, padding_side, 0) for v in vals], axis=1)
        elif key in PIXEL_KEYS:
            masks = [np.asarray(b[PIXEL_KEYS[key]]) for b in batches]
            real = [np.asarray(v)[m] for v, m in zip(vals, masks)]
            widths = {r.shape[1] for r in real if r.size}
            width = widths.pop() if widths else np.asarray(vals[0]).shape[1]
            out[key] = np.concatenate([r.reshape(-1, width) for r in real]).astype(np.asarray(vals[0]).dtype)
            out[PIXEL_KEYS[key]] = np.ones((out[key].shape[0],), bool)
        elif key in PIXEL_KEYS.values():
            continue  # written with its pixel array
        elif key == "prompt_index":
            offsets = np.cumsum([0] + [int(np.max(v)) + 1 for v in vals[:-1]])
            out[key] = np.concatenate([np.asarray(v) + o for v, o in zip(vals, offsets)])
        elif key in CONCAT_KEYS or isinstance(vals[0], (list, tuple)):
            out[key] = np.concatenate([np.asarray(v) for v in vals]) if key in CONCAT_KEYS else \
                [x for v in vals for x in v]
        elif isinstance(vals[0], np.ndarray) and vals[0].ndim >= 1:
            out[key] = np.concatenate(vals)  # per-row arrays: lengths, valid, rope_deltas, *_counts
        else:
            raise DistributedError(f"merge_batches: do not know how to combine batch key {key!r} "
                                   f"({type(vals[0]).__name__}) across processes")
    return out


def gather_batch(local: dict, *, padding_side: str, pad_id: int) -> dict:
    """The global host batch on every process from each process's local rows (see module doc)."""
    if not is_multiprocess():
        return local
    return merge_batches(allgather_objects(local), padding_side=padding_side, pad_id=pad_id)
