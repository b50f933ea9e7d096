"""Hugging Face Qwen2-VL / Qwen2.5-VL directory -> Orbax checkpoint (step 0) for the trainer / export.

    python scripts/convert_hf_to_orbax.py /models/Qwen2.5-VL-7B-Instruct ckpt/qwen25vl7b
    python scripts/convert_hf_to_orbax.py HF_DIR OUT --dtype float32 --mesh 1,-1,1 --overwrite
    python scripts/convert_hf_to_orbax.py HF_DIR OUT --with-optimizer rl.grad_clip=1.0   # full train state

With --with-optimizer the fresh optimizer state matches what `scripts/train.py` with the same
dotted overrides (or --config YAML) restores, so `scripts/train.py model.hf_dir=HF_DIR
checkpoint.dir=OUT ...` starts from this checkpoint. See zipr1_jax/convert/hf_to_orbax.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf_dir", help="local HF model directory (config.json + *.safetensors)")
    ap.add_argument("out_dir", help="Orbax checkpoint directory to create")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="stored parameter dtype (default bfloat16)")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest); default FSDP")
    ap.add_argument("--with-optimizer", action="store_true", help="also save a fresh optimizer state")
    ap.add_argument("--config", default=None, help="training YAML whose RL optimizer to mirror")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    ap.add_argument("overrides", nargs="*", help="dotted training-config overrides (with --with-optimizer)")
    args = ap.parse_args(argv)
    try:
        args.mesh = [int(x) for x in args.mesh.split(",")]
        assert len(args.mesh) == 3
    except (ValueError, AssertionError):
        ap.error(f"--mesh must be three comma-separated ints data,fsdp,tensor, got {args.mesh!r}")
    if (args.overrides or args.config) and not args.with_optimizer:
        ap.error("training-config overrides / --config only matter with --with-optimizer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from zipr1_jax.convert import convert_hf_to_orbax
    from zipr1_jax.convert.hf_to_orbax import rl_optimizer_config
    from zipr1_jax.sharding.mesh import make_mesh
    from zipr1_jax.train.cli import load_config

    optimizer = rl_optimizer_config(load_config(args.config, args.overrides)) if args.with_optimizer else None
    data, fsdp, tensor = args.mesh
    result = convert_hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, optimizer=optimizer,
                                 mesh=make_mesh(data=data, fsdp=fsdp, tensor=tensor), overwrite=args.overwrite)
    print(f"wrote {result.out_dir} (step {result.step}, {result.num_params:,} parameters, {args.dtype}"
          f"{', with optimizer state' if result.with_optimizer else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
