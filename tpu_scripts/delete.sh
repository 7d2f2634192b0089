#!/usr/bin/env bash
# Delete the TPU VM (or the queued resource and its VM).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: delete.sh --name NAME --zone ZONE [--queued] [--dry-run]
  --queued         delete a queued resource (and the VM it provisioned)
$COMMON_USAGE
USAGE
}

parse_flags "$@"
require name zone
mapfile -t extra < <(project_flag)
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" "${extra[@]}" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" "${extra[@]}" --quiet
fi
