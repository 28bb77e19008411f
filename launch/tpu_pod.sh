#!/usr/bin/env bash
# TPU pod slice (v4-32, v5p-64, ...): copy this checkout to every worker VM, install it, and
# start the same training command on all of them. Each worker runs one JAX process; JAX
# finds the others by itself on Cloud TPU (JAXALIGN_DISTRIBUTED=auto).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh CONFIG.yaml [key.sub=value ...]
#
# Required: TPU_NAME (the TPU VM), ZONE (its zone).
# Optional: PROJECT (gcloud project), SKIP_SYNC=1 (do not copy the checkout),
#           SKIP_INSTALL=1 (do not pip install), REMOTE_DIR (default: jaxalign, under ~),
#           PIP_EXTRA (default: tpu; the extra to install).
# output_dir must be on storage every worker sees (e.g. a gcsfuse-mounted bucket or
# Filestore): all workers write the orbax checkpoints together.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG.yaml [key.sub=value ...]   (see launch/README.md)" >&2
  exit 64
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name (gcloud compute tpus tpu-vm list --zone=ZONE)}"
: "${ZONE:?set ZONE to the TPU VM zone, e.g. us-central2-b}"
remote_dir=${REMOTE_DIR:-jaxalign}
extra=${PIP_EXTRA:-tpu}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gcloud_args=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

if [[ "${SKIP_SYNC:-0}" != 1 ]]; then
  archive=$(mktemp "${TMPDIR:-/tmp}/jaxalign-XXXXXX.tar.gz")
  trap 'rm -f "$archive"' EXIT
  tar -C "$root" --exclude=.git --exclude=runs --exclude='__pycache__' --exclude='*.egg-info' -czf "$archive" .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:jaxalign.tar.gz" "${gcloud_args[@]}" --worker=all
fi

# The remote command: quoted here, expanded on each worker.
printf -v train_args '%q ' "$@"
printf -v config_q '%q' "$1"
setup="mkdir -p ~/$remote_dir && tar -xzf ~/jaxalign.tar.gz -C ~/$remote_dir"
if [[ "${SKIP_SYNC:-0}" == 1 ]]; then
  setup=true
fi
install="python3 -m pip install -q -e '.[$extra]'"
if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
  install=true
fi
remote="set -euo pipefail; $setup; cd ~/$remote_dir; $install; \
test -f $config_q || { echo \"error: \$(hostname): config $config_q not found in ~/$remote_dir\" >&2; exit 66; }; \
JAXALIGN_DISTRIBUTED=auto python3 -m jaxalign.cli train ${train_args% }"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command="$remote"
