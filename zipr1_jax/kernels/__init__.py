"""Custom kernels of zipr1_jax. `sparse_attention` holds ZipR1's top-p selection and sparse attention."""
