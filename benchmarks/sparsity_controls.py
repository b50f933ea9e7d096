"""Does RL lower the token ratio? The pathwise term against its controls, from one SFT checkpoint.

Runs `zipr1_jax.eval.controls.run_controls` on a training config (default: the embedded default
run): one SFT, then for each seed the three arms (no efficiency reward / the paper-literal reward /
the paper's reward plus the pathwise efficiency term) with the same data order, then a greedy
evaluation of all of them on the held-out split over a p grid. Prints the table; writes
controls.md / controls.json / curve.png / layers.png under --out.

    python benchmarks/sparsity_controls.py [--config configs/X.yaml] [overrides ...] \\
        [--seeds 0 1] [--eval-examples 512] [--out runs/controls] [--write-md]

`--write-md` replaces the "Token-ratio controls" section of BENCHMARKS.md (with the command).
`main(argv) -> dict` is importable (tests/benchmarks/test_controls_bench.py runs it tiny).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _markdown import replace_section  # noqa: E402

HEADING = "## Token-ratio controls"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML training config (default: the embedded default run)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--p-grid", type=float, nargs="+", default=None)
    ap.add_argument("--out", default="runs/controls")
    ap.add_argument("--write-md", action="store_true", help="update the section of BENCHMARKS.md in place")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from --out/controls.json")
    args = ap.parse_args(argv)

    from zipr1_jax.eval.controls import DEFAULT_P_GRID, run_controls, write_report  # noqa: PLC0415
    from zipr1_jax.train.cli import load_config  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    if args.report_only:
        report = write_report(cfg, out_dir=args.out, seeds=tuple(args.seeds))
    else:
        report = run_controls(cfg, out_dir=args.out, seeds=tuple(args.seeds), eval_examples=args.eval_examples,
                              eval_batch=args.eval_batch, p_grid=tuple(args.p_grid or DEFAULT_P_GRID))
    print(report["markdown"])
    if args.write_md:
        cmd = "python benchmarks/sparsity_controls.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        body = (f"{HEADING}\n\nCommand: `{cmd.strip()}` (curve: `{report['curve_png']}`).\n\n"
                + report["markdown"])
        replace_section(HEADING, body)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
