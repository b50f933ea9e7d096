"""Rewards: verifier-based accuracy, efficiency 1 - tau, the group gate, the combined total on
hand-computed numbers, the registry (user rewards, duplicates, unknown names) and input checks."""

import numpy as np
import pytest

from zipr1_jax.rl import rewards as R
from zipr1_jax.rl.rewards import (RewardInputs, combine_rewards, compute_rewards, efficiency_reward, get_reward,
                                  group_gate, list_rewards, register_reward, unregister_reward)


def _inputs(responses, answers, types, tau, choices=None, group_size=None):
    return RewardInputs(responses=responses, answers=answers, answer_types=types, choices=choices,
                        token_ratio_R=np.asarray(tau, np.float32), group_size=group_size)


@pytest.fixture
def batch():
    # 2 prompts x G=2. Prompt 0 ("42", number): row 0 right, row 1 wrong. Prompt 1 ("B", choice):
    # both wrong, so its gate is 0.
    return _inputs(
        responses=["<answer>42</answer>", "<answer>41</answer>", "<answer>C</answer>", "no idea"],
        answers=["42", "42", "B", "B"],
        types=["number", "number", "choice", "choice"],
        choices=[None, None, ["red", "blue", "green"], ["red", "blue", "green"]],
        tau=[0.25, 0.5, 0.1, 1.0])


def test_accuracy_reward_uses_verifiers(batch):
    np.testing.assert_array_equal(get_reward("accuracy")(batch), [1, 0, 0, 0])
    # Option text maps to its letter through the row's choices.
    inp = _inputs(["<answer>blue</answer>", "<answer>(B)</answer>"], ["B", "B"], ["choice", "choice"],
                  [1, 1], choices=[["red", "blue"], ["red", "blue"]])
    np.testing.assert_array_equal(get_reward("accuracy")(inp), [1, 1])
    # Non-string answers are compared through str().
    inp = _inputs(["answer: 7", "<answer>7.0</answer>", "<answer>7</answer>"], [7.0, 7, 7],
                  ["number", "exact", "exact"], [1, 1, 1])
    np.testing.assert_array_equal(get_reward("accuracy")(inp), [1, 0, 1])


def test_format_reward():
    inp = _inputs(["<think>x</think><answer>3</answer>", "<answer></answer>", "<answer>3", "3"],
                  ["3"] * 4, ["number"] * 4, [1] * 4)
    out = get_reward("format")(inp)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1, 0, 0, 0])


def test_efficiency_reward():
    out = efficiency_reward([0.0, 0.25, 1.0])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [1.0, 0.75, 0.0])


