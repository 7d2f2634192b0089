#!/usr/bin/env bash
# Shared flag parsing and command runner for the jaxpt TPU scripts (sourced, not run).
# Every script accepts the flags below; --dry-run prints each gcloud command, shell-quoted,
# instead of running it.
# shellcheck disable=SC2034  # the variables set here are read by the sourcing script

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR=""
RUNTIME=""
SPOT=0
QUEUED=0
CONFIG=""
GIT_URL="https://github.com/jaxpt/jaxpt.git"
GIT_REF="main"
SDIST=""
WORKERS=1
LOG_DIR="tpu_logs"
FOLLOW=0
RECREATE=0
DRY_RUN=0
OVERRIDES=()
REMOTE_DIR="jaxpt_run"  # on each worker, relative to the home directory

COMMON_USAGE="common flags:
  --name NAME             TPU VM / queued resource name (env TPU_NAME)
  --zone ZONE             e.g. us-west4-a (env TPU_ZONE)
  --project PROJECT       gcloud project (env TPU_PROJECT; default: gcloud's)
  --dry-run               print the gcloud commands instead of running them
  -h, --help              this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# parse_flags "$@": sets the variables above; everything after `--` goes to OVERRIDES.
parse_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --accelerator-type) ACCELERATOR="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --runtime-version) RUNTIME="${2:?--runtime-version needs a value}"; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
      --git-url) GIT_URL="${2:?--git-url needs a value}"; shift 2 ;;
      --ref) GIT_REF="${2:?--ref needs a value}"; shift 2 ;;
      --sdist) SDIST="${2:?--sdist needs a value}"; shift 2 ;;
      --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
      --log-dir) LOG_DIR="${2:?--log-dir needs a value}"; shift 2 ;;
      --follow) FOLLOW=1; shift ;;
      --recreate) RECREATE=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; OVERRIDES=("$@"); break ;;
      *) die "unknown flag $1 (see --help)" ;;
    esac
  done
}

require() {
  local flag
  for flag in "$@"; do
    case "$flag" in
      name) [[ -n "$NAME" ]] || die "--name is required" ;;
      zone) [[ -n "$ZONE" ]] || die "--zone is required" ;;
      accelerator) [[ -n "$ACCELERATOR" ]] || die "--accelerator-type is required (e.g. v5litepod-8)" ;;
      runtime) [[ -n "$RUNTIME" ]] || die "--runtime-version is required (e.g. v2-alpha-tpuv5-lite)" ;;
      config) [[ -n "$CONFIG" ]] || die "--config is required"
              [[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist" ;;
    esac
  done
}

# The --project flag for gcloud, when one was given.
project_flag() {
  if [[ -n "$PROJECT" ]]; then printf '%s\n' "--project=$PROJECT"; fi
}

# One word as a shell would need it typed: bare when safe, else in single quotes.
quote() {
  local squote="'"
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//$squote/$squote\\$squote$squote}"
  fi
}

# run CMD ARGS...: run it, or with --dry-run print it, quoted, on one line.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local line="" word
    for word in "$@"; do line+="$(quote "$word") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

# ssh_all COMMAND: run COMMAND on every worker of the TPU VM.
ssh_all() {
  local extra=()
  mapfile -t extra < <(project_flag)
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${extra[@]}" --worker=all \
    --command="$1"
}

# scp_all LOCAL REMOTE: copy a file to the same path on every worker.
scp_all() {
  local extra=()
  mapfile -t extra < <(project_flag)
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" --zone="$ZONE" "${extra[@]}" --worker=all
}

# The worker command that starts training in the background, one log per worker.
train_command() {
  local overrides="" item
  for item in "${OVERRIDES[@]}"; do
    overrides+=" $(printf '%q' "$item")"
  done
  printf '%s' "mkdir -p ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && nohup python3 -m jaxpt.train" \
    " --config config.yaml$overrides > train.log 2>&1 < /dev/null &"
}

# The checkpoint directory a config file names (empty when it names none): the value of a
# `directory:` key, in block (`checkpoint:` + `  directory: X`) or flow style.
config_checkpoint_dir() {
  { grep -o 'directory:[[:space:]]*[^],}#[:space:]]*' "$1" || true; } | head -n 1 |
    sed 's/^directory:[[:space:]]*//'
}

# Multi-host runs resume from checkpoints every host can read: insist on a gs://
# checkpoint.directory (output_dir, with metrics and the HF export, stays on each worker).
check_checkpoint_dir() {
  local dir item
  dir="$(config_checkpoint_dir "$CONFIG")"
  for item in "${OVERRIDES[@]}"; do
    if [[ "$item" == checkpoint.directory=* ]]; then dir="${item#checkpoint.directory=}"; fi
  done
  if [[ "$WORKERS" -gt 1 && "$dir" != gs://* ]]; then
    die "checkpoint.directory '$dir' is not gs://: with $WORKERS workers every host must read the same checkpoints"
  fi
}
