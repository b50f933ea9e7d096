"""Pallas Triton (GPU) kernels for compact sparse attention: forward, backward, decode.

Same algorithm as tpu.py, lowered through Pallas' Triton backend (explicit
`pltriton.CompilerParams`, which selects the `__gpu$xla.gpu.triton` custom call instead of
Mosaic GPU). Layout stays [B, L, N, H]: one program per (batch, head, block), keys streamed
in a `fori_loop` whose trip count comes from the skip table (blocks beyond k_count or entirely in
the causal future are never visited). Triton needs power-of-2 tiles, so head_dim is zero-padded
to a power of 2 (scores and outputs are unchanged) and lengths to block multiples.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from zipr1_jax.kernels.sparse_attention import pallas_common as pc
from zipr1_jax.kernels.sparse_attention.blocks import TRITON_MIN_DOT, BlockSizes, next_pow2

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _scores(q, k_ref, v_ref, kp_ref, kc, qp, start, bk, scale, decode):
    """One k block: zero k/v rows at or past k_count (garbage/NaN must not leak), masked scores."""
    cols = start + jnp.arange(bk, dtype=jnp.int32)
    ok = jnp.broadcast_to((cols < kc)[:, None], (bk, k_ref.shape[-1]))
    # Masked loads: slots at or past k_count / length are never read (they may be garbage or NaN,
    # or lie past the end of an unpadded cache).
    k = pltriton.load(k_ref.at[pl.ds(start, bk), :], mask=ok, other=0.0)
    v = pltriton.load(v_ref.at[pl.ds(start, bk), :], mask=ok, other=0.0)
    k_pos = cols if decode else kp_ref[pl.ds(start, bk)]
    mask = (k_pos[None, :] <= qp[:, None]) & (cols < kc)[None, :]
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    return k, v, jnp.where(mask, s, pc.NEG_INF), mask


# ---- forward: online softmax over key blocks [0, n_kb) ----------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, kc_ref, nkb_ref, o_ref, lse_ref, *, scale,
                bk, decode):
    q, qp, kc = q_ref[...], qp_ref[...], kc_ref[...]
    bq, H = q.shape

    def body(j, carry):
        m, l, acc = carry
        _, v, s, mask = _scores(q, k_ref, v_ref, kp_ref, kc, qp, j * bk, bk, scale, decode)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_next, l * alpha + p.sum(axis=1), acc

    init = (jnp.full((bq,), pc.NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, H), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, nkb_ref[...], body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, pc.LSE_EMPTY, m + jnp.log(l_safe))


def _params(bs: BlockSizes):
    return pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _fwd_call(q, k, v, q_pos, k_pos, k_count, n_kb, *, scale, bq, bk, bs, interpret, decode=False,
              layer=None):
    """q [B, Lp, N, H], k/v [B, Tp, K, H] (or layer `layer` of [Y, B, Tp, K, H]), q_pos [B, Lp],
    k_pos [B, Tp], n_kb [B, nq]."""
    B, Lp, N, H = q.shape
    Tp, K = k.shape[-3], k.shape[-2]
    G, nq = N // K, Lp // bq
    lead = () if layer is None else (layer,)
    kv_spec = pl.BlockSpec((None,) * (1 + len(lead)) + (Tp, None, H),
                           lambda b, n, i: (*lead, b, 0, n // G, 0))
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, bk=bk, decode=decode),
        grid=(B, N, nq),
        in_specs=[
            pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, Tp), lambda b, n, i: (b, 0)),
            pl.BlockSpec((None,), lambda b, n, i: (b,)),
            pl.BlockSpec((None, None), lambda b, n, i: (b, i)),
        ],
        out_specs=[pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
                   pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, Lp), jnp.float32)],
        compiler_params=_params(bs),
        interpret=interpret,
        name="zipr1_compact_attention_fwd_triton",
    )(q, k, v, q_pos, k_pos, k_count.astype(jnp.int32), n_kb)
    return o, lse


# ---- backward (FlashAttention-2, p from the saved logsumexp) -----------------------------------
def _dq_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, kc_ref, nkb_ref, do_ref, lse_ref, d_ref,
               dq_ref, *, scale, bk):
    q, qp, kc, do = q_ref[...], qp_ref[...], kc_ref[...], do_ref[...]
    lse, delta = lse_ref[...], d_ref[...]

    def body(j, dq):
        k, v, s, mask = _scores(q, k_ref, v_ref, kp_ref, kc, qp, j * bk, bk, scale, False)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, nkb_ref[...], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, kc_ref, fq_ref, do_ref, lse_ref, d_ref,
                dk_ref, dv_ref, *, scale, bq, bk, nq):
    kb = pl.program_id(2)
    start_k = kb * bk
    kc = kc_ref[...]
    cols = start_k + jnp.arange(bk, dtype=jnp.int32)
    ok = (cols < kc)[:, None]
    k = k_ref[...]
    v = v_ref[...]
    k = jnp.where(ok, k, jnp.zeros_like(k))
    v = jnp.where(ok, v, jnp.zeros_like(v))
    k_pos = kp_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        qp, lse, delta = qp_ref[rows], lse_ref[rows], d_ref[rows]
        mask = (k_pos[None, :] <= qp[:, None]) & (cols < kc)[None, :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(fq_ref[...], nq, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_call(q, k, v, q_pos, k_pos, k_count, n_kb, first_q, do, lse, delta, *, scale, bq, bk,
              bs, interpret):
    B, Lp, N, H = q.shape
    Tp, K = k.shape[1], k.shape[2]
    G, nq, nk = N // K, Lp // bq, Tp // bk
    kc = k_count.astype(jnp.int32)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bk=bk),
        grid=(B, N, nq),
        in_specs=[
            pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, Tp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
            pl.BlockSpec((None, Tp, None, H), lambda b, n, i: (b, 0, n // G, 0)),
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, Tp), lambda b, n, i: (b, 0)),
            pl.BlockSpec((None,), lambda b, n, i: (b,)),
            pl.BlockSpec((None, None), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(bs),
        interpret=interpret,
        name="zipr1_compact_attention_dq_triton",
    )(q, k, v, q_pos, k_pos, kc, n_kb, do, lse, delta)
    # dk/dv per query head (grid over N), then summed over each GQA group outside the kernel.
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk, nq=nq),
        grid=(B, N, nk),
        in_specs=[
            pl.BlockSpec((None, Lp, None, H), lambda b, n, j: (b, 0, n, 0)),
            pl.BlockSpec((None, bk, None, H), lambda b, n, j: (b, j, n // G, 0)),
            pl.BlockSpec((None, bk, None, H), lambda b, n, j: (b, j, n // G, 0)),
            pl.BlockSpec((None, Lp), lambda b, n, j: (b, 0)),
            pl.BlockSpec((None, bk), lambda b, n, j: (b, j)),
            pl.BlockSpec((None,), lambda b, n, j: (b,)),
            pl.BlockSpec((None, None), lambda b, n, j: (b, j)),
            pl.BlockSpec((None, Lp, None, H), lambda b, n, j: (b, 0, n, 0)),
            pl.BlockSpec((None, None, Lp), lambda b, n, j: (b, n, 0)),
            pl.BlockSpec((None, None, Lp), lambda b, n, j: (b, n, 0)),
        ],
        out_specs=[pl.BlockSpec((None, bk, None, H), lambda b, n, j: (b, j, n, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, Tp, N, H), jnp.float32)] * 2,
        compiler_params=_params(bs),
        interpret=interpret,
        name="zipr1_compact_attention_dkv_triton",
    )(q, k, v, q_pos, k_pos, kc, first_q, do, lse, delta)
    dk = dk.reshape(B, Tp, K, G, H).sum(3).astype(k.dtype)
    dv = dv.reshape(B, Tp, K, G, H).sum(3).astype(v.dtype)
    return dq, dk, dv


# ---- custom_vjp core on padded arrays --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    bs: BlockSizes
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, q_pos, k_pos, k_count, cfg: _Cfg):
    return _core_fwd(q, k, v, q_pos, k_pos, k_count, cfg)[0]


def _core_fwd(q, k, v, q_pos, k_pos, k_count, cfg):
    Lp, Tp = q.shape[1], k.shape[1]
    qp, kp, n_kb, _ = pc.positions_and_tables(q_pos, k_pos, k_count, Lp, Tp, cfg.bq, cfg.bk)
    o, lse = _fwd_call(q, k, v, qp, kp, k_count, n_kb, scale=cfg.scale, bq=cfg.bq, bk=cfg.bk,
                       bs=cfg.bs, interpret=cfg.interpret)
    return o, (q, k, v, q_pos, k_pos, k_count, o, lse)


def _core_bwd(cfg, res, do):
    q, k, v, q_pos, k_pos, k_count, o, lse = res
    Lp, Tp = q.shape[1], k.shape[1]
    qp, kp, n_kb, first_q = pc.positions_and_tables(q_pos, k_pos, k_count, Lp, Tp, cfg.bq_bwd,
                                                    cfg.bk_bwd)
    delta = jnp.einsum("blnh,blnh->bnl", do.astype(jnp.float32), o.astype(jnp.float32))
    dq, dk, dv = _bwd_call(q, k, v, qp, kp, k_count, n_kb, first_q, do, lse, delta,
                           scale=cfg.scale, bq=cfg.bq_bwd, bk=cfg.bk_bwd, bs=cfg.bs,
                           interpret=cfg.interpret)
    return dq, dk, dv, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _fit(block: int, n: int) -> int:
    """Shrink a power-of-2 block for short inputs (stays a power of 2, >= the tl.dot minimum)."""
    return min(block, max(TRITON_MIN_DOT, next_pow2(n)))


def attend_compact_triton(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B, *, sm_scale=None,
                          block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Compact attention as Pallas Triton kernels (forward + custom_vjp backward)."""
    B, L, N, T, K, H = pc.validate_compact(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B)
    bs = (block_sizes or BlockSizes.default("triton")).validate("triton", H, q_BLNH.dtype)
    bq, bq_b = _fit(bs.block_q, L), _fit(bs.block_q_bwd, L)
    bk, bk_b = _fit(bs.block_k, T), _fit(bs.block_k_bwd, T)
    Lp = pc.round_up(L, max(bq, bq_b))  # powers of 2: the larger is a multiple of the smaller
    Tp = pc.round_up(T, max(bk, bk_b))
    Hp = max(TRITON_MIN_DOT, next_pow2(H))
    cfg = _Cfg(pc.default_scale(H, sm_scale), bq, bk, bq_b, bk_b, bs, bool(interpret))
    q = pc.pad_axis(pc.pad_axis(q_BLNH, 1, Lp), 3, Hp)
    k = pc.pad_axis(pc.pad_axis(k_BTKH, 1, Tp), 3, Hp)
    v = pc.pad_axis(pc.pad_axis(v_BTKH, 1, Tp), 3, Hp)
    o = _core(q, k, v, q_pos_BL, k_pos_BT, k_count_B, cfg)
    return o[:, :L, :, :H]


