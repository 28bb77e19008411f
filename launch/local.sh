#!/usr/bin/env bash
# One host, all its accelerators: a single JAX process drives every local GPU / TPU chip
# (or the CPU). The mesh in the config spans the local devices (mesh.data=-1: all of them).
#
#   launch/local.sh CONFIG.yaml [key.sub=value ...]
#
# Optional variables:
#   JAXALIGN_BIN  the command to run (default: jaxalign; e.g. "python -m jaxalign.cli")
#   CUDA_VISIBLE_DEVICES / XLA_PYTHON_CLIENT_MEM_FRACTION  the usual JAX/XLA GPU knobs
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key.sub=value ...]   (see launch/README.md)" >&2
  exit 64
fi
config=$1
shift
if [[ ! -f "$config" ]]; then
  echo "error: config file '$config' does not exist" >&2
  exit 66
fi

# One process: keep multi-host settings inherited from the environment (an allocation's
# SLURM_* variables, a stale JAXALIGN_COORDINATOR) from turning this into a job that waits for peers.
export JAXALIGN_DISTRIBUTED=off
read -r -a bin <<<"${JAXALIGN_BIN:-jaxalign}"
exec "${bin[@]}" train "$config" "$@"
