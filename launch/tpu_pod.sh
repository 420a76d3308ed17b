#!/usr/bin/env bash
# Train lasegjax on a Cloud TPU pod slice with gcloud. The stages create the TPU VM (directly or
# through a queued resource), copy the code to every worker, install it, run training on all
# workers at once, gather each worker's log and delete the TPU. Usage: --help, launch/README.md.
# NOTE: tested only through --dry-run. The gcloud flags follow the help text of gcloud 528.0.0
# and were not run against a real TPU.
set -euo pipefail

PROG=${0##*/}
_source=${BASH_SOURCE[0]}
[[ $_source == */* ]] || _source=./$_source
LAUNCH_DIR=$(cd "${_source%/*}" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"

# Paths on the workers, relative to the home directory that gcloud's ssh and scp start in.
REMOTE_DIR=lasegjax
REMOTE_TARBALL=lasegjax.tar.gz
REMOTE_LOG=lasegjax-logs/train.log

read -r -d '' USAGE <<'EOF' || true
Usage: tpu_pod.sh [options] STAGE... [-- TRAIN_ARGS...]

Train lasegjax on a Cloud TPU pod slice. STAGE is one or more of, run in the given order:
  create   create the TPU VM, or with --queued a queued resource, and wait until it is ACTIVE
  copy     copy a `git archive` tarball of HEAD to every worker and unpack it in ~/lasegjax
  install  pip install -e . and jax[tpu] on every worker, then run --setup if given
  run      run python -m lasegjax.main on all workers at once; each worker appends its output
           to ~/lasegjax-logs/train.log
  logs     copy every worker's log to --logs-dir as <worker index>.log
  delete   delete the TPU VM (with --queued: the queued resource and its TPU VM)
  all      create, copy, install and run, then logs and delete, also after a failure or
           Ctrl-C (delete is skipped with --keep); cannot be combined with other stages

TPU options (the variable in brackets sets the default):
  --project ID             Google Cloud project [LASEG_PROJECT]; default: gcloud's core/project
  --zone ZONE              zone, e.g. us-west4-a [LASEG_ZONE]; required
  --tpu-name NAME          TPU VM name [LASEG_TPU_NAME]; required
  --accelerator-type TYPE  slice type, e.g. v5litepod-16, v4-32, v6e-16
                           [LASEG_ACCELERATOR_TYPE]; required for create
  --runtime-version VER    TPU software version [LASEG_RUNTIME_VERSION]; default by generation:
                           v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite
                           (v5litepod), tpu-ubuntu2204-base (v2, v3, v4)
  --spot                   create Spot TPU VMs: cheaper, but Google can preempt them
  --queued                 request the TPU through a queued resource
  --queued-resource ID     queued resource name; default <tpu-name>-qr
  --valid-until-duration D with --queued: the request expires if not provisioned within D
                           (a gcloud duration such as 6h)
  --poll-seconds S         with --queued: seconds between state checks; default 60
  --wait-timeout S         with --queued: stop waiting after S seconds; default 0, no limit

Training options:
  --config FILE            config file relative to the repository root [LASEG_CONFIG];
                           default configs/giant.py
  --workdir DIR            absolute path on a filesystem that every worker mounts (NFS,
                           Filestore, a gcsfuse mount) [LASEG_WORKDIR]; required for run
  --data-root DIR          passed as --config.data.root; must be readable on every worker
                           [LASEG_DATA_ROOT]
  --setup CMD              shell command run on every worker at the end of install, e.g. to
                           mount the shared filesystem [LASEG_SETUP]
  --python PY              Python interpreter on the workers; default python3
  -- TRAIN_ARGS...         every argument after -- is passed on to python -m lasegjax.main

Other options:
  --logs-dir DIR           local folder for the gathered logs; default tpu-logs/<tpu-name>
  --keep                   with all: do not delete the TPU at the end
  --dry-run                print the commands, one per line, instead of running them;
                           needs neither gcloud nor git
  -h, --help               show this help
EOF

PROJECT=${LASEG_PROJECT:-}
ZONE=${LASEG_ZONE:-}
TPU_NAME=${LASEG_TPU_NAME:-}
ACCELERATOR_TYPE=${LASEG_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${LASEG_RUNTIME_VERSION:-}
CONFIG=${LASEG_CONFIG:-configs/giant.py}
WORKDIR=${LASEG_WORKDIR:-}
DATA_ROOT=${LASEG_DATA_ROOT:-}
SETUP=${LASEG_SETUP:-}
PYTHON=python3
QUEUED=0
QUEUED_RESOURCE=""
VALID_UNTIL_DURATION=""
POLL_SECONDS=60
WAIT_TIMEOUT=0
SPOT=0
KEEP=0
DRY_RUN=0
LOGS_DIR=""
STAGES=()
TRAIN_ARGS=()

parse_args() {
  local arg inline
  while (($#)); do
    arg=$1
    shift
    # Split --flag=value into --flag value, remembering that the value came inline.
    inline=0
    if [[ $arg == --*=* ]]; then
      set -- "${arg#*=}" "$@"
      arg=${arg%%=*}
      inline=1
    fi
    case $arg in
      -h | --help)
        printf '%s\n' "$USAGE"
        exit 0
        ;;
      --queued | --spot | --keep | --dry-run)
        ((!inline)) || usage_error "option $arg takes no value"
        case $arg in
          --queued) QUEUED=1 ;;
          --spot) SPOT=1 ;;
          --keep) KEEP=1 ;;
          --dry-run) DRY_RUN=1 ;;
        esac
        ;;
      --project | --zone | --tpu-name | --accelerator-type | --runtime-version | \
        --queued-resource | --valid-until-duration | --poll-seconds | --wait-timeout | \
        --config | --workdir | --data-root | --setup | --python | --logs-dir)
        (($#)) || usage_error "option $arg needs a value"
        case $arg in
          --project) PROJECT=$1 ;;
          --zone) ZONE=$1 ;;
          --tpu-name) TPU_NAME=$1 ;;
          --accelerator-type) ACCELERATOR_TYPE=$1 ;;
          --runtime-version) RUNTIME_VERSION=$1 ;;
          --queued-resource) QUEUED_RESOURCE=$1 ;;
          --valid-until-duration) VALID_UNTIL_DURATION=$1 ;;
          --poll-seconds) POLL_SECONDS=$1 ;;
          --wait-timeout) WAIT_TIMEOUT=$1 ;;
          --config) CONFIG=$1 ;;
          --workdir) WORKDIR=$1 ;;
          --data-root) DATA_ROOT=$1 ;;
          --setup) SETUP=$1 ;;
          --python) PYTHON=$1 ;;
          --logs-dir) LOGS_DIR=$1 ;;
        esac
        shift
        ;;
      --)
        TRAIN_ARGS=("$@")
        return
        ;;
      -*) usage_error "unknown option $arg" ;;
      *) STAGES+=("$arg") ;;
    esac
  done
}

default_runtime_version() {
  case $1 in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

validate_args() {
  local stage needs_create=0 needs_run=0
  ((${#STAGES[@]})) || usage_error "missing STAGE: give one or more of create, copy, install," \
    "run, logs, delete, all"
  for stage in "${STAGES[@]}"; do
    case $stage in
      create) needs_create=1 ;;
      run) needs_run=1 ;;
      copy | install | logs | delete) ;;
      all)
        ((${#STAGES[@]} == 1)) || usage_error "stage 'all' cannot be combined with other stages"
        needs_create=1
        needs_run=1
        ;;
      *)
        usage_error "unknown stage '$stage'; use create, copy, install, run, logs, delete or all"
        ;;
    esac
  done

  [[ -n $ZONE ]] || usage_error "missing --zone (or LASEG_ZONE), e.g. --zone=us-west4-a"
  [[ -n $TPU_NAME ]] || usage_error "missing --tpu-name (or LASEG_TPU_NAME)"
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}
  LOGS_DIR=${LOGS_DIR:-tpu-logs/$TPU_NAME}
  require_positive_int --poll-seconds "$POLL_SECONDS"
  [[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] ||
    usage_error "--wait-timeout must be a whole number of seconds (got '$WAIT_TIMEOUT')"

  if ((needs_create)); then
    [[ -n $ACCELERATOR_TYPE ]] ||
      usage_error "missing --accelerator-type (or LASEG_ACCELERATOR_TYPE), e.g. v5litepod-16"
    if [[ -z $RUNTIME_VERSION ]]; then
      RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
        usage_error "no default TPU software version for accelerator type" \
          "'$ACCELERATOR_TYPE'; set --runtime-version"
    fi
  fi
  if ((needs_run)); then
    [[ -n $WORKDIR ]] ||
      usage_error "missing --workdir (or LASEG_WORKDIR), e.g. /mnt/shared/runs/giant"
    require_absolute --workdir "$WORKDIR"
    if [[ -n $DATA_ROOT ]]; then
      require_absolute --data-root "$DATA_ROOT"
    fi
  fi
}

# Flags that every gcloud TPU command gets, and the flags that select the queued resource.
gcloud_scope() {
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    SCOPE+=(--project="$PROJECT")
  fi
  QUEUE_FLAGS=()
  if ((QUEUED)); then
    QUEUE_FLAGS=(--queued --queued-resource="$QUEUED_RESOURCE")
  fi
}

# Run a shell command on every worker at once. Extra gcloud flags may follow the command.
on_all_workers() {
  local command=$1
  shift
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${SCOPE[@]}" \
    --command="$command" "$@"
}

request_tpu() {
  local args
  if ((QUEUED)); then
    args=(gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${SCOPE[@]}"
      --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
      --runtime-version="$RUNTIME_VERSION")
    if [[ -n $VALID_UNTIL_DURATION ]]; then
      args+=(--valid-until-duration="$VALID_UNTIL_DURATION")
    fi
  else
    args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}"
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  fi
  if ((SPOT)); then
    args+=(--spot)
  fi
  run_cmd "${args[@]}"
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${SCOPE[@]}")
  local state start=$SECONDS
  if ((DRY_RUN)); then
    note "repeat every $POLL_SECONDS s until it prints ACTIVE:"
    run_cmd "${describe[@]}" --format='value(state.state)'
    return
  fi
  while :; do
    state=$("${describe[@]}" --format='value(state.state)')
    case $state in
      ACTIVE)
        note "queued resource $QUEUED_RESOURCE is ACTIVE"
        return
        ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $QUEUED_RESOURCE is $state; run" \
          "'$(join_quoted "${describe[@]}")' for the reason, then delete it with the delete stage"
        ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      die "queued resource $QUEUED_RESOURCE is still $state after $WAIT_TIMEOUT s" \
        "(--wait-timeout). It stays in the queue: rerun the create stage to wait again, or" \
        "delete it with the delete stage"
    fi
    note "queued resource $QUEUED_RESOURCE is ${state:-not listed yet};" \
      "next check in $POLL_SECONDS s"
    sleep "$POLL_SECONDS"
  done
}

stage_create() {
  request_tpu
  if ((QUEUED)); then
    wait_until_active
  fi
}

stage_copy() {
  local tarball=${TMPDIR:-/tmp}/lasegjax-$TPU_NAME.tar.gz
  if ((!DRY_RUN)); then
    require_tool git "install git; the code is copied as a git archive of HEAD"
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
      warn "uncommitted changes in $REPO_ROOT are not copied; the workers get HEAD" \
        "($(git -C "$REPO_ROOT" rev-parse --short HEAD))"
    fi
  fi
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --worker=all \
    "${SCOPE[@]}"
  local unpack="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR"
  unpack+=" && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR"
  on_all_workers "$unpack"
}

stage_install() {
  # jax[tpu] pulls libtpu from PyPI, and the TPU software version provides the drivers.
  on_all_workers "cd $REMOTE_DIR && $(shell_quote "$PYTHON") -m pip install -e . \"jax[tpu]\""
  if [[ -n $SETUP ]]; then
    on_all_workers "$SETUP"
  fi
}

stage_run() {
  # --distributed=on: jax.distributed.initialize() finds the other workers through the TPU VM
  # metadata server, but an ssh session on a TPU VM need not have the environment variables
  # that lasegjax's --distributed=auto looks for. Every worker runs the same command.
  local train=("$PYTHON" -m lasegjax.main --distributed=on --config="$CONFIG"
    --workdir="$WORKDIR")
  if [[ -n $DATA_ROOT ]]; then
    train+=(--config.data.root="$DATA_ROOT")
  fi
  train+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  # pipefail keeps the trainer's exit status through tee.
  local remote="set -o pipefail; mkdir -p ${REMOTE_LOG%/*} && cd $REMOTE_DIR && {"
  remote+=" echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname)\";"
  remote+=" PYTHONUNBUFFERED=1 $(join_quoted "${train[@]}"); } 2>&1 | tee -a ../$REMOTE_LOG"
  on_all_workers "$remote"
}

stage_logs() {
  run_cmd mkdir -p "$LOGS_DIR"
  # gcloud writes each worker's output to <worker index>.log in --output-directory.
  on_all_workers "cat $REMOTE_LOG" --output-directory="$LOGS_DIR"
  note "worker logs: $LOGS_DIR/<worker index>.log"
}

stage_delete() {
  if ((QUEUED)); then
    # --force also deletes the TPU VM that the queued resource created.
    run_cmd gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${SCOPE[@]}" --force \
      --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}" --quiet
  fi
}

# EXIT trap of the all stage: gather logs and delete the TPU whether the run passed or not,
# then exit with the run's status.
finish_all() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  stage_logs || warn "gathering the logs failed; each worker still has ~/$REMOTE_LOG"
  if ((KEEP)); then
    local delete_command
    delete_command=$(join_quoted "$0" "${SCOPE[@]}" --tpu-name="$TPU_NAME" \
      ${QUEUE_FLAGS[@]+"${QUEUE_FLAGS[@]}"})
    note "--keep: TPU $TPU_NAME still exists and is billed until deleted with:" \
      "$delete_command delete"
  else
    stage_delete || warn "deleting the TPU failed; it is billed until deleted: check" \
      "'gcloud compute tpus tpu-vm list --zone=$ZONE' and" \
      "'gcloud compute tpus queued-resources list --zone=$ZONE'"
  fi
  exit "$status"
}

stage_all() {
  # The trap is set only once the request went through, so a failed create (for example a
  # name that already exists) never deletes a TPU that this run did not create.
  request_tpu
  trap finish_all EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if ((QUEUED)); then
    wait_until_active
  fi
  stage_copy
  stage_install
  stage_run
}

main() {
  parse_args "$@"
  validate_args
  gcloud_scope
  if ((!DRY_RUN)); then
    require_tool gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
  local stage
  for stage in "${STAGES[@]}"; do
    "stage_$stage"
  done
}

main "$@"
