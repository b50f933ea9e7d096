"""Multi-process training for real on one machine: `scripts/train.py` as 2 JAX processes x 4
virtual CPU devices (gloo collectives, coordinator on localhost) gives the same losses as 1 process
x 8 devices with the same (data=2, fsdp=2, tensor=2) mesh, writes logs / plots only on process 0,
and its checkpoint restores in a single process. Plus fast checks of the pieces
(zipr1_jax/sharding/launch.py, zipr1_jax/data/process_rows.py): flags, the per-process data rows,
the batch merge.

Tolerance of the comparison (float32): both runs execute the same partitioned program; only the
all-reduces that cross processes (gloo) add partial sums in another order than in-process CPU
collectives, i.e. differences of float32 rounding (observed: SFT losses agree to ~1e-7 relative).
The RL steps here see all-zero rewards, so their loss and gradient are the small KL term of two
nearly equal policies (~1e-5), formed by cancellation: absolute 1e-6 covers its rounding noise.
Adam moves each weight by about lr * sign(gradient) in its first steps whatever the gradient's
size, so on those near-zero RL gradients the weights may differ by a fraction of rl.lr (3e-4).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from zipr1_jax.data import process_rows
from zipr1_jax.sharding import launch as dist

from tests.train.tiny_run import MESH_222
from tests.train.tiny_run import TINY as TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The trainer tests' tiny run, on the 8-device mesh of their sharded test, with a line per step.
TINY = [o for o in TINY_RUN if not o.startswith("log.progress=")] + ["log.progress=line"] + MESH_222
TIMEOUT_S = 2400  # a generous bound for a loaded 2-core machine (typically 4-10 min per run)
# Same budget as the sharded == 1-device trainer test: fp32 end to end (1e-4 relative). Two processes
# all-reduce over gloo in another order than one process's 8 devices, and GRPO's zero-sum
# advantages cancel in the gradient sum, so that order shows: measured 1.7e-5 relative on the
# grad_norm of RL step 5 (the losses of every step agree to 6e-5 relative or 1e-6 absolute).
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- fast: the pieces
def test_flags_and_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    cfg, rest = dist.parse_flags(["--config", "a.yaml", "rl.steps=2", "--process-id", "3"], environ=env)
    assert rest == ["--config", "a.yaml", "rl.steps=2"]
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)  # flag wins
    assert cfg.explicit and cfg.mode == "auto"
    plain, _ = dist.parse_flags(["rl.steps=2"], environ={})
    assert not plain.explicit
    with pytest.raises(dist.DistributedError, match="not below num_processes"):
        dist.parse_flags(["--num-processes", "2", "--process-id", "2"], environ={})
    with pytest.raises(dist.DistributedError, match="host:port"):
        dist.from_env({"JAX_COORDINATOR_ADDRESS": "localhost"})
    with pytest.raises(dist.DistributedError, match="JAX_NUM_PROCESSES"):
        dist.from_env({"JAX_NUM_PROCESSES": "two"})


def test_initialize_single_process_and_late_call():
    assert dist.initialize(dist.DistributedConfig()) == (0, 1)  # nothing given, no cluster: no-op
    assert dist.initialize(dist.DistributedConfig(mode="off", num_processes=2, process_id=0)) == (0, 1)
    # Once a backend runs, joining a cluster is refused with a clear error (before any network use).
    import jax

    assert jax.devices()
    late = dist.DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0,
                                  cpu_collectives="none")
    with pytest.raises(dist.DistributedError, match="initialize failed.*before any JAX"):
        dist.initialize(late)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_rows_make_the_single_process_batches(count):
    """Per-process batches, concatenated in process order, are the single-process batches
    (same shuffle, across epoch boundaries)."""
    import grain

    n, B, seed = 10, 4, 7
    source = [f"ex{i}" for i in range(n)]
    def batches(ds, size):
        return iter(ds.repeat(None).batch(size, drop_remainder=True, batch_fn=list))

    single = batches(grain.MapDataset.source(source).shuffle(seed=seed), B)
    views = [process_rows.ProcessRows(source, global_batch=B, index=i, count=count, seed=seed) for i in range(count)]
    local = [batches(grain.MapDataset.source(v), B // count) for v in views]
    for _ in range(8):  # 32 examples: more than 3 epochs
        assert [x for it in local for x in next(it)] == next(single)
    with pytest.raises(dist.DistributedError, match="multiple of the process count"):
        process_rows.ProcessRows(source, global_batch=3, index=0, count=2, seed=seed)


def _examples(lengths, image_token_id, width=6):
    """Processed examples (pipelines.py layout): text + one 4x4-patch image (4 merged tokens)."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        ids = np.concatenate([[1, 2], np.full(4, image_token_id), rng.integers(3, 50, n - 6)]).astype(np.int32)
        out.append({"ids": ids, "loss_mask": np.arange(n) >= n - 2, "pixel_values": rng.normal(size=(16, width)),
                    "image_grid_thw": np.asarray([[1, 4, 4]]), "uid": f"u{i}", "question": "q", "answer": str(i),
                    "answer_type": "number", "choices": ()})
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_merge_batches_equals_one_collate(side):
    """Merging per-process collated batches (different length buckets, group repeats) gives the
    batch `collate` makes of all examples at once."""
    from functools import partial

    from zipr1_jax.data.batching import collate
    from zipr1_jax.models.qwen_vl import config
    from zipr1_jax.models.qwen_vl.rope import get_rope_index
    from zipr1_jax.data.model_inputs import vision_arrays

    mc = config.tiny_qwen2_vl()
    rope = partial(get_rope_index, mc)
    rope_fn = lambda ids, mask, ig, vg, s: rope(ids, mask, image_grid_thw=ig, video_grid_thw=vg,  # noqa: E731
                                                  second_per_grid_ts=s)
    make = partial(collate, length_buckets=(16, 32), pad_id=0, padding_side=side, group_size=2, rope_fn=rope_fn)
    ex = _examples([10, 12, 20, 9], mc.image_token_id)
    whole = make(ex)
    merged = process_rows.merge_batches([make(ex[:2]), make(ex[2:])], padding_side=side, pad_id=0)  # buckets 16 and 32
    assert set(merged) == set(whole)
    for key, want in whole.items():
        if key in ("pixel_values", "pixel_mask"):
            continue
        if isinstance(want, list):
            assert merged[key] == want, key
        else:
            np.testing.assert_array_equal(merged[key], want, err_msg=key)
    (pix_m, _), (pix_w, _) = vision_arrays(merged), vision_arrays(whole)
    np.testing.assert_array_equal(pix_m["pixel_values"], pix_w["pixel_values"])


