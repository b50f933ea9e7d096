"""Tiny tokenizer (offline, fixed special ids) and Qwen chat prompt / SFT target building."""

import string

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from zipr1_jax.data.chat import (DEFAULT_SYSTEM_PROMPT, SpecialIds, VisionTokenMismatchError, build_prompt,
                                 build_sft_example, check_vision_tokens, merged_token_count, question_messages)
from zipr1_jax.data.tokenizer import TINY_SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer
from zipr1_jax.models.qwen_vl.config import tiny_qwen2_vl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_special_ids_match_tiny_config(tok):
    cfg = tiny_qwen2_vl()
    assert len(tok) == cfg.text.vocab_size == 263
    for t, i in TINY_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(t) == i
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_end|>") == cfg.vision_end_token_id
    assert tok.pad_token_id == cfg.pad_token_id == 257
    assert tok.eos_token_id == cfg.eos_token_id == 256
    sp = SpecialIds.from_tokenizer(tok)
    assert (sp.im_start, sp.im_end, sp.pad) == (258, 256, 257)


def test_build_is_deterministic(tmp_path):
    a = (tmp_path / "a").as_posix()
    b = (tmp_path / "b").as_posix()
    build_tiny_tokenizer(a), build_tiny_tokenizer(b)
    assert open(f"{a}/tokenizer.json").read() == open(f"{b}/tokenizer.json").read()


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80) | st.text(alphabet=string.printable, max_size=80))
def test_ascii_round_trip(tok, s):
    ids = tok.encode(s, add_special_tokens=False)
    assert all(0 < i < 251 for i in ids)  # 0 is <|unk|>: never needed for ASCII
    assert tok.decode(ids) == s


def test_word_merges_compress(tok):
    s = "How many red circles are there?"
    assert len(tok.encode(s, add_special_tokens=False)) < len(s) // 2


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_prompt_layout_and_pad_count(tok):
    grids = np.array([[1, 4, 6], [1, 2, 2]])
    ids = build_prompt(tok, "What colour?", grids)
    assert ids.dtype == np.int32
    text = tok.decode(ids)
    n0, n1 = merged_token_count(grids[0]), merged_token_count(grids[1])
    assert (n0, n1) == (6, 1)
    expected = (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|>{'<|image_pad|>' * n0}<|vision_end|>"
                f"<|vision_start|>{'<|image_pad|>' * n1}<|vision_end|>What colour?<|im_end|>\n"
                f"<|im_start|>assistant\n")
    assert text == expected
    assert (ids == 251).sum() == n0 + n1


def test_prompt_matches_saved_chat_template(tok):
    grids = np.array([[1, 4, 4]])
    messages = [{"role": "system", "content": "Be brief."}] + question_messages("How many stars?")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 4)
    want = tok.encode(expanded, add_special_tokens=False)
    got = build_prompt(tok, messages, grids)
    np.testing.assert_array_equal(got, want)


def test_video_and_no_system(tok):
    ids = build_prompt(tok, [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Go"}]}],
                       video_grid_thw=[[2, 4, 4]], system_prompt=None)
    assert (ids == 252).sum() == 8 and (ids == 251).sum() == 0
    assert tok.decode(ids).startswith("<|im_start|>user\n<|vision_start|><|video_pad|>")


def test_mismatch_errors(tok):
    sp = SpecialIds.from_tokenizer(tok)
    ids = build_prompt(tok, "Q", [[1, 4, 4], [1, 2, 4]])
    with pytest.raises(VisionTokenMismatchError, match=r"image 1: prompt has 2 image pad tokens but grid \(1, 2, 6\) needs 3"):
        check_vision_tokens(ids, [[1, 4, 4], [1, 2, 6]], special=sp)
    with pytest.raises(VisionTokenMismatchError, match="2 image blocks but 1 image grids"):
        check_vision_tokens(ids, [[1, 4, 4]], special=sp)
    # A literal pad token in user text joins no placeholder and is caught.
    with pytest.raises(VisionTokenMismatchError):
        build_prompt(tok, "look <|image_pad|> here", [[1, 2, 2]])
    with pytest.raises(VisionTokenMismatchError, match="more than 0 images"):
        build_prompt(tok, question_messages("Q", 1), None)
    with pytest.raises(VisionTokenMismatchError, match="hold 1 images"):
        build_prompt(tok, question_messages("Q", 1), [[1, 2, 2], [1, 2, 2]])
    with pytest.raises(ValueError, match="not divisible"):
        build_prompt(tok, "Q", [[1, 3, 4]])


def test_sft_example_mask(tok):
    ids, mask = build_sft_example(tok, "How many?", "3", [[1, 2, 2]])
    prompt = build_prompt(tok, "How many?", [[1, 2, 2]])
    np.testing.assert_array_equal(ids[:len(prompt)], prompt)
    assert not mask[:len(prompt)].any() and mask[len(prompt):].all()
    assert tok.decode(ids[mask]) == "<answer>3</answer><|im_end|>"
    ids2, mask2 = build_sft_example(tok, "How many?", "3", [[1, 2, 2]], loss_on_eos=False, answer_template="{answer}")
    assert tok.decode(ids2[mask2]) == "3" and ids2[-1] == 256 and not mask2[-1]
