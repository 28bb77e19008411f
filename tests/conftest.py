"""Test setup: 8 simulated CPU devices (set before JAX initializes) and tiny HF checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.hf_models import make_hf_model  # noqa: E402


@pytest.fixture
def hf_model(tmp_path):
    """Factory: `hf_model(family, **config_overrides)` -> (torch model, checkpoint dir)."""

    def make(family="llama", **overrides):
        return make_hf_model(str(tmp_path / f"{family}-{len(os.listdir(tmp_path))}"), family, **overrides)

    return make
