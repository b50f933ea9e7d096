"""The README's promises about the code: its Python API block runs as written (on a tiny model saved
the Hugging Face way), and every path its package map names exists."""

import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _block(section: str, lang: str = "") -> str:
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_python_api_block_runs(tmp_path, capsys):
    pytest.importorskip("torch")
    from tests.models.hf_utils import tiny_hf_model
    from zipr1_jax.data.tokenizer import build_tiny_tokenizer
    from zipr1_jax.models.qwen_vl.config import tiny_qwen2_vl

    hf_dir = str(tmp_path / "hf")
    tiny_hf_model(tiny_qwen2_vl(), seed=1).save_pretrained(hf_dir)
    build_tiny_tokenizer(hf_dir)
    code = _block(_section("Python API"), "python")
    assert code.count('"/path/to/Qwen2-VL-2B-Instruct"') == 2
    scope = {}
    exec(compile(code.replace("/path/to/Qwen2-VL-2B-Instruct", hf_dir), "README.md", "exec"), scope)
    ids = scope["ids"]["input_ids"]
    assert scope["logits"].shape[:2] == ids.shape
    # Dense greedy decoding equals the argmax of the forward's last logits at the first token.
    assert int(scope["dense"].tokens_BT[0, 0]) == int(np.argmax(np.asarray(scope["logits"])[0, -1]))
    assert float(scope["dense"].token_ratio_B[0]) == 1.0
    assert 0.0 < float(scope["sparse"].token_ratio_B[0]) <= 1.0
    assert "[" in capsys.readouterr().out
    mask = scope["ids"]["attention_mask"]
    with pytest.raises(TypeError, match="attention_mask given twice"):
        scope["model"](ids, attention_mask=mask, attention_mask_BL=mask)


def test_package_map_names_only_existing_paths():
    lines = _block(_section("Package map")).splitlines()
    missing, folder, parents = [], ROOT, {}
    for line in lines:
        indent = len(line) - len(line.lstrip())
        head = line.strip().split(" ")[0] if line.strip() else ""
        if indent < 14 and head.endswith("/"):  # a folder entry: zipr1_jax/, models/qwen_vl/, configs/, ...
            base = ROOT if indent == 0 else parents[indent - 2]
            folder = os.path.join(base, head)
            parents[indent] = folder
            if not os.path.isdir(folder):
                missing.append(head)
        elif indent < 14 and head:  # a file entry inside the last folder (typing.py, config.py ...)
            base = parents.get(indent - 2, ROOT)
            folder = base
        for name in re.findall(r"(?<![\w/])[\w./]+\.(?:py|yaml|md|png|ipynb)\b|(?<![\w/])[\w./]+/(?=[\s,)]|$)", line):
            name = name.rstrip(",")
            if not any(os.path.exists(os.path.join(b, name)) for b in (folder, ROOT, os.path.join(ROOT, "zipr1_jax"))):
                missing.append(name)
    assert not missing, f"README package map names paths that do not exist: {missing}"
