#!/usr/bin/env bash
# Cloud TPU VMs for tpustack: from an empty project to a training run, and back.
#
#   launch/tpu_vm.sh up     --project P --name N --zone Z --accelerator-type v5p-32 [--num-slices K]
#                           [--queued] [--spot] -- train --config configs/llama2_7b.py --workdir gs://BUCKET/run
#   launch/tpu_vm.sh create --name N --zone Z --accelerator-type T [--queued] [--num-slices K] [--spot]
#                           [--runtime-version V] [--no-wait] [--timeout S] [--poll S]
#   launch/tpu_vm.sh wait   --name N --zone Z [--timeout S] [--poll S]     # queued resource -> ACTIVE
#   launch/tpu_vm.sh setup  --name N --zone Z [--num-slices K] [--python X.Y.Z] [--python-mirror URL]
#   launch/tpu_vm.sh run    --name N --zone Z [--num-slices K] [--accelerator-type T] [--env K=V] -- train ...
#   launch/tpu_vm.sh stop   --name N --zone Z [--num-slices K]              # SIGTERM: the run saves, exits
#   launch/tpu_vm.sh tail   --name N --zone Z [--num-slices K] [--lines L] [--follow [--node I] [--worker W]]
#   launch/tpu_vm.sh delete --name N --zone Z [--queued | --num-slices K]
#   (every command takes --project P)
#
# --dry-run, wherever it stands (after `--` too), prints every command instead of running it.
# `up` is enable-API + bucket + create + wait + setup + run. Multislice (--num-slices K > 1)
# is a queued resource whose nodes are N-0 ... N-(K-1); setup, run, stop and tail visit each.
# Give run --config.mesh.dcn_data=K there. Walk-through and sources: docs/tpu_vm.md.
set -eo pipefail  # not -u: bash 3.2 (macOS) calls an empty array unset

# Pins for the workers: the stock images ship Python 3.10 and tpustack needs >= 3.11.
# uv comes from PyPI through the image's own pip (the one route every worker has);
# uv then fetches this CPython build (python-build-standalone; --python-mirror moves it).
UV_VERSION="0.13.9"
PYTHON_VERSION="3.12.16"
REMOTE_DIR="tpustack"  # ~/tpustack on every worker: the code, .venv, logs/
R_DIR="\$HOME/$REMOTE_DIR" R_UV="\$HOME/.local/bin/uv"  # as the workers' shell reads them

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }
warn() { echo "warning: $*" >&2; }

# --dry-run may stand anywhere, `--` included: take it out before anything else is read.
dry_run=0 before=() tpustack_args=() seen_dashes=0
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    dry_run=1
  elif [ "$seen_dashes" = 0 ] && [ "$arg" = "--" ]; then
    seen_dashes=1
  elif [ "$seen_dashes" = 1 ]; then
    tpustack_args+=("$arg")
  else
    before+=("$arg")
  fi
done
set -- "${before[@]+"${before[@]}"}"

command="${1:-}"
[ -n "$command" ] || { usage; exit 2; }
case "$command" in -h|--help) usage; exit 0 ;; esac
shift

name="" zone="" accelerator="" runtime="" project="" queued=0 spot=0 slices=1 worker=0 node=0
timeout_s=7200 poll_s=30 wait_active=1 follow=0 lines=50 python_version="$PYTHON_VERSION" python_mirror=""
service_account="" envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name|--zone|--accelerator-type|--runtime-version|--project|--num-slices|--worker|--node|--timeout|--poll|\
    --lines|--python|--python-mirror|--service-account|--env)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
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
    --node) node="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --poll) poll_s="$2"; shift 2 ;;
    --no-wait) wait_active=0; shift ;;
    --follow) follow=1; shift ;;
    --lines) lines="$2"; shift 2 ;;
    --python) python_version="$2"; shift 2 ;;
    --python-mirror) python_mirror="$2"; shift 2 ;;
    --service-account) service_account="$2"; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

