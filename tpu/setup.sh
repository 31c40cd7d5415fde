#!/usr/bin/env bash
# Installs bagel-jax on every worker of every slice: ships `git archive HEAD` of this checkout (committed files
# only: no .venv, no workdirs) or clones --repo, and pip-installs it with the TPU extra into ~/bagel-jax/.venv.
#   tpu/setup.sh --name bagel --zone us-east5-a [--num-slices 2] [--repo https://github.com/org/bagel-jax]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/common.sh
source "$HERE/common.sh"
usage() { echo "usage: tpu/setup.sh [flags] [--repo URL]"; usage_common; }
parse_common "$@"

archive="${TMPDIR:-/tmp}/bagel-jax-$$.tgz"
if [[ -z "$REPO_URL" ]]; then
  run git -C "$HERE/.." archive --format=tar.gz -o "$archive" HEAD
fi
install='cd ~/bagel-jax && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e ".[tpu]"'
while read -r node; do
  if [[ -n "$REPO_URL" ]]; then
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
      --command="(git clone -q $REPO_URL ~/bagel-jax || git -C ~/bagel-jax pull -q) && $install"
  else
    run gcloud compute tpus tpu-vm scp "$archive" "$node:bagel-jax.tgz" --zone="$ZONE" "${PROJECT_ARGS[@]}" \
      --worker=all
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
      --command="mkdir -p ~/bagel-jax && tar -xzf ~/bagel-jax.tgz -C ~/bagel-jax && $install"
  fi
done < <(node_names)
