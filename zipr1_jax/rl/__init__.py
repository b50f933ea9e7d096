"""ZipR1 RL (docs/method.md section 3): rewards, group-relative advantages and the GRPO / SFT losses.

  rewards.py     host-side (numpy) rewards on decoded responses: accuracy, format, efficiency 1 - tau,
                 the group gate, a registry for user rewards, `compute_rewards`
  advantages.py  GRPO / RLOO / Dr.GRPO advantages per rollout (jnp)
  losses.py      clipped surrogate with clip-higher, k3 KL, aggregations, `grpo_loss`, `sft_loss` (jnp)
  rollout.py     the jitted sampler (`generate`); import it from `zipr1_jax.rl.rollout` (not loaded here,
                 it pulls in flax)
"""

from zipr1_jax.rl.advantages import (ADVANTAGE_KINDS, compute_advantages, drgrpo_advantages, grpo_advantages,
                                     rloo_advantages)
from zipr1_jax.rl.losses import (AGGREGATIONS, aggregate, clipped_surrogate, grpo_loss, k3_kl, sft_loss,
                                 token_logprobs_from_logits)
from zipr1_jax.rl.rewards import (RewardFn, RewardInputs, accuracy_reward, combine_rewards, compute_rewards,
                                  efficiency_reward, format_reward, get_reward, group_gate, list_rewards,
                                  register_reward, unregister_reward)

__all__ = [
    "ADVANTAGE_KINDS", "AGGREGATIONS", "RewardFn", "RewardInputs", "accuracy_reward", "aggregate",
    "clipped_surrogate", "combine_rewards", "compute_advantages", "compute_rewards", "drgrpo_advantages",
    "efficiency_reward", "format_reward", "get_reward", "grpo_advantages", "grpo_loss", "group_gate", "k3_kl",
    "list_rewards", "register_reward", "rloo_advantages", "sft_loss", "token_logprobs_from_logits",
    "unregister_reward",
]