def test_group_gate():
    np.testing.assert_array_equal(group_gate([1, 0, 0, 0, 0, 1], 2), [1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(group_gate([0, 0, 0, 1], 4), [1, 1, 1, 1])
    np.testing.assert_array_equal(group_gate([0, 0, 0, 0], 4), [0, 0, 0, 0])
    np.testing.assert_array_equal(group_gate([1, 0, 1], 1), [1, 0, 1])


def test_combine_rewards_golden():
    r_acc = [1, 0, 0, 0]
    r_eff = [0.75, 0.5, 0.9, 0.0]
    # Gate C = [1, 1, 0, 0]; lambda = 0.5: r = r_acc + 0.5 * C * r_eff.
    np.testing.assert_allclose(combine_rewards(r_acc, r_eff, group_size=2, lambda_eff=0.5),
                               [1.375, 0.25, 0.0, 0.0], rtol=1e-6)
    # No gate: the all-wrong group is still paid for pruning (the collapse the gate prevents).
    np.testing.assert_allclose(combine_rewards(r_acc, r_eff, group_size=2, lambda_eff=0.5, gate=False),
                               [1.375, 0.25, 0.45, 0.0], rtol=1e-6)
    # Extra rewards add weight * reward.
    np.testing.assert_allclose(
        combine_rewards(r_acc, r_eff, group_size=2, lambda_eff=1.0, extra=[(0.5, [1, 0, 1, 0])]),
        [2.25, 0.5, 0.5, 0.0], rtol=1e-6)


def test_compute_rewards_golden(batch):
    out = compute_rewards(batch, group_size=2, lambda_eff=1.0, gate=True, extra_rewards=(("format", 0.5),))
    assert set(out) == {"total", "accuracy", "efficiency", "gate", "format"}
    for v in out.values():
        assert v.dtype == np.float32 and v.shape == (4,)
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 0, 0])
    np.testing.assert_allclose(out["efficiency"], [0.75, 0.5, 0.9, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out["gate"], [1, 1, 0, 0])
    np.testing.assert_array_equal(out["format"], [1, 1, 1, 0])
    # total = acc + 1.0 * gate * (1 - tau) + 0.5 * format
    np.testing.assert_allclose(out["total"], [1 + 0.75 + 0.5, 0 + 0.5 + 0.5, 0 + 0 + 0.5, 0.0], rtol=1e-6)

    no_gate = compute_rewards(batch, group_size=2, lambda_eff=2.0, gate=False)
    np.testing.assert_array_equal(no_gate["gate"], [1, 1, 1, 1])
    np.testing.assert_allclose(no_gate["total"], [2.5, 1.0, 1.8, 0.0], rtol=1e-6)


def test_user_registered_reward(batch):
    @register_reward("test_len")
    def short(inputs):
        return np.array([len(r) < 10 for r in inputs.responses], np.float32)

    try:
        assert "test_len" in list_rewards() and get_reward("test_len") is short
        out = compute_rewards(batch, group_size=2, lambda_eff=0.0, gate=True, extra_rewards=(("test_len", -1.0),))
        np.testing.assert_array_equal(out["test_len"], [0, 0, 0, 1])
        np.testing.assert_allclose(out["total"], [1, 0, 0, -1])

        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_len")(short)
        replacement = register_reward("test_len", override=True)(lambda inp: np.zeros(inp.num_rollouts))
        assert get_reward("test_len") is replacement
    finally:
        unregister_reward("test_len")
    assert "test_len" not in list_rewards()


def test_unknown_and_bad_rewards(batch):
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*accuracy.*format"):
        get_reward("nope")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        compute_rewards(batch, group_size=2, lambda_eff=1.0, extra_rewards=(("nope", 1.0),))
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(lambda inp: None)
    with pytest.raises(ValueError, match="reserved"):
        register_reward("total")
    with pytest.raises(ValueError, match="non-empty"):
        register_reward("")

    register_reward("test_bad_shape")(lambda inp: np.zeros(3))
    try:
        with pytest.raises(ValueError, match=r"reward 'test_bad_shape' output has 3 entries, expected 4"):
            compute_rewards(batch, group_size=2, lambda_eff=1.0, extra_rewards=(("test_bad_shape", 1.0),))
    finally:
        unregister_reward("test_bad_shape")


def test_validation_errors(batch):
    with pytest.raises(ValueError, match=r"not divisible by group_size \(3\)"):
        compute_rewards(batch, group_size=3, lambda_eff=1.0)
    with pytest.raises(ValueError, match="not divisible"):
        group_gate([1, 0, 0], 2)
    with pytest.raises(ValueError, match=r"token_ratio_R must lie in \[0, 1\]; row 1"):
        _inputs(["a", "b"], ["a", "b"], ["exact"] * 2, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        efficiency_reward([-0.1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        _inputs(["a"], ["a"], ["exact"], [np.nan])
    with pytest.raises(ValueError, match="answers has 1 entries, responses has 2"):
        _inputs(["a", "b"], ["a"], ["exact"] * 2, [1, 1])
    with pytest.raises(ValueError, match="token_ratio_R has 1 entries"):
        _inputs(["a", "b"], ["a", "b"], ["exact"] * 2, [1])
    with pytest.raises(ValueError, match="inputs.group_size=4"):
        compute_rewards(R.replace(batch, group_size=4), group_size=2, lambda_eff=1.0)
    with pytest.raises(ValueError, match="lambda_eff must be >= 0"):
        combine_rewards([1, 0], [0, 0], group_size=2, lambda_eff=-1.0)
    with pytest.raises(ValueError, match="clashes"):
        compute_rewards(batch, group_size=2, lambda_eff=1.0, extra_rewards=(("accuracy", 1.0),))
    with pytest.raises(ValueError, match="unique"):
        compute_rewards(batch, group_size=2, lambda_eff=1.0, extra_rewards=(("format", 1.0), ("format", 2.0)))


def test_from_prompts_repeats_per_prompt_fields():
    responses = ["<answer>B</answer>", "x", "<answer>2</answer>", "<answer>3</answer>"]
    inp = RewardInputs.from_prompts(responses=responses, answers=["B", "3"], answer_types=["choice", "number"],
                                    choices=[["p", "q"], []], token_ratio_R=[1, 1, 1, 1], group_size=2)
    assert inp.group_size == 2 and list(inp.answers) == ["B", "B", "3", "3"]
    np.testing.assert_array_equal(get_reward("accuracy")(inp), [1, 0, 0, 1])
    with pytest.raises(ValueError, match="one per prompt"):
        RewardInputs.from_prompts(responses=["a", "b"], answers=["a", "b"], answer_types=["exact", "exact"],
                                  token_ratio_R=[1, 1], group_size=2)
