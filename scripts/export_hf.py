"""Orbax checkpoint (trainer or converted) -> Hugging Face directory for transformers / vLLM.

    python scripts/export_hf.py runs/default/checkpoints export/default --source-hf-dir runs/default/tokenizer
    python scripts/export_hf.py CKPT_DIR OUT --step 40 --dtype bfloat16 --max-shard-size 2GB --overwrite

See zipr1_jax/convert/orbax_to_hf.py for what is written and where the architecture comes from.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint_dir", help="Checkpointer directory (<run>/checkpoints or a converted one)")
    ap.add_argument("out_dir", help="HF directory to create")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--source-hf-dir", default=None,
                    help="copy tokenizer / processor / chat template / generation config files from here")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                    help="cast the tensors (default: as stored)")
    ap.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB, 500MB (default 5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from zipr1_jax.convert import export_hf

    result = export_hf(args.checkpoint_dir, args.out_dir, step=args.step, source_hf_dir=args.source_hf_dir,
                       dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"exported step {result.step} -> {result.out_dir}: {result.num_tensors} tensors, "
          f"{result.total_bytes / 1e6:.1f} MB in {len(result.files)} shard(s); copied {list(result.copied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