def decode_attention_triton(q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B, *, sm_scale=None,
                            block_sizes: BlockSizes | None = None, interpret: bool = False,
                            layer: int | None = None):
    """New tokens (cache slots [length - Tn, length), causal among themselves) over the cache.

    One program per (batch, kv head): the GQA group's query heads x new tokens are the rows of
    the q tile (padded to >= 16 for tl.dot); the key loop stops at cdiv(length, block) and loads
    are masked at `length`, so the cache is read in place and never past `length` (it is copied
    only if head_dim is not a power of 2). With `layer`, the caches are a stacked [Y, B, S, K, H]
    array and the index_map picks the layer: a sliced operand would be copied whole before the call.
    """
    B, Tn, N, S, K, H = pc.validate_decode(q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B, layer)
    bs = (block_sizes or BlockSizes.default("triton")).validate("triton", H, q_BTNH.dtype)
    G = N // K
    R = Tn * G
    Rp = max(TRITON_MIN_DOT, next_pow2(R))
    bk = _fit(bs.block_k_decode, S)
    Hp = max(TRITON_MIN_DOT, next_pow2(H))
    if layer is not None and Hp != H:  # padding head_dim copies anyway: copy only this layer
        k_cache_BSKH, v_cache_BSKH, layer = k_cache_BSKH[layer], v_cache_BSKH[layer], None
    q = q_BTNH.reshape(B, Tn, K, G, H).transpose(0, 1, 3, 2, 4).reshape(B, R, K, H)  # row t*G+g
    q = pc.pad_axis(pc.pad_axis(q, 1, Rp), 3, Hp)
    k = pc.pad_axis(k_cache_BSKH, k_cache_BSKH.ndim - 1, Hp)  # no copy when head_dim is a power of 2
    v = pc.pad_axis(v_cache_BSKH, v_cache_BSKH.ndim - 1, Hp)
    row_pos = jnp.repeat(pc.decode_positions(length_B, Tn), G, axis=1)
    row_pos = pc.pad_axis(row_pos, 1, Rp, pc.QPOS_PAD)
    length = jnp.clip(length_B.astype(jnp.int32), 0, S)
    n_kb = pl.cdiv(length, bk)[:, None].astype(jnp.int32)
    dummy_kpos = jnp.zeros((B, S), jnp.int32)  # unused: decode key position == slot
    o, _ = _fwd_call(q, k, v, row_pos, dummy_kpos, length, n_kb,
                     scale=pc.default_scale(H, sm_scale), bq=Rp, bk=bk, bs=bs,
                     interpret=interpret, decode=True, layer=layer)
    o = o[:, :R, :, :H].reshape(B, Tn, G, K, H).transpose(0, 1, 3, 2, 4).reshape(B, Tn, N, H)
    return o
