"""Random-access example sources for grain: JSONL/LLaVA files, HF datasets on disk, tfds, built-in tasks.

Every source has `__len__` / `__getitem__` and returns the same record layout:

  {"question": str, "answer": str, "answer_type": "exact"|"choice"|"number", "choices": tuple[str, ...],
   "images": list[str path | bytes (encoded PNG/JPEG) | np.ndarray uint8 [H, W, 3]], "uid": str,
   optional "videos": list[np.ndarray uint8 [T, H, W, 3] | list of frames], "fps": float}

Images are decoded later (`load_image`, in the pipeline's map step) so sources stay cheap to index.
None of this needs TensorFlow: tfds array_record data sources are read with tfds' own NumPy path and
images are stored as PNG bytes. Hugging Face `datasets` is not a dependency: its on-disk formats
(parquet files, `save_to_disk` arrow directories) are read with pyarrow.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zipr1_jax.data.tasks import BuiltinTaskSource

ANSWER_TYPES = ("exact", "choice", "number")


class DataSourceError(ValueError):
    """A source file or record is missing, empty or malformed."""


def _text(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return _text(x.item())
    return str(x)


def make_record(raw: Mapping[str, Any], where: str, *, base_dir: str | os.PathLike | None = None) -> dict:
    """Normalise one raw example into the shared record layout.

    Accepts `question`/`answer` keys or a LLaVA `conversations` list (first human turn = question,
    first following gpt turn = answer; `<image>` placeholders are removed because images are placed
    before the question). Relative image paths are resolved against `base_dir`.

    Args:
      where: names the record in errors, e.g. "record 3 of data.jsonl".
    """
    if not isinstance(raw, Mapping):
        raise DataSourceError(f"{where}: expected an object, got {type(raw).__name__}")
    question, answer = raw.get("question"), raw.get("answer")
    if question is None and "conversations" in raw:
        question, answer = _from_conversations(raw["conversations"], where)
    if question is None:
        raise DataSourceError(f"{where} has no question (keys: {sorted(raw)})")
    if answer is None:
        raise DataSourceError(f"{where} has no answer (keys: {sorted(raw)})")
    if not _text(answer).strip():
        # A verifier can never match an empty reference: the record would only ever earn reward 0.
        raise DataSourceError(f"{where} has an empty answer")
    question = _text(question).replace("<image>\n", "").replace("<image>", "").strip()
    answer_type = _text(raw.get("answer_type") or "exact")
    if answer_type not in ANSWER_TYPES:
        raise DataSourceError(f"{where}: answer_type {answer_type!r} is not one of {ANSWER_TYPES}")
    choices = raw.get("choices")
    if choices is None:
        choices = ()
    elif isinstance(choices, (str, bytes)):
        choices = tuple(json.loads(_text(choices))) if _text(choices).startswith("[") else (_text(choices),)
    else:
        choices = tuple(_text(c) for c in choices)
    images = raw.get("images", raw.get("image"))
    if images is None:
        images = []
    elif isinstance(images, (str, bytes, np.ndarray, Mapping)) or hasattr(images, "convert"):
        images = [images]
    images = [_resolve(img, base_dir) for img in images]
    uid = _text(raw.get("uid", raw.get("id", where)))
    record = {"question": question, "answer": _text(answer), "answer_type": answer_type, "choices": choices,
              "images": images, "uid": uid}
    # Videos: "video" is one video, "videos" a list; a video is frames [T, H, W, 3] or a list of frames.
    videos = [raw["video"]] if raw.get("video") is not None else list(raw.get("videos") or ())
    if videos:
        record["videos"] = [v if isinstance(v, (np.ndarray, str, bytes)) else [_resolve(f, base_dir) for f in v]
                            for v in videos]
        if "fps" in raw:
            record["fps"] = float(raw["fps"])
    return record


def _from_conversations(turns, where: str) -> tuple[str | None, str | None]:
    question = answer = None
    for turn in turns:
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role in ("human", "user") and question is None:
            question = value
        elif role in ("gpt", "assistant") and question is not None:
            answer = value
            break
    return question, answer


def _resolve(img, base_dir):
    if isinstance(img, Mapping):  # HF Image feature: {"bytes": ..., "path": ...}
        if img.get("bytes"):
            return img["bytes"]
        img = img.get("path")
        if img is None:
            raise DataSourceError("image entry has neither bytes nor path")
    if isinstance(img, str) and base_dir is not None and not os.path.isabs(img):
        return os.path.join(os.fspath(base_dir), img)
    return img


def load_image(img, where: str = "image") -> np.ndarray:
    """Decode one image (path, encoded bytes, PIL image or array) to uint8 RGB [H, W, 3].

    Raises:
      DataSourceError naming `where` (and the path) for a missing or unreadable file.
    """
    if isinstance(img, np.ndarray):
        arr = img
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            if isinstance(img, (str, os.PathLike)):
                if not os.path.isfile(img):
                    raise DataSourceError(f"{where}: image file {os.fspath(img)!r} does not exist")
                pil = Image.open(img)
            elif isinstance(img, (bytes, bytearray)):
                pil = Image.open(io.BytesIO(img))
            elif hasattr(img, "convert"):
                pil = img
            else:
                raise DataSourceError(f"{where}: cannot read an image from {type(img).__name__}")
            arr = np.asarray(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataSourceError(f"{where}: unreadable image {img if isinstance(img, str) else ''}: {e}") from e
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataSourceError(f"{where}: image must be [H, W, 3] RGB, got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


class _ListSource:
    """Shared random-access behaviour over a list-like of raw rows."""

    name: str

    def __len__(self) -> int:
        return self._len

    def _raw(self, index: int) -> Mapping[str, Any]:
        raise NotImplementedError

    def _base_dir(self):
        return None

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} with {len(self)} examples")
        return make_record(self._raw(index), f"record {index} of {self.name}", base_dir=self._base_dir())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} examples)"


class JsonlSource(_ListSource):
    """A `.jsonl` file (one record per line) or a `.json` array (LLaVA's layout).

    Image paths are relative to the file's directory unless `image_root` is given.
    """

    def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None):
        p = Path(path)
        if not p.is_file():
            raise DataSourceError(f"data file {str(p)!r} does not exist")
        self.name = str(p)
        self._root = Path(image_root) if image_root is not None else p.parent
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataSourceError(f"{p} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                                  f"{e.start}); save the file as UTF-8") from None
        if p.suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{p}: not valid JSON: {e}") from e
            if not isinstance(rows, list):
                raise DataSourceError(f"{p}: a .json data file must hold a list of records")
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataSourceError(f"{p} line {n}: not valid JSON: {e}") from e
        if not rows:
            raise DataSourceError(f"data file {str(p)!r} has no examples")
        self._rows = rows
        self._len = len(rows)

    def _raw(self, index):
        return self._rows[index]

    def _base_dir(self):
        return self._root


class HFDiskSource(_ListSource):
    """A Hugging Face dataset on disk, read with pyarrow (no `datasets` dependency).

    `path` is a parquet file, a directory of parquet files (optionally filtered by `split` in the
    file name, as the hub's `data/train-00000-of-00001.parquet` layout), or a `save_to_disk`
    directory (`data-*.arrow` IPC streams). `columns` maps our keys to the dataset's column names,
    e.g. {"question": "query", "images": "image"}.
    """

    def __init__(self, path: str | os.PathLike, *, split: str | None = None,
                 columns: Mapping[str, str] | None = None, image_root: str | os.PathLike | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = Path(path)
        if not p.exists():
            raise DataSourceError(f"dataset path {str(p)!r} does not exist")
        self.name = str(p)
        self._root = Path(image_root) if image_root is not None else (p if p.is_dir() else p.parent)
        self._columns = dict(columns or {})
        if p.is_file():
            files = [p]
        else:
            files = sorted(p.rglob("*.parquet")) or sorted(p.rglob("*.arrow"))
            if split is not None:
                files = [f for f in files if split in f.relative_to(p).as_posix()]
        if not files:
            raise DataSourceError(f"dataset path {str(p)!r} has no parquet or arrow files"
                                  + (f" for split {split!r}" if split else ""))
        tables = []
        for f in files:
            try:
                if f.suffix == ".parquet":
                    tables.append(pq.read_table(f))
                else:
                    with pa.memory_map(str(f)) as src:
                        try:
                            tables.append(pa.ipc.open_stream(src).read_all())
                        except pa.ArrowInvalid:
                            tables.append(pa.ipc.open_file(src).read_all())
            except pa.ArrowException as e:
                raise DataSourceError(f"cannot read {f}: {e}") from e
        self._table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self._len = self._table.num_rows
        if self._len == 0:
            raise DataSourceError(f"dataset {str(p)!r} has no examples")
        missing = [c for c in self._columns.values() if c not in self._table.column_names]
        if missing:
            raise DataSourceError(f"dataset {str(p)!r} has no columns {missing}; it has {self._table.column_names}")

    def _raw(self, index):
        row = self._table.slice(index, 1).to_pylist()[0]
        for ours, theirs in self._columns.items():
            row[ours] = row.pop(theirs)
        return row

    def _base_dir(self):
        return self._root


class TfdsSource(_ListSource):
    """A tfds dataset prepared on disk, read via `tfds.data_source` (array_record, no TensorFlow).

    Text features arrive as bytes or str; an `image` Tensor feature holds encoded PNG bytes.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | os.PathLike | None = None,
                 builder_kwargs: Mapping[str, Any] | None = None):
        import tensorflow_datasets as tfds

        self.name = f"tfds:{name}[{split}]"
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                                        download=False, builder_kwargs=dict(builder_kwargs or {}))
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ...)
            raise DataSourceError(f"cannot open tfds dataset {name!r} split {split!r} in {data_dir}: {e}") from e
        self._len = len(self._ds)
        if self._len == 0:
            raise DataSourceError(f"tfds dataset {name!r} split {split!r} has no examples")

    @classmethod
    def from_builder(cls, builder, *, split: str = "train") -> "TfdsSource":
        """Wrap an already prepared builder (`builder.as_data_source(split)`)."""
        self = cls.__new__(cls)
        self.name = f"tfds:{builder.name}[{split}]"
        self._ds = builder.as_data_source(split=split)
        self._len = len(self._ds)
        if self._len == 0:
            raise DataSourceError(f"tfds dataset {builder.name!r} split {split!r} has no examples")
        return self

    def _raw(self, index):
        row = dict(self._ds[index])
        if "choices_json" in row:
            row["choices"] = json.loads(_text(row.pop("choices_json")))
        if "image" in row and isinstance(row["image"], np.ndarray) and row["image"].dtype == object:
            row["image"] = row["image"].item()
        return row


