"""Public preference losses: `ja.losses.dpo`, `ja.losses.reward_pairwise`, ...

The implementations (with shapes, conventions and references) live in
`jaxalign/algos/preference_losses.py`.
"""

from jaxalign.algos.preference_losses import (
    DPO_LOSS_TYPES,
    LENGTH_NORMALIZED_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    dpo,
    kto,
    kto_reference_point,
    length_bias_metrics,
    orpo_log_odds,
    reward_metrics,
    reward_pairwise,
)

__all__ = ["DPO_LOSS_TYPES", "LENGTH_NORMALIZED_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES", "dpo", "kto",
           "kto_reference_point", "length_bias_metrics", "orpo_log_odds", "reward_metrics", "reward_pairwise"]
