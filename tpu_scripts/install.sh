#!/usr/bin/env bash
# Install jaxpt (with libtpu) on every worker: from a git ref, or from an uploaded sdist.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: install.sh --name NAME --zone ZONE [--ref REF [--git-url URL] | --sdist FILE] [--dry-run]
  --ref REF        git branch, tag or commit to install (default: main)
  --git-url URL    repository to install from (default: $GIT_URL)
  --sdist FILE     a local sdist (python -m build --sdist) copied to each worker instead
$COMMON_USAGE
USAGE
}

parse_flags "$@"
require name zone
if [[ -n "$SDIST" ]]; then
  [[ -f "$SDIST" ]] || die "sdist $SDIST does not exist"
  remote="/tmp/$(basename "$SDIST")"
  scp_all "$SDIST" "$remote"
  ssh_all "python3 -m pip install --upgrade '${remote}[tpu]'"
else
  ssh_all "python3 -m pip install --upgrade 'jaxpt[tpu] @ git+$GIT_URL@$GIT_REF'"
fi
