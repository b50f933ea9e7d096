"""Policy-gradient and SFT losses (docs/method.md section 3): pure jnp, jittable, float32 math.

Per response token t of rollout b (``mask_BT`` marks response tokens):

    rho     = exp(logp - old_logp)                                   pi_theta / pi_old
    obj     = min(rho * A_b, clip(rho, 1 - eps_low, 1 + eps_high) * A_b)
    kl      = exp(ref - logp) - (ref - logp) - 1                     k3 estimator of KL(pi_theta || pi_ref)
    loss    = -aggregate(obj - beta * kl, mask)

``eps_high > eps_low`` is "clip-higher" (DAPO): low-probability tokens may grow further before the
clip stops their gradient, which keeps exploration alive. The k3 estimator is unbiased, always >= 0,
and its gradient vanishes where the two policies agree.

Aggregation (static string):
  "token"   sum(x * m) / sum(m) over the whole batch: every token weighs the same (paper default).
  "seq"     mean over rollouts of each rollout's token mean (original GRPO; rows without tokens
            are excluded): long responses weigh as much as short ones.
  "drgrpo"  sum(x * m) / (B * T): a constant normaliser, no length bias (Dr. GRPO).

Masked positions are zeroed with ``jnp.where`` before any exp, so padding log-probs (which may be
garbage or -inf) never reach the loss or its gradient as NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zipr1_jax.typing import Array, Bool, Float, Int

AGGREGATIONS = ("token", "seq", "drgrpo")


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _check_same_shape(ref_name: str, ref_shape, **arrays) -> None:
    for name, x in arrays.items():
        if x is not None and tuple(jnp.shape(x)) != tuple(ref_shape):
            raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {tuple(ref_shape)} (the shape of "
                             f"{ref_name})")


def k3_kl(logp_BT: Float[Array, "B T"], ref_logp_BT: Float[Array, "B T"]) -> Float[Array, "B T"]:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d_BT = _f32(ref_logp_BT) - _f32(logp_BT)
    return jnp.exp(d_BT) - d_BT - 1.0


def clipped_surrogate(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"], adv_B: Float[Array, "B"],
                      eps_low: float, eps_high: float) -> tuple[Float[Array, "B T"], Bool[Array, "B T"]]:
    """PPO clipped objective per token, with asymmetric clip range [1 - eps_low, 1 + eps_high].

    Args:
      logp_BT: log pi_theta(token) (differentiated).
      old_logp_BT: log pi_old(token) of the rollout policy (treated as a constant).
      adv_B: one advantage per rollout, broadcast over its tokens (constant).
      eps_low, eps_high: clip range; the lower bound must stay positive.
    Returns:
      obj_BT: min(rho * A, clip(rho) * A) (to be MAXIMISED);
      clipped_BT: True where the clipped branch is strictly smaller, i.e. the clip is active and
        the token contributes no gradient.
    """
    _check_eps(eps_low, eps_high)
    _check_same_shape("logp_BT", jnp.shape(logp_BT), old_logp_BT=old_logp_BT)
    if jnp.ndim(adv_B) != 1 or jnp.shape(adv_B)[0] != jnp.shape(logp_BT)[0]:
        raise ValueError(f"adv_B must be [B] = [{jnp.shape(logp_BT)[0]}], got shape {tuple(jnp.shape(adv_B))}")
    old_BT = jax.lax.stop_gradient(_f32(old_logp_BT))
    adv_B1 = jax.lax.stop_gradient(_f32(adv_B))[:, None]
    rho_BT = jnp.exp(_f32(logp_BT) - old_BT)
    unclipped_BT = rho_BT * adv_B1
    clipped_obj_BT = jnp.clip(rho_BT, 1.0 - eps_low, 1.0 + eps_high) * adv_B1
    return jnp.minimum(unclipped_BT, clipped_obj_BT), clipped_obj_BT < unclipped_BT


def _check_eps(eps_low, eps_high) -> None:
    # Traced values (eps passed as jit arguments) cannot be checked on the host.
    if isinstance(eps_low, (int, float)) and not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1) so the lower clip bound 1 - eps_low stays positive, "
                         f"got {eps_low!r}")
    if isinstance(eps_high, (int, float)) and not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high!r}")


def aggregate(x_BT: Float[Array, "B T"], mask_BT: Bool[Array, "B T"], kind: str) -> Float[Array, ""]:
    """Reduce per-token values to a scalar; ``kind`` in AGGREGATIONS (see the module docstring).

    An all-False mask gives 0 (never 0/0).
    """
    _check_same_shape("x_BT", jnp.shape(x_BT), mask_BT=mask_BT)
    if jnp.ndim(x_BT) != 2:
        raise ValueError(f"x_BT must be 2-D [B, T], got shape {tuple(jnp.shape(x_BT))}")
    m_BT = jnp.asarray(mask_BT).astype(bool)
    xm_BT = jnp.where(m_BT, _f32(x_BT), 0.0)
    if kind == "token":
        return xm_BT.sum() / jnp.maximum(m_BT.sum(), 1).astype(jnp.float32)
    if kind == "seq":
        n_B = m_BT.sum(axis=1)
        row_mean_B = xm_BT.sum(axis=1) / jnp.maximum(n_B, 1).astype(jnp.float32)
        has_B = n_B > 0
        return jnp.where(has_B, row_mean_B, 0.0).sum() / jnp.maximum(has_B.sum(), 1).astype(jnp.float32)
    if kind == "drgrpo":
        return xm_BT.sum() / float(max(x_BT.shape[0] * x_BT.shape[1], 1))
    raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {kind!r}")


def grpo_loss(logp_BT: Float[Array, "B T"], old_logp_BT: Float[Array, "B T"],
              ref_logp_BT: Float[Array, "B T"] | None, adv_B: Float[Array, "B"], mask_BT: Bool[Array, "B T"], *,
              beta: float, eps_low: float, eps_high: float, aggregation: str = "token"
              ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """ZipR1 GRPO loss: -aggregate(clipped surrogate - beta * k3 KL).

    Args:
      logp_BT: log-probs of the response tokens under the current policy (sparse, same p as rollout).
      old_logp_BT: the same under the rollout policy (constant; equals logp_BT when mu = 1).
      ref_logp_BT: under the frozen DENSE reference, or None to skip the KL term.
      adv_B: advantages, one per rollout.
      mask_BT: True on response tokens (stop token included), False on padding.
      beta: KL coefficient (a Python 0 skips the KL term like ``ref_logp_BT=None``).
      eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high].
      aggregation: "token" | "seq" | "drgrpo" (static).
    Returns:
      (loss, metrics) where metrics are scalars: "pg_loss" (-aggregate(obj)), "kl" (aggregate of
      k3, 0 without the KL term), "clip_frac" (fraction of masked tokens with the clip active) and
      "ratio_mean" (mean rho over masked tokens). loss = pg_loss + beta * kl.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    if jnp.ndim(logp_BT) != 2:
        raise ValueError(f"logp_BT must be 2-D [B, T], got shape {tuple(jnp.shape(logp_BT))}")
    _check_same_shape("logp_BT", jnp.shape(logp_BT), old_logp_BT=old_logp_BT, ref_logp_BT=ref_logp_BT,
                      mask_BT=mask_BT)
    m_BT = jnp.asarray(mask_BT).astype(bool)
    # Zero the padding first: exp of garbage there would give inf, and inf * 0 = NaN in the grads.
    logp_BT = jnp.where(m_BT, _f32(logp_BT), 0.0)
    old_BT = jnp.where(m_BT, _f32(old_logp_BT), 0.0)

    obj_BT, clipped_BT = clipped_surrogate(logp_BT, old_BT, adv_B, eps_low, eps_high)
    pg_loss = -aggregate(obj_BT, m_BT, aggregation)
    use_kl = ref_logp_BT is not None and not (isinstance(beta, (int, float)) and beta == 0)
    if use_kl:
        ref_BT = jax.lax.stop_gradient(jnp.where(m_BT, _f32(ref_logp_BT), 0.0))
        kl = aggregate(k3_kl(logp_BT, ref_BT), m_BT, aggregation)
        loss = pg_loss + beta * kl
    else:
        kl = jnp.zeros((), jnp.float32)
        loss = pg_loss

    n_tokens = jnp.maximum(m_BT.sum(), 1).astype(jnp.float32)
    rho_BT = jnp.exp(jax.lax.stop_gradient(logp_BT) - jax.lax.stop_gradient(old_BT))
    metrics = {
        "pg_loss": jax.lax.stop_gradient(pg_loss),
        "kl": jax.lax.stop_gradient(kl),
        "clip_frac": (clipped_BT & m_BT).sum().astype(jnp.float32) / n_tokens,
        "ratio_mean": jnp.where(m_BT, rho_BT, 0.0).sum() / n_tokens,
    }
    return loss, metrics