need() { [ -n "$2" ] || die "$command needs $1"; }
integer() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"; }
need --name "$name"
need --zone "$zone"
integer --num-slices "$slices"; [ "$slices" -ge 1 ] || die "--num-slices must be >= 1"
integer --timeout "$timeout_s"; integer --poll "$poll_s"; integer --lines "$lines"; integer --node "$node"
[ "$node" -lt "$slices" ] || die "--node $node: there are $slices slice(s), numbered from 0"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or all"
for kv in "${envs[@]+"${envs[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE, got '$kv'"
done

# One shell word as bash reads it: bare when safe, else single-quoted (--flag='value').
quote() {
  local q="'\\''"
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/$q}"
  else
    printf "'%s'" "${1//\'/$q}"
  fi
}
quote_all() {
  local out="" word
  for word in "$@"; do out+="$(quote "$word") "; done
  printf '%s' "${out% }"
}

# Run a command, or print it (one line, shell-quoted) with --dry-run.
run() {
  if [ "$dry_run" = 1 ]; then
    quote_all "$@"; printf '\n'
  else
    "$@"
  fi
}
note() { echo "# $*"; }

project_flag=()
[ -n "$project" ] && project_flag=(--project="$project")

# A queued multislice resource names its nodes <prefix>-0 .. <prefix>-(K-1) (TPU API
# QueuedResource MultisliceParams.node_id_prefix); a single slice is the node --name.
nodes=()
if [ "$slices" -gt 1 ]; then
  for ((i = 0; i < slices; i++)); do nodes+=("${name}-${i}"); done
else
  nodes=("$name")
fi

# ---------------------------------------------------------------------------------------------
# The slice table. Sources (checked 2026): cloud.google.com/tpu/docs/v4, /v5p (topology table:
# 2x2x1 = 4 chips 1 host, 2x2x2 = 8 chips 2 hosts, 2x4x4 = 32 chips 8 hosts; a host has 4 chips),
# /v5e and /v6e ("Topology | TPU chips | Hosts | VMs": 2x4 8 chips 1 host 1 VM, 4x4 16 chips
# 2 hosts 4 VMs, 16x16 256 chips 32 hosts 64 VMs). v4 and v5p are named by TensorCores (2 per
# chip: v5p-32 = 16 chips), v5e and v6e by chips. One TPU VM (gcloud worker) runs one tpustack
# process; v5e/v6e slices over 8 chips use 4-chip VMs, two to a physical host.
# ---------------------------------------------------------------------------------------------
chips=0 hosts="" vms=0
slice_shape() {
  local type="$1" n
  n="${type##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "unknown accelerator type $type (v4-N, v5p-N, v5e-N, v6e-N)"
  case "$type" in
    v4-*|v5p-*)
      if [ "$n" -lt 8 ] || [ $((n % 8)) -ne 0 ]; then
        die "$type: v4 and v5p sizes count TensorCores, 8, 16, 32, ..."
      fi
      chips=$((n / 2)); vms=$((chips / 4)); hosts="$vms" ;;
    v5e-*|v5litepod-*|v6e-*)
      case "$n" in 1|4|8|16|32|64|128|256) ;; *) die "$type: v5e and v6e slices have 1, 4, 8, 16, ... 256 chips" ;; esac
      chips="$n"
      case "$n" in
        1) hosts="1/8"; vms=1 ;;
        4) hosts="1/2"; vms=1 ;;
        8) hosts=1; vms=1 ;;
        *) hosts=$((n / 8)); vms=$((n / 4)) ;;
      esac ;;
    *) die "unknown accelerator type $type (v4-N, v5p-N, v5e-N, v6e-N)" ;;
  esac
}

# v5e is v5litepod-N to gcloud; the others keep their names.
gcloud_accelerator() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# cloud.google.com/tpu/docs/runtimes: the software versions for JAX.
default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5e-*|v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
  esac
}

describe_slice() {
  note "$accelerator: $chips chips, $hosts host(s), $vms TPU VM worker(s) per slice; $slices slice(s)," \
       "$((vms * slices)) tpustack process(es) in all"
}

# --- create / wait ---------------------------------------------------------------------------------

is_queued() { [ "$queued" = 1 ] || [ "$slices" -gt 1 ]; }

