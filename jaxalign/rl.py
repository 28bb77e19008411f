"""Public RL math: `ja.rl.gae`, `ja.rl.ppo_policy_loss`, `ja.rl.grpo_advantages`, ...

The implementations (with shapes, conventions and references) live in
`jaxalign/algos/advantages.py`.
"""

from jaxalign.algos.advantages import (
    KL_ESTIMATORS,
    LOSS_TYPES,
    SCALE_REWARDS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    clipped_surrogate,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    sequence_policy_loss,
    whiten,
)

__all__ = ["KL_ESTIMATORS", "LOSS_TYPES", "SCALE_REWARDS", "AdaptiveKLController", "FixedKLController", "aggregate",
           "clipped_surrogate", "explained_variance", "gae", "grpo_advantages", "kl_penalty", "masked_mean",
           "masked_var", "ppo_policy_loss", "ppo_value_loss", "rloo_advantages", "sequence_policy_loss", "whiten"]
