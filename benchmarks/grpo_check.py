"""The same-objective check of benchmarks/grpo_step_vs_trl.py, run before timing: on one fixed batch
(random completions whose rewards vary within every group, a perturbed reference model) ours' loss,
advantages and gradient must match TRL's (computed by grpo_trl_side.py --trl-objective in the TRL
venv) within LOSS_RTOL / GRAD_RTOL.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
from grpo_ours_side import ours_objective
from grpo_shared import GRAD_RTOL, LOSS_RTOL, TRL_SCRIPT, worker_env


def perturbed_copy(hf, seed: int, scale: float = 0.05):
    """A copy of the HF model with every weight moved by `scale` x its mean magnitude (Gaussian): a
    reference policy that differs from the policy, so the KL term and its gradient are not zero."""
    import copy

    import torch

    ref = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return ref


def fixed_completions(cfg, args) -> np.ndarray:
    """[R, new] random text ids where row j of each group has about j / (G - 1) of its tokens even, so
    rewards (and advantages) vary within every group and the surrogate term has a gradient."""
    rng = np.random.default_rng(args.seed + 1)
    R, T = args.prompts * args.group, args.new
    ids = 2 * rng.integers(0, cfg.image_token_id // 2, size=(R, T))  # even ids < image_token_id
    n_even = np.round(np.arange(R) % args.group / (args.group - 1) * T).astype(int)
    odd = np.arange(T)[None] >= n_even[:, None]
    return np.where(odd & (ids + 1 < cfg.image_token_id), ids + 1, ids)


def compare_objectives(ours: dict, trl: dict) -> dict:
    """Loss, advantage and per-tensor gradient gaps of two `*_objective` results (grads keyed by hub
    layout); raises RuntimeError beyond LOSS_RTOL / GRAD_RTOL, naming the worst tensor."""
    if set(ours["grads"]) != set(trl["grads"]):
        raise RuntimeError(f"the two sides' gradients name different tensors: only ours "
                           f"{sorted(set(ours['grads']) - set(trl['grads']))[:5]}, only TRL's "
                           f"{sorted(set(trl['grads']) - set(ours['grads']))[:5]}")
    g_norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in trl["grads"].values()))
    d_norm, worst = 0.0, ("", 0.0)
    for k, g in trl["grads"].items():
        if ours["grads"][k].shape != g.shape:
            raise RuntimeError(f"gradient {k}: ours {ours['grads'][k].shape} vs TRL {g.shape}")
        d = float(np.sum(np.square(ours["grads"][k].astype(np.float64) - g)))
        d_norm += d
        rel = np.sqrt(d) / max(float(np.linalg.norm(g)), 1e-3 * g_norm, 1e-30)
        worst = max(worst, (k, rel), key=lambda x: x[1])
    res = dict(loss_ours=ours["loss"], loss_trl=trl["loss"],
               loss_rel=abs(ours["loss"] - trl["loss"]) / max(abs(trl["loss"]), 1e-12),
               adv_max_abs=float(np.max(np.abs(np.asarray(ours["advantages"]) - np.asarray(trl["advantages"])))),
               grad_norm=g_norm, grad_rel=np.sqrt(d_norm) / max(g_norm, 1e-30), worst_tensor=worst[0],
               worst_rel=float(worst[1]))
    if not np.any(np.abs(np.asarray(trl["advantages"])) > 0):
        raise RuntimeError("the check batch has all-zero advantages: it would not test the surrogate term")
    if not (res["loss_rel"] <= LOSS_RTOL and res["adv_max_abs"] <= 1e-5 and res["grad_rel"] <= GRAD_RTOL
            and res["worst_rel"] <= GRAD_RTOL):
        raise RuntimeError(f"ours and TRL optimise different objectives on the same batch: {res}")
    return res


def check_objective(python: str, spec: dict, cfg, hf, batch: dict, args, work: str) -> dict:
    """Before timing: both sides' loss and gradient on one fixed batch (random completions of
    `--new` text tokens, a perturbed reference model) must agree (`compare_objectives`)."""
    completions = fixed_completions(cfg, args)
    ref = perturbed_copy(hf, args.seed + 2)
    ref_dir = os.path.join(work, "ref_model")
    ref.save_pretrained(ref_dir)
    path, out = os.path.join(work, "objective.json"), os.path.join(work, "objective_trl.npz")
    with open(path, "w") as f:
        json.dump(dict(spec, threads=1, ref_dir=ref_dir, completions=completions.tolist(), out=out), f)
    proc = subprocess.run([python, TRL_SCRIPT, "--trl-objective", path], capture_output=True, text=True,
                          env=worker_env())
    if proc.returncode:
        raise RuntimeError(f"the TRL objective worker failed (code {proc.returncode}):\n{proc.stderr[-3000:]}")
    from zipr1_jax.models.qwen_vl.hf_params import canonical_hf_key

    z = np.load(out)
    trl = dict(loss=float(z["loss"]), advantages=z["advantages"],
               grads={canonical_hf_key(k[len("grad/"):]): z[k] for k in z.files if k.startswith("grad/")})
    if not np.array_equal(z["completion_ids"], completions):
        raise RuntimeError("TRL's completion ids differ from the fixed ones it was given")
    hf_ref = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = ours_objective(cfg, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, hf_ref, batch,
                          completions, args)
    return dict(compare_objectives(ours, trl), rows=int(completions.shape[0]))
