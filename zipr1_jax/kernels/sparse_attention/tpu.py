"""Pallas TPU (Mosaic) kernels for compact sparse attention: forward, backward, decode.

Layout inside the compact kernels is head-major ([B, N, L, H]) so a block's last two dims are
(rows, head_dim) and meet the (8, 128) tiling; the decode kernel reads the [B, S, K, H] cache
in place instead (blocks [bk, K, H] whose last two dims are full). Positions travel
lane-broadcast (queries as [B, L, 128], keys as [B, 8, T]) so that the mask `k_pos <= q_pos` is a
plain 2-D compare (the layout jax's TPU flash attention uses for segment ids). Skip tables (`n_kb`, `first_q`) and
`k_count` arrive by scalar prefetch: skipped grid steps do no compute (`pl.when`) and, through a
clamped index_map, re-use the previous block so no DMA is issued either.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zipr1_jax.kernels.sparse_attention import pallas_common as pc
from zipr1_jax.kernels.sparse_attention.blocks import TPU_LANE, TPU_SUBLANE, BlockSizes

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _lanes(x, width: int):
    """Lane-broadcast stats [rows, 128] -> [rows, width] (tile when possible, as Mosaic likes)."""
    if width % TPU_LANE == 0:
        return jnp.tile(x, (1, width // TPU_LANE))
    if width < TPU_LANE:
        return x[:, :width]
    return x[:, :1]


def _hspec(rows: int, H: int, idx):
    """BlockSpec of the (rows, H) tile of head h, block i of a head-major [B, heads, len, H] array;
    idx(*grid, *prefetch) -> (b, h, i)."""
    return pl.BlockSpec((None, None, rows, H), lambda *a: (lambda b, h, i: (b, h, i, 0))(*idx(*a)))


def _masked_tiles(b, kb, bk, kc_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, scale):
    """Scores of one (q block, k block) tile with the compact mask; invalid k/v rows zeroed so
    garbage (even NaN) beyond k_count can never leak through 0 * NaN."""
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, k.shape, 0) + kb * bk
    ok = rows < kc_ref[b]
    k = jnp.where(ok, k, jnp.zeros_like(k))
    v = jnp.where(ok, v, jnp.zeros_like(v))
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    mask = kp_ref[0:1, :] <= _lanes(qp_ref[...], bk)
    return q, k, v, jnp.where(mask, s, pc.NEG_INF), mask


# ---------------------------------------------------------------------------------------------
# Forward (FlashAttention-2 online softmax; writes the logsumexp for the backward pass)
# ---------------------------------------------------------------------------------------------
def _fwd_kernel(kc_ref, nkb_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, o_ref, lse_ref, m_sc, l_sc,
                acc_sc, *, scale, bk, nk):
    b, qi, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    H = acc_sc.shape[-1]

    @pl.when(kb == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, pc.NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(kb < nkb_ref[b, qi])  # skip blocks beyond k_count / in the causal future
    def _step():
        _, _, v, s, mask = _masked_tiles(b, kb, bk, kc_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, scale)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        # where(): a fully masked row has s == m_next == NEG_INF, and exp(0) must not count.
        p = jnp.where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
        l_sc[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _lanes(alpha, H) + pv

    @pl.when(kb == nk - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        empty = l == 0.0  # no visible key: output 0, lse "+inf" so the backward p is 0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = jnp.where(_lanes(empty, H), 0.0, acc_sc[...] / _lanes(l_safe, H)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, pc.LSE_EMPTY, m + jnp.log(l_safe))


@dataclasses.dataclass(frozen=True)
class _Geom:
    """Static geometry: batch, query heads, kv heads, head_dim, padded lengths."""
    B: int
    N: int
    K: int
    H: int
    Lp: int
    Tp: int


def _fwd_call(q, k, v, q_pos, k_pos, k_count, n_kb, *, geom: _Geom, scale, bq, bk, interpret):
    """q [B, N, Lp, H], k/v [B, K, Tp, H], q_pos [B, Lp], k_pos [B, Tp]; returns o, lse (lane-bcast)."""
    B, N, K, H, Lp, Tp = geom.B, geom.N, geom.K, geom.H, geom.Lp, geom.Tp
    G, nq, nk = N // K, Lp // bq, pl.cdiv(Tp, bk)

    def kvb(b, n, qi, kb, kc, nkb):  # skipped steps re-use the last needed block: no new DMA
        return jnp.minimum(kb, jnp.maximum(nkb[b, qi] - 1, 0))

    q_spec = _hspec(bq, H, lambda b, n, qi, kb, kc, nkb: (b, n, qi))
    kv_spec = _hspec(bk, H, lambda b, n, qi, kb, kc, nkb: (
        b, jax.lax.div(n, G), kvb(b, n, qi, kb, kc, nkb)))
    in_specs = [q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, bq, TPU_LANE), lambda b, n, qi, kb, kc, nkb: (b, qi, 0)),
                pl.BlockSpec((None, TPU_SUBLANE, bk),
                             lambda b, n, qi, kb, kc, nkb: (b, 0, kvb(b, n, qi, kb, kc, nkb)))]
    args = [q, k, v, jnp.broadcast_to(q_pos[:, :, None], (B, Lp, TPU_LANE)),
            jnp.broadcast_to(k_pos[:, None, :], (B, TPU_SUBLANE, Tp))]
    kernel = functools.partial(_fwd_kernel, scale=scale, bk=bk, nk=nk)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, N, nq, nk),
            in_specs=in_specs,
            out_specs=[
                q_spec,
                pl.BlockSpec((None, None, bq, TPU_LANE), lambda b, n, qi, kb, kc, nkb: (b, n, qi, 0)),
            ],
            scratch_shapes=[pltpu.VMEM((bq, TPU_LANE), jnp.float32),
                            pltpu.VMEM((bq, TPU_LANE), jnp.float32),
                            pltpu.VMEM((bq, H), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, N, Lp, H), q.dtype),
                   jax.ShapeDtypeStruct((B, N, Lp, TPU_LANE), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="zipr1_compact_attention_fwd",
    )(k_count.astype(jnp.int32), n_kb, *args)
    return o, lse


# ---------------------------------------------------------------------------------------------
# Backward (FlashAttention-2: p recomputed from the saved logsumexp, delta = rowsum(do * o))
# ---------------------------------------------------------------------------------------------
def _dq_kernel(kc_ref, nkb_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, do_ref, lse_ref, d_ref,
               dq_ref, dq_sc, *, scale, bk, nk):
    b, qi, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(kb == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(kb < nkb_ref[b, qi])
    def _step():
        _, k, v, s, mask = _masked_tiles(b, kb, bk, kc_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, scale)
        p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(d_ref[...], bk))
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

    @pl.when(kb == nk - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(kc_ref, nkb_ref, fq_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, do_ref, lse_ref,
                d_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, bk, G, nq):
    b, kb, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(kb < nkb_ref[b, qi])
    def _step():
        q, _, v, s, mask = _masked_tiles(b, kb, bk, kc_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, scale)
        do = do_ref[...]
        p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                          preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(d_ref[...], bk))
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN,
                                          preferred_element_type=jnp.float32) * scale

    @pl.when((g == G - 1) & (qi == nq - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd_call(q, k, v, q_pos, k_pos, k_count, n_kb, first_q, do, lse, delta, *, geom: _Geom,
              scale, bq, bk, interpret):
    B, N, K, H, Lp, Tp = geom.B, geom.N, geom.K, geom.H, geom.Lp, geom.Tp
    G, nq, nk = N // K, Lp // bq, Tp // bk
    qp = jnp.broadcast_to(q_pos[:, :, None], (B, Lp, TPU_LANE))
    kp = jnp.broadcast_to(k_pos[:, None, :], (B, TPU_SUBLANE, Tp))
    delta = jnp.broadcast_to(delta[..., None], (B, N, Lp, TPU_LANE))
    kc = k_count.astype(jnp.int32)

    # dq: grid over (b, n, q block, k block), k blocks clamped like the forward.
    def kvb(b, qi, kb, nkb):
        return jnp.minimum(kb, jnp.maximum(nkb[b, qi] - 1, 0))

    q_spec = _hspec(bq, H, lambda b, n, qi, kb, kc, nkb: (b, n, qi))
    row_spec = pl.BlockSpec((None, None, bq, TPU_LANE), lambda b, n, qi, kb, kc, nkb: (b, n, qi, 0))
    kv_spec = _hspec(bk, H, lambda b, n, qi, kb, kc, nkb: (
        b, jax.lax.div(n, G), kvb(b, qi, kb, nkb)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bk=bk, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, N, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec,
                      pl.BlockSpec((None, bq, TPU_LANE), lambda b, n, qi, kb, kc, nkb: (b, qi, 0)),
                      pl.BlockSpec((None, TPU_SUBLANE, bk),
                                   lambda b, n, qi, kb, kc, nkb: (b, 0, kvb(b, qi, kb, nkb))),
                      q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="zipr1_compact_attention_dq",
    )(kc, n_kb, q, k, v, qp, kp, do, lse, delta)

    # dk/dv: grid over (b, kv head, k block, group member, q block); the group's query heads and
    # all needed q blocks accumulate into one f32 scratch (GQA reduction inside the kernel).
    def qb(b, kb, qi, nkb, fq):  # skipped steps point at a needed block (fq), no extra DMA
        return jnp.where(kb < nkb[b, qi], qi, fq[b, kb])

    q_spec2 = _hspec(bq, H, lambda b, h, kb, g, qi, kc, nkb, fq: (
        b, h * G + g, qb(b, kb, qi, nkb, fq)))
    row_spec2 = pl.BlockSpec((None, None, bq, TPU_LANE), lambda b, h, kb, g, qi, kc, nkb, fq: (
        b, h * G + g, qb(b, kb, qi, nkb, fq), 0))
    kv_spec2 = _hspec(bk, H, lambda b, h, kb, g, qi, kc, nkb, fq: (b, h, kb))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bk=bk, G=G, nq=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, K, nk, G, nq),
            in_specs=[q_spec2, kv_spec2, kv_spec2,
                      pl.BlockSpec((None, bq, TPU_LANE),
                                   lambda b, h, kb, g, qi, kc, nkb, fq: (b, qb(b, kb, qi, nkb, fq), 0)),
                      pl.BlockSpec((None, TPU_SUBLANE, bk),
                                   lambda b, h, kb, g, qi, kc, nkb, fq: (b, 0, kb)),
                      q_spec2, row_spec2, row_spec2],
            out_specs=[kv_spec2, kv_spec2],
            scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=(
            "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="zipr1_compact_attention_dkv",
    )(kc, n_kb, first_q, q, k, v, qp, kp, do, lse, delta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# custom_vjp core on padded, head-major arrays
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Cfg:
    geom: _Geom
    scale: float
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, q_pos, k_pos, k_count, cfg: _Cfg):
    return _core_fwd(q, k, v, q_pos, k_pos, k_count, cfg)[0]


def _core_fwd(q, k, v, q_pos, k_pos, k_count, cfg):
    g = cfg.geom
    qp, kp, n_kb, _ = pc.positions_and_tables(q_pos, k_pos, k_count, g.Lp, g.Tp, cfg.bq, cfg.bk)
    o, lse = _fwd_call(q, k, v, qp, kp, k_count, n_kb, geom=g, scale=cfg.scale, bq=cfg.bq,
                       bk=cfg.bk, interpret=cfg.interpret)
    return o, (q, k, v, q_pos, k_pos, k_count, o, lse[..., 0])


def _core_bwd(cfg, res, do):
    q, k, v, q_pos, k_pos, k_count, o, lse = res
    g = cfg.geom
    qp, kp, n_kb, first_q = pc.positions_and_tables(q_pos, k_pos, k_count, g.Lp, g.Tp,
                                                    cfg.bq_bwd, cfg.bk_bwd)
    # FA2 preprocessing: delta = rowsum(do * o), [B, N, Lp].
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    lse = jnp.broadcast_to(lse[..., None], (*lse.shape, TPU_LANE))
    dq, dk, dv = _bwd_call(q, k, v, qp, kp, k_count, n_kb, first_q, do, lse, delta, geom=g,
                           scale=cfg.scale, bq=cfg.bq_bwd, bk=cfg.bk_bwd, interpret=cfg.interpret)
    return dq, dk, dv, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _fit(block: int, n: int, unit: int) -> int:
    """Shrink a block for short inputs (still a multiple of `unit`)."""
    return min(block, pc.round_up(max(n, 1), unit))


def _head_major(x_BLNH, length: int):
    """[B, L, heads, H] -> [B, heads, Lp, H]. On TPU, XLA folds this transpose into the operand
    layout (AOT v5e compile: ~21 MB of glue traffic at L=8k vs ~480 MB for a [B, L, N*H] reshape,
    which forces a relayout of the (8, 128)-tiled heads dim)."""
    return pc.pad_axis(jnp.transpose(x_BLNH, (0, 2, 1, 3)), 2, length)


def attend_compact_tpu(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B, *, sm_scale=None,
                       block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Compact attention as Pallas TPU kernels (forward + custom_vjp dq / dk,dv kernels).

    Query l of row b attends key t iff t < k_count[b] and k_pos[b, t] <= q_pos[b, l]; GQA maps
    query head n to kv head n // (N // K); a query with no visible key outputs 0.
    """
    B, L, N, T, K, H = pc.validate_compact(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B)
    bs = (block_sizes or BlockSizes.default("tpu")).validate("tpu", H, q_BLNH.dtype)
    bq, bq_b = _fit(bs.block_q, L, TPU_SUBLANE), _fit(bs.block_q_bwd, L, TPU_SUBLANE)
    bk, bk_b = _fit(bs.block_k, T, TPU_LANE), _fit(bs.block_k_bwd, T, TPU_LANE)
    # One padded length serves forward and backward: a multiple of both blocks.
    Lp = pc.round_up(L, math.lcm(bq, bq_b))
    Tp = pc.round_up(T, math.lcm(bk, bk_b))
    geom = _Geom(B, N, K, H, Lp, Tp)
    cfg = _Cfg(geom, pc.default_scale(H, sm_scale), bq, bk, bq_b, bk_b, bool(interpret))
    q = _head_major(q_BLNH, Lp)
    k = _head_major(k_BTKH, Tp)
    v = _head_major(v_BTKH, Tp)
    o = _core(q, k, v, q_pos_BL, k_pos_BT, k_count_B, cfg)
    return jnp.transpose(o[:, :, :L], (0, 2, 1, 3))


