"""TokenLinear: nnx.Linear's parameters and values, computed as one 2-D dot over the tokens."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zipr1_jax.models.qwen_vl.text import TokenLinear


def test_same_params_and_values_as_nnx_linear():
    ours = TokenLinear(6, 5, use_bias=True, rngs=nnx.Rngs(0))
    ref = nnx.Linear(6, 5, use_bias=True, rngs=nnx.Rngs(0))
    assert set(nnx.state(ours, nnx.Param).keys()) == {"kernel", "bias"}
    ours.bias[...] = jnp.arange(5.0)
    ref.bias[...] = jnp.arange(5.0)
    for shape in [(6,), (3, 6), (2, 3, 6), (2, 1, 3, 6)]:
        x = jax.random.normal(jax.random.key(len(shape)), shape)
        y = ours(x)
        assert y.shape == shape[:-1] + (5,)
        np.testing.assert_allclose(y, ref(x), rtol=1e-6, atol=1e-6)


def test_gradients_match_nnx_linear():
    ours = TokenLinear(4, 3, use_bias=False, rngs=nnx.Rngs(1))
    ref = nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))

    def grad(m):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)["kernel"][...]
    np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-6, atol=1e-6)
