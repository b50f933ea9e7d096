"""One dispatcher for ZipR1 sparse attention over kept keys (docs/method.md section 2).

`sparse_attention` gathers the kept K/V (plain JAX gather: its autodiff scatters the gradients
back to the full K/V) into a static capacity T and calls the backend's `attend_compact`:
  - "xla": `reference.attend_compact_reference` (pure jnp; the CPU production path),
  - "pallas_tpu": `tpu.attend_compact_tpu` (Mosaic), "pallas_triton": `gpu.attend_compact_triton`.
The default backend follows `jax.default_backend()` at trace time (tpu -> pallas_tpu,
gpu -> pallas_triton, else xla). Pallas modules are imported lazily, only when selected.

Static capacity: with `capacity=None`, T is the smallest bucket (fractions of S) that holds
max(kept_count), chosen at run time with `lax.switch` so compute really shrinks at low ratios.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp

from zipr1_jax.kernels.sparse_attention.config import (ATTENTION_MODES, BACKENDS,
                                                       DEFAULT_CAPACITY_BUCKETS,
                                                       SelectionConfig, validate_buckets)
from zipr1_jax.kernels.sparse_attention.reference import attend_compact_reference
from zipr1_jax.kernels.sparse_attention.selection import Selection, select_topp
from zipr1_jax.typing import Array, Bool, Float, Int

# backend -> (module, compact entry, decode entry)
_PALLAS = {
    "pallas_tpu": ("zipr1_jax.kernels.sparse_attention.tpu", "attend_compact_tpu", "decode_attention_tpu"),
    "pallas_triton": ("zipr1_jax.kernels.sparse_attention.gpu", "attend_compact_triton",
                      "decode_attention_triton"),
}


def default_backend() -> str:
    """Backend for the platform jax traces for: tpu -> pallas_tpu, gpu -> pallas_triton, else xla."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_triton"
    return "xla"


def resolve_backend(backend: str | None) -> str:
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def _pallas_entry(backend: str, which: int):
    module, *names = _PALLAS[backend]
    try:
        mod = importlib.import_module(module)
        return getattr(mod, names[which])
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"backend {backend!r} is unavailable: cannot load {module}.{names[which]} "
                           f"({e}); use backend='xla'") from e


def compact_attention_fn(backend: str | None, *, block_sizes=None, interpret: bool | None = None):
    """`attend_compact(q, k, v, q_pos, k_pos, k_count, *, sm_scale)` of a backend."""
    backend = resolve_backend(backend)
    if backend == "xla":
        if block_sizes is not None:
            raise ValueError("block_sizes only applies to the Pallas backends, not 'xla'")
        return attend_compact_reference
    fn = _pallas_entry(backend, 0)

    def call(*args, sm_scale=None):
        return fn(*args, sm_scale=sm_scale, block_sizes=block_sizes, interpret=bool(interpret))
    return call


