"""Shared by the benchmark scripts: replace (or append) one `## ...` section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import re

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def replace_section(heading: str, body: str, path: str | None = None) -> str:
    """Write `body` (which starts with `heading`) in place of that section, or append it.

    A section runs from its heading line to the next `## ` heading or the end of the file; the
    other sections are left byte for byte. Returns the path written.
    """
    path = path or BENCHMARKS_MD
    if not body.startswith(heading):
        raise ValueError(f"section body must start with its heading {heading!r}")
    text = open(path).read() if os.path.exists(path) else "# zipr1_jax benchmarks\n"
    pattern = re.compile(rf"{re.escape(heading)}\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body.rstrip("\n") + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return path


def add_md_args(ap: argparse.ArgumentParser) -> None:
    """--write-md (replace the script's section of BENCHMARKS.md) and the tests' hidden --md-path."""
    ap.add_argument("--write-md", action="store_true")
    ap.add_argument("--md-path", default=None, help=argparse.SUPPRESS)