def _decode_kernel(len_ref, nkb_ref, q_ref, qp_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
                   scale, bk, nk, K):
    """One (batch row, key block) step for ALL kv heads: the cache block [bk, K, H] is read in its
    native layout (no relayout copy of the cache) and each head's rows run their own online softmax."""
    b, kb = pl.program_id(0), pl.program_id(1)
    H = acc_sc.shape[-1]

    @pl.when(kb == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, pc.NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(kb < nkb_ref[b])
    def _step():
        length = len_ref[b]
        q_pos = qp_ref[...]
        k_pos = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1) + kb * bk
        mask = k_pos <= _lanes(q_pos, bk)  # q_pos <= length - 1, so slots >= length are masked
        for h in range(K):  # static unroll over kv heads (K is small)
            k, v = k_ref[:, h, :], v_ref[:, h, :]
            ok = jax.lax.broadcasted_iota(jnp.int32, k.shape, 0) + kb * bk < length
            k = jnp.where(ok, k, jnp.zeros_like(k))  # slots past length may hold garbage / NaN
            v = jnp.where(ok, v, jnp.zeros_like(v))
            s = jax.lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, pc.NEG_INF)
            m_prev, l_prev = m_sc[h], l_sc[h]
            m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
            l_sc[h] = alpha * l_prev + p.sum(axis=1, keepdims=True)
            m_sc[h] = m_next
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_sc[h] = acc_sc[h] * _lanes(alpha, H) + pv

    @pl.when(kb == nk - 1)
    def _finish():
        for h in range(K):
            l = l_sc[h]
            empty = l == 0.0
            l_safe = jnp.where(empty, 1.0, l)
            o_ref[h] = jnp.where(_lanes(empty, H), 0.0,
                                 acc_sc[h] / _lanes(l_safe, H)).astype(o_ref.dtype)


