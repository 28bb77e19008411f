"""Bad checkpoints and meshes give errors that say what is wrong and what to do."""

import json
import os

import numpy as np
import pytest

import jaxalign as ja
from jaxalign.errors import CheckpointError, ShardingError, UnsupportedModelError
from jaxalign.models.tensorfiles import SafetensorsFile, save_file


def edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def rewrite_weights(path, fn):
    """Apply fn to the {name: array} dict of model.safetensors and write it back."""
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {n: np.array(f.tensor(n)) for n in f.names()}
    del f
    save_file(fn(tensors), os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("changes,needle", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope scaling type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope scaling type 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_model_or_feature(hf_model, changes, needle):
    _, path = hf_model("llama")
    edit_config(path, **changes)
    with pytest.raises(UnsupportedModelError, match=needle):
        ja.load_model(path)


def test_qwen_sliding_window_is_refused(hf_model):
    _, path = hf_model("qwen2")
    edit_config(path, use_sliding_window=True, sliding_window=8)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        ja.load_model(path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ja.load_model(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json"):
        ja.load_model(str(tmp_path))


def test_invalid_config_json(hf_model):
    _, path = hf_model("llama")
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ja.load_model(path)


def test_pickle_weights_are_refused(hf_model):
    _, path = hf_model("llama")
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="safetensors only"):
        ja.load_model(path)


def test_no_weights(hf_model):
    _, path = hf_model("llama")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        ja.load_model(path)


def test_truncated_file(hf_model):
    _, path = hf_model("llama")
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ja.load_model(path)


def test_garbage_header(hf_model):
    _, path = hf_model("llama")
    open(os.path.join(path, "model.safetensors"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{garbage}}}}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ja.load_model(path)


def test_missing_tensor(hf_model):
    _, path = hf_model("llama")
    rewrite_weights(path, lambda t: {n: a for n, a in t.items() if n != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        ja.load_model(path)


def test_wrong_shape(hf_model):
    _, path = hf_model("llama")
    rewrite_weights(path, lambda t: {**t, "model.norm.weight": np.ones(31, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* shape \[31\] .* \[32\]"):
        ja.load_model(path)


def test_index_names_missing_shard(hf_model):
    _, path = hf_model("llama")
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" for n in f.names()}}
    json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors, which is missing"):
        ja.load_model(path)


def test_mesh_must_match_device_count():
    with pytest.raises(ShardingError, match="= 12 devices, but 8 are available"):
        ja.make_mesh((3, 2, 2))
    with pytest.raises(ShardingError, match="not divisible"):
        ja.make_mesh((-1, 3, 1))


def test_dimension_not_divisible_by_mesh_axis(hf_model):
    _, path = hf_model("llama", intermediate_size=60)  # mlp=60 over tensor=8
    with pytest.raises(ShardingError, match=r"mlp.*size 60 is not divisible by mesh axes \('tensor',\)"):
        ja.load_model(path, mesh=ja.make_mesh((1, 1, 8)))


def test_batch_not_divisible_by_data_axes(hf_model):
    _, path = hf_model("llama")
    model = ja.load_model(path, mesh=ja.make_mesh((8, 1, 1)))
    with pytest.raises(ShardingError, match="batch size 3 is not divisible"):
        model.logits(np.ones((3, 4), np.int32))