def pathwise_efficiency_loss(soft_ratio_B: Float[Array, "B"], weight_B: Float[Array, "B"], lambda_path: float, *,
                             num_rows: int | None = None) -> Float[Array, ""]:
    """lambda_path * sum_b(w_b * tau_soft_b) / num_rows: the pathwise efficiency term (docs/method.md 3b).

    The efficiency reward 1 - tau depends on the parameters directly, through the token ratio the
    selection produces; its policy-gradient (REINFORCE) part vanishes because tau is fixed before the
    response is sampled. This term is the missing derivative of that direct dependence, through the
    relaxed ratio `soft_token_ratio` (differentiated) times a constant per-row weight w.
    `num_rows` (default B) is the row count of the whole batch, so micro-batch terms add up to it.
    """
    tau_B = _f32(soft_ratio_B)
    _check_same_shape("soft_ratio_B", tau_B.shape, weight_B=weight_B)
    if tau_B.ndim != 1:
        raise ValueError(f"soft_ratio_B must be 1-D [B], got shape {tau_B.shape}")
    n = tau_B.shape[0] if num_rows is None else num_rows
    w_B = jax.lax.stop_gradient(_f32(weight_B))
    return jnp.float32(lambda_path) * jnp.sum(w_B * tau_B) / jnp.float32(max(n, 1))


