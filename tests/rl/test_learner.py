"""The learner's update step, and the pathwise efficiency term in the model and the learner
(docs/method.md 3b).

- gradient accumulation is a scan: the traced program holds one micro-step whatever grad_accum is,
  and the accumulated step equals the whole-batch step;

- a gradient step on the term alone lowers the soft AND the hard token ratio at fixed p;
- lambda_path = 0 (paper-literal) gives bit-identical losses and parameters to the learner with
  the term computed at weight 0, and the term's gradient adds up over micro-batches;
- the term's gradient lowers for TPU / CUDA with the Pallas attention backends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig
from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.rl.learner import _logprobs_only, _update
from zipr1_jax.rl.state import TrainState

SELECTION = SelectionConfig(min_probes=4)
SPARSITY = SparsityConfig(backend="xla", selection=SELECTION, capacity_buckets=(1.0,))
PAD = 257


@functools.lru_cache(maxsize=None)
def _model(layers=2, std_scale=1.0):
    cfg = C.tiny_qwen2_vl(layers=layers)
    model = QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))

    def rescale(path, x):  # O(1)-scale weights: attention that is not uniform to begin with
        k = next(keys)
        if x.ndim < 2:
            return x
        std = 1.0 if "embed_tokens" in str(path) else std_scale * x.shape[0] ** -0.5
        return jax.random.normal(k, x.shape, x.dtype) * std

    nnx.update(model, jax.tree_util.tree_map_with_path(rescale, params))
    return nnx.split(model, nnx.Param)


def _batch(seed=0, lengths=(40, 33, 37, 29), T=5):
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.full((len(lengths), L + T), PAD, np.int32)
    mask = np.zeros((len(lengths), L + T), np.int32)
    for b, n in enumerate(lengths):
        ids[b, L - n:] = rng.integers(0, 250, n + T)
        mask[b, L - n:] = 1
    return jnp.asarray(ids), jnp.asarray(mask), L


@functools.partial(jax.jit, static_argnames=("graphdef", "L", "T"))
def _ratios(graphdef, params, ids, mask, L, p_B, rng, T=0.02):
    model = nnx.merge(graphdef, params)
    out = model.sparse_forward(ids, sparsity=SPARSITY, p_B=p_B, rng=rng, attention_mask_BL=mask, select_end=L,
                               soft_temperature=T)
    return out.soft_ratio_B, out.token_ratio_B


def test_soft_ratio_of_the_model_tends_to_its_hard_ratio():
    graphdef, params = _model()
    ids, mask, L = _batch()
    p_B = jnp.asarray([0.6, 0.8, 0.9, 0.975])
    soft, hard = _ratios(graphdef, params, ids, mask, L, p_B, jax.random.key(0), T=1e-7)
    np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-4)


def test_one_step_on_the_term_lowers_soft_and_hard_ratio():
    """At fixed thresholds (two rows at p = 0.8, two at 0.95): one gradient step on the mean relaxed
    ratio alone lowers it, and the hard top-p count too."""
    graphdef, params = _model(layers=2)
    ids, mask, L = _batch(seed=1)
    p_B = jnp.asarray([0.8, 0.95, 0.8, 0.95])
    rng = jax.random.key(2)

    def soft_mean(prm):
        return jnp.mean(_ratios(graphdef, prm, ids, mask, L, p_B, rng)[0])

    soft0, hard0 = (np.asarray(x) for x in _ratios(graphdef, params, ids, mask, L, p_B, rng))
    g = jax.jit(jax.grad(soft_mean))(params)
    # One plain gradient step of a fixed length (0.5 in the global parameter norm).
    norm = optax.global_norm(g)
    new = jax.tree.map(lambda x, d: x - 0.5 * d / norm, params, g)
    soft1, hard1 = (np.asarray(x) for x in _ratios(graphdef, new, ids, mask, L, p_B, rng))
    for p in (0.8, 0.95):
        rows = np.asarray(p_B) == np.float32(p)
        assert soft1[rows].mean() < soft0[rows].mean() - 1e-3, p
        assert hard1[rows].mean() < hard0[rows].mean(), p


def _learner_inputs(graphdef, params, R=4, T=5):
    ids, mask, L = _batch(seed=3, lengths=(40, 33, 37, 29)[:R], T=T)
    model = nnx.merge(graphdef, params)
    pos, _ = model.position_ids(ids, mask)
    seq = {"ids": ids, "mask": mask, "pos": pos}
    p_R = jnp.asarray([0.7, 0.8, 0.9, 0.95][:R])
    rng = jax.random.key(4)
    rollout_logp = jnp.zeros((R, T))
    adv = jnp.asarray([1.0, -1.0, 0.5, -0.5][:R])
    ref = jnp.full((R, T), -5.0)
    return seq, p_R, rng, adv, ref, rollout_logp, L


TX = optax.adam(3e-3)
TEMPERATURE = 0.05


@functools.lru_cache(maxsize=None)
def _program(path: bool, grad_accum: int, with_old: bool):
    """One compiled learner update per (term on/off, micro-batches, old log-probs given); lambda_path
    is a traced argument, so lambda 0 and lambda 1 run the SAME program (tests share the compiles)."""
    graphdef, params = _model()
    seq, p_R, rng, adv, ref, rollout_logp, L = _learner_inputs(graphdef, params)
    static = dict(graphdef=graphdef, grids=dict(image_grid=None, video_grid=None), sparsity=SPARSITY, L=L,
                  temperature=1.0)

    def update(state, w, lam, old):
        path_kw = dict(lambda_path=lam, temperature=TEMPERATURE) if path else None
        return _update(state, seq, {}, p_R, rng, adv, old if with_old else None, ref, rollout_logp, w, tx=TX,
                       loss_kw=dict(beta=0.5, eps_low=0.2, eps_high=0.28), grad_accum=grad_accum,
                       aggregation="token", path_kw=path_kw, **static)

    old = _logprobs_only(params, seq, {}, p_R, rng, **static) if with_old else jnp.zeros(())
    return jax.jit(update), old


def _step(*, lam=None, path_w=None, grad_accum=1, mu=1):
    """`mu` optimizer steps on one rollout batch, as GRPOLearner.step runs them (old log-probs fixed
    at the rollout policy's when mu > 1); lam=None: the paper-literal learner (no term at all)."""
    _, params = _model()
    fn, old = _program(lam is not None, grad_accum, mu > 1)
    state = TrainState.create(params, TX)
    w = jnp.zeros((4,)) if path_w is None else path_w
    for _ in range(mu):
        state, metrics = fn(state, w, jnp.float32(0.0 if lam is None else lam), old)
    return state, metrics


W = jnp.asarray([1.0, 0.0, 1.0, 1.0])


def test_lambda_path_zero_is_bit_identical_to_the_paper_literal_learner():
    plain, m_plain = _step()
    zero, m_zero = _step(lam=0.0, path_w=W)
    assert float(m_zero["path_term"]) == 0.0 and float(m_zero["path_grad_norm"]) == 0.0
    for k in ("loss", "pg_loss", "kl", "grad_norm"):
        assert np.asarray(m_plain[k]).tobytes() == np.asarray(m_zero[k]).tobytes(), k
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(zero.params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # and the term does change the step when it is on
    on, m_on = _step(lam=1.0, path_w=W)
    assert float(m_on["path_term"]) > 0 and 0 < float(m_on["path_grad_share"]) <= 1.5
    np.testing.assert_allclose(float(m_on["loss"]), float(m_plain["loss"]) + float(m_on["path_term"]), rtol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(on.params)))


def test_path_term_adds_up_over_micro_batches():
    one, m1 = _step(lam=1.0, path_w=W)
    two, m2 = _step(lam=1.0, path_w=W, grad_accum=2)
    # Gradient norms, not Adam-updated parameters: Adam's first step is ~lr * sign(g), so a parameter
    # whose gradient is ~1e-9 moves by a different amount under any float reordering.
    for k in ("loss", "path_term", "soft_ratio", "path_grad_norm", "grpo_grad_norm", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, err_msg=k)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params))]
    assert max(moved) < 0.01 * 3e-3  # the two updates agree to 1% of one Adam step


