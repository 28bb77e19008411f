"""The training loop end to end: configs, data errors, resume after SIGKILL, damaged and
mismatched checkpoints, the run's records (config history, metrics), non-finite steps, the
quickstart's held-out gain."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import load_config
from jaxalign.errors import CheckpointError, CheckpointMismatchError, ConfigError, DataError
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "sft.yaml")
SMALL = ["train.batch_size=8", "data.max_length=32", "train.log_every=1", "train.async_checkpoints=false",
         "data.eval=null", "train.export=false"]


def test_bad_config_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'; did you mean 'optim.learning_rate'"):
        load_config(QUICKSTART, ["optim.learning_rat=0.1"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(QUICKSTART, ["train.steps=many"])


def test_cli_reports_config_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxalign.cli", "train", QUICKSTART, "trian.steps=3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "unknown config key 'trian'; did you mean 'train'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_model_commands_restart_with_the_allocator_setting_when_asked(tmp_path):
    """From the shell, `jaxalign train` with JAXALIGN_MALLOC_TUNING=1 re-executes itself once
    with GLIBC_TUNABLES set (jaxalign.runtime) and then runs normally; by default the process
    is left alone."""
    from jaxalign.runtime import MALLOC_TUNABLES, malloc_tuning_wanted

    code = ("import os, sys; print('tunables', os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "sys.argv = ['jaxalign', 'train', 'missing.yaml']; from jaxalign.cli import main; sys.exit(main())")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXALIGN_MALLOC_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAXALIGN_MALLOC_TUNING": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["tunables None", f"tunables {MALLOC_TUNABLES}"]
    assert out.returncode == 2 and "missing.yaml" in out.stderr
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert default.stdout.splitlines() == ["tunables None"]
    assert default.returncode == 2 and "missing.yaml" in default.stderr
    assert not malloc_tuning_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


def test_missing_dataset_column(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(4)))
    cfg = load_config(QUICKSTART, SMALL + [f"data.train={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="question"):
        train(cfg)


def test_empty_dataset(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    cfg = load_config(QUICKSTART, SMALL + [f"data.train={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="empty"):
        train(cfg)


def _run_cli(out_dir, steps, extra=()):
    cmd = [sys.executable, "-m", "jaxalign.cli", "train", QUICKSTART, f"output_dir={out_dir}", f"train.steps={steps}",
           "train.save_every=4", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    steps = 14
    full = _run_cli(tmp_path / "full", steps)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    reference = _losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, steps + 1))

    victim = _run_cli(tmp_path / "killed", steps)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # poll the run's own progress record, then kill it hard
        if metrics.exists() and any(json.loads(l).get("step", 0) >= 10 for l in metrics.read_text().splitlines() if l):
            break
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert max(_losses(tmp_path / "killed")) < steps  # it really was interrupted

    resumed = _run_cli(tmp_path / "killed", steps)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    got = _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], [reference[s] for s in range(1, steps + 1)],
                               rtol=1e-6)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _corrupt(step_dir):
    """Overwrite the middle of every array data file of a saved state with garbage."""
    hit = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size > 64 and not name.endswith(".json") and "METADATA" not in name:
                with open(path, "r+b") as f:
                    f.seek(size // 3)
                    f.write(os.urandom(max(size // 3, 1)))
                hit += 1
    assert hit, "found no data files to corrupt"


def test_damaged_latest_checkpoint_falls_back_then_errors(tmp_path):
    state1 = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones(300)}
    state2 = jax.tree.map(lambda x: x * 2, state1)
    ckpt = Checkpointer(str(tmp_path), keep=3, use_async=False)
    ckpt.save(1, state1, {"data": 1})
    ckpt.save(2, state2, {"data": 2})
    ckpt.close()
    _corrupt(str(tmp_path / "2"))
    abstract = _abstract(state1)
    reader = Checkpointer(str(tmp_path), keep=3)
    state, meta, step = reader.restore_latest(abstract)
    reader.close()
    assert step == 1 and meta["data"] == 1
    np.testing.assert_array_equal(state["w"], state1["w"])
    _corrupt(str(tmp_path / "1"))
    reader = Checkpointer(str(tmp_path), keep=3)
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        reader.restore_latest(abstract)
    reader.close()


def test_damaged_step_is_saved_again_after_the_fallback(tmp_path):
    """The run resumed from step 1 saves step 2 again (orbax refused it while the damaged
    step 2 existed, so every later run fell back too); a refused save is an error."""
    state1 = {"w": jnp.arange(4096, dtype=jnp.float32)}
    ckpt = Checkpointer(str(tmp_path), keep=3, use_async=False)
    ckpt.save(1, state1, {"data": 1})
    ckpt.save(2, state1, {"data": 2})
    ckpt.close()
    _corrupt(str(tmp_path / "2"))
    resumed = Checkpointer(str(tmp_path), keep=3, use_async=False)
    assert resumed.restore_latest(_abstract(state1))[2] == 1
    state2 = {"w": state1["w"] * 3}
    resumed.save(2, state2, {"data": 22})
    with pytest.raises(CheckpointError, match="step 1 was not saved"):
        resumed.save(1, state1, {"data": 1})
    resumed.close()
    reader = Checkpointer(str(tmp_path), keep=3)
    state, meta, step = reader.restore_latest(_abstract(state1))
    reader.close()
    assert step == 2 and meta["data"] == 22
    np.testing.assert_array_equal(state["w"], state2["w"])


def test_checkpoint_of_another_state_is_a_mismatch_not_damage(tmp_path):
    ckpt = Checkpointer(str(tmp_path), use_async=False)
    ckpt.save(1, {"w": jnp.ones(8)}, {})
    ckpt.close()
    other = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "lora": {"a": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    reader = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match=r"lora/a: not in the checkpoint; w: \(8,\) float32 in the "
                                                       r"checkpoint, \(4,\) float32 here"):
        reader.restore_latest(other)
    reader.close()
    assert Checkpointer(str(tmp_path)).steps() == [1]  # nothing deleted


def test_rerun_with_another_config_names_the_difference_and_keeps_the_records(tmp_path):
    """A re-run whose config does not fit the checkpoints names the differing keys, and, like
    any re-run that fails, writes nothing; a resume adds config.resume-1.yaml."""
    base = SMALL + [f"output_dir={tmp_path}", "train.steps=2"]
    train(load_config(QUICKSTART, base))
    records = {name: (tmp_path / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(CheckpointMismatchError) as err:
        train(load_config(QUICKSTART, base + ["lora.rank=4"]))
    msg = str(err.value)
    assert "lora.rank: 0 -> 4" in msg and "config.yaml" in msg and "new output_dir" in msg
    assert "damaged" not in msg and "\n" not in msg
    with pytest.raises(DataError):
        train(load_config(QUICKSTART, base + [f"data.train={tmp_path / 'missing.jsonl'}"]))
    assert {name: (tmp_path / name).read_text() for name in records} == records
    assert not (tmp_path / "config.resume-1.yaml").exists()
    train(load_config(QUICKSTART, base + ["train.steps=3"]))
    assert (tmp_path / "config.yaml").read_text() == records["config.yaml"]
    assert load_config(str(tmp_path / "config.resume-1.yaml")).train.steps == 3


def _tensorboard_steps(run_dir, tag="loss"):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for name in sorted(os.listdir(run_dir / "tensorboard")):
        for event in EventFileLoader(str(run_dir / "tensorboard" / name)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_resume_keeps_metrics_append_only_without_torn_lines_or_duplicates(tmp_path):
    base = SMALL + [f"output_dir={tmp_path}", "train.save_every=2"]
    train(load_config(QUICKSTART, base + ["train.steps=4"]))
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed after logging step 4 ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # ... and during the write of step 5
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]  # the torn line is left out
    train(load_config(QUICKSTART, base + ["train.steps=6"]))  # resumes at step 2
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    inode = os.stat(tmp_path / "metrics.jsonl").st_ino
    train(load_config(QUICKSTART, base + ["train.steps=8"]))  # nothing to drop: appended to
    assert os.stat(tmp_path / "metrics.jsonl").st_ino == inode
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 9))
    assert _tensorboard_steps(tmp_path) == list(range(1, 9))


def test_steps_are_dispatched_without_fetching_metrics_in_between(tmp_path, monkeypatch):
    """The loop waits on the device only on log / save steps, each time fetching the metrics
    of every step since the last fetch; the next batch is on device before that wait."""
    import jaxalign.train.loop as loop

    placed, fetches, gets = [], [], []
    to_global, fetch_metrics, device_get = loop.to_global, loop.fetch_metrics, jax.device_get
    monkeypatch.setattr(loop, "to_global", lambda batch, mesh: placed.append(1) or to_global(batch, mesh))

    def counting_fetch(pending, *args):
        fetches.append((len(placed), [step for step, _ in pending]))
        return fetch_metrics(pending, *args)

    monkeypatch.setattr(loop, "fetch_metrics", counting_fetch)
    monkeypatch.setattr(jax, "device_get", lambda tree: gets.append(len(placed)) or device_get(tree))
    cfg = load_config(QUICKSTART, SMALL + [f"output_dir={tmp_path}", "train.steps=7", "train.log_every=3",
                                           "train.save_every=0"])
    train(cfg)
    assert fetches == [(4, [1, 2, 3]), (7, [4, 5, 6]), (7, [7])]
    assert [n for n in gets if n < 7] == [4]  # no other fetch before the last step (eval is off)
    assert [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r] == [3, 6, 7]


def test_nonfinite_step_between_fetches_is_reported_with_its_step(tmp_path):
    """on_nonfinite=stop with metrics fetched every 5 steps: the error (at the fetch) names the
    first non-finite step, and no checkpoint holds a state from after it."""
    from jaxalign.errors import NonFiniteLossError

    cfg = load_config(QUICKSTART, SMALL + [f"output_dir={tmp_path}", "train.steps=6", "train.log_every=5",
                                           "train.save_every=0", "optim.learning_rate=1e30", "optim.warmup_steps=0",
                                           "optim.max_grad_norm=null"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 2 "):
        train(cfg)
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_skipping_too_many_nonfinite_steps_fails_the_run(tmp_path):
    """A learning rate that blows up with on_nonfinite=skip: the run stops with an error
    (exit status 2) once more than max_skipped_steps (default 10% of 20) were skipped."""
    cmd = [sys.executable, "-m", "jaxalign.cli", "train", QUICKSTART, f"output_dir={tmp_path}", *SMALL,
           "train.steps=20", "train.on_nonfinite=skip", "optim.learning_rate=1e30", "optim.warmup_steps=0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert "error: 3 steps up to step" in out.stderr and "train.max_skipped_steps=2" in out.stderr
    assert "Traceback" not in out.stderr


def test_quickstart_improves_heldout_accuracy(tmp_path):
    """A shortened quickstart: held-out token accuracy (and loss) clearly better than at step 0."""
    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path}", "train.steps=120", "train.eval_every=null",
                                   "train.save_every=null", "data.max_eval_examples=64", "train.log_every=40"])
    result = train(cfg)
    evals = [r for r in read_metrics(str(tmp_path)) if "eval/token_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 120]
    assert evals[-1]["eval/token_accuracy"] > evals[0]["eval/token_accuracy"] + 0.15
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0
    assert result["eval/token_accuracy"] == evals[-1]["eval/token_accuracy"]
    assert os.path.exists(tmp_path / "config.yaml")
    assert os.path.exists(tmp_path / "final" / "model.safetensors")
    assert os.path.exists(tmp_path / "final" / "tokenizer.json")
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))
    from jaxalign.plot import plot_run

    png = plot_run(str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_qlora_training_from_config(tmp_path, hf_model):
    """quantization + lora config keys: NF4 base, adapters trained, merged export + PEFT adapter written."""
    _, path = hf_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(os.path.join(ROOT, "jaxalign", "assets", "tiny")).save_pretrained(path)
    cfg = load_config(QUICKSTART, SMALL + [
        f"output_dir={tmp_path / 'run'}", f"model.path={path}", "model.config=null", "model.tokenizer=null",
        "quantization.method=nf4", "quantization.block_size=32", "lora.rank=4", "lora.targets=all-linear",
        "train.steps=3", "train.export=true"])
    result = train(cfg)
    assert np.isfinite(result["loss"])
    assert os.path.exists(tmp_path / "run" / "adapter" / "adapter_config.json")
    import jaxalign as ja

    merged = ja.load_model(str(tmp_path / "run" / "final"))
    assert merged.config.num_hidden_layers == 2
