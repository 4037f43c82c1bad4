#!/usr/bin/env bash
# Run N tpustack processes on this machine as one multi-controller JAX job (CPU devices,
# gloo collectives): what a multi-host slice does, without the hosts.
#
#   launch/local.sh [--processes N] [--devices-per-process K] [--port P] [--logdir DIR] -- train --config ...
#
# Process i writes DIR/process_i.log; the script waits for all and fails if any failed.
set -euo pipefail

processes=2
devices=4
port=12355
logdir=""
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "error: give the tpustack command after --, e.g. -- train --config configs/tiny.py" >&2
  exit 2
fi
logdir="${logdir:-$(mktemp -d)}"
mkdir -p "$logdir"
python="${PYTHON:-python3}"

pids=()
for ((i = 0; i < processes; i++)); do
  cmd=(env JAX_PLATFORMS=cpu TPUSTACK_COORDINATOR="localhost:${port}" TPUSTACK_NUM_PROCESSES="${processes}"
       TPUSTACK_PROCESS_ID="${i}" TPUSTACK_LOCAL_DEVICES="${devices}" "$python" -m tpustack "$@")
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"; printf '> %q\n' "${logdir}/process_${i}.log"
    continue
  fi
  "${cmd[@]}" > "${logdir}/process_${i}.log" 2>&1 &
  pids+=("$!")
done
[ "$dry_run" = 1 ] && exit 0

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see ${logdir}/process_${i}.log" >&2
    status=1
  fi
done
echo "logs: ${logdir}"
exit "$status"
