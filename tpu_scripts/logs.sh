#!/usr/bin/env bash
# Stream the workers' training logs, or copy them to a local directory (one file each).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: logs.sh --name NAME --zone ZONE [--follow] [--workers N] [--log-dir DIR] [--dry-run]
  --follow         stream every worker's log (tail -f) until interrupted
  --workers N      hosts to collect from (default 1); logs land in DIR/worker-I.log
  --log-dir DIR    where collected logs go (default: $LOG_DIR)
$COMMON_USAGE
USAGE
}

parse_flags "$@"
require name zone
if [[ "$FOLLOW" == 1 ]]; then
  ssh_all "tail -n 100 -F ~/$REMOTE_DIR/train.log"
  exit 0
fi
run mkdir -p "$LOG_DIR"
mapfile -t extra < <(project_flag)
for ((worker = 0; worker < WORKERS; worker++)); do
  run gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_DIR/train.log" \
    "$LOG_DIR/worker-$worker.log" --zone="$ZONE" "${extra[@]}" --worker="$worker"
done
