"""grain loaders: layout, group repetition with pixel rows, determinism, exact resume, static shapes."""

import json

import numpy as np
import pytest

from zipr1_jax.data import chat
from zipr1_jax.data.pipelines import PipelineConfig, eval_loader, rl_prompt_loader, sft_loader
from zipr1_jax.data.sources import DataSourceError, RecordListSource
from zipr1_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from zipr1_jax.models.qwen_vl.config import tiny_qwen2_vl
from zipr1_jax.models.qwen_vl.rope import get_rope_index

try:  # the real processor once zipr1_jax.data.vision lands; a Qwen-like patchifier until then
    from zipr1_jax.data.vision import process_image as _real_process

    def process(image):
        return _real_process(image, min_pixels=28 * 28, max_pixels=28 * 28 * 64)
except ImportError:
    def process(image, patch=14, tp=2, merge=2):
        h, w = image.shape[:2]
        x = np.stack([image.astype(np.float32) / 255.0] * tp)
        gh, gw = h // patch, w // patch
        x = x.reshape(tp, gh // merge, merge, patch, gw // merge, merge, patch, 3)
        x = x.transpose(1, 4, 2, 5, 7, 0, 3, 6).reshape(gh * gw, 3 * tp * patch * patch)
        return x, np.array([1, gh, gw], np.int64)

try:
    from zipr1_jax.data.vision import process_video as _real_video

    def process_video(frames):
        return _real_video(frames, min_pixels=28 * 28, max_pixels=28 * 28 * 64)
except ImportError:
    def process_video(frames, tp=2):  # one patchified frame per temporal patch: enough to track rows
        parts = [process(f) for f in frames[::tp]]
        grid = parts[0][1].copy()
        grid[0] = len(parts)
        return np.concatenate([p[0] for p in parts]), grid

SIZES = [(28, 56), (56, 56), (56, 84), (28, 28)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def make_source(n=11, seed=0, sizes=SIZES):
    rs = np.random.RandomState(seed)
    recs = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        recs.append(dict(uid=f"ex{i}", question="How many red circles?" + " really" * (i % 5),
                         answer=str(i), answer_type="number", image=rs.randint(0, 256, (h, w, 3), dtype=np.uint8)))
    return RecordListSource(recs)


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], np.ndarray):
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            else:
                assert x[key] == y[key], key


