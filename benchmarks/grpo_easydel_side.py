"""The EasyDeL side of benchmarks/grpo_step_vs_trl.py (`--easydel`): EasyDeL's own `GRPOTrainer`
(easydel 0.3.0) on the same tiny Qwen2-VL, run by the EasyDeL venv's python as a subprocess of the
driver (benchmarks/setup_easydel_venv.sh builds that venv), stepped over the same pipe protocol as
the TRL worker: `on_step_start` reports "ready" and waits for "go", `on_step_end` (after the new
state is blocked on) reports the step's seconds.

    EASYDEL_PYTHON benchmarks/grpo_easydel_side.py --easydel-worker SPEC.json

The spec's model directory is EasyDeL's copy of the checkpoint (easydel_vs_ours.easydel_config: two
config.json workarounds); the model loads exactly as in the forward / generate comparison
(easydel_vs_ours.load_easydel_model). The objective is set as close to ours as `GRPOConfig` allows;
what differs is listed in NOTES (the driver prints them under the table). No same-objective check:
EasyDeL's loss and gradient on fixed completions cannot be reached without driving its internals.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from grpo_shared import PROTO, even_word_reward, word_tokenizer  # noqa: E402  (also sets the offline env)

NOTES = (
    "same as ours: the prompts' token ids (checked), G completions of exactly `new` tokens (stop id outside the "
    "vocabulary), temperature 1 with no top-k / top-p truncation, the reward, A = r - group mean "
    "(`scale_rewards=none`), beta, eps low / high, token-level loss (`loss_type=dapo`), k3 KL with no importance "
    "ratio, one AdamW step (lr constant, clip 1.0, no weight decay), float32",
    "differs: EasyDeL's trainer samples with its compiled `generate` (its default eSurge engine failed here: "
    "compiling `ragged_page_attention_v3` raised 'cannot reshape array of shape (160, 2, 128) into shape (160, 2, "
    "2, 128)'), re-traced every step "
    "(the trainer releases its generation runtime after each rollout; the executable comes back from JAX's "
    "persistent cache) and seeded with `PRNGKey(0)` every step (steps reuse the same random draws); AdamW "
    "betas / eps are eformer's defaults; its phase timers do not wait for asynchronous JAX work, so only the "
    "rollout (`generation_time`, which decodes text on the host) is split out, the rest is 'update'",
)


def _emit(kind: str, **payload) -> None:
    print(PROTO + json.dumps({"kind": kind, **payload}), flush=True)


def easydel_worker(spec_path: str) -> None:
    """Build EasyDeL's GRPOTrainer from the spec and train `steps` steps, each started by a "go"."""
    spec = json.load(open(spec_path))
    # ejkernel (imported by easydel) points JAX's persistent compilation cache at COMPILE_FUNC_DIR; a fresh
    # directory per run keeps the first step cold, like the other sides' first steps.
    os.environ["COMPILE_FUNC_DIR"] = tempfile.mkdtemp(prefix="ejit_cache_", dir=os.path.dirname(spec_path))
    import datasets
    import easydel as ed
    import jax
    from easydel_vs_ours import easydel_versions, load_easydel_model

    tok = word_tokenizer(spec["vocab"], spec["pad_id"])
    if [tok(t)["input_ids"] for t in spec["prompts"]] != spec["prompt_ids"]:
        raise RuntimeError("the EasyDeL side tokenizes the prompts to other ids than ours")
    model, _ = load_easydel_model(spec["model_dir"])
    model.generation_config.eos_token_id = spec["vocab"]  # outside the vocabulary: no early stop
    model.generation_config.pad_token_id = spec["pad_id"]
    V, B = spec["vocab"], len(spec["prompts"])
    args = ed.GRPOConfig(
        save_directory=os.path.join(os.path.dirname(spec_path), "easydel_out"), model_name="grpo_bench",
        do_last_save=False, save_steps=None, use_wandb=False, report_steps=1, log_steps=1, progress_bar_type="json",
        total_batch_size=B, num_train_epochs=1, max_training_steps=spec["steps"],
        max_prompt_length=max(map(len, spec["prompt_ids"])), max_completion_length=spec["new"],
        num_return_sequences=spec["group"], temperature=1.0, top_p=1.0, top_k=V, generation_top_k=V,
        generation_top_p=1.0, generation_temperature=1.0, generation_do_sample=True, skip_apply_chat_template=True,
        use_esurge_generation=False, beta=spec["beta"], epsilon=spec["eps_low"], epsilon_high=spec["eps_high"],
        loss_type="dapo", importance_sampling_level="token", scale_rewards="none", num_iterations=1,
        mask_truncated_completions=False, learning_rate=spec["lr"], optimizer=ed.EasyDeLOptimizers.ADAMW,
        scheduler=ed.EasyDeLSchedulers.NONE, warmup_steps=0, weight_decay=0.0, clip_grad=1.0,
        gradient_accumulation_steps=1, shuffle_train_dataset=False, do_eval=False)

    def bench_even_words(prompts=None, completions=None, **_):
        return [even_word_reward(c if isinstance(c, str) else str(c)) for c in completions]

    logs = []

    class Stepped(ed.GRPOTrainer):
        def on_step_start(self, state, step):
            _emit("ready", step=int(step))
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("grpo bench EasyDeL worker: the driver closed the pipe")
            self._t0 = time.perf_counter()
            return super().on_step_start(state=state, step=step)

        def on_step_end(self, state, metrics, step):
            jax.block_until_ready(state.graphstate)
            seconds = time.perf_counter() - self._t0
            other = getattr(metrics, "other_metrics", None) or {}
            m = {k: float(v) for k, v in other.items() if isinstance(v, (int, float))}
            m["loss"] = float(getattr(metrics, "loss", float("nan")))
            logs.append(m)
            _emit("done", seconds=seconds, metrics=m)
            return super().on_step_end(state=state, metrics=metrics, step=step)

    trainer = Stepped(arguments=args, model=model, reward_funcs=[bench_even_words],
                      train_dataset=datasets.Dataset.from_dict({"prompt": list(spec["prompts"]) * spec["steps"]}),
                      processing_class=tok)
    _emit("init", versions=easydel_versions())
    trainer.train()
    _emit("end", logs=logs)


def easydel_phases(total: float, metrics: dict) -> dict:
    """EasyDeL's step split like ours where its timers allow: rollout = `generation_time`; other = the
    rest of its preprocessing (rewards, advantages; the reference forward is dispatched there but runs
    asynchronously); update = everything after preprocessing; reference = None (not separable)."""
    gen, pre = metrics.get("generation_time"), metrics.get("preprocessing_time")
    if gen is None or pre is None:
        return dict(rollout=None, reference=None, update=None, other=None)
    return dict(rollout=gen, reference=None, update=total - pre, other=pre - gen)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--easydel-worker":
        easydel_worker(sys.argv[2])
    else:
        raise SystemExit(__doc__)