wait_for_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" --zone="$zone" "${project_flag[@]}"
                  --format='value(state.state)')
  if [ "$dry_run" = 1 ]; then
    note "wait for ACTIVE: repeat every ${poll_s}s until it prints ACTIVE (give up after ${timeout_s}s, or on FAILED/SUSPENDED)"
    run "${describe[@]}"
    return
  fi
  local start=$SECONDS state
  while :; do
    state="$("${describe[@]}" 2>/dev/null || true)"
    case "$state" in
      ACTIVE) echo "queued resource $name is ACTIVE"; return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING)
        echo "error: queued resource $name is $state; see gcloud compute tpus queued-resources describe $name --zone=$zone" >&2
        exit 1 ;;
    esac
    if [ $((SECONDS - start)) -ge "$timeout_s" ]; then
      echo "error: queued resource $name is still ${state:-unknown} after ${timeout_s}s; wait again with:" >&2
      echo "  $(quote_all "$0" wait --name "$name" --zone="$zone" "${project_flag[@]}")" >&2
      exit 1
    fi
    echo "queued resource $name: ${state:-unknown}; next look in ${poll_s}s" >&2
    sleep "$poll_s"
  done
}

create() {
  need --accelerator-type "$accelerator"
  slice_shape "$accelerator"
  runtime="${runtime:-$(default_runtime "$accelerator")}"
  local accel spot_flag=() nodes_flag=() sa_flag=()
  accel="$(gcloud_accelerator "$accelerator")"
  [ "$spot" = 1 ] && spot_flag=(--spot)
  [ -n "$service_account" ] && sa_flag=(--service-account="$service_account")
  describe_slice
  if is_queued; then
    if [ "$slices" -gt 1 ]; then
      nodes_flag=(--node-count="$slices" --node-prefix="$name")
    else
      nodes_flag=(--node-id="$name")
    fi
    run gcloud compute tpus queued-resources create "$name" "${nodes_flag[@]}" --zone="$zone" \
      --accelerator-type="$accel" --runtime-version="$runtime" "${spot_flag[@]}" "${sa_flag[@]}" "${project_flag[@]}"
    if [ "$wait_active" = 1 ]; then
      wait_for_active
    else
      note "not waiting; before setup run: $(quote_all "$0" wait --name "$name" --zone "$zone" "${project_flag[@]}")"
    fi
  else
    # tpu-vm create returns once the node is READY.
    run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
      --version="$runtime" "${spot_flag[@]}" "${sa_flag[@]}" "${project_flag[@]}"
  fi
}

# --- setup ---------------------------------------------------------------------------------------

# The commands each worker runs, one line joined by &&. The archive keeps .venv and logs/ of
# an earlier setup; the venv is made afresh (uv's cache makes that quick).
setup_remote_command() {
  local mirror=""
  [ -n "$python_mirror" ] && mirror="UV_PYTHON_INSTALL_MIRROR=$(quote "$python_mirror") "
  local steps=(
    "mkdir -p $R_DIR"
    "find $R_DIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +"
    "tar -xzf $R_DIR.tar.gz -C $R_DIR"
    "{ python3 -m pip --version >/dev/null 2>&1 || { sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip; }; }"
    "python3 -m pip install --user --quiet --disable-pip-version-check uv==$UV_VERSION"
    "${mirror}$R_UV python install $python_version"
    "cd $R_DIR"
    "$R_UV venv --clear --managed-python --python $python_version .venv"
    "$R_UV pip install --python .venv/bin/python -e '.[tpu]'"
    ".venv/bin/python --version"
    ".venv/bin/tpustack --help >/dev/null"
  )
  local joined="" step
  for step in "${steps[@]}"; do joined+="$step && "; done
  printf '%s' "${joined% && }"
}

setup() {
  local root archive
  root="$(cd "$(dirname "$0")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/${name}-tpustack.tar.gz"
  # The last commit travels, not the working tree: what runs is what `git log` names.
  if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    warn "setup copies the last commit ($(git -C "$root" rev-parse --short HEAD)); uncommitted changes stay here"
  fi
  run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
  local remote n
  remote="$(setup_remote_command)"
  for n in "${nodes[@]}"; do
    run gcloud compute tpus tpu-vm scp "$archive" "${n}:${REMOTE_DIR}.tar.gz" --zone="$zone" --worker=all \
      "${project_flag[@]}"
    run gcloud compute tpus tpu-vm ssh "$n" --zone="$zone" --worker=all "${project_flag[@]}" --command="$remote"
  done
}

