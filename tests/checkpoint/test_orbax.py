"""Orbax checkpoints: cross-mesh restore, retention, and every broken case raising CheckpointError.

Runs on 8 virtual CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zipr1_jax.checkpoint import CheckpointError, Checkpointer, restore_params, save_params
from zipr1_jax.models.qwen_vl import QwenVLForConditionalGeneration
from zipr1_jax.models.qwen_vl.config import tiny_qwen2_vl
from zipr1_jax.sharding import abstract_with_shardings, make_mesh, opt_state_shardings, state_shardings


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.fail(f"checkpoint tests need 8 devices, got {jax.device_count()} (see tests/conftest.py)")


@pytest.fixture(scope="module")
def params():
    """Tiny-model nnx.State (int keys under `layers`, Param boxes) with random values from numpy
    (eager initializers would compile one by one, ~10 s)."""
    abstract = nnx.split(nnx.eval_shape(lambda: QwenVLForConditionalGeneration(tiny_qwen2_vl(), rngs=nnx.Rngs(0))),
                         nnx.Param)[1]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), abstract)


def _small(seed=0):
    """A plain dict tree, sharded on a (2, 2, 2) mesh, for the error-path tests (fast)."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    x = jax.random.normal(jax.random.key(seed), (8, 6))
    return {"w": jax.device_put(x, NamedSharding(mesh, P("fsdp", "tensor"))),
            "layers": {0: {"b": jnp.arange(4.0) + seed}, 1: {"b": jnp.ones(4) * seed}}}


def _target(tree, mesh=None):
    mesh = mesh or make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps, **kw):
    ck = Checkpointer(directory, save_every=1, **kw)
    for s in steps:
        assert ck.save(s, params=_small(s), meta={"step": s, "rng": [0, s]})
    ck.wait()
    return ck


# ------------------------------------------------------------------ round trips
def test_save_on_8_devices_restore_on_other_meshes(tmp_path, params):
    mesh8 = make_mesh(data=2, fsdp=2, tensor=2)
    opt = optax.adamw(1e-3)
    p_sh = state_shardings(params, mesh8)
    placed = jax.device_put(params, p_sh)
    opt_state = jax.jit(opt.init)(placed)
    step = jax.jit(lambda o, x: opt.update(jax.tree.map(jnp.ones_like, x), o, x)[1])  # non-trivial moments
    opt_state = jax.device_put(step(opt_state, placed), opt_state_shardings(opt_state, p_sh))
    meta = {"step": 7, "rng": [1, 2], "config": {"lr": 1e-3}}

    with Checkpointer(tmp_path / "ck", keep_last=2, save_every=5) as ck:
        assert ck.save(7, params=placed, opt_state=opt_state, meta=meta, data_state={"epoch": 0, "index": 12},
                       force=True)
        ck.wait()
        assert ck.latest_step() == 7 and ck.all_steps() == [7]

    abstract_opt = jax.eval_shape(opt.init, params)
    for mesh in (make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1]), make_mesh(data=1, fsdp=8, tensor=1)):
        p_sh = state_shardings(params, mesh)
        ck = Checkpointer(tmp_path / "ck")
        out = ck.restore(params_target=abstract_with_shardings(params, p_sh),
                         opt_state_target=abstract_with_shardings(abstract_opt,
                                                                  opt_state_shardings(abstract_opt, p_sh)))
        assert out["step"] == 7 and out["meta"] == meta and out["data_state"] == {"epoch": 0, "index": 12}
        assert isinstance(out["params"], nnx.State)
        _assert_tree_equal(out["params"], params)
        _assert_tree_equal(out["opt_state"], opt_state)
        q = out["params"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
        assert q.sharding == p_sh["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
        ck.close()


def test_nnx_state_and_pure_dict_are_interchangeable(tmp_path, params):
    pure = nnx.to_pure_dict(params)
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, params=params, force=True)
    ck.save(2, params=pure, force=True)
    as_dict = ck.restore(1, params_target=_target(pure))["params"]
    assert set(as_dict["layers"]) == {0, 1}  # int keys come back as the target has them
    _assert_tree_equal(as_dict, pure)
    as_state = ck.restore(2, params_target=_target(params))
    _assert_tree_equal(as_state["params"], params)
    assert as_state["opt_state"] is None and as_state["data_state"] is None and as_state["meta"] == {}


def test_save_every_force_and_no_overwrite(tmp_path):
    ck = Checkpointer(tmp_path, save_every=2)
    assert not ck.save(1, params=_small())
    assert ck.save(2, params=_small())
    assert ck.save(3, params=_small(), force=True)
    ck.wait()
    with pytest.raises(CheckpointError, match="step 2 already exists"):  # never overwritten, never skipped silently
        ck.save(2, params=_small(9), force=True)
    ck.wait()
    _assert_tree_equal(ck.restore(2, params_target=_target(_small()))["params"], _small())
    assert not Checkpointer(tmp_path / "only_final", save_every=0).save(10, params=_small())


def test_set_aside_after_moves_later_steps_and_keeps_them(tmp_path):
    ck = _save_steps(tmp_path, [1, 2, 3], keep_last=5)
    assert ck.set_aside_after(1) == [2, 3]
    assert ck.all_steps() == [1] and ck.latest_step() == 1
    assert sorted(os.listdir(tmp_path / "superseded")) == ["2", "3"]
    assert ck.save(2, params=_small(7), force=True)  # the step number is free again
    ck.wait()
    assert ck.set_aside_after(1) == [2]
    assert sorted(os.listdir(tmp_path / "superseded")) == ["2", "2.1", "3"]  # an earlier set-aside is kept
    _assert_tree_equal(restore_params(tmp_path / "superseded" / "2.1" / "params", _target(_small())), _small(7))


def test_keep_last_keeps_only_the_newest(tmp_path):
    ck = _save_steps(tmp_path, [1, 2, 3, 4], keep_last=2)
    assert ck.all_steps() == [3, 4]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]
    assert Checkpointer(tmp_path).restore(params_target=_target(_small()))["meta"] == {"step": 4, "rng": [0, 4]}


