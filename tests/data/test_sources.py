"""Sources: JSONL / LLaVA files, HF datasets on disk (pyarrow), in-memory records, bad input."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zipr1_jax.data.sources import (DataSourceError, HFDiskSource, JsonlSource, RecordListSource, load_image,
                                    make_record)


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    rs = np.random.RandomState(0)
    arrs = [rs.randint(0, 256, (28, 56, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    return arrs


def test_jsonl_with_relative_paths(tmp_path, images):
    rows = [{"question": "Q0?", "answer": "A", "answer_type": "choice", "choices": ["A", "B"], "image": "imgs/0.png"},
            {"question": "Q1?", "answer": 3, "images": ["imgs/1.png", "imgs/2.png"], "uid": "x1"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = JsonlSource(path)
    assert len(src) == 2
    r0, r1 = src[0], src[1]
    assert (r0["question"], r0["answer"], r0["answer_type"], r0["choices"]) == ("Q0?", "A", "choice", ("A", "B"))
    assert r1["answer"] == "3" and r1["answer_type"] == "exact" and r1["uid"] == "x1" and r1["choices"] == ()
    np.testing.assert_array_equal(load_image(r0["images"][0]), images[0])
    np.testing.assert_array_equal(load_image(r1["images"][1]), images[2])
    with pytest.raises(IndexError, match="out of range"):
        src[2]


def test_llava_json(tmp_path, images):
    rows = [{"id": "l0", "image": "imgs/1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "blue"}]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    r = JsonlSource(path)[0]
    assert (r["question"], r["answer"], r["uid"]) == ("What colour is it?", "red", "l0")
    np.testing.assert_array_equal(load_image(r["images"][0]), images[1])


def test_file_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        JsonlSource(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataSourceError, match="empty.jsonl' has no examples"):
        JsonlSource(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(DataSourceError, match="bad.jsonl line 2: not valid JSON"):
        JsonlSource(bad)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"question": "q", "answer": "a"}\n{"question": "r", "answer": "  "}\n')
    with pytest.raises(DataSourceError, match="empty answer"):
        JsonlSource(blank)[1]
    latin = tmp_path / "latin.jsonl"  # a Latin-1 byte on line 3: the error names the file and the line
    latin.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "r", "answer": "b"}\n'
                      b'{"question": "caf\xe9", "answer": "c"}\n')
    with pytest.raises(DataSourceError, match=r"latin.jsonl line 3: not UTF-8 text \(byte 0xe9"):
        JsonlSource(latin)
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    src = JsonlSource(noans)
    with pytest.raises(DataSourceError, match=r"record 1 of .*noans.jsonl has no answer"):
        src[1]
    badtype = tmp_path / "t.jsonl"
    badtype.write_text('{"question": "q", "answer": "a", "answer_type": "fuzzy"}\n')
    with pytest.raises(DataSourceError, match="answer_type 'fuzzy'"):
        JsonlSource(badtype)[0]
    missing_img = tmp_path / "m.jsonl"
    missing_img.write_text('{"question": "q", "answer": "a", "image": "nope.png"}\n')
    with pytest.raises(DataSourceError, match="image 0: image file .*nope.png' does not exist"):
        load_image(JsonlSource(missing_img)[0]["images"][0], "image 0")
    with pytest.raises(DataSourceError, match="unreadable image"):
        load_image(b"not a png")
    with pytest.raises(DataSourceError, match=r"\[H, W, 3\]"):
        load_image(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(DataSourceError, match="has no question"):
        make_record({"answer": "a"}, "record 0 of x")


def _hf_table(images, n=3):
    return pa.table({
        "query": [f"Q{i}?" for i in range(n)],
        "answer": [str(i) for i in range(n)],
        "image": [{"bytes": png_bytes(images[i % len(images)]), "path": None} for i in range(n)],
    })


def test_hf_parquet_dir_with_split_and_columns(tmp_path, images):
    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(_hf_table(images), tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(_hf_table(images, 2), tmp_path / "ds" / "data" / "test-00000-of-00001.parquet")
    src = HFDiskSource(tmp_path / "ds", split="train", columns={"question": "query"})
    assert len(src) == 3 and len(HFDiskSource(tmp_path / "ds", split="test", columns={"question": "query"})) == 2
    r = src[2]
    assert (r["question"], r["answer"]) == ("Q2?", "2")
    np.testing.assert_array_equal(load_image(r["images"][0]), images[2])
    with pytest.raises(DataSourceError, match="has no columns"):
        HFDiskSource(tmp_path / "ds", split="train", columns={"question": "prompt"})
    with pytest.raises(DataSourceError, match="no parquet or arrow files for split 'validation'"):
        HFDiskSource(tmp_path / "ds", split="validation")
    with pytest.raises(DataSourceError, match="does not exist"):
        HFDiskSource(tmp_path / "nothing")


def test_hf_save_to_disk_arrow_layout(tmp_path, images):
    d = tmp_path / "saved"
    d.mkdir()
    table = _hf_table(images).rename_columns(["question", "answer", "image"])
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text("{}")
    src = HFDiskSource(d)
    assert len(src) == 3 and src[1]["question"] == "Q1?"
    np.testing.assert_array_equal(load_image(src[1]["images"][0]), images[1])
    empty = tmp_path / "empty.parquet"
    pq.write_table(_hf_table(images).slice(0, 0), empty)
    with pytest.raises(DataSourceError, match="has no examples"):
        HFDiskSource(empty)


def test_record_list_source():
    with pytest.raises(DataSourceError, match="no examples"):
        RecordListSource([])
    src = RecordListSource([{"question": "q", "answer": "a", "image": np.zeros((28, 28, 3), np.uint8)}])
    assert src[0]["images"][0].shape == (28, 28, 3) and src[0]["uid"] == "record 0 of records"


def test_builtin_source(monkeypatch):
    import dataclasses
    import sys
    import types

    try:
        import zipr1_jax.data.tasks  # noqa: F401
    except ImportError:  # stand-in until zipr1_jax.data.tasks lands: yields TaskExample-like dataclasses
        @dataclasses.dataclass(frozen=True)
        class TaskExample:
            uid: str
            task: str
            image: np.ndarray
            question: str
            answer: str
            answer_type: str
            choices: tuple = ()
            difficulty: int = 1

        class BuiltinTaskSource:
            def __init__(self, num_examples, *, seed=0, image_size=(56, 56), **kw):
                self.n, self.seed, self.size = num_examples, seed, image_size

            def __len__(self):
                return self.n

            def __getitem__(self, i):
                return TaskExample(f"t{self.seed}-{i}", "count", np.zeros((*self.size, 3), np.uint8), "How many?",
                                   "2", "choice", ("1", "2"))

        monkeypatch.setitem(sys.modules, "zipr1_jax.data.tasks",
                            types.SimpleNamespace(BuiltinTaskSource=BuiltinTaskSource, TaskExample=TaskExample))
    from zipr1_jax.data.sources import BuiltinSource

    src = BuiltinSource(5, seed=1, image_size=(56, 84))
    assert len(src) == 5
    rec = src[3]
    assert set(rec) == {"question", "answer", "answer_type", "choices", "images", "uid"}
    assert rec["images"][0].shape == (56, 84, 3) and rec["images"][0].dtype == np.uint8
    assert rec["answer_type"] in ("exact", "choice", "number") and isinstance(rec["choices"], tuple)
    again = src[3]  # random access is deterministic
    assert again["uid"] == rec["uid"] and np.array_equal(again["images"][0], rec["images"][0])
    with pytest.raises(DataSourceError, match="num_examples"):
        BuiltinSource(0)
