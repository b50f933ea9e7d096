"""ZipR1 training: SFT warm-up + multi-budget GRPO with sparse attention (see README).

    python scripts/train.py                                   # embedded default: tiny model, CPU
    python scripts/train.py --config configs/qwen2_5_vl_7b_tpu_v5e.yaml model.hf_dir=/ckpt/qwen
    python scripts/train.py rl.steps=5 log.out_dir=runs/try   # dotted overrides
"""

from __future__ import annotations

import sys

from zipr1_jax.train.cli import parse_args
from zipr1_jax.train.trainer import run, summary_line


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    summary = run(cfg)
    print(summary_line(summary))
    print(f"metrics: {summary['out_dir']}/metrics.jsonl, plots: {summary['out_dir']}/plots, "
          f"checkpoints: {summary['checkpoint_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
