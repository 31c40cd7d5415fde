#!/usr/bin/env bash
# Creates a TPU VM slice (or N slices for a multi-slice job) through a queued resource and waits for ACTIVE.
#   tpu/create.sh --name bagel --accelerator v5p-256 --zone us-east5-a [--num-slices 2] [--capacity spot]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/common.sh
source "$HERE/common.sh"
usage() { echo "usage: tpu/create.sh [flags]"; usage_common; }
parse_common "$@"

args=(gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" "${PROJECT_ARGS[@]}"
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME"
      --metadata-from-file=startup-script="$HERE/startup.sh")
if [[ "$NUM_SLICES" -gt 1 ]]; then
  args+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
else
  args+=(--node-id="$NAME")
fi
case "$CAPACITY" in
  spot) args+=(--spot) ;;
  reserved) args+=(--reserved) ;;
  on-demand) ;;
  *) echo "--capacity must be on-demand, spot or reserved" >&2; exit 2 ;;
esac
run "${args[@]}"

if [[ "$DRY_RUN" -eq 1 ]]; then
  run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" "${PROJECT_ARGS[@]}" --format="value(state.state)"
  exit 0
fi
echo "waiting for queued resource $NAME to become ACTIVE..."
while true; do
  state="$(gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" "${PROJECT_ARGS[@]}" \
           --format='value(state.state)')"
  echo "  state: $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) echo "queued resource $NAME is $state" >&2; exit 1 ;;
  esac
  sleep 30
done