def test_grad_accum_equals_the_whole_batch_step():
    _, m1 = _step()
    _, m2 = _step(grad_accum=2)
    _, m4 = _step(grad_accum=4)
    for k in ("loss", "pg_loss", "kl", "grad_norm", "logp_mismatch"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)


def _jaxpr_of_update(grad_accum: int, path: bool):
    graphdef, params = _model()
    seq, p_R, rng, adv, ref, rollout_logp, L = _learner_inputs(graphdef, params)
    path_kw = dict(lambda_path=1.0, temperature=TEMPERATURE) if path else None

    def update(state):
        return _update(state, seq, {}, p_R, rng, adv, None, ref, rollout_logp, W if path else None, tx=TX,
                       loss_kw=dict(beta=0.5, eps_low=0.2, eps_high=0.28), grad_accum=grad_accum,
                       aggregation="token", path_kw=path_kw, graphdef=graphdef,
                       grids=dict(image_grid=None, video_grid=None), sparsity=SPARSITY, L=L, temperature=1.0)

    return jax.make_jaxpr(update)(TrainState.create(params, TX)).jaxpr


@pytest.mark.parametrize("path", [False, True])
def test_grad_accum_is_a_scan_not_an_unrolled_loop(path):
    """An unrolled loop would trace the forward + backward grad_accum times (program size and
    compile time growing with it); the scan traces it once."""
    two, four = _jaxpr_of_update(2, path), _jaxpr_of_update(4, path)
    assert [e.primitive.name for e in two.eqns].count("scan") >= 1
    assert len(two.eqns) == len(four.eqns)
    body = lambda j: max((e.params["jaxpr"].jaxpr for e in j.eqns if e.primitive.name == "scan"),  # noqa: E731
                         key=lambda b: len(b.eqns))
    # One micro-step (model forward + backward) in the body; its size differs only by a few
    # shape-dependent ops between 2 and 1 rows per slice (an unrolled loop would double it).
    n2, n4 = len(body(two).eqns), len(body(four).eqns)
    assert n2 > 500 and abs(n2 - n4) < 0.05 * n2