class BuiltinSource:
    """The built-in procedural visual tasks (`zipr1_jax.data.tasks.BuiltinTaskSource`) as records.

    Args are forwarded to BuiltinTaskSource(num_examples, tasks=..., seed=..., difficulty=...,
    image_size=...). Images are arrays of the fixed `image_size`, so patch grids are static.
    """

    def __init__(self, num_examples: int, **kwargs):
        if num_examples <= 0:
            raise DataSourceError(f"num_examples must be > 0, got {num_examples}")
        self._src = BuiltinTaskSource(num_examples, **kwargs)
        self.name = f"builtin({num_examples})"

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: int) -> dict:
        raw = self._src[int(index)]
        if not isinstance(raw, Mapping):  # a TaskExample dataclass
            raw = {k: getattr(raw, k) for k in ("uid", "question", "answer", "answer_type", "choices", "image")}
        return make_record(raw, f"record {index} of {self.name}")

    @property
    def spec(self) -> dict:
        """What the records are a deterministic function of (a cheap stand-in for their contents)."""
        s = self._src
        return {"num_examples": s.num_examples, "tasks": list(s.tasks), "seed": s.seed, "difficulty": s.difficulty,
                "image_size": list(s.image_size)}

    def __repr__(self) -> str:
        return f"BuiltinSource({len(self)} examples)"


class RecordListSource(_ListSource):
    """In-memory records (tests, notebooks): a list of dicts in any layout `make_record` accepts."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], *, name: str = "records"):
        if not rows:
            raise DataSourceError(f"{name} has no examples")
        self._rows, self._len, self.name = list(rows), len(rows), name

    def _raw(self, index):
        return self._rows[index]
