"""Checkpoint conversion both ways, Hugging Face <-> Orbax (library API behind
scripts/convert_hf_to_orbax.py and scripts/export_hf.py; usable from a notebook).

  convert_hf_to_orbax(hf_dir, out_dir, dtype=, mesh=, optimizer=, overwrite=) -> ImportResult
  export_hf(checkpoint_dir, out_dir, step=, source_hf_dir=, model_config=, dtype=, max_shard_size=,
            mesh=, overwrite=) -> ExportResult
  ConversionError: every refusal / failure (a CheckpointError), naming the step, key or file.
"""

from zipr1_jax.convert.hf_to_orbax import ConversionError, ImportResult, convert_hf_to_orbax
from zipr1_jax.convert.orbax_to_hf import (COPIED_FILES, SPARSITY_FIELD, ExportResult, export_hf, parse_size,
                                           resolve_model_config, sparsity_record)

__all__ = ["COPIED_FILES", "SPARSITY_FIELD", "ConversionError", "ExportResult", "ImportResult", "convert_hf_to_orbax",
           "export_hf", "parse_size", "resolve_model_config", "sparsity_record"]
