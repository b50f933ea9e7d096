"""The report of benchmarks/grpo_step_vs_trl.py: the markdown table, the machine / check / reading
notes and `write_section`, which replaces its section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import time

from _markdown import replace_section
from grpo_easydel_side import NOTES as EASYDEL_NOTES
from grpo_shared import GRAD_RTOL, LOSS_RTOL, PHASES

SECTION = "## One GRPO step vs TRL GRPOTrainer"


def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


# The ratio columns of our rows: key in the row -> header (a column appears when some row has it).
RATIOS = {"ratio": "ours / best TRL time: median (min - max over rounds)",
          "ratio_easydel": "ours / EasyDeL time: median (min - max over rounds)"}


def _ratio(r: dict, key: str) -> str:
    if not r["side"].startswith("zipr1_jax"):  # a peer's own row
        return "-"
    if key not in r:  # no such peer in this run
        return "n/a"
    spread = f" ({r[key + '_min']:.2f} - {r[key + '_max']:.2f})" if key + "_min" in r else ""
    return f"{r[key]:.2f}{spread}"


def table(rows: list[dict]) -> str:
    keys = [k for k in RATIOS if any(k in r for r in rows)] or ["ratio"]
    lines = ["| side | threads | first step s | s / step (median) | min - max s | "
             + "".join(f"{RATIOS[k]} | " for k in keys)
             + "rollout s | reference s | update s | other s | loss | reward | kl | completion len | token ratio |",
             "|" + "---|" * (14 + len(keys))]
    for r in rows:
        ph = " | ".join(_f(r["phases"][k], ".3f") for k in PHASES)
        ratios = "".join(f"{_ratio(r, k)} | " for k in keys)
        lines.append(f"| {r['side']} | {r['threads']} | {r['first_s']:.2f} | {r['steady_s']:.3f} | "
                     f"{r['min_s']:.3f} - {r['max_s']:.3f} | {ratios}{ph} | "
                     f"{_f(r['loss'], '.4f')} | {_f(r['reward'], '.3f')} | {_f(r['kl'], '.2e')} | "
                     f"{_f(r['length'], '.0f')} | {_f(r['token_ratio'], '.2f')} |")
    return "\n".join(lines)


def machine_note(load_before: str, load_after: str) -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs: "
            f"load average (1/5/15 min) {load_before} before, {load_after} after; float32 on both sides")


NOTE = ("Reading: CPU timings of a TINY model (one step here is ~65 GFLOP: sampling, a reference forward and a "
        "policy forward + backward over B*G rows of prompt + completion), so they mix per-op overhead and matmul "
        "speed. Phases (medians; a phase of ours is a jitted call waited for; TRL's come from its own profiling "
        "blocks): rollout = sampling (ours: a compiled prefill and a compiled `lax.while_loop` decode; TRL: "
        "`model.generate`, a Python loop with one eager forward per token); reference = the frozen model's "
        "log-probs; update = policy forward, loss, backward, clipping and AdamW (ours: one XLA program; TRL: eager "
        "torch on oneDNN/MKL kernels); other = host work (decode, rewards, advantages, transfers / TRL's "
        "tokenising and bookkeeping). The compiled rollout is where ours gains; the update is matmul-bound at "
        "this size and ours' XLA CPU backward is slower than torch's eager one (compare the update columns), "
        "which takes most of that gain back: the weight-gradient transposes of N-d dots are gone (the model's "
        "projections are 2-D token dots, `TokenLinear`: the update core 0.84x the time, see 'Update step: dot "
        "layout and FLOP roofline'), and what is left is the attention's head / group transposes and the "
        "elementwise backward. First step: ours includes the jit compiles (the sparse step compiles the "
        "selection too). Do not read the ratio as an accelerator or real-size number (there TRL would sample "
        "with vLLM). The sparse row is the ZipR1 step (sparse prefill in the rollout, the same kept sets in the "
        "learner's forward, handed over from the rollout; its KL is against the dense reference): at 64-token "
        "prompts the selection costs about what it saves. On a shared 2-core machine torch with 2 threads can "
        "be far slower than with 1 (OpenMP waits on threads whose core another process took); the ratio uses "
        "the faster TRL column, and "
        "the interleaved rounds keep load changes from favouring one side.\n")


VLM_NOTE = ("\nVLM case: see 'One GRPO step vs TRL GRPOTrainer, with images' (`--image`).\n")
IMAGE_NOTE = ("\nImages: TRL's GRPOTrainer takes them only with conversational prompts and an `image` column, "
              "rendered by a processor's chat template; `grpo_shared.vlm_processor` builds one offline (the word "
              "tokenizer with Qwen2-VL's vision markers at the tiny model's ids, transformers' Qwen2-VL image "
              "processor - its PIL backend, since the TRL venv has no torchvision - and a template that renders a "
              "user turn as its image block then its text). Ours gets the same processor's ids and pixel rows, so "
              "both sides see identical inputs; the same-objective check runs on them (its gradient includes the "
              "vision tower). One difference in the sampler: TRL's generate suppresses the image pad token "
              "(`suppress_tokens`, a logits processor per step); ours does not (its id is never sampled here in "
              "practice, the reward ignores it).\n")
SECTION_IMAGE = SECTION + ", with images"


def check_note(check: dict | None) -> str:
    if not check:
        return "Same-objective check: not run (`--no-check` or no TRL)."
    return (f"Same-objective check (before timing, one fixed batch: {check['rows']} random completions whose "
            "rewards vary within every group, and a reference model perturbed by 5% so the KL term is not zero; "
            "TRL's own reward / advantage / reference / loss code with only the sampler replaced, vs ours' "
            f"learner pieces and `_micro_step`): loss ours {check['loss_ours']:.6g} vs TRL {check['loss_trl']:.6g} "
            f"(relative gap {check['loss_rel']:.1e}), advantages max gap {check['adv_max_abs']:.1e}, gradient "
            f"(global norm {check['grad_norm']:.3g}) relative gap {check['grad_rel']:.1e} overall and "
            f"{check['worst_rel']:.1e} on the worst tensor ({check['worst_tensor']}); the run fails above "
            f"{LOSS_RTOL:g} (loss) / {GRAD_RTOL:g} (gradient). With TRL's defaults the same check fails: "
            "`scale_rewards=group` gives a ~0.3 relative gradient gap, `use_bias_correction_kl=True` ~3e-3 "
            "(measured at the smoke-test size).")


def easydel_note(rows: list[dict]) -> str:
    """What the EasyDeL row is, when the run has one (`--easydel`)."""
    if not any(r["side"].startswith("EasyDeL") for r in rows):
        return ""
    return ("\nEasyDeL row: EasyDeL's own `GRPOTrainer` in its venv (jax 0.9.2: its ejkernel pin), on its copy "
            "of the same checkpoint with the two config.json workarounds of the 'zipr1_jax vs EasyDeL' section, "
            "stepped over the same pipe (`on_step_start` waits for the driver, `on_step_end` blocks on the new "
            "state). No same-objective check (its loss and gradient on fixed completions are not reachable "
            "without driving its internals); what is the same and what differs: "
            + "; ".join(EASYDEL_NOTES) + ".\n")


def _more(n: int) -> str:
    return f"then {n} more untimed step{'s' if n > 1 else ''}; " if n > 0 else ""


def write_section(result: dict, args, path: str | None = None) -> str:
    cfg, v = result["config"], result["versions"]
    t = cfg.text
    ed_setup = ("bash benchmarks/setup_easydel_venv.sh /work/easydel_venv && "
                "ZIPR1_EASYDEL_PYTHON=/work/easydel_venv/bin/python " if args.easydel else "")
    cmd = (f"bash benchmarks/setup_trl_env.sh /work/trl_venv && {ed_setup}ZIPR1_TRL_PYTHON=/work/trl_venv/bin/python "
           f"nice -n 10 python benchmarks/grpo_step_vs_trl.py --prompts {args.prompts} --group {args.group} "
           f"--prompt {args.prompt} --new {args.new} --repeats {args.repeats} --warmup {args.warmup} "
           f"--threads {','.join(map(str, args.threads))}{f' --image {args.image}' if args.image else ''}"
           f"{' --easydel' if args.easydel else ''} --write-md")
    n_img = (args.image // 28) ** 2
    trl_v = (f"TRL venv: trl {v.get('trl_venv_trl')}, transformers {v.get('trl_venv_transformers')}, torch "
             f"{v.get('trl_venv_torch')}; " if "trl_venv_trl" in v else "TRL not run; ")
    if "easydel_venv_easydel" in v:
        trl_v += (f"EasyDeL venv: easydel {v['easydel_venv_easydel']}, jax {v.get('easydel_venv_jax')}, flax "
                  f"{v.get('easydel_venv_flax')}; ")
    what = (f"{args.prompts} prompts, each one {args.image}x{args.image} px noise image ({n_img} merged tokens "
            f"after the vision tower's 2x2 merge) then its text (lengths {args.prompt // 2}..{args.prompt} words), "
            "identical token ids and pixels on both sides" if args.image else
            f"{args.prompts} TEXT prompts (left padded to {args.prompt}, lengths {args.prompt // 2}..{args.prompt}, "
            "identical token ids on both sides)")
    section = SECTION_IMAGE if args.image else SECTION
    body = (f"{section}\n\n"
            f"Command: `{cmd}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {result['machine']}). "
            f"Versions: {trl_v}project venv: jax {v['jax']}, flax {v['flax']}, transformers {v['transformers']}, "
            f"torch {v['torch']} (torch only builds the shared model).\n"
            f"Model: random Qwen2-VL built with transformers' `Qwen2VLConfig` as in the rollout section (hidden "
            f"{t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads / "
            f"{t.num_key_value_heads} KV heads, MLP {t.intermediate_size}, vocab {t.vocab_size}); TRL loads it "
            "with `from_pretrained` (sdpa attention), ours imports the same weights with `from_hf_state_dict`. "
            f"Step: {what} x G = {args.group} sampled completions of exactly "
            f"{args.new} tokens (temperature 1, stop id outside the vocabulary), reward = fraction of even token "
            f"words (same function on both sides), advantages A = r - group mean on both sides (ours "
            "`advantage=drgrpo`, TRL `scale_rewards=none`: ours' std is the population one (ddof 0) + 1e-6, TRL's "
            f"the Bessel-corrected one + 1e-4, and neither can choose the ddof), beta = {args.beta} (reference "
            "forward on both sides; TRL `use_bias_correction_kl=False`, i.e. no importance ratio on the k3 KL), "
            "eps 0.2 / 0.28, token-level loss (ours `aggregation=token`, TRL `loss_type=dapo`), one AdamW step "
            "(mu = 1, lr constant, clip 1.0), fp32. Ours: `GRPOLearner.step` "
            "(rollout, host decode + rewards, reference log-probs, update), timed in-process. TRL: "
            "`GRPOTrainer.train` in a subprocess of the TRL venv, timed from `on_step_begin` to `on_step_end` "
            "(generate, rewards, reference and policy forwards, backward, clip, optimizer step). First step = "
            f"ours' jit compile + one step / TRL's first step; {_more(args.warmup - 1)}then "
            f"{args.repeats} rounds, one step of every side per round (interleaved), median and min - max "
            "reported; the ratio column is ours / the faster TRL column, per round (median, min - max).\n\n"
            f"{check_note(result.get('check'))}\n\n{table(result['rows'])}\n\n{NOTE}"
            f"{easydel_note(result['rows'])}{IMAGE_NOTE if args.image else VLM_NOTE}")
    return replace_section(section, body, path)
