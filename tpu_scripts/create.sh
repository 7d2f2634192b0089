#!/usr/bin/env bash
# Create a TPU VM, or a queued resource that provisions one when capacity frees up.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE --runtime-version VERSION
                 [--spot] [--queued] [--project P] [--dry-run]
  --accelerator-type TYPE   v5litepod-8 (v5e-8), v5p-16, v6e-16, ...
  --runtime-version V       TPU software version, e.g. v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                            v2-alpha-tpuv6e (v6e)
  --spot                    spot (preemptible) capacity: cheaper, may be preempted (see resume.sh)
  --queued                  a queued resource (waits for capacity) instead of a VM right away
$COMMON_USAGE
USAGE
}

parse_flags "$@"
require name zone accelerator runtime
mapfile -t extra < <(project_flag)
if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${extra[@]}"
else
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
fi
