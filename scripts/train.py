"""ZipR1 training: SFT warm-up + multi-budget GRPO with sparse attention (see README).

    python scripts/train.py                                   # embedded default: tiny model, CPU
    python scripts/train.py --config configs/qwen2_5_vl_7b_tpu_v5e.yaml model.hf_dir=/ckpt/qwen
    python scripts/train.py rl.steps=5 log.out_dir=runs/try   # dotted overrides

Several processes (README "Multi-host"): TPU pods, Slurm and Open MPI need nothing more; elsewhere
every process gets `--coordinator-address HOST:PORT --num-processes N --process-id I` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
"""

from __future__ import annotations

import sys

from zipr1_jax.sharding.launch import initialize, parse_flags


def main(argv: list[str] | None = None) -> int:
    dist, argv = parse_flags(sys.argv[1:] if argv is None else argv)
    initialize(dist)  # before anything starts a JAX backend

    import jax

    from zipr1_jax.checkpoint import CheckpointError
    from zipr1_jax.data.sources import DataSourceError
    from zipr1_jax.train.cli import parse_args
    from zipr1_jax.train.trainer import TrainConfigError, TrainingDivergedError, run, summary_line

    try:
        summary = run(parse_args(argv))
    except (TrainConfigError, CheckpointError, DataSourceError, TrainingDivergedError) as e:
        # The message says what is wrong and what to do; a traceback would only bury it.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, (TrainConfigError, DataSourceError)) else 1
    if jax.process_index() == 0:
        print(summary_line(summary))
        print(f"metrics: {summary['out_dir']}/metrics.jsonl, plots: {summary['out_dir']}/plots, "
              f"checkpoints: {summary['checkpoint_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