def bucket_sizes(S: int, buckets=DEFAULT_CAPACITY_BUCKETS, multiple: int = 8) -> tuple[int, ...]:
    """Static capacities ceil(f * S) rounded up to `multiple`, capped at S, deduplicated."""
    validate_buckets(tuple(buckets))
    sizes = []
    for f in buckets:
        t = min(S, -(-math.ceil(f * S) // multiple) * multiple)
        if not sizes or t > sizes[-1]:
            sizes.append(max(t, 1))
    return tuple(sizes)


def run_bucketed(fn, count_max, sizes: tuple[int, ...], *operands):
    """Call `fn(T, *operands)` with the smallest static T in `sizes` that is >= count_max."""
    if len(sizes) == 1:
        return fn(sizes[0], *operands)
    sizes_arr = jnp.asarray(sizes, jnp.int32)
    index = jnp.minimum(jnp.sum(sizes_arr < count_max), len(sizes) - 1)
    branches = [lambda ops, t=t: fn(t, *ops) for t in sizes]
    return jax.lax.switch(index, branches, operands)


def _gather_rows(x_BS__, idx_BT):
    return jnp.take_along_axis(x_BS__, idx_BT[:, :, None, None], axis=1)


def sparse_attention(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"],
                     v_BSKH: Float[Array, "B S K H"], *, selection: Selection | None = None,
                     kept_idx_BT: Int[Array, "B T"] | None = None,
                     kept_count_B: Int[Array, "B"] | None = None, mode: str = "kv",
                     backend: str | None = None, capacity: int | None = None,
                     capacity_buckets: tuple[float, ...] = DEFAULT_CAPACITY_BUCKETS,
                     block_sizes=None, interpret: bool | None = None,
                     sm_scale: float | None = None) -> Float[Array, "B L N H"]:
    """Prefill attention over the kept keys of one layer.

    Query l is the token at array index S - L + l (L == S for a prefill). Key j is used iff it is
    kept (one of the first kept_count kept_idx) and j <= the query's index.

    Args:
      q_BLNH, k_BSKH, v_BSKH: RoPE'd projections (GQA: N a multiple of K).
      selection or (kept_idx_BT, kept_count_B): the kept set (ascending indices at the front).
      mode: "kv" every query attends to kept keys; "qkv" only kept queries get an output, the
        others get 0 (they pass through the residual, ZipVL Algorithm 1); needs L == S.
      backend: None (by platform), "xla", "pallas_tpu" or "pallas_triton".
      capacity: static compact length T (the caller guarantees kept_count <= T; larger counts
        are truncated to T). None: bucketed by `capacity_buckets` with lax.switch.
      block_sizes, interpret: forwarded to the Pallas kernels.
    Returns:
      [B, L, N, H] in q's dtype.
    """
    if selection is not None:
        if kept_idx_BT is not None or kept_count_B is not None:
            raise ValueError("pass either selection or kept_idx_BT + kept_count_B, not both")
        kept_idx_BT, kept_count_B = selection.kept_idx_BT, selection.kept_count_B
    if kept_idx_BT is None or kept_count_B is None:
        raise ValueError("sparse_attention needs selection= or both kept_idx_BT= and kept_count_B=")
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
    for name, x in (("q_BLNH", q_BLNH), ("k_BSKH", k_BSKH), ("v_BSKH", v_BSKH)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be rank 4, got shape {tuple(x.shape)}")
    B, L, N, H = q_BLNH.shape
    S = k_BSKH.shape[1]
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"k {k_BSKH.shape} / v {v_BSKH.shape} must be equal and match q {q_BLNH.shape} "
                         "in batch and head_dim")
    if L > S:
        raise ValueError(f"query length L={L} exceeds key length S={S}")
    if mode == "qkv" and L != S:
        raise ValueError(f"mode='qkv' gathers kept queries: needs L == S, got L={L}, S={S}")
    if kept_idx_BT.ndim != 2 or kept_idx_BT.shape[0] != B or kept_idx_BT.shape[1] > S:
        raise ValueError(f"kept_idx_BT must be [B={B}, T<=S={S}], got {tuple(kept_idx_BT.shape)}")
    if tuple(kept_count_B.shape) != (B,):
        raise ValueError(f"kept_count_B must have shape ({B},), got {tuple(kept_count_B.shape)}")
    if not (jnp.issubdtype(kept_idx_BT.dtype, jnp.integer) and jnp.issubdtype(kept_count_B.dtype, jnp.integer)):
        raise ValueError("kept_idx_BT and kept_count_B must be integer arrays")
    Tmax = kept_idx_BT.shape[1]
    if capacity is not None and not (isinstance(capacity, int) and 1 <= capacity <= Tmax):
        raise ValueError(f"capacity must be an int in [1, {Tmax}], got {capacity!r}")
    attend = compact_attention_fn(backend, block_sizes=block_sizes, interpret=interpret)
    kept_idx_BT = jnp.clip(kept_idx_BT.astype(jnp.int32), 0, S - 1)
    kept_count_B = jnp.clip(kept_count_B.astype(jnp.int32), 0, Tmax)
    q_pos_BL = jnp.broadcast_to(jnp.arange(S - L, S, dtype=jnp.int32), (B, L))

    def run(T, q, k, v, idx_BT, count_B):
        idx_BT = idx_BT[:, :T]
        count_B = jnp.minimum(count_B, T)
        k_c, v_c = _gather_rows(k, idx_BT), _gather_rows(v, idx_BT)
        if mode == "kv":
            return attend(q, k_c, v_c, q_pos_BL, idx_BT, count_B, sm_scale=sm_scale)
        q_c = _gather_rows(q, idx_BT)
        o_c = attend(q_c, k_c, v_c, idx_BT, idx_BT, count_B, sm_scale=sm_scale)
        live = (jnp.arange(T)[None, :] < count_B[:, None])[:, :, None, None]
        o_c = jnp.where(live, o_c, jnp.zeros_like(o_c))
        # scatter-add: pad slots repeat an index but carry zeros (autodiff: a gather).
        rows = jnp.arange(B)[:, None]
        return jnp.zeros_like(q).at[rows, idx_BT].add(o_c)

    operands = (q_BLNH, k_BSKH, v_BSKH, kept_idx_BT, kept_count_B)
    if capacity is not None:
        return run(capacity, *operands)
    sizes = tuple(t for t in bucket_sizes(S, capacity_buckets) if t < Tmax) + (Tmax,)
    return run_bucketed(run, jnp.max(kept_count_B), sizes, *operands)


def select_and_attend(q_BLNH, k_BSKH, v_BSKH, valid_BS: Bool[Array, "B S"], p_B, *,
                      config: SelectionConfig = SelectionConfig(), rng=None, mode: str = "kv",
                      backend: str | None = None, capacity: int | None = None,
                      capacity_buckets: tuple[float, ...] = DEFAULT_CAPACITY_BUCKETS,
                      block_sizes=None, interpret: bool | None = None,
                      sm_scale: float | None = None) -> tuple[Array, Selection]:
    """`select_topp` then `sparse_attention`; returns (out_BLNH, selection)."""
    sel = select_topp(q_BLNH, k_BSKH, valid_BS, p_B, config=config, rng=rng, sm_scale=sm_scale)
    out = sparse_attention(q_BLNH, k_BSKH, v_BSKH, selection=sel, mode=mode, backend=backend,
                           capacity=capacity, capacity_buckets=capacity_buckets,
                           block_sizes=block_sizes, interpret=interpret, sm_scale=sm_scale)
    return out, sel
