#!/usr/bin/env bash
# N processes of one JAX program on this machine, joined by jax.distributed with the coordinator on
# 127.0.0.1: what a multi-host run does, on one host (tests, debugging a multi-host problem).
#
#   launch/local.sh N [--devices D] [--port P] [--logs DIR] -- python -m vlm2vec_jax.train --config ... [...]
#
# Process i runs the command with --config.distributed.{coordinator,num_processes,process_id,
# local_devices} appended (D CPU devices each, default 4). Process 0 writes to this terminal, the
# others to DIR/process_<i>.log (default: a temporary directory, printed). If one process fails the
# others are stopped; the exit code is the first non-zero one.
set -euo pipefail

usage() { echo "usage: $0 N [--devices D] [--port P] [--logs DIR] -- <command ...>" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1; shift
devices=4
port=""
logs=""
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --devices) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $# -ge 2 && $1 == "--" ]] || usage
shift
if [[ -z $port ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logs=${logs:-$(mktemp -d -t local_launch.XXXXXX)}
mkdir -p "$logs"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  args=("$@" "--config.distributed.coordinator=127.0.0.1:$port" "--config.distributed.num_processes=$num_processes"
        "--config.distributed.process_id=$i" "--config.distributed.local_devices=$devices")
  if [[ $i -eq 0 ]]; then
    "${args[@]}" &
  else
    "${args[@]}" > "$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
[[ $num_processes -gt 1 ]] && echo "local.sh: $num_processes processes, coordinator 127.0.0.1:$port, logs of processes 1.. in $logs" >&2

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  # The first process to end (bash >= 5.1); on a failure stop the rest (they would wait at a barrier).
  if wait -n -p ended "${running[@]}"; then code=0; else code=$?; fi
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$ended" ]] || still+=("$pid"); done
  running=("${still[@]+"${still[@]}"}")
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    echo "local.sh: process $ended exited with $code; stopping the others (logs in $logs)" >&2
    stop_all
  fi
done
exit $status
