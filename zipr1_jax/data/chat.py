"""Qwen chat prompts with the right number of vision pad tokens, and SFT targets.

A prompt is

  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
  <|vision_start|><|image_pad|>*n<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n

with n = t*h*w / merge**2 for each image's patch grid (videos likewise with <|video_pad|>). The
text is tokenized with a single pad per vision block (as Hugging Face's processor does before its
expansion) and the pads are expanded in id space, then `check_vision_tokens` re-counts every block
against its grid: an image-token / placeholder mismatch is the most common silent bug in peer VLM
trainers, so every prompt is validated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant. Answer the question about the image. "
                         "Put your final answer in <answer> </answer> tags.")
ANSWER_TEMPLATE = "<answer>{answer}</answer>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class VisionTokenMismatchError(ValueError):
    """The pad tokens of a vision block do not match its patch grid."""


@dataclass(frozen=True, kw_only=True)
class SpecialIds:
    """Ids of the chat/vision special tokens of one tokenizer (looked up by token string)."""

    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        ids = {}
        for field, tok in (("image_pad", IMAGE_PAD), ("video_pad", VIDEO_PAD), ("vision_start", VISION_START),
                           ("vision_end", VISION_END), ("im_start", IM_START), ("im_end", IM_END)):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {tok} token: not a Qwen-VL tokenizer")
            ids[field] = int(i)
        pad = tokenizer.pad_token_id
        ids["pad"] = int(pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        return cls(**ids)


def merged_token_count(grid_thw, merge_size: int = 2) -> int:
    """Number of LM tokens of one image/video: t*h*w / merge_size**2."""
    t, h, w = (int(g) for g in np.asarray(grid_thw).reshape(3))
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {(t, h, w)} is not divisible by merge_size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def _as_grids(grids) -> list[np.ndarray]:
    if grids is None:
        return []
    arr = np.asarray(grids, dtype=np.int64)
    if arr.size == 0:
        return []
    return list(arr.reshape(-1, 3))


def _content_parts(message: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, text) parts of a message: kind in {"text", "image", "video"}."""
    content = message.get("content")
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, Sequence):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("image", "image_url") or (kind is None and isinstance(part, Mapping) and "image" in part):
            parts.append(("image", ""))
        elif kind == "video" or (kind is None and isinstance(part, Mapping) and "video" in part):
            parts.append(("video", ""))
        elif kind == "text" or (isinstance(part, Mapping) and "text" in part):
            parts.append(("text", str(part["text"])))
        else:
            raise ValueError(f"unknown message part {part!r}: expected type image, video or text")
    return parts


