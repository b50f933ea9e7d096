"""Evaluate checkpoints x evaluation sets x attention settings: the paper's accuracy / token-ratio table.

    python scripts/evaluate.py runs/tiny                                  # a training run (latest step)
    python scripts/evaluate.py before=runs/tiny/checkpoints/reference after=runs/tiny \\
        --settings dense topp:0.9 topp:0.95 topp:0.975 topk:0.25 threshold:0.01 fastv:2:0.5
    python scripts/evaluate.py /ckpt/Qwen2.5-VL-7B --sets jsonl:/data/vqa.jsonl --limit 500

Writes <out-dir>/results.{md,csv,json} and, unless --no-pictures, <out-dir>/pictures/:
accuracy_vs_token_ratio.png (every model on one plot), layer_ratios_<set>.png and a kept-token
heatmap per model (first examples of the first set). Defaults come from the first checkpoint's
training config when it has one (its eval set, p_list, max_new_tokens); else builtin:all:64,
dense + topp:0.975.
"""

from __future__ import annotations

import argparse
import os
import sys

from zipr1_jax.eval.methods import SETTINGS_HELP, SettingError, check_settings, parse_settings


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", metavar="[LABEL=]PATH",
                    help="HF directory, Orbax checkpoint dir, training run dir or params-only checkpoint")
    ap.add_argument("--step", type=int, default=None, help="Orbax step (default: latest)")
    ap.add_argument("--sets", nargs="+", default=None, help="builtin[:TASKS[:N]] | jsonl:PATH | hf_disk:PATH | "
                    "tfds:NAME[:SPLIT]")
    ap.add_argument("--settings", nargs="+", default=None, help=SETTINGS_HELP)
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--length-buckets", type=int, nargs="+", default=None)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory or 'builtin' (default: the checkpoint's)")
    ap.add_argument("--probes", choices=("zipcache", "all"), default=None, help="override the selection probes")
    ap.add_argument("--backend", default=None, help="sparse attention backend (xla, pallas_tpu, pallas_triton)")
    ap.add_argument("--capacity-buckets", type=float, nargs="+", default=None,
                    help="compact kept-key buckets as fractions of the prompt, ending with 1.0")
    ap.add_argument("--out-dir", default="eval_out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-prefill-timing", action="store_true", help="skip the separate prefill timing")
    ap.add_argument("--no-pictures", action="store_true")
    ap.add_argument("--heatmap-layer", type=int, default=None, help="decoder layer of the heatmap (default: last)")
    ap.add_argument("--heatmap-setting", default=None, help="setting of the heatmap (default: first sparse one)")
    ap.add_argument("--heatmap-examples", type=int, default=1)
    ap.add_argument("--responses", action="store_true", help="store decoded responses in results.json")
    ap.add_argument("--progress", choices=("tqdm", "line", "none"), default="tqdm")
    args = ap.parse_args(argv)
    for name in ("batch_size", "heatmap_examples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        parse_settings(args.settings or ["dense"])
    except ValueError as e:
        ap.error(str(e))
    return args


def _labelled(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if sep and label and not os.path.exists(spec):
        return label, path
    return os.path.basename(os.path.normpath(spec)) or spec, spec


def _sparsity(loaded, args):
    import dataclasses  # noqa: PLC0415

    sp = loaded.sparsity()
    if args.probes is not None:
        sp = dataclasses.replace(sp, selection=dataclasses.replace(
            sp.selection, probes="all" if args.probes == "all" else "sampled"))
    if args.backend is not None:
        sp = dataclasses.replace(sp, backend=args.backend)
    if args.capacity_buckets is not None:
        sp = dataclasses.replace(sp, capacity_buckets=tuple(args.capacity_buckets))
    return sp


def _heatmaps(label, loaded, eval_set, settings, args, sparsity) -> dict:
    import numpy as np  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from zipr1_jax.data.sources import load_image  # noqa: PLC0415
    from zipr1_jax.eval.harness import image_keep_grid, kept_masks  # noqa: PLC0415

    sparse = [s for s in settings if s.kind != "dense"]
    setting = parse_settings([args.heatmap_setting])[0] if args.heatmap_setting else (sparse or settings)[0]
    n_layers = loaded.config.text.num_hidden_layers
    layer = n_layers - 1 if args.heatmap_layer is None else args.heatmap_layer
    if not 0 <= layer < n_layers:
        raise SystemExit(f"--heatmap-layer {layer} is outside the model's {n_layers} decoder layers")
    batch = next(iter(eval_set.loader))
    keep_YBL, _ = kept_masks(loaded.model, batch, setting, sparsity=sparsity, seed=args.seed)
    counts = np.asarray(batch.get("image_counts", np.zeros(len(batch["input_ids"]), np.int32)))
    grids = np.asarray(batch.get("image_grid_thw", np.zeros((0, 3)))).reshape(-1, 3)
    out = {}
    for row in range(min(args.heatmap_examples, int(np.sum(batch["valid"])))):
        if counts[row] == 0:
            continue
        first = int(counts[:row].sum())
        grid = image_keep_grid(keep_YBL[layer, row], batch["input_ids"][row], grids[first:first + counts[row]],
                               image_token_id=loaded.config.image_token_id,
                               merge_size=loaded.config.vision.spatial_merge_size)
        image = load_image(eval_set.source[row]["images"][0])
        if eval_set.image_size is not None:  # as the pipeline resized it
            h, w = eval_set.image_size
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
        out[f"{label}_{setting.key}_layer{layer}_ex{row}"] = (image, grid, layer)
    return out


def _check_models(models, settings, args) -> None:
    """Every setting (and the heatmap's) against every model before any evaluation work starts: a
    setting a model cannot run (FastV's K beyond its layers) must not surface after others ran."""
    extra = [] if args.no_pictures or not args.heatmap_setting else parse_settings([args.heatmap_setting])
    for label, loaded in models:
        try:
            for group in (settings, extra):
                if group:
                    check_settings(group, loaded.config, model_name=label)
        except SettingError as e:
            raise SystemExit(f"evaluate.py: {e}") from None
        n_layers = loaded.config.text.num_hidden_layers
        if not args.no_pictures and args.heatmap_layer is not None and not 0 <= args.heatmap_layer < n_layers:
            raise SystemExit(f"--heatmap-layer {args.heatmap_layer} is outside model {label!r}'s {n_layers} "
                             "decoder layers")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from zipr1_jax.eval.harness import HarnessConfig, evaluate, write_tables  # noqa: PLC0415
    from zipr1_jax.eval.loading import eval_set, load_model, load_tokenizer_for, run_eval_set  # noqa: PLC0415

    models = [(label, load_model(path, step=args.step)) for label, path in map(_labelled, args.checkpoints)]
    first = models[0][1]
    tc = first.train_config
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer = load_tokenizer_for(first, args.tokenizer, workdir=args.out_dir)
    if args.settings is None:
        p_list = tc.eval.p_list if tc is not None else (1.0, 0.975)
        args.settings = ["dense"] + [f"topp:{p:g}" for p in p_list if p < 1.0]
    settings = parse_settings(args.settings)
    _check_models(models, settings, args)
    image_size = tuple(args.image_size or (tc.data.image_size if tc is not None else (56, 56)))
    buckets = tuple(args.length_buckets or (tc.data.length_buckets if tc is not None else (128, 256, 512)))
    common = dict(batch_size=args.batch_size, length_buckets=buckets, image_size=image_size, limit=args.limit,
                  system_prompt=tc.data.system_prompt if tc is not None else "default")
    if args.sets is not None:
        sets = [eval_set(spec, tokenizer, first.config, **common) for spec in args.sets]
    elif tc is not None:  # the trainer's own eval split / its first eval.num_examples records
        sets = [run_eval_set(tc, tokenizer, first.config, batch_size=args.batch_size, limit=args.limit,
                             image_size=image_size, length_buckets=buckets)]
    else:
        sets = [eval_set("builtin:all:64", tokenizer, first.config, **common)]
    eos = (int(tokenizer.convert_tokens_to_ids("<|im_end|>")), int(tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[1]
    max_new = args.max_new_tokens or (tc.rl.max_new_tokens if tc is not None else 32)
    config = HarnessConfig(max_new_tokens=max_new, eos_ids=eos, pad_id=int(pad), seed=args.seed,
                           measure_prefill=not args.no_prefill_timing, progress=args.progress)
    results, heatmaps = [], {}
    for label, loaded in models:
        sparsity = _sparsity(loaded, args)
        results += evaluate(loaded.model, {s.name: s.loader for s in sets}, tokenizer, settings, config=config,
                            sparsity=sparsity, model_name=label)
        if not args.no_pictures:
            heatmaps.update(_heatmaps(label, loaded, sets[0], settings, args, sparsity))
    meta = {"checkpoints": [{"label": lb, "path": m.path, "kind": m.kind, "step": m.step} for lb, m in models],
            "sets": [s.name for s in sets], "settings": [s.label for s in settings], "max_new_tokens": max_new,
            "batch_size": args.batch_size, "seed": args.seed}
    paths = write_tables(results, args.out_dir, responses=args.responses, meta=meta)
    if not args.no_pictures:
        from zipr1_jax.eval.pictures import plot_all  # noqa: PLC0415

        paths["pictures"] = plot_all(results, os.path.join(args.out_dir, "pictures"), heatmaps=heatmaps)
    with open(paths["md"], encoding="utf-8") as f:
        print(f.read())
    print(f"tables: {paths['md']}, {paths['csv']}, {paths['json']}")
    return {"results": results, "paths": paths}


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
