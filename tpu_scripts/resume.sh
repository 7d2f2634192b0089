#!/usr/bin/env bash
# Continue a run after preemption: jaxpt restores the newest checkpoint in the config's
# checkpoint.directory (default <output_dir>/checkpoints) by itself, so resuming is running the same command again (on a new VM if the
# old one was preempted: --recreate deletes it, creates it and reinstalls jaxpt first).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: resume.sh --name NAME --zone ZONE --config FILE [--workers N]
                 [--recreate --accelerator-type TYPE --runtime-version V [--spot] [--queued]
                  [--ref REF | --sdist FILE]] [--dry-run] [-- key=value ...]
  --recreate       the VM was preempted: delete and recreate it, reinstall, then run
$COMMON_USAGE
USAGE
}

parse_flags "$@"
require name zone config
check_checkpoint_dir
here="$(dirname "${BASH_SOURCE[0]}")"
pass=(--name "$NAME" --zone "$ZONE")
if [[ -n "$PROJECT" ]]; then pass+=(--project "$PROJECT"); fi
if [[ "$DRY_RUN" == 1 ]]; then pass+=(--dry-run); fi
if [[ "$RECREATE" == 1 ]]; then
  require accelerator runtime
  create=(--accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then create+=(--spot); fi
  if [[ "$QUEUED" == 1 ]]; then create+=(--queued) delete=(--queued); else delete=(); fi
  install=(--ref "$GIT_REF" --git-url "$GIT_URL")
  if [[ -n "$SDIST" ]]; then install=(--sdist "$SDIST"); fi
  "$here/delete.sh" "${pass[@]}" "${delete[@]}"
  "$here/create.sh" "${pass[@]}" "${create[@]}"
  "$here/install.sh" "${pass[@]}" "${install[@]}"
fi
"$here/run.sh" "${pass[@]}" --config "$CONFIG" --workers "$WORKERS" -- "${OVERRIDES[@]}"
