"""Check every record of a training source before the first step, and fingerprint a source.

Without this, a bad record (a missing image, an empty answer, a prompt longer than the largest
length bucket) is found only when a batch reaches it, possibly many steps into a run.
`validate_source` runs the loaders' own record map (`pipelines.record_processor`: image decoding
and processing, chat template, vision pad tokens, the length-bucket check) over every record, so
it finds exactly what the pipeline would fail on, and reports all problems in one error, or drops
the bad records when asked.

`source_fingerprint` is a short hash of what a source holds (uids, questions, answers, images), so
a resumed run can tell that its data changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from zipr1_jax.data.pipelines import PipelineConfig, record_processor
from zipr1_jax.data.sources import BuiltinSource, DataSourceError

MAX_LISTED = 20  # problem lines in the error; the rest are counted


class FilteredSource:
    """The records of `source` at `indices` (the good ones), in order; random access like a source."""

    def __init__(self, source, indices):
        self.source, self.indices = source, tuple(int(i) for i in indices)
        self.name = f"{getattr(source, 'name', type(source).__name__)} ({len(self.indices)} of {len(source)} records)"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[self.indices[int(index)]]

    def _base_dir(self):
        return _base_dir(self.source)

    def __repr__(self) -> str:
        return f"FilteredSource({self.name!r})"


def find_bad_records(source, tokenizer, cfg: PipelineConfig, *, sft: bool = False) -> list[tuple[int, str]]:
    """(index, problem) of every record the loaders would fail on (none for the built-in tasks).

    Args:
      cfg: the loader's PipelineConfig (length buckets, image size, system prompt, processor settings).
      sft: check prompt + answer (the SFT example, longer than the RL prompt) against the buckets.
    """
    if isinstance(source, BuiltinSource):  # generated to fit: checking them would only cost time
        return []
    process = record_processor(tokenizer, cfg, sft=sft)
    bad = []
    for index in range(len(source)):
        problem = _problem(source, index, process)
        if problem is not None:
            bad.append((index, problem))
    return bad


def validate_source(source, tokenizer, cfg: PipelineConfig, *, sft: bool = False,
                    skip_bad: bool = False) -> tuple[Any, list[tuple[int, str]]]:
    """(source to train on, skipped (index, problem) pairs) after checking every record.

    Raises:
      DataSourceError listing every bad record (at most MAX_LISTED lines) unless `skip_bad`; with
      `skip_bad`, only when no record is good.
    """
    bad = find_bad_records(source, tokenizer, cfg, sft=sft)
    if not bad:
        return source, []
    name = getattr(source, "name", repr(source))
    if not skip_bad:
        raise DataSourceError(f"{name}: {len(bad)} of {len(source)} records would fail in training (checked "
                              "before the first step; fix them, or set data.skip_bad_records=true to train on the "
                              f"good ones):\n{format_problems(bad)}")
    if len(bad) == len(source):
        raise DataSourceError(f"{name}: every one of its {len(source)} records is bad, nothing is left to train "
                              f"on:\n{format_problems(bad)}")
    dropped = {i for i, _ in bad}
    return FilteredSource(source, [i for i in range(len(source)) if i not in dropped]), bad


def format_problems(bad: list[tuple[int, str]], limit: int = MAX_LISTED) -> str:
    lines = [f"  record {index}: {problem}" for index, problem in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def _problem(source, index: int, process) -> str | None:
    try:
        record = source[index]
    except (ValueError, TypeError) as e:  # make_record's DataSourceError, or a malformed field
        return _with_uid(str(e), _raw_uid(source, index))
    if not str(record.get("answer") or "").strip():  # sources that do not go through make_record
        return _with_uid("has no answer", record.get("uid"))
    try:
        process(record)
    except (ValueError, OSError) as e:  # unreadable image, too many tokens, vision token mismatch
        return _with_uid(str(e), record.get("uid"))
    return None


def _raw_uid(source, index: int):
    # A record that fails conversion has no uid in make_record's message; the raw row may name one.
    raw = getattr(source, "_raw", None)
    try:
        row = raw(index) if callable(raw) else None
        return None if not isinstance(row, dict) else row.get("uid", row.get("id"))
    except Exception:  # best effort only: the problem itself is already known
        return None


def _with_uid(problem: str, uid) -> str:
    if uid is None or repr(str(uid)) in problem:
        return problem
    return f"(uid {str(uid)!r}) {problem}"


# ---------------------------------------------------------------------- fingerprint
def source_fingerprint(source) -> dict:
    """{"num_records", "hash"}: 16 hex digits over every record's uid, question, answer, answer type,
    choices and images (paths as written relative to the data file's directory, so moving the data
    keeps the hash; encoded bytes and arrays by content). Built-in tasks hash their generator's
    arguments instead of generating every image. Meant for a validated source: a record that does
    not convert raises its DataSourceError."""
    h = hashlib.sha256()
    if isinstance(source, BuiltinSource):
        h.update(json.dumps({"builtin": source.spec}, sort_keys=True).encode())
    else:
        base = _base_dir(source)
        for index in range(len(source)):
            h.update(json.dumps(_record_key(source[index], base)).encode() + b"\n")
    return {"num_records": len(source), "hash": h.hexdigest()[:16]}


def _base_dir(source):
    fn = getattr(source, "_base_dir", None)
    base = fn() if callable(fn) else None
    return None if base is None else os.fspath(base)


def _record_key(record: dict, base: str | None) -> list:
    videos = [[_image_key(f, base) for f in v] if isinstance(v, (list, tuple)) else _image_key(v, base)
              for v in record.get("videos") or ()]
    return [str(record.get("uid")), record.get("question"), record.get("answer"), record.get("answer_type"),
            list(record.get("choices") or ()), [_image_key(img, base) for img in record.get("images") or ()],
            videos, record.get("fps")]


def _image_key(img, base: str | None) -> str:
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        if base is not None and os.path.commonpath([os.path.abspath(path), os.path.abspath(base)]) == \
                os.path.abspath(base):
            path = os.path.relpath(path, base)
        return "path:" + path
    if isinstance(img, (bytes, bytearray)):
        return "bytes:" + hashlib.sha256(img).hexdigest()
    arr = np.ascontiguousarray(np.asarray(img))  # arrays, PIL images
    return f"array:{arr.dtype}{arr.shape}:" + hashlib.sha256(arr.tobytes()).hexdigest()