def test_params_only_roundtrip_and_no_overwrite(tmp_path, params):
    save_params(tmp_path / "p", params)
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    out = restore_params(tmp_path / "p", abstract_with_shardings(params, state_shardings(params, mesh)))
    _assert_tree_equal(out, params)
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path / "p", params)
    # The params item of a training checkpoint is a params-only checkpoint too.
    _save_steps(tmp_path / "ck", [5])
    _assert_tree_equal(restore_params(tmp_path / "ck" / "5" / "params", _target(_small())), _small(5))


# ------------------------------------------------------------------ errors
def test_missing_step_lists_available(tmp_path):
    ck = _save_steps(tmp_path, [1, 2])
    with pytest.raises(CheckpointError, match=r"step 5 .*available steps: \[1, 2\]"):
        ck.restore(5, params_target=_target(_small()))


def test_opt_state_requested_but_not_saved(tmp_path):
    ck = _save_steps(tmp_path, [1])
    with pytest.raises(CheckpointError, match="no opt_state"):
        ck.restore(1, params_target=_target(_small()), opt_state_target={"mu": _target(_small())})


@pytest.mark.parametrize("damage", ["delete_metadata", "truncate_data", "delete_item"])
def test_corrupted_step_raises_and_others_restore(tmp_path, damage):
    ck = _save_steps(tmp_path, [1, 2])
    item = tmp_path / "2" / "params"
    if damage == "delete_metadata":
        (item / "_METADATA").unlink()
    elif damage == "truncate_data":  # the OCDBT data files (array bytes), cut in half
        data = [os.path.join(root, f) for root, _, files in os.walk(item) if os.path.basename(root) == "d"
                for f in files]
        assert data
        for f in data:
            open(f, "r+b").truncate(os.path.getsize(f) // 2)
    else:
        for root, dirs, files in os.walk(item, topdown=False):
            for f in files:
                os.remove(os.path.join(root, f))
            for d in dirs:
                os.rmdir(os.path.join(root, d))
        os.rmdir(item)
    with pytest.raises(CheckpointError, match=r"step 2 .*other steps: \[1\]"):
        ck.restore(2, params_target=_target(_small()))
    out = Checkpointer(tmp_path).restore(1, params_target=_target(_small()))
    _assert_tree_equal(out["params"], _small(1))


@pytest.mark.parametrize("edit, key", [
    (lambda t: {**t, "extra": t["w"]}, "'extra'"),  # target has a key the checkpoint lacks
    (lambda t: {"w": t["w"], "layers": {0: t["layers"][0]}}, "'layers/1/b'"),  # target lacks a key
    (lambda t: {**t, "w": jax.ShapeDtypeStruct((8, 5), t["w"].dtype, sharding=t["w"].sharding)}, "'w'"),
])
def test_mismatched_target_names_the_key(tmp_path, edit, key):
    ck = _save_steps(tmp_path, [1])
    with pytest.raises(CheckpointError, match=key):
        ck.restore(1, params_target=edit(_target(_small())))
    with pytest.raises(CheckpointError, match=key):
        restore_params(tmp_path / "1" / "params", edit(_target(_small())))


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    (tmp_path / "stuff" / "3").mkdir()  # looks like a step name but holds nothing
    with pytest.raises(CheckpointError, match="no checkpoint|could not be read|has no params"):
        Checkpointer(tmp_path / "stuff").restore(params_target=_target(_small()))
    with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
        restore_params(tmp_path / "stuff", _target(_small()))
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_params(tmp_path / "nowhere", _target(_small()))
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpointer(tmp_path / "stuff" / "notes.txt")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "hello"  # nothing was deleted


def test_meta_must_be_json(tmp_path):
    ck = Checkpointer(tmp_path, save_every=1)
    with pytest.raises(CheckpointError, match="meta must be JSON"):
        ck.save(1, params=_small(), meta={"rng": np.zeros(2)})
    assert ck.all_steps() == []


def test_unreadable_message_names_the_real_cause():
    """orbax can wrap the real error in one whose text is a bare object repr: the message digs it out."""
    from zipr1_jax.checkpoint.orbax import _unreadable

    class Wrapper(Exception):
        def __str__(self):
            return "<bound method Checkpointer.restore of <orbax.Checkpointer object at 0x7f>>"

    try:
        try:
            raise ValueError("DATA_LOSS: Error decoding manifest\nmore detail")
        except ValueError as inner:
            raise Wrapper() from inner
    except Wrapper as e:
        msg = str(_unreadable("checkpoint step 3 in /x", e))
    assert msg == ("checkpoint step 3 in /x could not be read, it may be corrupt or incomplete "
                   "(ValueError: DATA_LOSS: Error decoding manifest)")
    assert "bound method" not in msg
