#!/usr/bin/env bash
# Tears down the queued resource and its TPU VMs (all slices).
#   tpu/delete.sh --name bagel --zone us-east5-a
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/common.sh
source "$HERE/common.sh"
usage() { echo "usage: tpu/delete.sh [flags]"; usage_common; }
parse_common "$@"
run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" "${PROJECT_ARGS[@]}" --force --async --quiet
