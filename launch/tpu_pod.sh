#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM slice (one process per worker, each owning its
# host's chips), joined by jax.distributed.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project P] [--dir DIR] [--dry-print] -- python -m vlm2vec_jax.train --config ... [...]
#
# Runs `cd DIR && <command> --config.distributed.coordinator=auto` through
# `gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all`. With coordinator "auto",
# jax.distributed.initialize() takes the coordinator (worker 0), the process count and each
# worker's id from the TPU VM's metadata server (vlm2vec_jax.training.distributed). DIR (default:
# this checkout's path) must hold the same checkout and virtualenv on every worker, and the
# workdir must be on storage all workers share (a gcsfuse or Filestore mount): each process writes
# its own shards of every checkpoint. --dry-print prints the gcloud command instead of running it.
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE [--project P] [--dir DIR] [--dry-print] -- <command ...>" >&2
  exit 2
}
[[ $# -ge 2 && $1 != -* && $2 != -* ]] || usage
name=$1 zone=$2
shift 2
project=()
dir=$(cd "$(dirname "$0")/.." && pwd)
dry_print=false
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project) [[ $# -ge 2 ]] || usage; project=(--project "$2"); shift 2 ;;
    --dir) [[ $# -ge 2 ]] || usage; dir=$2; shift 2 ;;
    --dry-print) dry_print=true; shift ;;
    *) usage ;;
  esac
done
[[ $# -ge 2 && $1 == "--" ]] || usage
shift

# One shell-quoted string: gcloud hands it to each worker's login shell as it is ("~/" left to that
# shell, so a DIR under the home directory means each worker's own home).
if [[ $dir == "~/"* ]]; then remote_dir="~/$(printf '%q' "${dir#"~/"}")"; else remote_dir=$(printf '%q' "$dir"); fi
remote="cd $remote_dir && $(printf '%q ' "$@")--config.distributed.coordinator=auto"
command=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all --command "$remote")
if $dry_print; then
  printf '%q ' "${command[@]}"
  echo
else
  exec "${command[@]}"
fi