# --- run / stop / tail ---------------------------------------------------------------------------

# Processes that hold a TPU chip open (/dev/accel* on v4, /dev/vfio/N on v5e and later), found
# through /proc so that nothing beyond coreutils and findutils is needed.
TPU_PIDS='tpu_pids() { sudo find /proc/[0-9]*/fd -maxdepth 1 \( -lname "/dev/accel*" -o -lname "/dev/vfio/[0-9]*" \) 2>/dev/null | cut -d/ -f3 | sort -u; }'

# The pid the last run wrote, while that process is still a tpustack one (pids get reused).
# shellcheck disable=SC2016  # expanded by the workers' shell
OUR_PID='our_pid() { [ -f logs/tpustack.pid ] && grep -qs tpustack "/proc/$(cat logs/tpustack.pid)/cmdline" && cat logs/tpustack.pid; }'

run_remote_command() {
  local env_words="" kv
  for kv in "${envs[@]+"${envs[@]}"}"; do env_words+="$(quote "$kv") "; done
  [ -n "$env_words" ] && env_words="env $env_words"
  local steps=(
    "set -e"
    "cd $R_DIR"
    "[ -x .venv/bin/tpustack ] || { echo \"no $R_DIR/.venv on \$(hostname): run launch/tpu_vm.sh setup first\" >&2; exit 1; }"
    "mkdir -p logs"
    "$TPU_PIDS"
    # A previous run gets SIGTERM (it saves and leaves), then anything still holding a chip is killed.
    "$OUR_PID"
    "if [ -n \"\$(our_pid)\" ]; then kill -TERM \"\$(our_pid)\" 2>/dev/null || true; fi"
    "for i in \$(seq 60); do [ -z \"\$(tpu_pids)\" ] && break; sleep 1; done"
    "{ tpu_pids | xargs -r sudo kill -9 || true; }"
    "for i in \$(seq 10); do [ -z \"\$(tpu_pids)\" ] && break; sleep 1; done"
    "sudo rm -f /tmp/libtpu_lockfile"
    "setsid nohup ${env_words}.venv/bin/tpustack $(quote_all "${tpustack_args[@]}") > \"logs/\$(hostname).log\" 2>&1 < /dev/null & echo \$! > logs/tpustack.pid"
    "echo \"\$(hostname): tpustack started (pid \$(cat logs/tpustack.pid))\""
  )
  local joined="" step
  for step in "${steps[@]}"; do joined+="$step; "; done
  printf '%s' "${joined%; }"
}

