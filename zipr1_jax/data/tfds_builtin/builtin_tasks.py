"""tfds builder for the built-in procedural visual tasks (array_record, readable without TensorFlow).

Features are Tensor/Text only: tfds' `Image` feature needs TensorFlow to encode, so the image is a
scalar bytes Tensor holding a PNG (decode with PIL, `sources.load_image`), and the choices are a
JSON list in a Text feature. `file_format="array_record"` gives a random-access
`tfds.data_source`, which grain reads directly.

    builder = BuiltinTasks(data_dir=d, config=BuiltinTasksConfig(name="small", num_train=32, num_test=8))
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split="train")
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import tensorflow_datasets as tfds


@dataclasses.dataclass(kw_only=True)
class BuiltinTasksConfig(tfds.core.BuilderConfig):
    """How many examples per split and how they are generated (all deterministic from `seed`)."""

    num_train: int = 256
    num_test: int = 64
    seed: int = 0
    difficulty: int = 1
    image_size: tuple[int, int] = (56, 56)
    tasks: tuple[str, ...] | None = None  # None: every task in zipr1_jax.data.tasks.TASKS

    def __post_init__(self):
        for field in ("num_train", "num_test"):
            if getattr(self, field) < 0:
                raise ValueError(f"BuiltinTasksConfig.{field} must be >= 0, got {getattr(self, field)}")
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"BuiltinTasksConfig.image_size must be (H, W) > 0, got {self.image_size}")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class BuiltinTasks(tfds.core.GeneratorBasedBuilder):
    """zipr1 built-in verifiable visual tasks (count, colour/shape at a position, compare, digits)."""

    name = "zipr1_builtin_tasks"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [BuiltinTasksConfig(name="default"),
                       BuiltinTasksConfig(name="small", num_train=32, num_test=8)]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "uid": tfds.features.Text(),
                "task": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "answer_type": tfds.features.Text(),
                "choices_json": tfds.features.Text(),
                "difficulty": tfds.features.Tensor(shape=(), dtype=np.int32),
                "image_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # procedural: nothing to download
        return {"train": self._generate_examples(self.builder_config.num_train, split_seed=0),
                "test": self._generate_examples(self.builder_config.num_test, split_seed=1)}

    def _generate_examples(self, num_examples: int, split_seed: int):
        from zipr1_jax.data.tasks import BuiltinTaskSource

        cfg = self.builder_config
        if num_examples == 0:
            return
        kwargs = dict(seed=cfg.seed * 2 + split_seed, difficulty=cfg.difficulty, image_size=tuple(cfg.image_size))
        if cfg.tasks is not None:
            kwargs["tasks"] = tuple(cfg.tasks)
        source = BuiltinTaskSource(num_examples, **kwargs)
        for i in range(len(source)):
            ex = source[i]
            get = ex.get if isinstance(ex, dict) else lambda k, d=None, e=ex: getattr(e, k, d)
            image = np.asarray(get("image"), dtype=np.uint8)
            uid = str(get("uid", f"{split_seed}-{i}"))
            yield uid, {
                "uid": uid, "task": str(get("task", "")), "question": str(get("question")),
                "answer": str(get("answer")), "answer_type": str(get("answer_type", "exact")),
                "choices_json": json.dumps(list(get("choices", ()) or ())),
                "difficulty": np.int32(get("difficulty", cfg.difficulty)),
                "image_shape": np.asarray(image.shape, np.int32), "image": _png(image),
            }


def prepare_builtin_tasks(data_dir: str, *, config_name: str = "custom", **config_kwargs) -> BuiltinTasks:
    """Prepare (or reuse) the built-in tasks under `data_dir` as array_record and return the builder.

    `config_kwargs` are BuiltinTasksConfig fields (num_train, num_test, seed, difficulty, image_size,
    tasks). Read it with `sources.TfdsSource.from_builder(builder, split="train")`.
    """
    builder = BuiltinTasks(data_dir=str(data_dir), config=BuiltinTasksConfig(name=config_name, **config_kwargs))
    builder.download_and_prepare(file_format="array_record")
    return builder
