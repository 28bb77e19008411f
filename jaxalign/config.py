"""Typed run configuration: dataclasses loaded from YAML, `key.sub=value` overrides,
validation that names a bad key and suggests the closest valid one.

Paths starting with `builtin:` point into the package's bundled assets (the embedded
tiny model, tokenizer and data), so quickstart configs work from any directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import types
import typing
from typing import Any

import yaml

from jaxalign.data.formats import COLUMNS
from jaxalign.errors import ConfigError, closest
from jaxalign.parallel.mesh import MeshConfig
from jaxalign.paths import inside


@dataclasses.dataclass
class ModelSection:
    """Where the model comes from and how it computes."""

    path: str | None = None  # HF model directory (config.json + *.safetensors), a .gguf file, builtin: or example:NAME
    config: str | None = None  # a config.json (or its directory) to initialize random weights from, instead of path
    tokenizer: str | None = None  # tokenizer directory (default: path, else config's directory)
    dtype: str = "float32"  # dtype the params are kept in: float32, bfloat16, float16
    compute_dtype: str = "auto"  # activation dtype of the forward pass; auto: bfloat16 on GPU/TPU, float32 on CPU
    remat: str = "none"  # per-layer rematerialization (recompute activations in the backward pass)
    attention_impl: str | None = "auto"  # attention kernel; auto (or null): cudnn on NVIDIA GPUs, splash on TPU, else xla
    seed: int = 0  # seed of random initialization (model.config) and of new heads / LoRA adapters


@dataclasses.dataclass
class DataSection:
    """Datasets (hub name, local json/jsonl/parquet, or builtin:) and how to tokenize them."""

    train: str | None = None  # Hub dataset name, local .json/.jsonl/.parquet file or directory, or builtin:
    eval: str | None = None  # held-out data in the same forms (null: no data eval)
    train_split: str = "train"  # split of a Hub dataset (or of a directory) used for training
    eval_split: str = "train"  # split used for eval
    eval_fraction: float = 0.0  # not used yet (give data.eval instead)
    max_length: int = 512  # longest example in tokens (prompt + response)
    truncation: str = "truncate"  # examples longer than max_length: cut to it (truncate) or left out (drop)
    packing: bool = False  # pack several SFT examples into one row (segment ids keep them apart)
    buckets: list[int] | None = None  # row lengths batches are padded to (null: powers of two up to max_length)
    completion_only_loss: bool = True  # loss on the completion / assistant turns only (false: every token)
    max_eval_examples: int | None = 512  # eval on at most this many examples (null: all)
    on_bad_row: str = "drop"  # unusable rows (missing field, wrong type): drop and count them, or error
    columns: dict[str, str] | None = None  # our column name -> the dataset's, e.g. {prompt: question, chosen: resp_j}
    system_prompt: str | None = None  # system message put before conversations (a row's system column wins)
    min_score_gap: float | None = None  # drop pairs with score_chosen - score_rejected below this (null: keep all)


@dataclasses.dataclass
class OptimSection:
    """AdamW with warmup then cosine/linear/constant decay, global-norm clipping."""

    learning_rate: float = 1e-4  # peak learning rate, reached after warmup (>= 0)
    schedule: str = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup from 0 over this many steps (>= 0)
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak, in [0, 1]
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    max_grad_norm: float | None = 1.0  # clip gradients to this global norm (null: no clipping)


@dataclasses.dataclass
class TrainSection:
    """Loop settings. batch_size is global (all processes); grad_accum splits it.
    logprob_chunk: sequence positions per LM-head chunk, rematerialized in the backward pass
    (a chunk >= the sequence length forms the logits in one piece, kept for the backward
    pass); null picks one piece when the f32 logits fit 1 GiB, else chunks of 128.
    on_nonfinite: "stop" at the first step with a NaN/inf loss or gradient, or "skip" such
    steps (the update is not applied); max_skipped_steps: with "skip", the run stops with an
    error once more steps than this were skipped (null: 10% of train.steps, at least 1)."""

    steps: int = 100  # optimizer steps of the run
    batch_size: int = 8  # global batch size (rows per optimizer step, all processes)
    grad_accum: int = 1  # micro-batches per step (batch_size must be divisible by it)
    seed: int = 0  # seed of data order, dropout and sampling
    log_every: int = 10  # log metrics every N steps
    eval_every: int | None = None  # evaluate every N steps (null: at the start and the end only)
    save_every: int | None = None  # checkpoint every N steps (null: at the end only)
    keep_checkpoints: int = 3  # keep the newest N checkpoints
    async_checkpoints: bool = True  # write checkpoints in the background while training continues
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop, or skip the step
    max_skipped_steps: int | None = None  # with skip: stop after more skipped steps (null: 10% of steps)
    logprob_chunk: int | None = None  # sequence positions per LM-head chunk (null: automatic)
    export: bool = True  # write OUTPUT_DIR/final (HF format), with LoRA also OUTPUT_DIR/adapter


@dataclasses.dataclass
class DistributedSection:
    """Multi-process (multi-host) runs; see jaxalign/parallel/distributed.py and launch/README.md.

    Unset (the default): a single process, unless a TPU pod, a SLURM step with several
    tasks, or Open MPI is detected (auto_detect). Explicit: coordinator_address (HOST:PORT
    of process 0), num_processes, process_id; the environment variables
    JAXALIGN_COORDINATOR / JAXALIGN_NUM_PROCESSES / JAXALIGN_PROCESS_ID fill what is unset.
    """

    coordinator_address: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None  # number of processes in the job
    process_id: int | None = None  # this process's index
    local_device_ids: list[int] | None = None  # devices this process uses (null: all visible)
    initialization_timeout: int = 300  # seconds to wait for all processes to join
    auto_detect: bool = True  # detect TPU pods, SLURM and Open MPI jobs when nothing is set


@dataclasses.dataclass
class LoraSection:
    rank: int = 0  # LoRA rank (0: no LoRA, train every weight)
    alpha: float = 16.0  # adapters are scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)
    targets: list[str] | str = dataclasses.field(  # names (or one regex) of the weights that get adapters
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.0  # dropout on the adapters' input
    use_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(rank)


@dataclasses.dataclass
class QuantizationSection:
    method: str | None = None  # quantize the frozen base weights (needs lora.rank > 0: QLoRA); null: none
    block_size: int | None = None  # values per quantization scale (null: the method's default)
    double_quant: bool = False  # quantize the scales too (QLoRA's double quantization)


@dataclasses.dataclass
class PPOSection:
    """RL fine-tuning: `algorithm: ppo` (critic + GAE), `grpo` / `rloo` (group baselines).

    A rollout = train.batch_size x num_minibatches sequences (prompts x group_size) sampled
    from the policy; it is trained on for ppo_epochs x num_minibatches optimizer steps of
    train.batch_size sequences each. Reward: reward_model (an HF *ForSequenceClassification
    dir, read at the last response token) or reward_fn ("module:function" called with
    (prompts, completions) -> scores; a list of them: the reward is their sum weighted by
    reward_weights, each logged as rewards/<function name>/mean). GRPO: loss_type picks
    TRL's aggregation (grpo: sequence mean; bnpo: token mean of the minibatch; dr_grpo:
    token sum / (sequences x response_length); dapo: token sum / the rollout's tokens per
    minibatch). LoRA dropout is off in RL updates (the old log-probs are computed without
    it). See docs/rl.md.

    KL to the reference, placed by kl_in: in the reward, kl_coef (fixed, or adapted by
    adaptive_kl) x the kl_estimator KL: per token before GAE (PPO), or summed over the
    response and subtracted from the score before the group baseline (GRPO/RLOO); in the
    loss, beta x the k3 KL per token, aggregated like the policy loss. auto: PPO in the
    reward, GRPO in the loss, RLOO both. overlong_cache > 0 adds DAPO's soft overlong
    penalty to the score: overlong_penalty_factor x (0 up to response_length -
    overlong_cache tokens, then falling linearly to -1 at response_length), logged as
    rewards/overlong_penalty/mean.
    """

    reward_model: str | None = None  # HF *ForSequenceClassification directory scoring responses
    reward_adapter: str | None = None  # a reward model saved as a LoRA adapter + score head of the policy's base
    reward_fn: str | list[str] | None = None  # module:function (or a list) called with (prompts, completions) -> scores
    reward_weights: list[float] | None = None  # weights of the reward_fn list in the reward (null: all 1)
    value_model: str = "auto"  # critic from the policy or the reward model (auto: the RM if same tokenizer)
    group_size: int = 1  # samples per prompt (GRPO / RLOO groups)
    num_minibatches: int = 4  # minibatches (optimizer steps) per rollout per epoch
    ppo_epochs: int = 4  # passes over each rollout
    response_length: int = 53  # tokens sampled per response
    max_prompt_length: int = 128  # prompt tokens kept
    prompt_truncation: str = "left"  # longer prompts: keep their end (left) or skip them
    temperature: float = 0.7  # sampling temperature of rollouts
    top_k: int = 0  # sample from the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling threshold (1: off)
    kl_coef: float = 0.05  # KL-to-reference coefficient in the reward (see kl_in)
    kl_estimator: str = "k1"  # per-token KL estimator of the KL in the reward and of the logged objective/kl
    adaptive_kl: bool = False  # adapt kl_coef toward target_kl (Ziegler et al.)
    target_kl: float = 6.0  # KL the adaptive controller aims at
    kl_horizon: int = 10000  # horizon of the adaptive KL controller
    beta: float = 0.0  # KL-to-reference coefficient in the loss (k3 KL; 0: none)
    kl_in: str = "auto"  # where the KL goes: reward (kl_coef), loss (beta), auto (PPO reward, GRPO loss, RLOO both)
    cliprange: float = 0.2  # policy ratio clip: ratios below 1 - cliprange are clipped
    epsilon_high: float | None = None  # upper ratio clip 1 + epsilon_high (DAPO clip-higher; null: cliprange)
    loss_type: str = "bnpo"  # GRPO loss aggregation (TRL's names, see above; PPO: token mean, RLOO: sequence mean)
    cliprange_value: float = 0.2  # value prediction clip
    vf_coef: float = 0.1  # value loss weight
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_scores: bool = False  # whiten sequence scores over the rollout
    whiten_rewards: bool = False  # whiten per-token rewards before GAE
    whiten_advantages: bool = True  # whiten advantages
    scale_rewards: str | bool = "group"  # GRPO: centered scores / the group's or batch's std, or none (true: group)
    drop_uniform_groups: bool = False  # GRPO/RLOO: groups with all rewards equal are out of the loss (DAPO)
    missing_eos_penalty: float | None = None  # subtracted from the score of responses without EOS (null: none)
    overlong_cache: int = 0  # DAPO soft overlong penalty over the last this many response tokens (0: off)
    overlong_penalty_factor: float = 1.0  # weight of the overlong penalty (-1 at response_length tokens)
    eval_temperature: float = 0.0  # sampling temperature of eval responses (0: greedy)
    eval_reward_fn: str | None = None  # module:function scoring eval responses, logged beside the learned reward

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # the former boolean setting
            self.scale_rewards = "group" if self.scale_rewards else "none"


@dataclasses.dataclass
class RewardSection:
    """`algorithm: reward`: a scalar score head trained with the Bradley-Terry loss
    -log sigmoid(r_chosen - r_rejected - margin) (+ center_rewards_coefficient * (r_c + r_r)^2).

    A causal-LM `model.path` gets a fresh head ~ normal(head_init_std, default
    1/sqrt(hidden_size + 1)); a *ForSequenceClassification checkpoint keeps its own.
    max_prompt_length: prompts are cut from the left to this many tokens (None: no cut).
    margin_from_scores: pairs with score_chosen / score_rejected columns get the margin
    margin_from_scores x their score gap (Llama 2's preference-strength margin), instead of
    a margin column.
    """

    center_rewards_coefficient: float = 0.0  # weight of the (r_chosen + r_rejected)^2 centering term
    margin_from_scores: float = 0.0  # margin = this x (score_chosen - score_rejected) (Llama 2; 0: off)
    head_init_std: float | None = None  # std of a fresh score head (null: 1/sqrt(hidden_size + 1))
    max_prompt_length: int | None = None  # prompts cut from the left to this many tokens (null: no cut)


@dataclasses.dataclass
class DPOSection:
    """`algorithm: dpo`: the DPO family (see `jaxalign.losses.dpo` for every loss_type),
    ORPO included: loss_type orpo = the chosen NLL + beta x the odds-ratio term (beta is
    ORPO's lambda, TRL's ORPOConfig.beta), no reference.

    reference: where the reference log-probs come from. "auto": none for reference-free
    loss types (simpo, orpo), "adapters_off" under LoRA (the same params with adapters switched
    off: no extra memory), else "frozen_copy" (one extra copy of the weights on device).
    "precomputed" (or precompute_ref_logps: true) runs the initial model over the train and
    eval data once before training and stores each pair's reference log-probs, so no
    reference weights are used during training. simpo_gamma: SimPO's target margin;
    discopop_tau: DiscoPOP's temperature. max_prompt_length: prompts are cut from the left
    to this many tokens (None: no cut). margin_from_scores: an offset from the data's
    score_chosen / score_rejected columns (ODPO): a pair whose scores differ more must win by more.
    """

    beta: float = 0.1  # strength of the implicit KL to the reference
    loss_type: str = "sigmoid"  # the DPO-family loss
    label_smoothing: float = 0.0  # assumed fraction of flipped labels (cDPO / robust)
    simpo_gamma: float = 0.5  # SimPO's target margin
    discopop_tau: float = 0.05  # DiscoPOP's temperature
    rpo_alpha: float = 0.0  # weight of the chosen reply's per-token NLL added to the loss (RPO; 0 = off)
    margin_from_scores: float = 0.0  # sigmoid: -log sigmoid(beta*h - this*(score_chosen - score_rejected)); 0 = off
    reference: str = "auto"  # where reference log-probs come from (see above)
    precompute_ref_logps: bool = False  # same as reference: precomputed
    max_prompt_length: int | None = None  # prompts cut from the left to this many tokens (null: no cut)


@dataclasses.dataclass
class KTOSection:
    """`algorithm: kto`: KTO (Ethayarajh et al. 2024) on unpaired feedback (prompt + completion
    + label; paired rows are split into a desirable chosen and an undesirable rejected example),
    TRL's KTOTrainer loss. Its reference point is the batch's KL estimate from mismatched
    prompt/completion pairs (each prompt with the previous example's completion), so
    train.batch_size must be at least 2 per process (loss_type apo_zero_unpaired has no
    reference point and no such limit). reference: "auto" is adapters_off under LoRA
    (no extra memory), else frozen_copy (one extra copy of the weights). TRL suggests weights
    with desirable_weight x #desirable / (undesirable_weight x #undesirable) in [1, 4/3].
    """

    loss_type: str = "kto"  # kto, or apo_zero_unpaired (APO-zero: no reference point, no KL pairs scored)
    beta: float = 0.1  # strength of the implicit KL to the reference
    desirable_weight: float = 1.0  # weight of the desirable examples' losses
    undesirable_weight: float = 1.0  # weight of the undesirable examples' losses
    nll_alpha: float = 0.0  # + this x the per-token NLL of each desirable completion (as dpo.rpo_alpha; 0: off)
    reference: str = "auto"  # where reference log-probs come from (see above)
    max_prompt_length: int | None = None  # prompts cut from the left to this many tokens (null: no cut)


@dataclasses.dataclass
class OnlineDPOSection:
    """`algorithm: online_dpo`: each step samples two completions per prompt (train.batch_size
    prompts) from the current policy with the ppo section's rollout settings, ranks them with
    a judge and takes one step of the dpo section's loss on the pairs (reference as DPO's:
    adapters_off under LoRA, else frozen_copy; not precomputed). The judge is the ppo
    section's reward_model / reward_adapter / reward_fn (the higher score is chosen, equal
    scores drop the pair), or `judge`: a causal LM asked which response is better, scored by
    the log-probability of its answer in both orders (`jaxalign label --judge`). See
    docs/ai_feedback.md.
    """

    judge: str | None = None  # judge model (HF dir, .gguf, example:NAME); null: the ppo section's reward source
    judge_template: str | None = None  # judge prompt with {prompt} {response_a} {response_b} {principle}, or @FILE
    judge_chat: bool | None = None  # wrap the judge prompt in the judge's chat template (null: when it has one)
    constitution: str | None = None  # principles file the judge's {principle} is drawn from (null: the shipped one)
    principle: str | None = None  # judge every pair under this principle (null: drawn per pair)


@dataclasses.dataclass
class Config:
    """A whole run. `algorithm` picks the objective (sft, reward, dpo, ppo, ...)."""

    algorithm: str = "sft"  # the objective: sft, reward, dpo (orpo: dpo.loss_type), kto, ppo, grpo, rloo, online_dpo
    output_dir: str = "runs/default"  # run directory: checkpoints, metrics.jsonl, config.yaml, final/
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    quantization: QuantizationSection = dataclasses.field(default_factory=QuantizationSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    ppo: PPOSection = dataclasses.field(default_factory=PPOSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    kto: KTOSection = dataclasses.field(default_factory=KTOSection)
    online_dpo: OnlineDPOSection = dataclasses.field(default_factory=OnlineDPOSection)


SECTIONS = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]

_CHOICES = {
    "data.truncation": ("truncate", "drop"),
    "data.on_bad_row": ("drop", "error"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.on_nonfinite": ("stop", "skip"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention_impl": ("auto", "xla", "cudnn", "splash", None),
    "quantization.method": (None, "int8", "int4", "nf4"),
    "ppo.value_model": ("auto", "policy", "reward"),
    "ppo.prompt_truncation": ("left", "skip"),
    "ppo.kl_estimator": ("k1", "k2", "k3", "abs", "mse"),
    "ppo.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "ppo.scale_rewards": ("group", "batch", "none"),
    "ppo.kl_in": ("auto", "reward", "loss"),
    "dpo.reference": ("auto", "adapters_off", "frozen_copy", "precomputed"),
    "kto.reference": ("auto", "adapters_off", "frozen_copy"),
    "kto.loss_type": ("kto", "apo_zero_unpaired"),
    "dpo.loss_type": ("sigmoid", "hinge", "ipo", "robust", "simpo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                      "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "orpo"),
}


def builtin_path(path: str | None) -> str | None:
    """Resolve `builtin:rel/path` to the packaged assets directory and `example:NAME` to the
    cached HF directory of an example model (fetched on first use, see
    `jaxalign.example_models`); other paths unchanged."""
    if isinstance(path, str) and path.startswith("example:"):
        from jaxalign.example_models import fetch

        return fetch(path[len("example:"):])
    if path is None or not isinstance(path, str) or not path.startswith("builtin:"):
        return path
    resolved = inside(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets"), path[len("builtin:"):])
    if resolved is None:
        raise ConfigError(f"{path!r} points outside the bundled assets; a builtin: path is a relative name under "
                          "jaxalign/assets without '..', e.g. builtin:tiny/train.jsonl")
    return resolved


def _suggest(key: str, valid: list[str], where: str) -> str:
    prefix = f"{where}." if where else ""
    close = closest(key, valid)
    return f"; did you mean '{prefix}{close}'?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys raise ConfigError with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'{_suggest(str(key), names, where)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    from jaxalign.train.objective import ALGORITHMS

    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={cfg.algorithm!r} is not valid; choose one of: {', '.join(ALGORITHMS)}"
                          f"{_suggest(cfg.algorithm, list(ALGORITHMS), '')}")
    for dotted, choices in _CHOICES.items():
        obj: Any = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"{dotted}={obj!r} is not valid; choose one of: {shown}")
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    if t.steps <= 0 or t.batch_size <= 0 or t.grad_accum <= 0:
        raise ConfigError("train.steps, train.batch_size and train.grad_accum must be positive")
    if t.max_skipped_steps is not None and t.max_skipped_steps < 0:
        raise ConfigError(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0 (null: 10% of train.steps)")
    o = cfg.optim
    if o.learning_rate < 0:
        raise ConfigError(f"optim.learning_rate={o.learning_rate} must be >= 0 (a negative rate climbs the loss)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the final rate as a fraction "
                          "of optim.learning_rate)")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    for name in cfg.data.columns or {}:
        if name not in COLUMNS:
            raise ConfigError(f"unknown key 'data.columns.{name}'{_suggest(str(name), list(COLUMNS), 'data.columns')}")
    if cfg.dpo.margin_from_scores and cfg.dpo.loss_type != "sigmoid":
        raise ConfigError(f"dpo.margin_from_scores works with dpo.loss_type=sigmoid only, got {cfg.dpo.loss_type!r}")
    if cfg.dpo.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha={cfg.dpo.rpo_alpha} must be >= 0 (0 = no NLL term)")
    if cfg.model.path is None and cfg.model.config is None:
        raise ConfigError("set model.path (an HF checkpoint dir) or model.config (a config.json to init from scratch)")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error on one line: 'line L, column C: what is wrong' (after where the
    enclosing construct started, when YAML says so)."""
    parts = []
    for what, mark in ((getattr(e, "context", None), getattr(e, "context_mark", None)),
                       (getattr(e, "problem", None), getattr(e, "problem_mark", None))):
        if what:
            parts.append((f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "") + what)
    return " ".join("; ".join(parts or [str(e)]).split())


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "fix it, or quote it to pass a string") from None
        node = d
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return d


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (optional), apply overrides, validate, and return a Config."""
    d: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    apply_overrides(d, overrides or [])
    cfg = from_dict(Config, d)
    _validate(cfg)
    return cfg


def _field_notes(cls) -> dict[str, str]:
    """{field: the `# comment` after it} in the source of dataclass `cls`."""
    found = (re.match(r"\s+(\w+): [^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def _describe_fields(cls, where: str) -> list[str]:
    notes, lines = _field_notes(cls), []
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            continue
        choices = _CHOICES.get(key)
        note = notes.get(f.name, "")
        if choices:
            note += f" (one of: {', '.join(json.dumps(c) for c in choices)})"
        lines.append(f"  {key} = {json.dumps(default)}" + (f"  # {note.strip()}" if note else ""))
    return lines


def describe(sections: list[str] | None = None) -> str:
    """Every config key with its default and meaning, section by section (`jaxalign config show`)."""
    valid = ["top-level"] + SECTIONS
    for name in sections or []:
        if name not in valid:
            raise ConfigError(f"unknown config section '{name}'{_suggest(name, valid, '')}")
    out = []
    for name in sections or valid:
        cls = Config if name == "top-level" else type(getattr(Config(), name))
        doc = inspect.cleandoc(cls.__doc__ or "")
        out += [f"{name}:"] + [f"  {line}".rstrip() for line in doc.splitlines()] + [""]
        out += _describe_fields(cls, "" if cls is Config else name) + [""]
    return "\n".join(out).rstrip()


def to_dict(cfg: Config) -> dict:
    """Plain-dict form (what is saved as the run's resolved config)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_history(run_dir: str) -> list[str]:
    """The run's saved configs, oldest first: `config.yaml` (the first run), then
    `config.resume-1.yaml`, `config.resume-2.yaml`, ... (one per resume)."""
    paths, k = [], 0
    path = os.path.join(run_dir, "config.yaml")
    while os.path.exists(path):
        paths.append(path)
        k += 1
        path = os.path.join(run_dir, f"config.resume-{k}.yaml")
    return paths


def record_config(cfg: Config, run_dir: str, resumed: bool) -> str:
    """Save `cfg` into the run's history: `config.yaml` on a fresh start, the next free
    `config.resume-K.yaml` on a resume (the earlier records are kept). Returns the path."""
    history = config_history(run_dir) if resumed else []
    path = os.path.join(run_dir, f"config.resume-{len(history)}.yaml" if history else "config.yaml")
    save_config(cfg, path)
    return path


def changes_since(path: str, cfg: Config) -> list[str]:
    """`key.sub: saved -> now` for every key whose value in `cfg` differs from the saved config at `path`."""
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    return _differences(saved, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))


def _differences(old: dict, new: dict, where: str = "") -> list[str]:
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        full = f"{where}.{key}" if where else str(key)
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, full)
        elif a != b:
            out.append(f"{full}: {a!r} -> {b!r}")
    return out
