#!/usr/bin/env bash
# Shared flag parsing and the dry-run-aware `run` helper for the tpu/ scripts (sourced, not executed).
# Every gcloud call goes through `run`, so `--dry-run` prints the exact commands a real run would execute.
# The variables below are read by the scripts that source this file.
# shellcheck disable=SC2034

NAME="${TPU_NAME:-bagel}"
ZONE="${TPU_ZONE:-us-east5-a}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_ACCELERATOR:-v5p-256}"
RUNTIME="${TPU_RUNTIME:-}"
NUM_SLICES="${TPU_NUM_SLICES:-1}"
CAPACITY="${TPU_CAPACITY:-on-demand}"   # on-demand | spot | reserved
REPO_URL="${BAGEL_REPO_URL:-}"
DRY_RUN=0
EXTRA_ARGS=()

usage_common() {
  cat <<USAGE
common flags:
  --name NAME            node / queued-resource name (default: \$TPU_NAME or bagel)
  --zone ZONE            (default: \$TPU_ZONE or us-east5-a)
  --project PROJECT      (default: gcloud's configured project)
  --accelerator TYPE     e.g. v5p-256, v6e-256 (default: \$TPU_ACCELERATOR or v5p-256)
  --runtime VERSION      TPU VM image (default: by generation)
  --num-slices N         multi-slice (DCN) job over N slices (default 1)
  --capacity KIND        on-demand | spot | reserved
  --dry-run              print every gcloud command instead of running it
USAGE
}

parse_common() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --accelerator) ACCELERATOR="$2"; shift 2 ;;
      --runtime) RUNTIME="$2"; shift 2 ;;
      --num-slices) NUM_SLICES="$2"; shift 2 ;;
      --capacity) CAPACITY="$2"; shift 2 ;;
      --repo) REPO_URL="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      *) EXTRA_ARGS+=("$1"); shift ;;
    esac
  done
  if [[ -z "$RUNTIME" ]]; then
    case "$ACCELERATOR" in
      v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
      v5litepod-*|v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
      v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
      v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
      *) echo "unknown accelerator type '$ACCELERATOR'" >&2; exit 2 ;;
    esac
  fi
  if ! [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]]; then
    echo "--num-slices must be a positive integer, got '$NUM_SLICES'" >&2; exit 2
  fi
  PROJECT_ARGS=()
  if [[ -n "$PROJECT" ]]; then PROJECT_ARGS=(--project="$PROJECT"); fi
}

# Node names: one node for a single slice, NAME-0..NAME-(N-1) for a multi-slice queued resource.
node_names() {
  if [[ "$NUM_SLICES" -eq 1 ]]; then
    echo "$NAME"
  else
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do echo "$NAME-$i"; done
  fi
}

run() {
  if [[ "$DRY_RUN" -eq 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
