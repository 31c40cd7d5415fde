#!/usr/bin/env bash
# TPU VM startup script (passed as metadata by tpu/create.sh): transparent hugepages (JAX warns without them on
# v5e and newer: slow runtime start/stop) and gcsfuse for random-access ArrayRecord reads.
set -euo pipefail
echo always > /sys/kernel/mm/transparent_hugepage/enabled || true
if ! command -v gcsfuse >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq gcsfuse || echo "gcsfuse not installed; read data via gs:// paths"
fi