def test_path_term_with_several_inner_steps():
    """mu = 2: the second inner step sees the policy moved away from the rollout's (rho != 1) and the
    term still lowers the relaxed ratio from step to step."""
    _, m1 = _step(lam=5.0, path_w=jnp.ones((4,)))
    _, m2 = _step(lam=5.0, path_w=jnp.ones((4,)), mu=2)
    assert float(m1["ratio_mean"]) == 1.0 and float(m2["ratio_mean"]) != 1.0
    assert float(m2["soft_ratio"]) < float(m1["soft_ratio"])
    assert all(np.isfinite(float(v)) for v in m2.values())


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "pallas_tpu", "tpu_custom_call"),
                                                     ("cuda", "pallas_triton", "__gpu$xla.gpu.triton")])
def test_pathwise_gradient_lowers_with_the_pallas_backends(platform, backend, marker):
    graphdef, params = _model()
    ids, mask, L = _batch(lengths=(40, 33), T=8)
    sparsity = SparsityConfig(backend=backend, selection=SELECTION, capacity_buckets=(1.0,))

    def loss(prm):
        model = nnx.merge(graphdef, prm)
        out = model.sparse_forward(ids, sparsity=sparsity, p_B=jnp.asarray([0.8, 0.9]), rng=jax.random.key(0),
                                   attention_mask_BL=mask, select_end=L, soft_temperature=0.02)
        return jnp.sum(out.logits[:, -1]) + jnp.sum(out.soft_ratio_B)

    text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
