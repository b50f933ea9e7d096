"""Per-device memory (params, optimizer, reference, rollout KV cache) of Qwen2.5-VL-7B with the
shipped configs on TPU v4-32, TPU v5e-64 and 8xH100: shapes from `jax.eval_shape`, shardings from
the trainer's rules on an abstract mesh (no accelerator, no weights). Prints the README table.

    python scripts/memory_table.py            # markdown
    python scripts/memory_table.py --json     # machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from zipr1_jax.train.memory import GIB, default_estimates, markdown_table

    estimates = default_estimates()
    if args.json:
        print(json.dumps([{"target": e.target.name, "devices": e.target.num_devices, "config": e.config,
                           "mesh": e.mesh, "model": e.model, "num_params": e.num_params, "params": e.params,
                           "opt_state": e.opt_state, "reference": e.reference, "kv_cache": e.kv_cache,
                           "update_logits": e.logits, "update_logits_all_positions": e.logits_all,
                           "total": e.total, "hbm_bytes": int(e.target.hbm_gib * GIB)} for e in estimates], indent=2))
    else:
        e = estimates[0]
        print(f"{e.model}: {e.num_params / 1e9:.2f} B parameters. GiB per device:\n")
        print(markdown_table(estimates))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
