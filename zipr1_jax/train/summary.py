"""The run's summary: `summary.json` and the final before -> after line it prints."""

from __future__ import annotations

import json


def summary_line(summary: dict) -> str:
    """The run's last line: the final evaluation, and how RL changed it versus the model before RL.

    e.g. "final eval (step 280) vs before RL (step 200), n=256: dense: accuracy 1.000 -> 1.000; p=0.975:
    accuracy 1.000 -> 1.000, token ratio 0.974 -> 0.723 (0.74x)".
    """
    ev = summary.get("final_eval") or {}
    if not ev:
        return "final eval: none"
    before = summary.get("before_rl_eval")
    if not before:
        return f"final eval (step {summary.get('global_step')}): " + ", ".join(
            f"{k} {v:.3f}" for k, v in ev.items() if k != "eval_examples")
    parts = []
    for tag in [k[len("accuracy_"):] for k in ev if k.startswith("accuracy_")]:
        a0, a1 = before.get(f"accuracy_{tag}"), ev[f"accuracy_{tag}"]
        text = f"{'p=' + tag[1:] if tag.startswith('p') else tag}: accuracy {_arrow(a0, a1)}"
        r0, r1 = before.get(f"token_ratio_{tag}"), ev.get(f"token_ratio_{tag}")
        if tag != "dense" and r1 is not None:
            text += f", token ratio {_arrow(r0, r1)}"
            if r0:
                text += f" ({r1 / r0:.2f}x)"
        parts.append(text)
    n = ev.get("eval_examples")
    return (f"final eval (step {summary.get('global_step')}) vs before RL (step {before.get('step')})"
            + ("" if n is None else f", n={int(n)}") + ": " + "; ".join(parts))


def _arrow(a, b) -> str:
    return f"{b:.3f}" if a is None else f"{a:.3f} -> {b:.3f}"


def write_summary(path: str, summary: dict) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
