"""Public RL math: `ja.rl.gae`, `ja.rl.ppo_policy_loss`, `ja.rl.grpo_advantages`, ...

The implementations (with shapes, conventions and references) live in
`jaxalign/algos/advantages.py`.
"""

from jaxalign.algos.advantages import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

__all__ = ["KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "explained_variance", "gae",
           "grpo_advantages", "kl_penalty", "masked_mean", "masked_var", "ppo_policy_loss", "ppo_value_loss",
           "rloo_advantages", "whiten"]
