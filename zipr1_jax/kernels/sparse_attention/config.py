"""Frozen configs of ZipR1 top-p token selection and sparse attention (docs/method.md sections 1-2).

Both are `frozen=True, kw_only=True` dataclasses validated in `__post_init__`; being hashable they
can be passed as static jit arguments.
"""

from __future__ import annotations

import dataclasses

PROBE_MODES = ("sampled", "all")
ATTENTION_MODES = ("kv", "qkv")
BACKENDS = ("xla", "pallas_tpu", "pallas_triton")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """How the keys of one layer are scored and cut (docs/method.md 1.1-1.5).

    Attributes:
      probe_recent: fraction of the VALID positions taken as the most recent probe queries.
      probe_random: fraction of the valid positions sampled uniformly (without replacement) from
        the remaining valid positions (ZipCache).
      probes: "sampled" (recent + random) or "all" (every valid query: exact, for tests).
      min_probes: lower bound on the number of probe queries (capped by the valid length) *(ours)*.
      keep_first: always keep the first valid token (no query ends up with an empty key set).
      keep_probe_window: always keep the keys of the recent-probe window (the last
        `probe_recent` fraction of valid positions, also with probes="all") *(ours)*.
      per_kv_head: one kept set per kv head. Not supported: the compact cache layout and the
        kernels share one kept set per layer, so True is rejected here (docs/method.md 1.2 default).
      normalise: divide key j's score by the number of probes that can see it (ZipCache).
    """

    probe_recent: float = 0.05
    probe_random: float = 0.05
    probes: str = "sampled"
    min_probes: int = 16
    keep_first: bool = True
    keep_probe_window: bool = True
    per_kv_head: bool = False
    normalise: bool = True

    def __post_init__(self):
        for name in ("probe_recent", "probe_random"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or not 0.0 <= val <= 1.0:
                raise ValueError(f"SelectionConfig.{name} must be a fraction in [0, 1], got {val!r}")
        if self.probe_recent + self.probe_random > 1.0:
            raise ValueError("SelectionConfig.probe_recent + probe_random must be <= 1, got "
                             f"{self.probe_recent} + {self.probe_random}")
        if self.probes not in PROBE_MODES:
            raise ValueError(f"SelectionConfig.probes must be one of {PROBE_MODES}, got {self.probes!r}")
        if not isinstance(self.min_probes, int) or self.min_probes < 1:
            raise ValueError(f"SelectionConfig.min_probes must be an int >= 1, got {self.min_probes!r}")
        for name in ("keep_first", "keep_probe_window", "per_kv_head", "normalise"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SelectionConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.per_kv_head:
            raise ValueError("SelectionConfig.per_kv_head=True is not supported: the compact KV "
                             "cache and kernels use one kept set per layer (scores are summed over "
                             "kv heads, docs/method.md 1.2)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """ZipR1 sparsity of the language-model decoder.

    Attributes:
      enabled: off -> dense attention everywhere (exactly the dense model).
      p: default top-p threshold (ZipVL's tau; 0.975 at inference). A per-row p may override it.
      selection: scoring / probe options.
      mode: "kv" (all queries attend to kept keys) or "qkv" (only kept queries get an output).
      layers: decoder layer indices that are sparse; None = all layers.
      backend: None (by platform) | "xla" | "pallas_tpu" | "pallas_triton".
      capacity_buckets: increasing fractions of the key length S ending with 1.0; the compact
        length T is the smallest bucket holding the largest kept count (static shapes).
    """

    enabled: bool = True
    p: float = 0.975
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    mode: str = "kv"
    layers: tuple[int, ...] | None = None
    backend: str | None = None
    capacity_buckets: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"SparsityConfig.enabled must be a bool, got {self.enabled!r}")
        if not isinstance(self.p, (int, float)) or not 0.0 < self.p <= 1.0:
            raise ValueError(f"SparsityConfig.p must be in (0, 1], got {self.p!r}")
        if not isinstance(self.selection, SelectionConfig):
            raise ValueError(f"SparsityConfig.selection must be a SelectionConfig, got {type(self.selection)}")
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"SparsityConfig.mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not all(
                    isinstance(i, int) and i >= 0 for i in self.layers):
                raise ValueError("SparsityConfig.layers must be None or a tuple of non-negative "
                                 f"ints, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"SparsityConfig.layers has duplicates: {self.layers!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"SparsityConfig.backend must be None or one of {BACKENDS}, got {self.backend!r}")
        validate_buckets(self.capacity_buckets, "SparsityConfig.capacity_buckets")

    def is_sparse_layer(self, layer: int) -> bool:
        return self.enabled and (self.layers is None or layer in self.layers)


DEFAULT_CAPACITY_BUCKETS = (0.125, 0.25, 0.5, 1.0)


def validate_buckets(buckets, name: str = "capacity_buckets") -> tuple[float, ...]:
    """Buckets must be a non-empty increasing tuple of fractions in (0, 1] ending with 1.0."""
    if not isinstance(buckets, tuple) or not buckets:
        raise ValueError(f"{name} must be a non-empty tuple of fractions, got {buckets!r}")
    if any(not isinstance(f, (int, float)) or not 0.0 < f <= 1.0 for f in buckets):
        raise ValueError(f"{name} entries must be fractions in (0, 1], got {buckets!r}")
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {buckets!r}")
    if buckets[-1] != 1.0:
        raise ValueError(f"{name} must end with 1.0 (a bucket that holds every key), got {buckets!r}")
    return buckets
