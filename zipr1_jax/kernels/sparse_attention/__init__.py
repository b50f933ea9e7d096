"""ZipR1 sparse attention: top-p token selection, compact attention over kept keys, decode.

Public API (Pallas kernels are loaded lazily by the dispatcher, never imported here):
  SelectionConfig, SparsityConfig             configs (config.py)
  select_topp, Selection                      top-p kept set of one layer (selection.py)
  attend_compact_reference, masked_dense_attention   pure-jnp contract + oracle (reference.py)
  sparse_attention, select_and_attend         prefill dispatcher (api.py)
  decode_attention                            decode over the pruned cache (decode.py)
"""

from zipr1_jax.kernels.sparse_attention.api import (bucket_sizes, default_backend,
                                                    select_and_attend, sparse_attention)
from zipr1_jax.kernels.sparse_attention.config import SelectionConfig, SparsityConfig
from zipr1_jax.kernels.sparse_attention.decode import decode_attention
from zipr1_jax.kernels.sparse_attention.reference import (attend_compact_reference,
                                                          masked_dense_attention)
from zipr1_jax.kernels.sparse_attention.selection import Selection, select_topp

__all__ = [
    "Selection", "SelectionConfig", "SparsityConfig", "attend_compact_reference", "bucket_sizes",
    "decode_attention", "default_backend", "masked_dense_attention", "select_and_attend",
    "select_topp", "sparse_attention",
]
