"""The TRL side of benchmarks/grpo_step_vs_trl.py: runs in the TRL venv's python, as a subprocess of
the driver (benchmarks/setup_trl_env.sh builds that venv).

    TRL_PYTHON benchmarks/grpo_trl_side.py --trl-worker SPEC.json     timed GRPOTrainer steps
    TRL_PYTHON benchmarks/grpo_trl_side.py --trl-objective SPEC.json  loss + gradient on fixed completions

The TRL venv has neither jax nor zipr1_jax: this file imports only grpo_shared (stdlib + numpy) at
the top, and torch / transformers / trl inside the functions. Messages to the driver are lines
starting with `PROTO` on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from grpo_shared import (PROTO, TRL_SCALE_REWARDS, conversation, even_word_reward, vlm_processor,  # noqa: E402
                         word_tokenizer)


def _emit(kind: str, **payload) -> None:
    print(PROTO + json.dumps({"kind": kind, **payload}), flush=True)


def _trl_trainer(spec: dict, callbacks=()):
    """(GRPOTrainer built from the spec, its tokenizer): the objective of ours' step (see ADVANTAGE
    in grpo_shared)."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    if spec.get("images"):  # the VLM step: conversational prompts + an image column, rendered by a processor
        tok = vlm_processor(spec["vocab"], spec["pad_id"])
        rows = _image_rows(spec)
        convs = [prepare_image(r) for r in rows]
        got = [list(map(int, x)) for x in tok.apply_chat_template(
            conversation=convs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]
        data = {"prompt": [r["prompt"] for r in rows], "image": [r["image"] for r in rows]}
    else:
        tok = word_tokenizer(spec["vocab"], spec["pad_id"])
        got = [tok(t)["input_ids"] for t in spec["prompts"]]
        data = {"prompt": spec["prompts"]}
    if got != spec["prompt_ids"]:
        raise RuntimeError("the TRL side tokenizes the prompts to other ids than ours")
    model = Qwen2VLForConditionalGeneration.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                            attn_implementation="sdpa")
    model.generation_config.eos_token_id = spec["vocab"]  # outside the vocabulary: no early stop

    def even_words(completions, **_):
        # Conversational prompts (the VLM step) get completions as [{"role": "assistant", "content": text}].
        return [even_word_reward(c if isinstance(c, str) else c[0]["content"]) for c in completions]

    R = len(spec["prompts"]) * spec["group"]
    args = trl.GRPOConfig(
        output_dir=os.path.join(os.path.dirname(spec["model_dir"]), f"trl_out_{spec['threads']}"), use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, per_device_train_batch_size=R,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=spec["group"],
        max_completion_length=spec["new"], temperature=1.0, top_p=1.0, top_k=0, beta=spec["beta"],
        epsilon=spec["eps_low"], epsilon_high=spec["eps_high"], loss_type="dapo",
        # The same objective as ours (ADVANTAGE; checked by `check_objective` before timing): no importance
        # ratio on the k3 KL term (TRL's default multiplies it in), mean-centred advantages.
        use_bias_correction_kl=False, scale_rewards=TRL_SCALE_REWARDS[spec["advantage"]],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["steps"], logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        shuffle_dataset=False, dataloader_num_workers=0, seed=spec["seed"])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=even_words, args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict(data),
                              callbacks=list(callbacks))
    return trainer, tok


def _image_rows(spec: dict) -> list[dict]:
    """One dataset row per prompt of the VLM step: {"prompt": conversation (image placeholder + text),
    "image": the PIL image}."""
    from PIL import Image

    return [{"prompt": conversation(t), "image": Image.open(path).convert("RGB")}
            for t, path in zip(spec["prompts"], spec["images"])]


def prepare_image(row: dict) -> list[dict]:
    """The row's conversation with its placeholder filled (what TRL renders)."""
    conv = json.loads(json.dumps(row["prompt"]))
    conv[0]["content"][0]["image"] = row["image"]
    return conv


def _versions() -> dict:
    import torch
    import transformers
    import trl
    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def trl_worker(spec_path: str) -> None:
    """Build a GRPOTrainer from the spec and train `steps` steps, each started by a "go" on stdin."""
    import trl.extras.profiling
    from transformers import TrainerCallback

    spec = json.load(open(spec_path))
    # TRL times its blocks (generate, _prepare_inputs, _get_per_token_logps..., compute_loss) for its
    # loggers; keep them per step for the phase breakdown.
    blocks = []
    trl.extras.profiling.ProfilingContext._log_metrics = lambda self, d: blocks.append((self.name.split(".", 1)[1], d))

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t0, self.logs = None, []

        def on_step_begin(self, args, state, control, **kw):
            _emit("ready", step=state.global_step)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("grpo bench worker: the driver closed the pipe")
            blocks.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _emit("done", seconds=time.perf_counter() - self.t0, blocks=list(blocks))

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})

    clock = StepClock()
    trainer, _ = _trl_trainer(spec, callbacks=[clock])
    _emit("init", versions=_versions())
    trainer.train()
    _emit("end", logs=clock.logs)


def trl_objective(spec_path: str) -> None:
    """TRL's loss and gradient on FIXED completions (spec["completions"], [R, T] ids): TRL's own
    tokenising, reward, advantage, reference and loss code (`_generate_and_score_completions`, then
    `compute_loss` and backward), with only the sampler replaced by those completions and the
    reference model's weights by spec["ref_dir"]'s (so the KL term is not zero). Writes the loss,
    advantages and per-parameter gradients (hub-layout keys) to spec["out"] (npz)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    spec = json.load(open(spec_path))
    trainer, _ = _trl_trainer(dict(spec, steps=1))
    ref = Qwen2VLForConditionalGeneration.from_pretrained(spec["ref_dir"], dtype=torch.float32)
    trainer.ref_model.load_state_dict(ref.state_dict())
    completions = [list(map(int, c)) for c in spec["completions"]]

    def fixed_sampler(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if len(prompt_ids) != len(completions):
            raise RuntimeError(f"TRL asked for {len(prompt_ids)} completions, the spec has {len(completions)}")
        return [list(c) for c in completions], None

    trainer._generate_single_turn = fixed_sampler
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop otherwise
    prompts = _image_rows(spec) if spec.get("images") else [{"prompt": t} for t in spec["prompts"]]
    rows = [r for r in prompts for _ in range(spec["group"])]  # RepeatSampler's order
    inputs = trainer._generate_and_score_completions(rows)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    out = {"loss": loss.detach().numpy(), "advantages": inputs["advantages"].numpy(),
           "completion_ids": inputs["completion_ids"].numpy()}
    for name, p in trainer.model.named_parameters():
        out["grad/" + name] = (torch.zeros_like(p) if p.grad is None else p.grad).numpy()
    np.savez(spec["out"], **out)
    _emit("objective", versions=_versions())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--trl-objective":
        trl_objective(sys.argv[2])
    else:
        raise SystemExit(__doc__)
