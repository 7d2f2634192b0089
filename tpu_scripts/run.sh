#!/usr/bin/env bash
# Start `python -m jaxpt.train` on every worker in the background (nohup), one log each.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: run.sh --name NAME --zone ZONE --config FILE [--workers N] [--dry-run] [-- key=value ...]
  --config FILE    the run's YAML config, copied to ~/$REMOTE_DIR/config.yaml on every worker
  --workers N      hosts in the slice (v5e-8: 1, v5p-16: 2); with N > 1 the config's
                   checkpoint.directory must be gs:// so every host reads the same checkpoints
  -- key=value     config overrides passed to python -m jaxpt.train
Each worker writes ~/$REMOTE_DIR/train.log (collect them with logs.sh).
$COMMON_USAGE
USAGE
}

parse_flags "$@"
require name zone config
check_checkpoint_dir
ssh_all "mkdir -p ~/$REMOTE_DIR"
scp_all "$CONFIG" "$REMOTE_DIR/config.yaml"  # relative to the home directory
ssh_all "$(train_command)"