def decode_attention_tpu(q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B, *, sm_scale=None,
                         block_sizes: BlockSizes | None = None, interpret: bool = False,
                         layer: int | None = None):
    """New tokens (cache slots [length - Tn, length), causal among themselves) over the cache.

    The GQA group's query heads x new tokens form the rows of each head's q tile (>= 8 sublanes
    even for a single new token). The cache is read in place ([B, S, K, H] blocks of [bk, K, H]:
    the last two dims are full, so Mosaic tiling holds without a transpose/relayout copy), each
    cache byte is fetched once per step, and key blocks at or past `length` are neither computed
    nor fetched (clamped index_map). With `layer`, the caches are a stacked [Y, B, S, K, H] array
    and the index_map picks the layer: a sliced operand would be copied whole before the call.
    """
    B, Tn, N, S, K, H = pc.validate_decode(q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B, layer)
    bs = (block_sizes or BlockSizes.default("tpu")).validate("tpu", H, q_BTNH.dtype)
    G = N // K
    R = Tn * G
    Rp = pc.round_up(R, TPU_SUBLANE)
    bk = _fit(bs.block_k_decode, S, TPU_LANE)
    nk = pl.cdiv(S, bk)
    # [B, Tn, K, G, H] -> [B, K, Tn*G, H]: row r = t * G + g (q is tiny: the transpose is cheap).
    q = q_BTNH.reshape(B, Tn, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, R, H)
    q = pc.pad_axis(q, 2, Rp)
    row_pos = jnp.repeat(pc.decode_positions(length_B, Tn), G, axis=1)  # [B, R]
    row_pos = pc.pad_axis(row_pos, 1, Rp, pc.QPOS_PAD)
    row_pos = jnp.broadcast_to(row_pos[:, :, None], (B, Rp, TPU_LANE))
    length = jnp.clip(length_B.astype(jnp.int32), 0, S)
    n_kb = pl.cdiv(length, bk).astype(jnp.int32)

    lead = () if layer is None else (layer,)
    kv_block = (None,) * (1 + len(lead)) + (bk, K, H)

    def kv_map(b, kb, ln, nkb):
        return (*lead, b, jnp.minimum(kb, jnp.maximum(nkb[b] - 1, 0)), 0, 0)

    o = pl.pallas_call(
        functools.partial(_decode_kernel, scale=pc.default_scale(H, sm_scale), bk=bk, nk=nk, K=K),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, nk),
            in_specs=[pl.BlockSpec((None, K, Rp, H), lambda b, kb, ln, nkb: (b, 0, 0, 0)),
                      pl.BlockSpec((None, Rp, TPU_LANE), lambda b, kb, ln, nkb: (b, 0, 0)),
                      pl.BlockSpec(kv_block, kv_map),
                      pl.BlockSpec(kv_block, kv_map)],
            out_specs=pl.BlockSpec((None, K, Rp, H), lambda b, kb, ln, nkb: (b, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((K, Rp, TPU_LANE), jnp.float32),
                            pltpu.VMEM((K, Rp, TPU_LANE), jnp.float32),
                            pltpu.VMEM((K, Rp, H), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((B, K, Rp, H), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="zipr1_decode_attention",
    )(length, n_kb, q, row_pos, k_cache_BSKH, v_cache_BSKH)
    return o[:, :, :R].reshape(B, K, Tn, G, H).transpose(0, 2, 1, 3, 4).reshape(B, Tn, N, H)