# A multi-host job with a local workdir cannot resume: every host writes only its own shards
# into its own disk, no host holds a whole checkpoint, and a spot VM loses its disk when preempted.
workdir_checked=0
# The --workdir given to tpustack (empty when none).
workdir_arg() {
  local workdir="" i
  for ((i = 0; i < ${#tpustack_args[@]}; i++)); do
    case "${tpustack_args[i]}" in
      --workdir) workdir="${tpustack_args[i + 1]:-}" ;;
      --workdir=*) workdir="${tpustack_args[i]#--workdir=}" ;;
    esac
  done
  printf '%s' "$workdir"
}

check_workdir() {
  [ "$workdir_checked" = 0 ] || return 0
  workdir_checked=1
  local sub="${tpustack_args[0]:-}" workdir
  case "$sub" in train|distill) ;; *) return 0 ;; esac
  workdir=$(workdir_arg)
  [[ "$workdir" == gs://* ]] && return 0
  local shown="${workdir:-runs/<config name> (the default)}" workers=""
  if [ -n "$accelerator" ]; then
    slice_shape "$accelerator"
    workers=$((vms * slices))
    [ "$workers" -gt 1 ] || return 0
  elif [ "$slices" -gt 1 ]; then
    workers="$slices slices"
  fi
  local why="each host would write only its own checkpoint shards to its own disk, so restore cannot"
  why+=" work; a spot VM also loses its disk on preemption. Use --workdir gs://BUCKET/RUN"
  if [ -n "$workers" ]; then
    [[ "$workers" =~ ^[0-9]+$ ]] && workers="$workers workers"
    warn "local workdir $shown on a multi-host run ($workers): $why"
  else
    warn "local workdir $shown: if $name has more than one host (pass --accelerator-type to know), $why"
  fi
}

start_run() {
  [ ${#tpustack_args[@]} -gt 0 ] || die "$command needs the tpustack command after --, e.g. -- train --config configs/tiny.py"
  check_workdir
  if [ "$slices" -gt 1 ] && [[ " ${tpustack_args[*]} " != *" --config.mesh.dcn_"* ]]; then
    warn "$slices slices: pass --config.mesh.dcn_data=$slices so that only the data axis crosses slices"
  fi
  local remote n
  remote="$(run_remote_command)"
  for n in "${nodes[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$n" --zone="$zone" --worker=all "${project_flag[@]}" --command="$remote"
  done
  note "logs: $(quote_all "$0" tail --name "$name" --zone "$zone" --num-slices "$slices" "${project_flag[@]}")"
}

stop_run() {
  local remote n
  remote="cd $R_DIR && $OUR_PID; if [ -n \"\$(our_pid)\" ] && kill -TERM \"\$(our_pid)\"; then echo \"\$(hostname): SIGTERM sent\"; fi"
  for n in "${nodes[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$n" --zone="$zone" --worker=all "${project_flag[@]}" --command="$remote"
  done
}

tail_logs() {
  local log="$R_DIR/logs/\$(hostname).log" n
  if [ "$follow" = 1 ]; then
    [ "$worker" != all ] || die "--follow follows one worker: give --worker N (and --node I for multislice)"
    run gcloud compute tpus tpu-vm ssh "${nodes[$node]}" --zone="$zone" --worker="$worker" "${project_flag[@]}" \
      --command="tail -n $lines -F $log"
    return
  fi
  for n in "${nodes[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$n" --zone="$zone" --worker=all "${project_flag[@]}" \
      --command="tail -v -n $lines $log"
  done
}

# --- up: an empty project to a first training step ------------------------------------------------

prepare_project() {
  need --project "$project"
  run gcloud services enable tpu.googleapis.com --project="$project"
  local sub="${tpustack_args[0]:-}" workdir
  workdir=$(workdir_arg)
  [[ "$sub" =~ ^(train|distill)$ && "$workdir" == gs://* ]] || return 0
  local bucket="${workdir#gs://}"
  bucket="gs://${bucket%%/*}"
  local region="${zone%-*}"
  # The bucket lives in the TPUs' region; the VMs' service account (the Compute Engine default
  # one unless --service-account) gets read/write on its objects.
  local create=(gcloud storage buckets create "$bucket" --location="$region" --uniform-bucket-level-access
                --project="$project")
  if [ "$dry_run" = 1 ]; then
    note "create the bucket unless it exists (gcloud storage buckets describe $bucket)"
    run "${create[@]}"
  elif gcloud storage buckets describe "$bucket" --project="$project" >/dev/null 2>&1; then
    echo "bucket $bucket exists"
  else
    "${create[@]}"
  fi
  local member="$service_account"
  if [ -z "$member" ]; then
    local number="PROJECT_NUMBER"
    if [ "$dry_run" = 1 ]; then
      run gcloud projects describe "$project" --format='value(projectNumber)'
    else
      number="$(gcloud projects describe "$project" --format='value(projectNumber)')"
    fi
    member="${number}-compute@developer.gserviceaccount.com"
  fi
  run gcloud storage buckets add-iam-policy-binding "$bucket" --member="serviceAccount:$member" \
    --role=roles/storage.objectUser --project="$project"
}

case "$command" in
  up)
    need --accelerator-type "$accelerator"
    [ ${#tpustack_args[@]} -gt 0 ] || die "up needs the tpustack command after --, e.g. -- train --config ..."
    slice_shape "$accelerator"  # a bad type fails before anything is created
    check_workdir
    prepare_project
    create
    setup
    start_run
    ;;
  create) create ;;
  wait) wait_for_active ;;
  setup) setup ;;
  run) start_run ;;
  stop) stop_run ;;
  tail) tail_logs ;;
  delete)
    if is_queued; then
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet "${project_flag[@]}"
    else
      run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet "${project_flag[@]}"
    fi
    ;;
  *) die "unknown command $command (up, create, wait, setup, run, stop, tail, delete)" ;;
esac