def token_logprobs_from_logits(logits_BTV: Float[Array, "*B V"], tokens_BT: Int[Array, "*B"], *,
                               temperature: float = 1.0) -> Float[Array, "*B"]:
    """log softmax(logits / temperature)[token], in float32, for any leading dims: the learner's
    [B, T, V] sequences and the sampler's [B, V] steps use this one function.

    Computed as ``logit[token] - logsumexp(logits)`` so the [B, T, V] log-softmax is never
    materialised. ``temperature`` must match the rollout's (its log-probs are of the
    temperature-scaled distribution; greedy rollouts use 1).
    """
    if jnp.shape(logits_BTV)[:-1] != jnp.shape(tokens_BT):
        raise ValueError(f"logits_BTV {tuple(jnp.shape(logits_BTV))} and tokens_BT {tuple(jnp.shape(tokens_BT))} "
                         "must agree on the leading dimensions")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits_BTV = _f32(logits_BTV)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
        logits_BTV = logits_BTV / temperature
    picked_BT = jnp.take_along_axis(logits_BTV, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def sft_loss(logits_BLV: Float[Array, "B L V"], ids_BL: Int[Array, "B L"], loss_mask_BL: Bool[Array, "B L"]
             ) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Next-token cross entropy: position t - 1 predicts token t; the mean over target tokens.

    Args:
      logits_BLV: model logits for the whole sequence.
      ids_BL: the sequence's token ids.
      loss_mask_BL: True on TARGET tokens (e.g. the answer); column 0 can never be a target.
    Returns:
      (loss float32, n_tokens int32): mean CE over the targets (0 when there are none) and their count.
    """
    if jnp.shape(logits_BLV)[:-1] != jnp.shape(ids_BL) or jnp.shape(loss_mask_BL) != jnp.shape(ids_BL):
        raise ValueError(f"logits_BLV {tuple(jnp.shape(logits_BLV))}, ids_BL {tuple(jnp.shape(ids_BL))} and "
                         f"loss_mask_BL {tuple(jnp.shape(loss_mask_BL))} must share [B, L]")
    logp_BT = token_logprobs_from_logits(logits_BLV[:, :-1], ids_BL[:, 1:])
    m_BT = jnp.asarray(loss_mask_BL[:, 1:]).astype(bool)
    n_tokens = m_BT.sum().astype(jnp.int32)
    loss = -jnp.where(m_BT, logp_BT, 0.0).sum() / jnp.maximum(n_tokens, 1).astype(jnp.float32)
    return loss, n_tokens
