#!/usr/bin/env bash
# Runs bagel-train on every host of every slice with jax.distributed initialised from the TPU environment and
# the overlap flags of bagel_jax/parallel/xla_flags.py; logs go to ~/bagel-train.log on each worker and
# worker 0's stream is followed here.
#   tpu/launch.sh --name bagel --accelerator v5p-256 -- \
#     --config experiments/bagel_7b/pretrain.py:topology=v5p-256 --workdir gs://BUCKET/runs/pt1
# Multi-slice: queued resources created with --node-count set the MEGASCALE_* variables on every worker; the
# config names the slice count (e.g. experiments/bagel_7b/pretrain.py:topology=v5p-256,slices=2).
# Compiled steps go to JAX's persistent compilation cache (--compile-cache DIR, default ~/.jax_cache on each
# worker; a gs:// path is shared by every host and survives the VMs): a relaunch of the same config and code
# loads the executable instead of compiling it again (minutes for the 7B step, docs/tpu_aot.md).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/common.sh
source "$HERE/common.sh"
usage() {
  echo "usage: tpu/launch.sh [flags] [--compile-cache DIR] -- <bagel-train args>"; usage_common
  echo "  --compile-cache DIR    JAX persistent compilation cache (default: ~/.jax_cache on each worker)"
}
COMPILE_CACHE=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --compile-cache) COMPILE_CACHE="$2"; shift 2 ;;
    --) args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
parse_common "${args[@]}"
if [[ ${#EXTRA_ARGS[@]} -eq 0 ]]; then
  echo "pass the bagel-train arguments after --, e.g. -- --config ... --workdir gs://..." >&2; exit 2
fi

train_args="$(printf ' %q' "${EXTRA_ARGS[@]}") --config.distributed.initialize=True"
remote="cd ~/bagel-jax && export LIBTPU_INIT_ARGS=\"\$(.venv/bin/python -m bagel_jax.parallel.xla_flags $ACCELERATOR)\" \
&& export JAX_COMPILATION_CACHE_DIR=\"${COMPILE_CACHE:-\$HOME/.jax_cache}\" \
&& nohup .venv/bin/bagel-train$train_args > ~/bagel-train.log 2>&1 &"
while read -r node; do
  run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command="$remote"
done < <(node_names)
first="$(node_names | head -n 1)"
run gcloud compute tpus tpu-vm ssh "$first" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker=0 \
  --command="tail -n +1 -F ~/bagel-train.log"
