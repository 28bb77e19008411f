#!/usr/bin/env bash
# The benchmark suite on one accelerator (GPU or TPU), within about 8 minutes, writing JSON
# lines to an output folder (default: bench-out/). Run from the repository root:
#   bash benchmarks/accelerator.sh [OUT_DIR]
# The machine needs jax (with its accelerator plugin), flax, optax, orbax-checkpoint, chex,
# transformers, tokenizers, safetensors, gguf and pyyaml; jaxalign itself is installed without
# dependencies (the benchmarks never import `datasets`). Peers (transformers' generate) run
# when torch is present.
set -euo pipefail
out="${1:-bench-out}"
mkdir -p "$out"
pip install --no-deps -q -e .
python -c "import jax; print('devices:', jax.devices())" | tee "$out/devices.txt"

# A 1B-shaped Llama (Llama 3.2 1B's layer shapes, 32k vocab), random weights, bf16 on disk.
model="$out/llama-1b"
if [ ! -f "$model/config.json" ]; then
  python - "$model" <<'PY'
import sys

import jax

from jaxalign.models.config import ModelConfig
from jaxalign.models.model import init_model
from jaxalign.nn.rope import RopeConfig

cfg = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                  rope=RopeConfig(theta=500000.0), max_position_embeddings=4096, param_dtype="bfloat16",
                  dtype="bfloat16", bos_token_id=1, eos_token_id=2)
init_model(cfg, jax.random.key(0)).save_pretrained(sys.argv[1])
PY
fi

run() {  # one benchmark, bounded in time; a failure is recorded and the suite goes on
  local name="$1"; shift
  echo "== $name: jaxalign bench $*"
  timeout 240 jaxalign bench "$@" --out "$out/$name.jsonl" || echo "{\"benchmark\": \"$name\", \"failed\": true}" >> "$out/$name.jsonl"
}

run sft_1b_seq2048 sft --checkpoint "$model" --batch 4 --seq 2048 --iters 5 --compute-dtype bfloat16 --no-trl --remat dots
run generate_1b generate --checkpoint "$model" --batches 1,64 --prompt-len 128 --new-tokens 64,256 --iters 2 --peers transformers --dtype bfloat16
run memory_1b memory --checkpoint "$model" --batch 4 --seq 1024
run dpo_1b dpo --checkpoint "$model" --batch 4 --prompt-len 256 --response-len 256 --iters 3 --no-trl
echo "results in $out/"
