#!/usr/bin/env bash
# Cloud TPU VM lifecycle for tpustack: create, setup, run, tail, delete.
#
#   launch/tpu_vm.sh create --name NAME --zone ZONE --accelerator-type v5p-32 [--runtime-version V]
#                           [--project P] [--queued] [--spot] [--num-slices N]
#   launch/tpu_vm.sh setup  --name NAME --zone ZONE            # copy this checkout, pip install on all workers
#   launch/tpu_vm.sh run    --name NAME --zone ZONE -- train --config configs/llama2_7b.py --workdir gs://B/run
#   launch/tpu_vm.sh tail   --name NAME --zone ZONE [--worker 0]
#   launch/tpu_vm.sh delete --name NAME --zone ZONE [--queued]
#
# Every command takes --dry-run: print the gcloud commands instead of running them.
# `run` starts the same command on every worker (--worker=all); each worker logs to
# ~/tpustack/logs/<hostname>.log, and jax.distributed finds its peers from the TPU metadata.
# Multislice (--num-slices N > 1) needs queued resources: N slices of the accelerator type,
# joined over the data-center network (DCN); run with --config.mesh.dcn_data=N so the
# mesh's data axis spans the slices (its gradient all-reduce is the only DCN traffic) and
# the in-slice axes (fsdp, tensor, stage) stay on ICI. jax.distributed sees all hosts.
set -euo pipefail

usage() { sed -n '2,17p' "$0"; }

command="${1:-}"
[ -n "$command" ] || { usage; exit 2; }
case "$command" in -h|--help) usage; exit 0 ;; esac
shift

name="" zone="" accelerator="" runtime="" project="" queued=0 spot=0 slices=1 worker="all" dry_run=0
remote_dir="tpustack"
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --runtime-version) runtime="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --num-slices) slices="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

need() { [ -n "$2" ] || { echo "error: $command needs $1" >&2; exit 2; }; }
need --name "$name"
need --zone "$zone"

# Run a command, or print it (shell-quoted) with --dry-run.
run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
  else
    "$@"
  fi
}

project_flag=()
[ -n "$project" ] && project_flag=(--project="$project")

# v5e and v6e are named by chips (v5litepod-16); v4 and v5p by TensorCores (v5p-32 = 16 chips).
gcloud_accelerator() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5e-*|v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "error: unknown accelerator type $1 (v4-N, v5p-N, v5e-N, v6e-N)" >&2; exit 2 ;;
  esac
}

# Chips and hosts of a slice: 4 chips per host on multi-host slices.
describe_slice() {
  local type="$1" n chips
  n="${type##*-}"
  case "$type" in
    v4-*|v5p-*) chips=$((n / 2)) ;;
    *) chips="$n" ;;
  esac
  local hosts=$(((chips + 3) / 4))
  [ "$chips" -le 8 ] && hosts=1
  echo "# $type: $chips chips on $hosts host(s) per slice, $slices slice(s)"
}

case "$command" in
  create)
    need --accelerator-type "$accelerator"
    runtime="${runtime:-$(default_runtime "$accelerator")}"
    accel="$(gcloud_accelerator "$accelerator")"
    spot_flag=()
    [ "$spot" = 1 ] && spot_flag=(--spot)
    [ "$dry_run" = 1 ] && describe_slice "$accelerator"
    if [ "$slices" -gt 1 ] || [ "$queued" = 1 ]; then
      if [ "$slices" -gt 1 ]; then
        nodes=(--node-count="$slices" --node-prefix="$name")
      else
        nodes=(--node-id="$name")
      fi
      run gcloud compute tpus queued-resources create "$name" "${nodes[@]}" --zone="$zone" \
        --accelerator-type="$accel" --runtime-version="$runtime" "${spot_flag[@]}" "${project_flag[@]}"
    else
      run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
        --version="$runtime" "${spot_flag[@]}" "${project_flag[@]}"
    fi
    ;;
  setup)
    archive="/tmp/${name}-tpustack.tar.gz"
    root="$(cd "$(dirname "$0")/.." && pwd)"
    run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "${name}:~/tpustack.tar.gz" --zone="$zone" --worker=all \
      "${project_flag[@]}"
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all "${project_flag[@]}" \
      --command="mkdir -p ~/${remote_dir} && tar -xzf ~/tpustack.tar.gz -C ~/${remote_dir} && cd ~/${remote_dir} && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    [ $# -gt 0 ] || { echo "error: run needs the tpustack command after --, e.g. -- train --config configs/tiny.py" >&2; exit 2; }
    args="$(printf '%q ' "$@")"
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all "${project_flag[@]}" \
      --command="cd ~/${remote_dir} && mkdir -p logs && nohup .venv/bin/tpustack ${args% } > logs/\$(hostname).log 2>&1 &"
    ;;
  tail)
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$worker" "${project_flag[@]}" \
      --command="tail -n 50 -F ~/${remote_dir}/logs/*.log"
    ;;
  delete)
    if [ "$queued" = 1 ] || [ "$slices" -gt 1 ]; then
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet "${project_flag[@]}"
    else
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet "${project_flag[@]}"
    fi
    ;;
  *) echo "error: unknown command $command (create, setup, run, tail, delete)" >&2; exit 2 ;;
esac