def test_rl_batch_layout_and_group_repeat(tok):
    src = make_source()
    cfg = PipelineConfig(batch_size=3, group_size=4, length_buckets=(64, 128), seed=3)
    model_cfg = tiny_qwen2_vl()
    batch = next(iter(rl_prompt_loader(src, tok, cfg, image_processor=process, model_config=model_cfg)))
    R, L = batch["input_ids"].shape
    assert R == 12 and L in cfg.length_buckets
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(batch["prompt_index"], np.repeat(np.arange(3), 4))
    assert batch["valid"].all() and batch["position_ids"].shape == (3, R, L)
    by_uid = {src[i]["uid"]: src[i] for i in range(len(src))}
    offsets = np.concatenate([[0], np.cumsum(batch["image_grid_thw"].prod(-1))])
    assert batch["pixel_mask"].sum() == offsets[-1] and not batch["pixel_values"][offsets[-1]:].any()
    assert len(set(batch["uid"][::4])) == 3
    for r in range(R):
        rec = by_uid[batch["uid"][r]]
        assert batch["uid"][r] == batch["uid"][4 * (r // 4)] and batch["answer"][r] == rec["answer"]
        pv, grid = process(rec["images"][0])
        # Row r's own image rows, wherever the group repetition put them.
        assert batch["image_counts"][r] == 1
        np.testing.assert_array_equal(batch["image_grid_thw"][r], grid)
        np.testing.assert_array_equal(batch["pixel_values"][offsets[r]:offsets[r + 1]], pv)
        ids = chat.build_prompt(tok, rec["question"], grid[None])
        n = len(ids)
        assert batch["lengths"][r] == n and batch["attention_mask"][r].sum() == n
        np.testing.assert_array_equal(batch["input_ids"][r, L - n:], ids)  # left padded
        assert (batch["input_ids"][r, :L - n] == tok.pad_token_id).all()
        pos, delta = get_rope_index(model_cfg, ids[None], image_grid_thw=grid[None])
        np.testing.assert_array_equal(batch["position_ids"][:, r, L - n:], pos[:, 0])
        assert batch["rope_deltas"][r] == delta[0]


def test_video_rows_follow_their_prompt(tok):
    from zipr1_jax.models.qwen_vl.config import tiny_qwen2_5_vl

    rs = np.random.RandomState(1)
    recs = [dict(uid=f"v{i}", question="What moves?", answer="dot", fps=4.0 if i == 1 else None,
                 video=rs.randint(0, 256, (3 + i, 28, 56, 3), dtype=np.uint8)) for i in range(2)]
    for r in recs:
        if r["fps"] is None:
            del r["fps"]
    src = RecordListSource(recs)
    cfg = PipelineConfig(batch_size=2, group_size=3, shuffle=False, length_buckets=(64, 128))
    model_cfg = tiny_qwen2_5_vl()
    batch = next(iter(rl_prompt_loader(src, tok, cfg, image_processor=process, video_processor=process_video,
                                       model_config=model_cfg)))
    assert batch["uid"] == ["v0"] * 3 + ["v1"] * 3 and batch["image_grid_thw"].shape == (0, 3)
    np.testing.assert_array_equal(batch["video_counts"], np.ones(6))
    np.testing.assert_allclose(batch["second_per_grid_ts"], [1.0] * 3 + [0.5] * 3)  # tp / fps
    offsets = np.concatenate([[0], np.cumsum(batch["video_grid_thw"].prod(-1))])
    assert batch["pixel_mask_videos"].sum() == offsets[-1]
    for r in range(6):
        pv, grid = process_video(src[r // 3]["videos"][0])
        np.testing.assert_array_equal(batch["video_grid_thw"][r], grid)
        np.testing.assert_array_equal(batch["pixel_values_videos"][offsets[r]:offsets[r + 1]], pv)
        ids = chat.build_prompt(tok, "What moves?", None, grid[None])
        L, n = batch["input_ids"].shape[1], len(ids)
        np.testing.assert_array_equal(batch["input_ids"][r, L - n:], ids)
        pos, _ = get_rope_index(model_cfg, ids[None], video_grid_thw=grid[None],
                                second_per_grid_ts=batch["second_per_grid_ts"][r:r + 1])
        np.testing.assert_array_equal(batch["position_ids"][:, r, L - n:], pos[:, 0])


def test_deterministic_and_epochs_are_permutations(tok):
    src = make_source(n=12)
    cfg = PipelineConfig(batch_size=4, seed=7, num_epochs=2, length_buckets=(128,))
    uids = lambda c: [u for b in rl_prompt_loader(src, tok, c, image_processor=process) for u in b["uid"]]
    a, b = uids(cfg), uids(cfg)
    assert a == b and len(a) == 24
    assert sorted(a[:12]) == sorted(a[12:]) == sorted(f"ex{i}" for i in range(12))
    assert a[:12] != a[12:]  # reshuffled each epoch
    assert uids(PipelineConfig(batch_size=4, seed=8, num_epochs=2, length_buckets=(128,))) != a
    assert len(rl_prompt_loader(src, tok, cfg, image_processor=process)) == 6


@pytest.mark.parametrize("threads", [0, 1])
def test_exact_resume(tok, threads):
    src = make_source()
    cfg = PipelineConfig(batch_size=2, group_size=2, seed=5, length_buckets=(64, 128), num_threads=threads)
    it = iter(rl_prompt_loader(src, tok, cfg, image_processor=process))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 4)  # crosses the epoch boundary (11 examples, 2 per batch)
    fresh = iter(rl_prompt_loader(src, tok, cfg, image_processor=process))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)


def test_shards_are_disjoint(tok):
    src = make_source(n=10)
    uids = []
    for i in range(2):
        cfg = PipelineConfig(batch_size=5, num_epochs=1, shard_index=i, shard_count=2, length_buckets=(128,))
        loader = rl_prompt_loader(src, tok, cfg, image_processor=process)
        assert len(loader) == 1
        uids.append({u for b in loader for u in b["uid"]})
    assert not uids[0] & uids[1] and uids[0] | uids[1] == {f"ex{i}" for i in range(10)}
    with pytest.raises(ValueError, match="shard_index"):
        PipelineConfig(shard_index=2, shard_count=2)


def test_static_shapes_from_buckets(tok):
    src = make_source(n=13)
    cfg = PipelineConfig(batch_size=3, group_size=2, length_buckets=(48, 64, 96, 128), pixel_row_buckets=(64, 128),
                         seed=0)
    it = iter(rl_prompt_loader(src, tok, cfg, image_processor=process))
    lengths, rows = set(), set()
    for b in take(it, 20):
        assert b["input_ids"].shape[0] == 6
        lengths.add(b["input_ids"].shape[1])
        rows.add(b["pixel_values"].shape[0])
        assert b["pixel_mask"].sum() == b["image_grid_thw"].prod(-1).sum()
    assert lengths <= set(cfg.length_buckets) and rows <= {64, 128}
    # A fixed image size makes grids and pixel rows constant.
    fixed = PipelineConfig(batch_size=3, group_size=2, length_buckets=(64, 128), image_size=(56, 56))
    grids = {next(iter(rl_prompt_loader(make_source(seed=s), tok, fixed, image_processor=process)))["image_grid_thw"]
             .tobytes() for s in range(3)}
    assert len(grids) == 1


def test_too_long_prompt_errors(tok):
    cfg = PipelineConfig(batch_size=2, length_buckets=(32,))
    with pytest.raises(ValueError, match=r"example 'ex\d+' has \d+ tokens, more than the largest length bucket 32"):
        next(iter(rl_prompt_loader(make_source(), tok, cfg, image_processor=process)))


def test_sft_loader(tok):
    src = make_source()
    cfg = PipelineConfig(batch_size=4, length_buckets=(64, 128), seed=2)
    batch = next(iter(sft_loader(src, tok, cfg, image_processor=process)))
    assert batch["loss_mask"].dtype == bool and batch["loss_mask"].shape == batch["input_ids"].shape
    for r in range(4):
        n = batch["lengths"][r]
        assert batch["attention_mask"][r, :n].all() and not batch["attention_mask"][r, n:].any()  # right padded
        assert (batch["input_ids"][r, n:] == tok.pad_token_id).all()
        assert tok.decode(batch["input_ids"][r][batch["loss_mask"][r]]) == f"<answer>{batch['answer'][r]}</answer><|im_end|>"


def test_eval_loader_order_and_last_batch(tok):
    src = make_source(n=10)
    cfg = PipelineConfig(batch_size=4, length_buckets=(64, 128), shuffle=True, num_epochs=None)
    loader = eval_loader(src, tok, cfg, image_processor=process)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    uids = [u for b in batches for u, v in zip(b["uid"], b["valid"]) if v]
    assert uids == [f"ex{i}" for i in range(10)]
    np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
    assert {b["input_ids"].shape[0] for b in batches} == {4}


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="length_buckets"):
        PipelineConfig(length_buckets=(256, 128))
    with pytest.raises(ValueError, match="image_size"):
        PipelineConfig(image_size=(0, 28))
    with pytest.raises(ValueError, match="num_epochs"):
        PipelineConfig(num_epochs=0)


def test_empty_batch_with_drop_remainder_errors(tok):
    with pytest.raises(ValueError, match="no full batch"):
        rl_prompt_loader(make_source(n=3), tok, PipelineConfig(batch_size=4, num_epochs=1), image_processor=process)


def test_bad_image_error_names_the_example(tok, tmp_path):
    src = RecordListSource([{"uid": "bad7", "question": "q", "answer": "a", "image": str(tmp_path / "gone.png")}])
    cfg = PipelineConfig(batch_size=1, length_buckets=(128,))
    with pytest.raises(DataSourceError, match=r"example 'bad7' image 0: image file .*gone.png' does not exist"):
        next(iter(rl_prompt_loader(src, tok, cfg, image_processor=process)))


def test_batch_runs_in_transformers_qwen2_vl(tok):
    """End to end with Hugging Face as the oracle: its PIL image processor makes the pixels and its
    tiny Qwen2-VL consumes a left-padded, group-repeated batch (it raises on any token/feature
    count mismatch), matching the same prompts run one by one without padding."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf_proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16)

    def hf_process(image):
        out = hf_proc(images=[image], return_tensors="np")
        return out["pixel_values"], out["image_grid_thw"][0]

    model_cfg = tiny_qwen2_vl()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**model_cfg.to_hf_config())).eval()
    cfg = PipelineConfig(batch_size=2, group_size=2, length_buckets=(64, 128), seed=0)
    batch = next(iter(rl_prompt_loader(make_source(n=4, sizes=[(28, 56), (56, 84)]), tok, cfg,
                                       image_processor=hf_process, model_config=model_cfg)))
    assert len({tuple(g) for g in batch["image_grid_thw"]}) == 2  # two different image sizes in one batch
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]),
                       mm_token_type_ids=(ids == model_cfg.image_token_id).long(),
                       pixel_values=torch.tensor(batch["pixel_values"][batch["pixel_mask"]]),
                       image_grid_thw=torch.tensor(batch["image_grid_thw"])).logits.numpy()
    offsets = np.concatenate([[0], np.cumsum(batch["image_grid_thw"].prod(-1))])
    L = ids.shape[1]
    for r in (0, 3):
        n = batch["lengths"][r]
        row = ids[r:r + 1, L - n:]
        with torch.no_grad():
            single = model(input_ids=row, mm_token_type_ids=(row == model_cfg.image_token_id).long(),
                           pixel_values=torch.tensor(batch["pixel_values"][offsets[r]:offsets[r + 1]]),
                           image_grid_thw=torch.tensor(batch["image_grid_thw"][r:r + 1])).logits.numpy()
        np.testing.assert_allclose(logits[r, L - n:], single[0], atol=1e-4)
