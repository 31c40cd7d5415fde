#!/usr/bin/env bash
# Streams ~/bagel-train.log of one worker (default 0) of the first slice, or prints the last lines of all.
#   tpu/logs.sh --name bagel [--worker 3 | --all]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/common.sh
source "$HERE/common.sh"
usage() { echo "usage: tpu/logs.sh [flags] [--worker N | --all]"; usage_common; }
parse_common "$@"
worker=0
all=0
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) worker="$2"; shift 2 ;;
    --all) all=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
first="$(node_names | head -n 1)"
if [[ "$all" -eq 1 ]]; then
  while read -r node; do
    run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
      --command="hostname; tail -n 20 ~/bagel-train.log"
  done < <(node_names)
else
  run gcloud compute tpus tpu-vm ssh "$first" --zone="$ZONE" "${PROJECT_ARGS[@]}" --worker="$worker" \
    --command="tail -n +1 -F ~/bagel-train.log"
fi
