"""The one training loop every algorithm uses: setup, resume, step, log, eval, save, export."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.config import Config, builtin_path, changes_since, config_history, record_config
from jaxalign.errors import CheckpointError, CheckpointMismatchError, ConfigError, NonFiniteLossError, RunInterrupted
from jaxalign.models.config import from_hf_dict
from jaxalign.models.model import Model, check_finite, init_model, load_model, resolve_compute_dtype
from jaxalign.nn.attention import resolve_impl
from jaxalign.parallel import distributed
from jaxalign.parallel.mesh import make_mesh
from jaxalign.parallel.rules import batch_sharding, named_shardings
from jaxalign.paths import check_output_dir
from jaxalign.peft import lora
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.metrics import MetricsLogger
from jaxalign.train.objective import Objective, get_builder
from jaxalign.train.optim import make_optimizer
from jaxalign.train.step import TrainState, init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)


def build_model(cfg: Config, mesh) -> Model:
    """Load the configured HF checkpoint (whose weights must be finite), or initialize from a
    config.json with random weights."""
    m = cfg.model
    overrides = dict(remat=m.remat, attention_impl=m.attention_impl)
    if m.path:
        q = cfg.quantization
        model = load_model(builtin_path(m.path), dtype=m.dtype, mesh=mesh, compute_dtype=m.compute_dtype,
                           quantize=q.method, quant_block_size=q.block_size, double_quant=q.double_quant, **overrides)
        check_finite(model.params, m.path)
        return model
    path = builtin_path(m.config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"model.config {m.config!r} does not exist; point it at an HF config.json")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"model.config {path} is not valid JSON ({e}); fix the file") from None
    config = from_hf_dict(hf, param_dtype=m.dtype, dtype=resolve_compute_dtype(m.compute_dtype, m.dtype), source=path,
                          **overrides)
    return init_model(config, jax.random.key(m.seed), mesh)


def apply_transforms(model: Model, cfg: Config) -> Model:
    """Quantize, then wrap LoRA adapters, as configured; re-shard the transformed tree."""
    from jaxalign.peft import quant

    params = model.params
    q = cfg.quantization
    if q.method is not None and not cfg.model.path:  # loaded checkpoints are quantized while loading
        params = quant.quantize(params, q.method, block_size=q.block_size, double_quant=q.double_quant)
    if cfg.lora.rank > 0:
        r = cfg.lora
        params = lora.apply(params, r.rank, r.alpha, r.targets, jax.random.key(cfg.model.seed + 1),
                            dropout=r.dropout, use_rslora=r.use_rslora)
    elif q.method is not None:
        raise ConfigError("quantized weights are frozen: set lora.rank > 0 to train adapters on them (QLoRA)")
    if params is model.params:
        return model
    return dataclasses.replace(model, params=jax.device_put(params, named_shardings(params, model.mesh)))


def load_tokenizer(cfg: Config):
    """The tokenizer of model.tokenizer, else model.path, else model.config's directory (a local directory)."""
    from transformers import AutoTokenizer

    from jaxalign.models.gguf import resolve

    m = cfg.model
    key, value = next((k, v) for k, v in (("model.tokenizer", m.tokenizer), ("model.path", m.path),
                                          ("model.config", m.config)) if v)
    source = resolve(builtin_path(value))
    if key == "model.config" and not os.path.isdir(source):
        source = os.path.dirname(source)
    if not os.path.isdir(source):
        what = "is a file, not a directory" if os.path.exists(source) else "does not exist"
        raise CheckpointError(f"{key} {value!r} {what}; point it at a local model directory "
                              "(config.json, *.safetensors and the tokenizer files)")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"no tokenizer could be loaded from {key} {value!r} ({first}); it needs "
                              "tokenizer.json or tokenizer_config.json + vocabulary files: set model.tokenizer "
                              "to a directory that has them") from None


