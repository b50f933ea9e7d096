"""Divergence guard: decides, after every optimizer step and before that step may be saved,
whether the run is still sane. A step that fails is never written, so every checkpoint on disk
passed the guard and "the latest checkpoint" is always one worth resuming from.

Checks (per step, on the metrics the update functions return as floats):
  finite     loss, grad_norm, param_norm and update_norm are finite;
  update     update_norm / param_norm of the step is at most guard.max_update_ratio;
  spike      the loss is at most guard.loss_spike x max(mean |loss| of the phase's last
             guard.loss_window steps, guard.loss_floor), once half the window has been seen.
"""

from __future__ import annotations

import collections
import math

from zipr1_jax.train.config import GuardSection


class TrainingDivergedError(RuntimeError):
    """A step's loss, gradient or update left the sane range; that step was not saved."""


class DivergenceGuard:
    def __init__(self, section: GuardSection):
        self.cfg = section
        self._phase = None
        self._losses: collections.deque = collections.deque(maxlen=section.loss_window)

    def problem(self, metrics: dict, phase: str) -> str | None:
        """What is wrong with this step (None: nothing); records the loss of a good step."""
        if phase != self._phase:  # loss scales differ between SFT and RL
            self._phase = phase
            self._losses.clear()
        keys = ("loss", "grad_norm", "param_norm", "update_norm")
        bad = [k for k in keys if k in metrics and not math.isfinite(metrics[k])]
        if bad:
            return "non-finite " + ", ".join(f"{k} ({metrics[k]})" for k in bad)
        c = self.cfg
        if "update_norm" in metrics and "param_norm" in metrics:
            # param_norm is after the update; the norm before it is within update_norm of it.
            before = max(metrics["param_norm"] - metrics["update_norm"], 0.0)
            ratio = metrics["update_norm"] / max(before, 1e-30)
            if ratio > c.max_update_ratio:
                return (f"the update is {ratio:.3g}x the parameters' norm (update_norm {metrics['update_norm']:.4g}, "
                        f"param_norm {metrics['param_norm']:.4g}; guard.max_update_ratio {c.max_update_ratio:g})")
        loss = metrics.get("loss")
        if loss is not None and c.loss_spike > 0 and len(self._losses) >= max(c.loss_window // 2, 1):
            scale = max(sum(abs(x) for x in self._losses) / len(self._losses), c.loss_floor)
            if abs(loss) > c.loss_spike * scale:
                return (f"loss spike: {loss:.4g} vs a recent mean |loss| of {scale:.4g} "
                        f"(guard.loss_spike {c.loss_spike:g} over guard.loss_window {c.loss_window})")
        if loss is not None:
            self._losses.append(float(loss))
        return None


def divergence_message(problem: str, *, phase: str, step: int, latest: int | None, directory: str,
                       grad_clip: float) -> str:
    """The error text: what happened, what is on disk, and what to change."""
    where = "none" if latest is None else f"step {latest} in {directory}"
    fix = f"lower {phase}.lr"
    if not grad_clip:
        fix += f" or enable gradient clipping ({phase}.grad_clip=1.0)"
    resume = ("" if latest is None else
              f"; rerun with the new setting to resume from step {latest}, or from an older step with "
              "checkpoint.resume_step=N")
    return (f"{phase} step {step} diverged: {problem}. Training stopped without saving this step. "
            f"Latest good checkpoint: {where}. To continue, {fix}{resume}.")


__all__ = ["DivergenceGuard", "TrainingDivergedError", "divergence_message"]
