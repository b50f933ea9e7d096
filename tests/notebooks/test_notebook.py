"""notebooks/zipr1_colab_tpu.ipynb executes top to bottom (nbclient, a fresh kernel) on one CPU device
with the tiny model: install check, platform detection, sparse inference and its heatmap, GRPO steps
through the trainer, HF export and reload. Any cell error fails the test."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "notebooks", "zipr1_colab_tpu.ipynb")


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
    # The kernel inherits this environment: one CPU device, the tiny model, outputs under tmp_path.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("ZIPR1_WORK", str(tmp_path / "work"))
    monkeypatch.delenv("ZIPR1_HF_DIR", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    text = _text(nb)
    assert "sparse attention backend: xla" in text
    assert "per-layer token ratios:" in text
    assert "max |logit difference|" in text
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))  # the heatmap / plots were drawn
    export = tmp_path / "work" / "hf_export"
    files = set(os.listdir(export))
    assert "config.json" in files and "tokenizer.json" in files and any(f.endswith(".safetensors") for f in files)
