"""Mesh construction, logical-rule shardings of the tiny Qwen-VL, optimizer-state and batch placement.

Runs on 8 virtual CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from zipr1_jax.models.qwen_vl import QwenVLForConditionalGeneration
from zipr1_jax.models.qwen_vl.config import tiny_qwen2_vl
from zipr1_jax.sharding import (DEFAULT_RULES, abstract_with_shardings, batch_axes_of, make_mesh, opt_state_shardings,
                                per_device_bytes, shard_batch, state_shardings, use_mesh)
from zipr1_jax.sharding.rules import logical_axes_of, norm_path


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.fail(f"sharding tests need 8 devices, got {jax.device_count()}: XLA_FLAGS="
                    "--xla_force_host_platform_device_count=8 must be set before jax is imported (tests/conftest.py)")


def _abstract_params(**cfg_kw):
    abstract = nnx.eval_shape(lambda: QwenVLForConditionalGeneration(tiny_qwen2_vl(**cfg_kw), rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)[1]


@pytest.fixture(scope="module")
def model_and_params():
    """(config, graphdef, params) of the tiny model with random values. Filling the abstract
    state from numpy avoids compiling every initializer eagerly (~10 s on a shared CPU)."""
    cfg = tiny_qwen2_vl()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))),
                                   nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), abstract)
    return cfg, graphdef, params


# ------------------------------------------------------------------ mesh
def test_make_mesh_sizes_and_rest():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    one = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize("kw, msg", [
    (dict(data=3, fsdp=-1), "does not divide 8"),
    (dict(data=2, fsdp=2, tensor=1), "2\\*2\\*1 = 4, but 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one axis"),
    (dict(tensor=0), "tensor must be a positive int"),
])
def test_make_mesh_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_mesh(**kw)


# ------------------------------------------------------------------ parameter shardings
def test_rules_cover_every_logical_axis_of_the_model():
    names = {a for v in jax.tree.leaves(_abstract_params(), is_leaf=lambda x: isinstance(x, nnx.Variable))
             for a in (logical_axes_of(v) or ()) if a is not None}
    assert names, "the model's params carry no logical axes"
    assert names <= set(dict(DEFAULT_RULES)), f"axes without a rule: {names - set(dict(DEFAULT_RULES))}"


def test_param_specs_follow_rules():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sh = state_shardings(_abstract_params(), mesh)
    spec = lambda *path: _get(sh, path).spec  # noqa: E731
    assert spec("layers", 0, "self_attn", "q_proj", "kernel") == P("fsdp", "tensor")
    assert spec("layers", 1, "self_attn", "o_proj", "kernel") == P("tensor", "fsdp")
    # intermediate_size 131 and vocab 263 are prime: tensor is dropped, fsdp kept where it divides.
    assert spec("layers", 0, "mlp", "gate_proj", "kernel") == P("fsdp")
    assert spec("embed_tokens", "embedding") == P(None, "fsdp")
    # Another rules table (embed not on fsdp) changes the specs: the table, not the model, decides.
    tensor_only = tuple((n, None if n == "embed" else t) for n, t in DEFAULT_RULES)
    other = state_shardings(_abstract_params(), mesh, tensor_only)
    assert _get(other, ("layers", 0, "self_attn", "q_proj", "kernel")).spec == P(None, "tensor")


@pytest.mark.parametrize("vocab, expected", [(300, P("tensor", "fsdp")), (301, P(None, "fsdp"))])
def test_non_dividing_mesh_axis_is_dropped(vocab, expected):
    sh = state_shardings(_abstract_params(vocab_size=vocab), make_mesh(data=2, fsdp=2, tensor=2))
    assert _get(sh, ("embed_tokens", "embedding")).spec == expected


def test_leaves_without_metadata_are_replicated():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sh = state_shardings({"w": jnp.zeros((4, 4)), "n": jax.ShapeDtypeStruct((), jnp.int32)}, mesh)
    assert sh["w"].spec == P() and sh["n"].spec == P() and sh["w"].mesh == mesh


def test_sharded_forward_matches_single_device(model_and_params):
    cfg, graphdef, params = model_and_params
    ids_BL = jax.random.randint(jax.random.key(1), (4, 12), 0, cfg.text.vocab_size)
    ref_BLV = np.asarray(jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)(params, ids_BL))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sh = state_shardings(params, mesh)
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))

    def fwd(state, ids):
        with use_mesh(mesh, DEFAULT_RULES):
            return nnx.merge(graphdef, state)(ids).logits

    placed = jax.device_put(params, sh)
    assert _get(placed, ("layers", 0, "self_attn", "q_proj", "kernel")).sharding.spec == P("fsdp", "tensor")
    out_BLV = jax.jit(fwd, in_shardings=(sh, batch_sh))(placed, jax.device_put(ids_BL, batch_sh))
    np.testing.assert_allclose(np.asarray(out_BLV), ref_BLV, atol=1e-5, rtol=1e-5)

    one = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), params)
    assert per_device_bytes(params, sh) < per_device_bytes(params, one)
    assert per_device_bytes(params, one) == sum(x.nbytes for x in jax.tree.leaves(params))


def test_abstract_targets_carry_shardings():
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    params = _abstract_params()
    sh = state_shardings(params, mesh)
    target = abstract_with_shardings(params, sh)
    leaf = _get(target, ("layers", 0, "self_attn", "q_proj", "kernel"))
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P("fsdp", "tensor")  # size-1 axes are kept


# ------------------------------------------------------------------ optimizer state
def test_adamw_moments_follow_params(model_and_params):
    _, _, params = model_and_params
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sh = state_shardings(params, mesh)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    osh = opt_state_shardings(opt_state, sh)
    assert jax.tree.structure(osh) == jax.tree.structure(opt_state)
    adam = osh[0]
    assert adam.count.spec == P()
    for moments in (adam.mu, adam.nu):
        for (path, s), (_, ps) in zip(jax.tree_util.tree_flatten_with_path(moments)[0],
                                      jax.tree_util.tree_flatten_with_path(sh)[0], strict=True):
            assert s == ps, path
    jax.device_put(optax.adamw(1e-3).init(params), osh)  # placeable


def test_frozen_vision_has_no_moments_and_rest_follows(model_and_params):
    from zipr1_jax.train.optim import OptimConfig, make_optimizer

    _, _, params = model_and_params
    sh = state_shardings(params, make_mesh(data=2, fsdp=2, tensor=2))
    opt = make_optimizer(OptimConfig(lr=1e-3, total_steps=10, freeze_vision=True), params)
    opt_state = jax.eval_shape(opt.init, params)
    osh = opt_state_shardings(opt_state, sh)
    specs = {norm_path(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(osh)[0]}
    q = [s for p, s in specs.items() if p[-2:] == ("q_proj", "kernel") and "mu" in p]
    assert q and all(s == P("fsdp", "tensor") for s in q)
    assert not any("visual" in p and "mu" in p for p in specs)
    assert all(s == P() for p, s in specs.items() if p[-1] == "count")


# ------------------------------------------------------------------ batches
def test_batch_axes_come_from_the_rules_table():
    from zipr1_jax.sharding.placement import Placement

    assert batch_axes_of(DEFAULT_RULES) == ("data", "fsdp")
    data_only = tuple((n, "data" if n == "batch" else t) for n, t in DEFAULT_RULES)
    assert batch_axes_of(data_only) == ("data",)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ids = np.arange(8 * 3).reshape(8, 3)
    assert Placement(mesh, DEFAULT_RULES).put_rows({"ids": ids})["ids"].sharding.spec == P(("data", "fsdp"))
    placed = Placement(mesh, data_only).put_rows({"ids": ids})["ids"]
    assert placed.sharding.spec == P("data") and np.array_equal(np.asarray(placed), ids)


def test_shard_batch():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ids = np.arange(24, dtype=np.int32).reshape(8, 3)
    batch = {"ids": ids, "odd": np.ones((3, 2), np.float32), "scalar": np.float32(2.5),
             "texts": ["a", "b"], "n": 7}
    out = shard_batch(batch, mesh)
    assert out["ids"].sharding.spec == P(("data", "fsdp"))
    assert out["ids"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(out["ids"]), ids)
    assert out["odd"].sharding.is_fully_replicated and out["scalar"].sharding.is_fully_replicated
    assert float(out["scalar"]) == 2.5
    assert out["texts"] is batch["texts"] and out["n"] == 7
    only_data = shard_batch({"ids": ids}, mesh, batch_axes=("data",))
    assert only_data["ids"].sharding.spec == P("data")
    with pytest.raises(ValueError, match="not mesh axes"):
        shard_batch({"ids": ids}, mesh, batch_axes=("rows",))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree.get_value() if isinstance(tree, nnx.Variable) else tree
