"""Whole-source validation before training (every bad record in one error, or dropped and reported)
and the source fingerprint; a training run on a bad JSONL stops before its first step."""

import json

import numpy as np
import pytest
from PIL import Image

from zipr1_jax.data.pipelines import PipelineConfig
from zipr1_jax.data.sources import BuiltinSource, DataSourceError, JsonlSource, RecordListSource
from zipr1_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from zipr1_jax.data.validate import MAX_LISTED, find_bad_records, source_fingerprint, validate_source

PIPE = PipelineConfig(batch_size=1, length_buckets=(64, 128), image_size=(56, 56), system_prompt=None)
LONG = "Describe every detail of the picture. " * 8  # ~300 tokens: over the largest bucket (128)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _write_jsonl(tmp_path, rows, name="data.jsonl"):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((56, 56, 3), 40 * (i + 1), np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows():
    return [{"uid": "good", "question": "What colour?", "answer": "red", "image": "imgs/0.png"},
            {"uid": "no_image", "question": "What colour?", "answer": "red", "image": "imgs/missing.png"},
            {"uid": "empty_answer", "question": "What colour?", "answer": " ", "image": "imgs/1.png"},
            {"uid": "too_long", "question": LONG, "answer": "red", "image": "imgs/1.png"},
            {"uid": "good2", "question": "Which shape?", "answer": "circle", "image": "imgs/1.png"}]


def test_one_error_names_every_bad_record(tmp_path, tok):
    src = JsonlSource(_write_jsonl(tmp_path, _rows()))
    with pytest.raises(DataSourceError) as err:
        validate_source(src, tok, PIPE)
    msg = str(err.value)
    assert "3 of 5 records" in msg and "data.skip_bad_records" in msg
    lines = msg.splitlines()[1:]
    assert len(lines) == 3
    for index, (uid, why) in zip((1, 2, 3), [("no_image", "does not exist"), ("empty_answer", "empty answer"),
                                             ("too_long", "largest length bucket 128")]):
        line = next(x for x in lines if x.startswith(f"  record {index}:"))
        assert repr(uid) in line and why in line
    assert "good" not in msg.replace("good ones", "")


def test_skip_mode_keeps_only_good_records(tmp_path, tok):
    src = JsonlSource(_write_jsonl(tmp_path, _rows()))
    kept, skipped = validate_source(src, tok, PIPE, skip_bad=True)
    assert [i for i, _ in skipped] == [1, 2, 3]
    assert "'no_image'" in skipped[0][1] and "'too_long'" in skipped[2][1]
    assert len(kept) == 2 and [kept[i]["uid"] for i in range(2)] == ["good", "good2"]
    assert find_bad_records(kept, tok, PIPE) == []
    # a clean source comes back as it is
    clean = RecordListSource([src[0], src[4]])
    assert validate_source(clean, tok, PIPE) == (clean, [])
    with pytest.raises(DataSourceError, match="every one of its 1 records is bad"):
        validate_source(RecordListSource([src[3]]), tok, PIPE, skip_bad=True)


def test_sft_checks_prompt_plus_answer(tok):
    # The prompt fits the bucket; prompt + a long answer (the SFT example) does not.
    image = np.zeros((56, 56, 3), np.uint8)
    short = PipelineConfig(batch_size=1, length_buckets=(64,), image_size=(56, 56), system_prompt=None)
    src = RecordListSource([{"uid": "a", "question": "Q?", "answer": "x" * 60, "image": image}])
    assert find_bad_records(src, tok, short) == []
    (index, why), = find_bad_records(src, tok, short, sft=True)
    assert index == 0 and "largest length bucket 64" in why
    # The hint names real config keys (it once named max_pixels, which is none).
    assert "data.length_buckets" in why and "data.image_size" in why and "max_pixels" not in why


def test_problem_list_is_capped(tok):
    rows = [{"uid": f"u{i}", "question": LONG, "answer": "a"} for i in range(MAX_LISTED + 5)]
    with pytest.raises(DataSourceError) as err:
        validate_source(RecordListSource(rows), tok, PIPE)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == "  ... and 5 more"