def question_messages(question: str, num_images: int = 1, num_videos: int = 0) -> list[dict]:
    """A single user turn: the vision blocks first (Qwen's convention), then the question."""
    content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def render_prompt_text(messages: Sequence[Mapping[str, Any]], *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                       add_generation_prompt: bool = True) -> str:
    """The chat text with ONE pad token per vision block (same as the saved chat template)."""
    out = []
    if system_prompt is not None and (not messages or messages[0].get("role") != "system"):
        out.append(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    for m in messages:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, got {role!r}")
        body = "".join(text if kind == "text" else
                       f"{VISION_START}{IMAGE_PAD if kind == 'image' else VIDEO_PAD}{VISION_END}"
                       for kind, text in _content_parts(m))
        out.append(f"{IM_START}{role}\n{body}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def check_vision_tokens(ids: Sequence[int] | np.ndarray, image_grid_thw=None, video_grid_thw=None, *,
                        special: SpecialIds, merge_size: int = 2) -> None:
    """Check that each vision block holds exactly its grid's merged patch count of pad tokens.

    Raises:
      VisionTokenMismatchError naming the image/video index and both counts.
    """
    ids = np.asarray(ids).reshape(-1)
    for kind, pad, grids in (("image", special.image_pad, _as_grids(image_grid_thw)),
                             ("video", special.video_pad, _as_grids(video_grid_thw))):
        is_pad = ids == pad
        # Runs of consecutive pad tokens = one vision block each.
        starts = np.flatnonzero(is_pad & ~np.concatenate([[False], is_pad[:-1]]))
        ends = np.flatnonzero(is_pad & ~np.concatenate([is_pad[1:], [False]])) + 1
        counts = (ends - starts).tolist()
        if len(counts) != len(grids):
            raise VisionTokenMismatchError(f"prompt has {len(counts)} {kind} blocks but {len(grids)} {kind} grids")
        for i, (n, grid) in enumerate(zip(counts, grids)):
            want = merged_token_count(grid, merge_size)
            if n != want:
                raise VisionTokenMismatchError(
                    f"{kind} {i}: prompt has {n} {kind} pad tokens but grid {tuple(int(g) for g in grid)} "
                    f"needs {want} (t*h*w / merge_size**2)")


def build_prompt(tokenizer, messages: str | Sequence[Mapping[str, Any]], image_grid_thw=None, video_grid_thw=None,
                 *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, merge_size: int = 2,
                 add_generation_prompt: bool = True, special: SpecialIds | None = None) -> np.ndarray:
    """Token ids of a Qwen chat prompt with expanded, validated vision pad tokens.

    Args:
      tokenizer: a Hugging Face tokenizer with the Qwen special tokens.
      messages: chat messages ({"role", "content": str | [{"type": "image"|"video"|"text", ...}]}),
        or a question string (then one user turn with one image per `image_grid_thw` row first).
      image_grid_thw / video_grid_thw: [n, 3] patch grids in the order the blocks appear.
      system_prompt: prepended unless the messages start with a system turn; None for none.

    Returns:
      ids int32 [L].
    """
    special = special or SpecialIds.from_tokenizer(tokenizer)
    images, videos = _as_grids(image_grid_thw), _as_grids(video_grid_thw)
    if isinstance(messages, str):
        messages = question_messages(messages, len(images), len(videos))
    text = render_prompt_text(messages, system_prompt=system_prompt, add_generation_prompt=add_generation_prompt)
    raw = tokenizer.encode(text, add_special_tokens=False)
    out: list[int] = []
    image_iter, video_iter = iter(images), iter(videos)
    n_img = n_vid = 0
    for prev, tok in zip([None] + raw[:-1], raw):
        # Only pads directly after <|vision_start|> are placeholders; a stray pad in user text stays
        # and is caught by the count check below.
        if tok == special.image_pad and prev == special.vision_start:
            grid = next(image_iter, None)
            if grid is None:
                raise VisionTokenMismatchError(f"messages hold more than {len(images)} images (image_grid_thw rows)")
            out.extend([tok] * merged_token_count(grid, merge_size))
            n_img += 1
        elif tok == special.video_pad and prev == special.vision_start:
            grid = next(video_iter, None)
            if grid is None:
                raise VisionTokenMismatchError(f"messages hold more than {len(videos)} videos (video_grid_thw rows)")
            out.extend([tok] * merged_token_count(grid, merge_size))
            n_vid += 1
        else:
            out.append(tok)
    if n_img != len(images) or n_vid != len(videos):
        raise VisionTokenMismatchError(f"messages hold {n_img} images / {n_vid} videos but {len(images)} image "
                                       f"grids / {len(videos)} video grids were given")
    ids = np.asarray(out, dtype=np.int32)
    check_vision_tokens(ids, images, videos, special=special, merge_size=merge_size)
    return ids


def build_sft_example(tokenizer, messages: str | Sequence[Mapping[str, Any]], answer: str, image_grid_thw=None,
                      video_grid_thw=None, *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                      answer_template: str = ANSWER_TEMPLATE, merge_size: int = 2, loss_on_eos: bool = True,
                      special: SpecialIds | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + formatted answer + <|im_end|>, with a loss mask over the target only.

    The target is `answer_template.format(answer=answer)`; `<|im_end|>` is in the loss by default
    (`loss_on_eos`) so the model learns to stop.

    Returns:
      ids int32 [L] and loss_mask bool [L] (False over the whole prompt).
    """
    special = special or SpecialIds.from_tokenizer(tokenizer)
    prompt = build_prompt(tokenizer, messages, image_grid_thw, video_grid_thw, system_prompt=system_prompt,
                          merge_size=merge_size, special=special)
    target = np.asarray(tokenizer.encode(answer_template.format(answer=answer), add_special_tokens=False),
                        dtype=np.int32)
    ids = np.concatenate([prompt, target, np.asarray([special.im_end], np.int32)])
    mask = np.zeros(ids.shape, dtype=bool)
    mask[len(prompt):len(prompt) + len(target) + (1 if loss_on_eos else 0)] = True
    return ids, mask
