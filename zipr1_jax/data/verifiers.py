"""Answer extraction and verifiers for verifiable rewards (exact, multiple choice, number).

All functions are total: malformed or empty responses give ``None`` / ``False``, never raise.
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

ANSWER_TYPES = ("exact", "choice", "number")
CHOICE_LETTERS = "ABCDE"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>(.*)$", re.IGNORECASE | re.DOTALL)
_ANSWER_PREFIX = re.compile(r"(?:final\s+)?answer\s*(?:is)?\s*[:=]\s*(.+)", re.IGNORECASE)
_TAGS = re.compile(r"</?\s*[a-zA-Z_]+\s*>")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def _boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}`` with balanced braces."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None


def extract_answer(response) -> str | None:
  """The answer span of a model response, or None when there is nothing to read.

  Order: last ``<answer>...</answer>``; an unclosed trailing ``<answer>``; last ``\\boxed{...}``;
  the last "answer: X" line; else the last non-empty line (stray tags removed).
  """
  if response is None or not isinstance(response, str):
    return None
  tags = _ANSWER_TAG.findall(response)
  if tags:
    out = tags[-1].strip()
    return out or None
  m = _ANSWER_OPEN.search(response)
  if m and m.group(1).strip():
    return _TAGS.sub("", m.group(1)).strip() or None
  boxed = _boxed(response)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  lines = [l.strip() for l in _TAGS.sub("\n", response).splitlines() if l.strip()]
  for line in reversed(lines):
    m = _ANSWER_PREFIX.search(line)
    if m and m.group(1).strip():
      return m.group(1).strip()
  return lines[-1] if lines else None


def normalize_text(text) -> str:
  """Lowercase, drop punctuation and articles, collapse whitespace."""
  if text is None:
    return ""
  text = str(text).lower()
  text = "".join(" " if ch in string.punctuation else ch for ch in text)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def verify_exact(response, answer: str) -> bool:
  """Normalised extracted answer equals the normalised reference."""
  pred = extract_answer(response)
  return pred is not None and normalize_text(pred) == normalize_text(answer) != ""


def _choice_letter(pred: str, choices: Sequence[str]) -> str | None:
  s = pred.strip()
  m = re.fullmatch(r"\(?\s*([A-Ea-e])\s*[\).:]?(?:\s.*)?", s, re.DOTALL)
  if m and (len(s) <= 3 or s[1:2] in ").:" or s[:1] == "("):
    return m.group(1).upper()
  m = re.search(r"(?:answer|option|choice)\s*(?:is)?\s*[:=]?\s*\(?([A-Ea-e])\b\)?", s,
                re.IGNORECASE)
  if m:
    return m.group(1).upper()
  norm = normalize_text(s)
  for i, c in enumerate(choices[:len(CHOICE_LETTERS)]):
    if norm and norm == normalize_text(c):
      return CHOICE_LETTERS[i]
  m = re.findall(r"\(([A-Ea-e])\)", s)
  if m:
    return m[-1].upper()
  return None


def verify_choice(response, answer: str, choices: Sequence[str] = ()) -> bool:
  """Multiple choice: the response names the letter ``answer`` (A-E) or its option text."""
  pred = extract_answer(response)
  if pred is None:
    return False
  want = answer.strip().strip("().").upper()
  if len(want) != 1 or want not in CHOICE_LETTERS:
    # The reference is the option text itself: map it to its letter if listed.
    want_norm = normalize_text(answer)
    idx = [i for i, c in enumerate(choices) if normalize_text(c) == want_norm]
    if not idx:
      return normalize_text(pred) == want_norm != ""
    want = CHOICE_LETTERS[idx[0]]
  return _choice_letter(pred, tuple(choices)) == want


def parse_number(text) -> float | None:
  """Last number in ``text`` ("1,000", "-2.5", "1e3") or a number word zero..twenty."""
  if text is None:
    return None
  s = str(text).strip().lower()
  found = _NUMBER.findall(s)
  if found:
    try:
      return float(found[-1].replace(",", ""))
    except ValueError:
      return None
  words = re.findall(r"[a-z]+", s)
  for w in reversed(words):
    if w in _WORD_NUMBERS:
      return float(_WORD_NUMBERS[w])
  return None


def verify_number(response, answer, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
  """Numeric match: |pred - ref| <= max(rel_tol * |ref|, abs_tol)."""
  pred = parse_number(extract_answer(response))
  ref = parse_number(answer)
  if pred is None or ref is None or not math.isfinite(pred):
    return False
  return math.isclose(pred, ref, rel_tol=rel_tol, abs_tol=abs_tol)


def verify(response, answer: str, answer_type: str, *, choices: Sequence[str] = (),
           rel_tol: float = 1e-6, abs_tol: float = 1e-6, tol: float | None = None) -> bool:
  """Dispatches on ``answer_type`` in {"exact", "choice", "number"}; returns a bool.

  ``tol`` (contract alias) sets both numeric tolerances when given.
  """
  if tol is not None:
    rel_tol = abs_tol = float(tol)
  if answer_type == "exact":
    return verify_exact(response, answer)
  if answer_type == "choice":
    return verify_choice(response, answer, choices)
  if answer_type == "number":
    return verify_number(response, answer, rel_tol=rel_tol, abs_tol=abs_tol)
  raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