def test_builtin_source_is_not_checked(tok, monkeypatch):
    import zipr1_jax.data.validate as V

    monkeypatch.setattr(V, "record_processor", lambda *a, **k: pytest.fail("builtin records were processed"))
    src = BuiltinSource(4, image_size=(56, 56))
    assert validate_source(src, tok, PIPE) == (src, [])


def test_fingerprint_changes_with_records_only(tmp_path):
    rows = [r for r in _rows() if r["uid"] != "empty_answer"]  # a record that does not convert has no key
    fp = source_fingerprint(JsonlSource(_write_jsonl(tmp_path, rows)))
    assert fp["num_records"] == 4 and len(fp["hash"]) == 16
    assert source_fingerprint(JsonlSource(tmp_path / "data.jsonl")) == fp  # stable
    # the same data in another directory (image paths are relative to the file): same fingerprint
    moved = tmp_path / "moved"
    moved.mkdir()
    assert source_fingerprint(JsonlSource(_write_jsonl(moved, rows))) == fp
    for key, value in [("answer", "blue"), ("question", "Which colour?"), ("image", "imgs/1.png"), ("uid", "g")]:
        changed = [dict(rows[0], **{key: value})] + rows[1:]
        other = source_fingerprint(JsonlSource(_write_jsonl(tmp_path, changed, name=f"{key}.jsonl")))
        assert other["num_records"] == 4 and other["hash"] != fp["hash"], key
    fewer = source_fingerprint(JsonlSource(_write_jsonl(tmp_path, rows[:3], name="fewer.jsonl")))
    assert fewer["num_records"] == 3 and fewer["hash"] != fp["hash"]
    # in-memory arrays are hashed by content; built-in tasks by their generator's arguments
    a = np.zeros((28, 28, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    rec = {"question": "Q?", "answer": "A", "image": a}
    assert source_fingerprint(RecordListSource([rec])) == source_fingerprint(RecordListSource([dict(rec)]))
    assert source_fingerprint(RecordListSource([rec])) != source_fingerprint(RecordListSource([dict(rec, image=b)]))
    assert source_fingerprint(BuiltinSource(8, seed=1)) == source_fingerprint(BuiltinSource(8, seed=1))
    assert source_fingerprint(BuiltinSource(8, seed=1)) != source_fingerprint(BuiltinSource(8, seed=2))


def _run_cfg(tmp_path, data_path, *extra):
    from tests.train.tiny_run import TINY
    from zipr1_jax.train.cli import load_config

    return load_config(None, TINY + [f"log.out_dir={tmp_path / 'run'}", "data.source=jsonl",
                                     f"data.path={data_path}", "log.plots=false"] + list(extra))


def test_training_on_a_bad_jsonl_fails_before_the_first_step(tmp_path, monkeypatch):
    import jax

    from zipr1_jax.train import trainer

    monkeypatch.setattr(trainer, "_run", lambda *a, **k: pytest.fail("training started on bad data"))
    path = _write_jsonl(tmp_path, _rows())
    with pytest.raises(DataSourceError, match="3 of 5 records would fail") as err:
        trainer.run(_run_cfg(tmp_path, path), devices=jax.devices()[:1])
    assert all(uid in str(err.value) for uid in ("'no_image'", "'empty_answer'", "'too_long'"))


def test_training_skips_bad_records_when_asked(tmp_path, capsys):
    import jax

    from zipr1_jax.train.setup import setup

    path = _write_jsonl(tmp_path, _rows())
    job = setup(_run_cfg(tmp_path, path, "data.skip_bad_records=true", "eval.num_examples=1"),
                devices=jax.devices()[:1])
    try:
        assert [i for i, _ in job.skipped_records] == [1, 2, 3]
        out = capsys.readouterr().out
        assert out.count("data.skip_bad_records: skipped record") == 3 and "'too_long'" in out
        batch = job.next_batch("sft")
        assert set(batch["uid"]) <= {"good", "good2"}
    finally:
        job.close()
