"""A tiny offline Hugging Face tokenizer whose special ids match the tiny Qwen-VL configs.

Tests and the default CPU run need a real `transformers` tokenizer but may never touch the hub, so
`build_tiny_tokenizer` trains a small character-level BPE with the `tokenizers` library on a fixed
corpus (English words used by the built-in visual tasks and the chat format) and saves it in HF
format. Ordinary tokens take ids 0..250: one per ASCII character (so any ASCII text round-trips
losslessly), the rest frequent merges. Special tokens sit at the
ids `tiny_qwen2_vl()` uses (`TINY_SPECIAL_TOKENS`); 259..262 are reserved so the vocab is 263.
Non-ASCII characters encode to `<|unk|>` (id 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import AddedToken

NUM_ORDINARY = 251
TINY_SPECIAL_TOKENS: dict[str, int] = {
    "<|image_pad|>": 251, "<|video_pad|>": 252, "<|vision_start|>": 253, "<|vision_end|>": 254,
    "<|endoftext|>": 255, "<|im_end|>": 256, "<|pad|>": 257, "<|im_start|>": 258,
    "<|reserved_0|>": 259, "<|reserved_1|>": 260, "<|reserved_2|>": 261, "<|reserved_3|>": 262,
}
UNK = "<|unk|>"
ALPHABET = [chr(c) for c in range(128)]  # all of ASCII, control characters included

# Qwen2-VL's template logic (system default, image/video placeholders as one pad each: the
# processor or `chat.build_prompt` expands them to the merged patch count), written for our tokens.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = """
system user assistant You are a helpful . Answer the question about image . Put your final answer
in <answer> </answer> tags . Think step by step . How many shapes of colour color are there ?
What is the colour of shape at top bottom left right center middle corner ? Which is larger more
fewer less than equal same count number digits digit string read Read written shown in picture
red green blue yellow orange purple white black gray grey pink brown cyan magenta circle circles
square squares triangle triangles rectangle star stars cross crosses dot dots shape shapes colour
colours objects object A B C D E yes no Yes No true false 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
The answer is : , ( ) the a an of in on at to is are and or with for from by this that which what
Choose one option options choices choice letter Respond respond only single word
"""


def _corpus() -> list[str]:
    lines = [line for line in _WORDS.strip().split("\n")]
    # Repeat whole words so their merges win over rarer pairs; the list is fixed, so the trained
    # vocab is deterministic.
    words = " ".join(lines).split()
    return lines * 4 + [" " + w for w in words] * 8 + ["\n".join(lines)]


def _train_model() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # GPT-2-like split (a word keeps its leading space) so merges never cross word boundaries.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]+|\s+"),
                                             behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=NUM_ORDINARY, special_tokens=[UNK], initial_alphabet=ALPHABET,
                                  limit_alphabet=len(ALPHABET), show_progress=False, min_frequency=2)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tiny_tokenizer(out_dir: str | os.PathLike) -> str:
    """Train and save the tiny tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map).

    Args:
      out_dir: directory to write (created if missing).

    Returns:
      `out_dir` as a string, loadable with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = _train_model()
    model_json = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    if len(vocab) > NUM_ORDINARY:
        raise RuntimeError(f"tiny tokenizer trained {len(vocab)} ordinary tokens, more than {NUM_ORDINARY}")
    missing = [c for c in ALPHABET if c not in vocab]
    if missing:
        raise RuntimeError(f"tiny tokenizer lost alphabet characters {missing!r}")
    # Fill unused ordinary ids (never produced: no merge builds them) so specials land on fixed ids.
    for i in range(len(vocab), NUM_ORDINARY):
        vocab[f"<|filler_{i}|>"] = i
    vocab.update(TINY_SPECIAL_TOKENS)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = trained.decoder
    # Already in the model vocab, so the added-token layer keeps their ids (checked below).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    for t, i in TINY_SPECIAL_TOKENS.items():
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    tok.save(str(out / "tokenizer.json"))
    specials = list(TINY_SPECIAL_TOKENS)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "unk_token": UNK,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": specials,
        "chat_template": QWEN_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "unk_token": UNK,
                   "additional_special_tokens": specials}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return str(out)


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer from a LOCAL directory (never the hub).

    Raises:
      FileNotFoundError: the directory or its tokenizer files are missing.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist")
    has_fast = (p / "tokenizer.json").is_file()
    has_slow = (p / "vocab.json").is_file() and (p / "merges.txt").is_file()
    if not (has_fast or has_slow):
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} has neither tokenizer.json nor vocab.json + "
                                f"merges.txt; build one with build_tiny_tokenizer() or copy a model's tokenizer files")
    from transformers import AutoTokenizer  # heavy import: only when a tokenizer is really loaded

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
