"""A corpus of bad inputs (configs, data files, model directories), each run through the
command line: a non-zero exit, one clear `error:` line on stderr (no traceback), and the
output directory left exactly as it was. Plus the failures that happen later: a full disk
while checkpointing and Ctrl-C."""

import errno
import json
import os
import shutil
import struct
import types

import jax
import numpy as np
import pytest
from etils import epath

import jaxalign as ja
from jaxalign.cli import main
from jaxalign.errors import CheckpointError
from jaxalign.models.config import from_hf_dict
from jaxalign.models.tensorfiles import SafetensorsFile, save_file
from jaxalign.train.checkpoint import Checkpointer

# A 1-layer model with the bundled tiny tokenizer's vocabulary (128).
TINY = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu", eos_token_id=2)
ROWS = [{"prompt": f"copy: {w}\n", "completion": w} for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF directory of a random 1-layer model (weights only: tokenizer from builtin:tiny)."""
    path = str(tmp_path_factory.mktemp("models") / "good")
    config = from_hf_dict(TINY)
    ja.init_model(config, jax.random.key(0)).save_pretrained(path)
    return path


@pytest.fixture
def env(tmp_path, model_dir):
    """(tmp_path, base argv of a valid run, output dir holding a previous run's files)."""
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    json.dump(TINY, open(tmp_path / "model_config.json", "w"))
    (tmp_path / "config.yaml").write_text(
        f"model:\n  config: {tmp_path / 'model_config.json'}\n  tokenizer: builtin:tiny\n"
        f"data:\n  train: {tmp_path / 'train.jsonl'}\n  max_length: 32\n"
        f"train:\n  steps: 2\n  batch_size: 8\n  async_checkpoints: false\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("previous run\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return tmp_path, ["train", str(tmp_path / "config.yaml"), f"output_dir={out}"], out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def snapshot(directory):
    """{relative path: bytes} of every file under `directory` (None if it does not exist)."""
    if not os.path.exists(directory):
        return None
    return {os.path.relpath(os.path.join(root, n), directory): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(directory) for n in names}


def fails_cleanly(argv, capsys, out, needle):
    """Run the CLI; assert exit 2, exactly one `error:` line (the last line of stderr) matching
    `needle`, no traceback, and `out` unchanged. Returns the error line."""
    before = snapshot(out)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert needle in lines[-1], lines[-1]
    assert snapshot(out) == before
    return lines[-1]


def copy_model(model_dir, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(model_dir, path)
    return path


def edit_json(path, fn):
    d = json.load(open(path))
    fn(d)
    json.dump(d, open(path, "w"))


def edit_safetensors_header(path, fn):
    """Apply `fn` to the parsed header of a safetensors file and write it back (data unchanged)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def set_nan(path, name):
    f = SafetensorsFile(path)
    tensors = {n: np.array(f.tensor(n)) for n in f.names()}
    del f
    tensors[name].flat[0] = np.nan
    save_file(tensors, path)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("extra,needle", [
    (["data.buckets=[32"], "override 'data.buckets=[32': the value is not valid YAML (line 1, column 1"),
    (["optim.learning_rate=-0.1"], "optim.learning_rate=-0.1 must be >= 0"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5 must be >= 0"),
    (["data.train=builtin:../../pyproject.toml"], "'builtin:../../pyproject.toml' points outside the bundled assets"),
    (["model.tokenizer=builtin:/etc"], "'builtin:/etc' points outside the bundled assets"),
])
def test_bad_config_values(env, capsys, extra, needle):
    _, argv, out = env
    fails_cleanly(argv + extra, capsys, out, needle)


def test_config_file_yaml_syntax_error(env, capsys):
    tmp, argv, out = env
    (tmp / "config.yaml").write_text("model:\n  config: [x\ntrain:\n  steps: 2\n")
    line = fails_cleanly(argv, capsys, out, "config.yaml is not valid YAML: line 2, column 11")
    assert "expected ',' or ']'" in line


def test_output_dir_is_a_file(env, capsys):
    tmp, argv, out = env
    (tmp / "afile").write_text("x")
    fails_cleanly(argv + [f"output_dir={tmp / 'afile'}"], capsys, out, "is a file, not a directory")
    fails_cleanly(argv + [f"output_dir={tmp / 'afile' / 'run'}"], capsys, out, "afile' is a file, not a directory")


def test_output_dir_not_writable(env, capsys, monkeypatch):
    _, argv, out = env
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # chmod does not stop root
    fails_cleanly(argv, capsys, out, "is not writable; choose a directory you can write to")


@pytest.mark.parametrize("command", ["label", "cai"])
def test_label_and_cai_outputs_checked_before_any_work(env, capsys, monkeypatch, command):
    tmp, _, out = env
    from jaxalign.algos import constitutional, rlaif

    for module in (rlaif, constitutional):
        monkeypatch.setattr(module, "run", lambda args: pytest.fail("work started before the output was checked"))
    (tmp / "afile").write_text("x")
    bad = str(tmp / "afile" / "out.jsonl")
    argv = (["label", "--judge-fn", "jaxalign.data.arithmetic:reward", "--data", str(tmp / "train.jsonl")]
            if command == "label" else ["cai", "some-model", "--prompts", str(tmp / "train.jsonl")])
    fails_cleanly(argv + ["--out", bad], capsys, out, f"--out {bad!r} cannot be created")


def test_train_help_lists_sections_and_config_show(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sections: model, data, optim, train, mesh, lora, quantization, distributed, ppo, reward, dpo" in text
    assert "jaxalign config show" in text


def test_config_show_prints_every_key_default_and_meaning(capsys):
    from jaxalign.config import SECTIONS, Config

    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert "optim.learning_rate = 0.0001  # peak learning rate" in text
    assert 'data.truncation = "truncate"  # examples longer than max_length' in text
    for section in SECTIONS:
        for field in vars(getattr(Config(), section)):
            assert f"\n  {section}.{field} = " in text, f"{section}.{field}"
    assert main(["config", "show", "optim"]) == 0
    assert "train.steps" not in capsys.readouterr().out
    assert main(["config", "show", "optimm"]) == 2
    assert "did you mean 'optim'?" in capsys.readouterr().err


# --------------------------------------------------------------------------- data files


def test_empty_data_file(env, capsys):
    tmp, argv, out = env
    (tmp / "train.jsonl").write_text("")
    fails_cleanly(argv, capsys, out, f"data file {str(tmp / 'train.jsonl')!r} is empty: it has no rows")


def test_data_line_not_json(env, capsys):
    tmp, argv, out = env
    (tmp / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n{'prompt': 1}\n")
    fails_cleanly(argv, capsys, out, f"data file {str(tmp / 'train.jsonl')!r} line 2 is not JSON")


def test_every_row_dropped_gives_the_counts(env, capsys):
    tmp, argv, out = env
    write_jsonl(tmp / "train.jsonl", [{"prompt": "copy: ab\n", "completion": " "}, {"prompt": "x " * 40, "completion": "y"}])
    line = fails_cleanly(argv + ["data.truncation=drop"], capsys, out, "was dropped (2 rows; empty_response: 1 (first: row 0")
    assert "too_long: 1 (first: row 1" in line


def test_non_string_completion_is_named(env, capsys):
    tmp, argv, out = env
    write_jsonl(tmp / "train.jsonl", [{"prompt": "copy: ab\n", "completion": 3}])
    fails_cleanly(argv, capsys, out, "field 'completion' must be a string or a list of {role, content} messages, got int 3")


@pytest.mark.parametrize("extra,needle", [
    (["data.columns={promt: question}"], "unknown key 'data.columns.promt'; did you mean 'data.columns.prompt'?"),
    (["data.columns={prompt: questoin, completion: answer}"],
     "data.columns.prompt='questoin': the dataset has no column 'questoin'; did you mean 'question'?"),
    (["algorithm=kto", "kto.beta=0"], "kto.beta must be > 0"),
])
def test_column_mapping_and_kto_settings_are_named(env, capsys, extra, needle):
    tmp, argv, out = env
    write_jsonl(tmp / "train.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in ROWS])
    fails_cleanly(argv + extra, capsys, out, needle)


def test_failed_start_creates_no_run_directory(env, capsys):
    tmp, argv, _ = env
    (tmp / "train.jsonl").write_text("")
    fails_cleanly(argv + [f"output_dir={tmp / 'new'}"], capsys, tmp / "new", "is empty")
    assert not (tmp / "new").exists()


# --------------------------------------------------------------------------- model directories


def model_argv(argv, path, tokenizer="null"):
    return argv + [f"model.path={path}", "model.config=null", f"model.tokenizer={tokenizer}"]


@pytest.mark.parametrize("breakage,needle", [
    ("no_data_offsets", "header entry of tensor 'model.norm.weight' lacks 'data_offsets'"),
    ("no_heads", "config.json has no 'num_attention_heads'"),
    ("string_hidden_size", "config.json: hidden_size must be a positive integer, got '32'"),
    ("nan_weights", "are not finite: tensor model.layers.0.self_attn.q_proj.weight has 1 NaN/inf values"),
    ("shard_outside", "lists shard '../elsewhere.safetensors', which points outside"),
])
def test_malformed_model_dir(env, capsys, model_dir, breakage, needle):
    tmp, argv, out = env
    path = copy_model(model_dir, tmp)
    weights, config = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
    if breakage == "no_data_offsets":
        edit_safetensors_header(weights, lambda h: h["model.norm.weight"].pop("data_offsets"))
    elif breakage == "no_heads":
        edit_json(config, lambda d: d.pop("num_attention_heads"))
    elif breakage == "string_hidden_size":
        edit_json(config, lambda d: d.update(hidden_size="32"))
    elif breakage == "nan_weights":
        set_nan(weights, "model.layers.0.self_attn.q_proj.weight")
    elif breakage == "shard_outside":
        names = SafetensorsFile(weights).names()
        json.dump({"weight_map": {n: "../elsewhere.safetensors" for n in names}},
                  open(os.path.join(path, "model.safetensors.index.json"), "w"))
    fails_cleanly(model_argv(argv, path, "builtin:tiny"), capsys, out, needle)


def test_missing_model_dir_is_not_a_tokenizer_problem(env, capsys):
    tmp, argv, out = env
    fails_cleanly(model_argv(argv, tmp / "nowhere"), capsys, out, f"model.path '{tmp / 'nowhere'}' does not exist")


def test_model_dir_without_tokenizer_files(env, capsys, model_dir):
    tmp, argv, out = env
    fails_cleanly(model_argv(argv, copy_model(model_dir, tmp)), capsys, out, "no tokenizer could be loaded from model.path")


# --------------------------------------------------------------------------- during training


@pytest.mark.parametrize("use_async", [False, True])
def test_disk_full_while_checkpointing(tmp_path, monkeypatch, caplog, use_async):
    state = {"w": jax.numpy.ones((64, 64)), "b": jax.numpy.zeros(3)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), use_async=use_async)
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(epath.Path, "write_text", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, state, {"step": 2})
        ckpt.close()
    assert str(e.value).startswith(f"disk full while saving checkpoint step 2 in {tmp_path / 'ckpt'}: "
                                   "it needs about 16.0 KiB")
    assert "resumes from step 1, the newest complete checkpoint" in str(e.value)
    assert not [r for r in caplog.records if r.exc_info], "orbax's tracebacks of the full disk were logged"
    monkeypatch.undo()
    again = Checkpointer(str(tmp_path / "ckpt"))
    _, meta, step = again.restore_latest(jax.eval_shape(lambda: state))
    again.close()
    assert (step, meta["step"]) == (1, 1)


def test_disk_too_small_is_found_before_writing(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), use_async=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=100, used=90, free=10))
    with pytest.raises(CheckpointError, match=r"step 1 .* needs about 16.0 KiB, 10 bytes are free .* starts over"):
        ckpt.save(1, {"w": jax.numpy.ones((64, 64))}, {})
    assert not os.listdir(tmp_path / "ckpt")


def test_ctrl_c_says_where_to_resume(env, capsys, monkeypatch):
    from jaxalign.train import loop

    _, argv, out = env
    calls = []

    def count_tokens(batch):  # once per batch; batch n+1 is made during step n, so call 4 is in step 3
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(loop, "count_tokens", count_tokens)
    rc = main(argv + ["train.steps=4", "train.save_every=2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 130
    assert lines[-1] == (f"interrupted: stopped in step 3; the newest checkpoint is step 2 in {out / 'checkpoints'}: "
                         "rerun the same command to resume from it")
    assert not [line for line in lines if "Traceback" in line]