def partition_params(params, trainable_mask=None):
    """(trainable, frozen, combine): where `trainable_mask(params)` is True if given, else LoRA
    adapters when present (`lora.trainable`), else every param (frozen is None)."""
    if trainable_mask is not None:
        trainable, frozen = lora.split(params, trainable_mask(params))
        return trainable, frozen, lora.combine
    if lora.has_lora(params):
        trainable, frozen = lora.split(params)
        return trainable, frozen, lora.combine
    return params, None, lambda p, _: p


def count_tokens(batch: dict) -> int:
    """Real tokens in a host batch: the sum of every `*attention_mask` array (preference
    batches have `chosen_attention_mask` and `rejected_attention_mask`)."""
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("attention_mask")))


def to_global(batch: dict, mesh) -> dict:
    """Host batch (this process's rows) -> global jax.Arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def train_state_shardings(params, optimizer, mesh) -> TrainState:
    """Shardings of the whole train state: optimizer moments follow their params."""
    param_shardings = named_shardings(params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)


def _shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def evaluate(objective: Objective, eval_step, params, frozen, combine, mesh) -> dict:
    """Eval metrics prefixed `eval/`: summed over all eval batches, then divided."""
    out: dict = {}
    if objective.eval_batches is not None and eval_step is not None:
        totals: dict = {}
        for batch in objective.eval_batches():
            sums = jax.device_get(eval_step(params, frozen, to_global(batch, mesh)))
            for k, (s, c) in sums.items():
                ts, tc = totals.get(k, (0.0, 0.0))
                totals[k] = (ts + float(s), tc + float(c))
        out.update({f"eval/{k}": s / max(c, 1.0) for k, (s, c) in totals.items()})
    if objective.evaluate_extra is not None:
        out.update({f"eval/{k}": v for k, v in objective.evaluate_extra(combine(params, frozen)).items()})
    return out


def restore_checkpoint(ckpt: Checkpointer, abstract_state, cfg: Config, out_dir: str):
    """`ckpt.restore_latest`; a checkpoint that does not fit this config is reported with the
    config keys that differ from the saved config of the run that wrote it."""
    try:
        return ckpt.restore_latest(abstract_state)
    except CheckpointMismatchError as e:
        ckpt.close()
        history = config_history(out_dir)
        changes = changes_since(history[-1], cfg) if history else []
        if not changes:
            raise CheckpointMismatchError(f"{e}; no config key differs from a saved config of the run, so it may "
                                          "come from another jaxalign version: choose a new output_dir") from None
        more = f" (+{len(changes) - 5} more)" if len(changes) > 5 else ""
        raise CheckpointMismatchError(
            f"the checkpoints in {out_dir} are intact but were saved with another config: {'; '.join(changes[:5])}"
            f"{more} (against {os.path.basename(history[-1])}, the config that saved them). To resume, rerun "
            f"with that config; to train with this one, choose a new output_dir. Details: {e}") from None


def train(cfg: Config) -> dict:
    """Run (or resume) the configured training; returns the final metrics record."""
    distributed.initialize(cfg.distributed)  # multi-host: join the job first (no-op if joined / single)
    out_dir = os.path.abspath(cfg.output_dir)
    check_output_dir(out_dir)
    mesh = make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg)
    model = apply_transforms(build_model(cfg, mesh), cfg)
    c = model.config
    resolve_impl(c.attention_impl, c.dtype, c.head_dim)  # a kernel this machine cannot run fails before the run
    objective = get_builder(cfg.algorithm)(cfg, model, tokenizer)
    if objective.init_params is not None:
        model = dataclasses.replace(model, params=objective.init_params(model.params))
    for key, value in objective.summary.items():
        log.info("%s: %s", key, value)

    trainable, frozen, combine = partition_params(model.params, objective.trainable_mask)
    steps = cfg.train.steps
    optimizer, schedule = make_optimizer(cfg.optim, steps)
    state_shardings = train_state_shardings(trainable, optimizer, mesh)
    state = jax.jit(lambda p: init_state(p, optimizer, cfg.train.seed), out_shardings=state_shardings)(trainable)
    frozen_shardings = _shardings_of(frozen) if frozen is not None else None

    os.makedirs(out_dir, exist_ok=True)  # model, tokenizer and data loaded: the run directory may be created
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                        use_async=cfg.train.async_checkpoints)
    start, skipped = 0, 0
    restored = restore_checkpoint(ckpt, _abstract(state), cfg, out_dir)
    if restored is not None:
        state, meta, start = restored
        skipped = meta.get("skipped", 0)
        objective.train_batches.restore(meta["data"])
        log.info("resumed from %s at step %d", ckpt.directory, start)
    if jax.process_index() == 0:  # everything is checked: only now does the run directory change
        record_config(cfg, out_dir, resumed=restored is not None)
    logger = MetricsLogger(out_dir, steps, resume_step=start)

    loss_fn = objective.loss_fn
    if cfg.lora.dropout > 0 and objective.lora_dropout and lora.has_lora(model.params):
        def loss_fn(params, batch, rng):
            return objective.loss_fn(lora.with_dropout_rng(params, rng), batch, rng)

    step_fn = jax.jit(make_train_step(loss_fn, optimizer, schedule, combine, cfg.train.grad_accum),
                      in_shardings=(state_shardings, frozen_shardings, None),
                      out_shardings=(state_shardings, None), donate_argnums=0)
    eval_step = None
    if objective.eval_fn is not None or objective.eval_batches is not None:
        eval_step = jax.jit(make_eval_step(objective.eval_fn or objective.loss_fn, combine))

    def run_eval(step):
        metrics = evaluate(objective, eval_step, state.params, frozen, combine, mesh)
        if metrics:
            logger.log(step, metrics)
        return metrics

    max_skipped = cfg.train.max_skipped_steps if cfg.train.max_skipped_steps is not None else max(1, steps // 10)
    record: dict = {}
    tokens, t_last, s_last = 0, time.time(), start
    step = start
    pending: list = []  # (step, device metrics) dispatched since the last fetch
    # Steps in flight at most. XLA:CPU runs every device's collectives on one shared thread
    # pool: with 8 host devices on 2 cores a second step in flight starved the first one's
    # all-reduce (a 40 s rendezvous timeout). So on CPU each step is awaited (not fetched)
    # once the next batch is ready; on GPUs and TPUs two steps are in flight.
    ahead = 1 if jax.default_backend() == "cpu" else 2

    def next_batch() -> dict:
        """The next host batch; on-policy objectives (RL) sample it from the current params."""
        if objective.sample_batch is not None:
            return objective.sample_batch(combine(state.params, frozen))
        return next(objective.train_batches)

    try:
        if start == 0:
            run_eval(0)
        if start < steps:
            batch = next_batch()
            batch_tokens, device_batch = count_tokens(batch) * jax.process_count(), to_global(batch, mesh)
        for step in range(start + 1, steps + 1):
            state, metrics = step_fn(state, frozen, device_batch)  # dispatched; runs while the host goes on
            pending.append((step, metrics))
            tokens += batch_tokens
            data_state = objective.train_batches.state()  # after this step's batch: what a checkpoint resumes from
            if step < steps:  # the next batch is made and placed on device while this step runs
                batch = next_batch()
                batch_tokens, device_batch = count_tokens(batch) * jax.process_count(), to_global(batch, mesh)
            if len(pending) >= ahead:
                jax.block_until_ready(pending[-ahead][1])  # bounds the run-ahead; nothing comes to the host
            log_now = step % cfg.train.log_every == 0 or step == steps
            eval_now = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps
            save_now = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == steps
            if not (log_now or eval_now or save_now):
                continue
            try:  # the only wait on the device: metrics of the steps since the last fetch
                metrics, skipped = fetch_metrics(pending, skipped, cfg.train.on_nonfinite, max_skipped)
            except NonFiniteLossError:
                ckpt.close()
                raise
            pending = []
            if log_now:
                elapsed = time.time() - t_last
                record = {k: float(v) for k, v in metrics.items()}
                record["tokens_per_second"] = tokens / max(elapsed, 1e-9)
                record["steps_per_second"] = (step - s_last) / max(elapsed, 1e-9)
                logger.log(step, record)
                tokens, t_last, s_last = 0, time.time(), step
            if eval_now:
                run_eval(step)
            if save_now:
                ckpt.save(step, state, {"data": data_state, "step": step, "skipped": skipped})
    except KeyboardInterrupt:
        raise interrupted(ckpt, step) from None
    final = run_eval(steps) if start < steps else {}
    ckpt.close()
    if cfg.train.export:
        # Every process takes part in gathering the (possibly multi-host sharded) weights to
        # host memory; process 0 writes them.
        from jaxalign.nn.seams import dense, is_weight_type

        writer = jax.process_index() == 0
        export_params = objective.export_params or (lambda p: p)
        trained = export_params(combine(state.params, frozen))
        merged = distributed.fetch_to_host(jax.tree.map(dense, trained, is_leaf=is_weight_type), keep=writer)
        adapters = distributed.fetch_to_host(state.params, keep=writer) if lora.has_lora(model.params) else None
        if writer:
            export(dataclasses.replace(model, params=merged), tokenizer, os.path.join(out_dir, "final"))
            if adapters is not None:
                from jaxalign.models import heads

                tree = export_params(combine(adapters, frozen))  # a reward model's adapter carries its score head
                save = heads.save_reward_adapter if heads.has_score_head(tree) else lora.save_adapter
                save(tree, os.path.join(out_dir, "adapter"), base=cfg.model.path)
        distributed.barrier("jaxalign:export")
    return {**record, **final}


def fetch_metrics(pending: list, skipped: int, on_nonfinite: str, max_skipped: int) -> tuple[dict, int]:
    """Fetch the metrics of the steps in `pending` ([(step, device metrics)], one transfer)
    and count their non-finite steps (which the step did not apply). Returns (the last
    step's metrics without "finite", steps skipped so far). NonFiniteLossError at the first
    non-finite step with on_nonfinite "stop", or once more than `max_skipped` were skipped."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, fetched):
        if metrics.pop("finite"):
            continue
        skipped += 1
        msg = (f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, "
               f"grad_norm={metrics['grad_norm']}); the step was not applied")
        fix = "lower optim.learning_rate or enable clipping (optim.max_grad_norm)"
        if on_nonfinite == "stop":
            raise NonFiniteLossError(f"{msg}; {fix}, or set train.on_nonfinite=skip")
        if skipped > max_skipped:
            raise NonFiniteLossError(f"{skipped} steps up to step {step} had a non-finite loss or gradient "
                                     f"and were skipped, more than train.max_skipped_steps={max_skipped}; {fix}")
        log.warning(msg)
    return fetched[-1], skipped


def interrupted(ckpt: Checkpointer, step: int) -> RunInterrupted:
    """RunInterrupted saying where a run stopped at `step` can be resumed from (pending saves are finished first)."""
    ckpt.wait()
    saved = ckpt.steps()
    ckpt.close()
    if saved:
        return RunInterrupted(f"stopped in step {step}; the newest checkpoint is step {saved[-1]} in "
                              f"{ckpt.directory}: rerun the same command to resume from it")
    return RunInterrupted(f"stopped in step {step}, before the first checkpoint (train.save_every sets how "
                          "often one is saved): rerunning the same command starts over")


def export(model: Model, tokenizer, out_dir: str) -> None:
    """Final export: HF safetensors + config.json (adapters merged) and the tokenizer (whose
    pad id a reward model's config records: transformers pools scores by it)."""
    model.save_pretrained(out_dir, pad_token_id=getattr(tokenizer, "pad_token_id", None))
    tokenizer.save_pretrained(out_dir)
