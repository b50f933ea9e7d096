"""tfds builder of the built-in tasks: prepare + read back WITHOUT TensorFlow, then feed grain."""

import importlib.util
import sys
import types

import numpy as np
import pytest

from zipr1_jax.data.pipelines import PipelineConfig, rl_prompt_loader
from zipr1_jax.data.sources import TfdsSource, load_image
from zipr1_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer

IMAGE_SIZE = (56, 84)


def _standin_tasks():
    """Until zipr1_jax.data.tasks lands: a source with the contract's signature and record keys."""

    class BuiltinTaskSource:
        def __init__(self, num_examples, *, tasks=None, seed=0, difficulty=1, image_size=(56, 56)):
            self.n, self.seed, self.size, self.difficulty = num_examples, seed, image_size, difficulty

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            rs = np.random.RandomState(self.seed * 1000 + i)
            return dict(uid=f"count-{self.seed}-{i}", task="count", question=f"How many red circles? ({i})",
                        answer=str(i % 5), answer_type="choice" if i % 2 else "number",
                        choices=("A", "B") if i % 2 else (), difficulty=self.difficulty,
                        image=rs.randint(0, 256, (*self.size, 3), dtype=np.uint8))

    mod = types.ModuleType("zipr1_jax.data.tasks")
    mod.BuiltinTaskSource = BuiltinTaskSource
    return mod


@pytest.fixture(scope="module")
def tasks_module():
    try:
        import zipr1_jax.data.tasks as tasks
        yield tasks
    except ImportError:
        mod = _standin_tasks()
        sys.modules["zipr1_jax.data.tasks"] = mod
        yield mod
        del sys.modules["zipr1_jax.data.tasks"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tasks_module):
    from zipr1_jax.data.tfds_builtin import prepare_builtin_tasks

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = prepare_builtin_tasks(str(data_dir), config_name="test24", num_train=24, num_test=6, seed=3,
                                    image_size=IMAGE_SIZE)
    return builder, data_dir


def test_no_tensorflow(prepared):
    assert importlib.util.find_spec("tensorflow") is None, "tensorflow must stay uninstalled: tfds works without it"
    assert "tensorflow" not in sys.modules


def test_read_back_equals_generated(prepared, tasks_module):
    builder, data_dir = prepared
    assert builder.info.splits["train"].num_examples == 24 and builder.info.splits["test"].num_examples == 6
    src = TfdsSource.from_builder(builder, split="train")
    by_name = TfdsSource("zipr1_builtin_tasks/test24", split="train", data_dir=data_dir)
    assert len(src) == len(by_name) == 24
    reference = tasks_module.BuiltinTaskSource(24, seed=3 * 2, difficulty=1, image_size=IMAGE_SIZE)
    want = {}
    for i in range(24):
        ex = reference[i]
        get = ex.get if isinstance(ex, dict) else lambda k, e=ex: getattr(e, k)
        want[str(get("uid"))] = ex, get
    seen = set()
    for i in range(24):
        rec = src[i]
        ex, get = want[rec["uid"]]
        seen.add(rec["uid"])
        assert rec["question"] == get("question") and rec["answer"] == get("answer")
        assert rec["answer_type"] == get("answer_type") and rec["choices"] == tuple(get("choices"))
        assert isinstance(rec["images"][0], bytes)  # PNG, decoded with PIL
        np.testing.assert_array_equal(load_image(rec["images"][0]), np.asarray(get("image")))
        assert by_name[i]["uid"] == rec["uid"]
    assert len(seen) == 24
    assert "tensorflow" not in sys.modules


def test_tfds_source_feeds_grain(prepared, tmp_path):
    builder, _ = prepared
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"))
    try:
        from zipr1_jax.data.vision import process_image as processor
    except ImportError:  # stand-in until zipr1_jax.data.vision lands: Qwen-like patchify, 14 px, tp 2
        def processor(image):
            h, w = image.shape[:2]
            x = np.stack([image.astype(np.float32)] * 2).reshape(2, h // 28, 2, 14, w // 28, 2, 14, 3)
            return x.transpose(1, 4, 2, 5, 7, 0, 3, 6).reshape(h * w // 196, -1), np.array([1, h // 14, w // 14])
    cfg = PipelineConfig(batch_size=4, group_size=2, length_buckets=(64, 128), seed=0, image_size=IMAGE_SIZE)
    loader = rl_prompt_loader(TfdsSource.from_builder(builder, split="test"), tok, cfg, image_processor=processor)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["image_grid_thw"].shape == (8, 3)
    assert len({tuple(g) for g in batch["image_grid_thw"]}) == 1  # one image size -> one grid
    assert "tensorflow" not in sys.modules


def test_config_validation():
    from zipr1_jax.data.tfds_builtin import BuiltinTasksConfig

    with pytest.raises(ValueError, match="num_train"):
        BuiltinTasksConfig(name="bad", num_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        BuiltinTasksConfig(name="bad", image_size=(0, 5))