# ---------------------------------------------------------------------- slow: real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV.values()}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _train(out, num_processes: int) -> list[str]:
    """Run scripts/train.py as `num_processes` processes (8 devices in all); returns their logs."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py")] + TINY + [f"log.out_dir={out}"]
    if num_processes > 1:
        port = _free_port()
        cmds = [cmd + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(num_processes),
                       "--process-id", str(i)] for i in range(num_processes)]
    else:
        cmds = [cmd]
    logs = [os.path.join(f"{out}_logs", f"process{i}.log") for i in range(num_processes)]
    os.makedirs(f"{out}_logs", exist_ok=True)
    procs = []
    try:
        for c, path in zip(cmds, logs):
            with open(path, "w") as f:
                procs.append(subprocess.Popen(c, env=_env(8 // num_processes), stdout=f, stderr=subprocess.STDOUT,
                                              cwd=ROOT))
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(path).read() for path in logs]
    for i, (code, text) in enumerate(zip(codes, texts)):
        assert code == 0, f"process {i} of {num_processes} exited with {code}:\n{text[-4000:]}"
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    two = _train(root / "two", 2)
    _train(root / "one", 1)
    return root / "one", root / "two", two


def _records(path) -> list[dict]:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    one, two, _ = runs
    a, b = _records(one), _records(two)
    assert [(r["phase"], r["step"]) for r in b] == [(r["phase"], r["step"]) for r in a]
    assert [r["step"] for r in b if r["phase"] in ("sft", "rl")] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        where = f"{ra['phase']} step {ra['step']}"
        for key in ("loss", "grad_norm", "kl"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], **LOSS_TOL, err_msg=f"{where} {key}")
        # Rollout-derived numbers: same samples, same kept sets, same verdicts.
        for key in ("reward", "accuracy", "token_ratio", "response_length", "accuracy_dense", "accuracy_p0.9",
                    "token_ratio_p0.9"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], rtol=0, atol=1e-6, err_msg=f"{where} {key}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_only_process_zero_writes_logs(runs):
    _, two, logs = runs
    assert os.path.isfile(two / "plots" / "summary.png")
    assert json.load(open(two / "summary.json"))["global_step"] == 5
    assert "final eval" in logs[0] and "final eval" not in logs[1]
    assert "sft 1/3" in logs[0] and "sft 1/3" not in logs[1]
    steps = sorted(int(d) for d in os.listdir(two / "checkpoints") if d.isdigit())
    assert steps == [1, 2, 3, 4, 5] and os.path.isdir(two / "checkpoints" / "reference")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    """The trainer's own resume path, in this single process on ONE device: params, optimizer
    state, data positions and the reference model of the 2-process run's last step load, and
    equal the 1-process run's."""
    import jax

    from zipr1_jax.checkpoint import Checkpointer
    from zipr1_jax.sharding.rules import abstract_with_shardings
    from zipr1_jax.train.cli import load_config
    from zipr1_jax.train.setup import setup

    one, two, _ = runs
    cfg = load_config(None, TINY + [f"log.out_dir={tmp_path}", f"checkpoint.dir={two / 'checkpoints'}",
                                    "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"])
    job = setup(cfg, devices=jax.devices()[:1])
    try:
        state, step, phase = job.restore_or_init()
        assert (step, phase) == (5, "rl") and int(state.step) == 2
        assert job.rl_iter.get_state() == {"next_index": 2} and job.sft_iter.get_state() == {"next_index": 3}
        assert job.ref_params is not None
        target = abstract_with_shardings(job.params0, job.param_shardings)
        with Checkpointer(one / "checkpoints") as ref:
            want_sft = ref.restore(3, params_target=target)["params"]
            want = ref.restore(5, params_target=target)["params"]
        with Checkpointer(two / "checkpoints") as got:
            got_sft = got.restore(3, params_target=target)["params"]
            saved = got.restore(5, params_target=target)["params"]
    finally:
        job.close()
    for g, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved)):  # the resume loads it exactly
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    for g, w in zip(jax.tree.leaves(got_sft), jax.tree.leaves(want_sft)):  # end of SFT: rounding only
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=2e-6)
    # After 2 Adam steps of RL the two runs agree as a whole, not element by element: Adam divides
    # each gradient by its own magnitude, so a weight whose gradient is reduction-order noise (GRPO's
    # zero-sum advantages cancel) moves by up to lr either way. Measured: the difference is 0.8% of
    # the RL update's norm; 48 of 197k weights differ by more than 0.2 lr, the largest by 0.8 lr.
    g_, w_, s_ = ([np.asarray(x) for x in jax.tree.leaves(t)] for t in (state.params, want, want_sft))
    diff = np.sqrt(sum(np.sum((g - w) ** 2) for g, w in zip(g_, w_)))
    update = np.sqrt(sum(np.sum((w - s) ** 2) for w, s in zip(w_, s_)))
    assert diff < 0.05 * update, (diff, update)
    for g, w in zip(g_, w_):
        np.testing.assert_allclose(g, w, rtol=0, atol=2 * cfg.rl.lr)
