#!/usr/bin/env bash
# Submit lasegjax training to a SLURM GPU cluster: N nodes, one task per node, each task's
# Python process driving every GPU of its node. Writes the sbatch script next to the logs and
# submits it. Usage: --help, launch/README.md.
# NOTE: tested only through --dry-run, not on a SLURM cluster. The srun step is assumed to
# inherit the job's --gpus-per-node, as srun does through SLURM_GPUS_PER_NODE.
set -euo pipefail

PROG=${0##*/}
_source=${BASH_SOURCE[0]}
[[ $_source == */* ]] || _source=./$_source
LAUNCH_DIR=$(cd "${_source%/*}" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"

HEREDOC_END=LASEG_SBATCH_EOF

read -r -d '' USAGE <<'EOF' || true
Usage: slurm_gpu.sh [options] [-- TRAIN_ARGS...]

Write an sbatch script that runs python -m lasegjax.main on --nodes nodes (one task per node,
each process using all GPUs of its node) and submit it with sbatch. The repository, the
Python environment, --workdir and --data-root must be on a filesystem that every node mounts.

Job options:
  --nodes N              number of nodes; required
  --gpus-per-node G      GPUs per node, all used by the node's one process; required
  --partition NAME       SLURM partition (sbatch --partition)
  --account NAME         account to charge (sbatch --account)
  --time LIMIT           wall-time limit, e.g. 2-00:00:00 (sbatch --time)
  --cpus-per-task C      CPU cores per node's process, for the input pipeline
  --job-name NAME        job name; default lasegjax
  --sbatch-arg ARG       extra sbatch option written as "#SBATCH ARG", e.g.
                         --sbatch-arg=--exclusive; can be repeated
  --setup CMD            shell command run at the start of the job, e.g. "module load cuda"
  --venv DIR             Python virtual environment to activate (absolute path)
  --python PY            Python interpreter; default python3 (from --venv when given)
  --coordinator-port P   port of JAX's coordinator on the first node; default: JAX picks one
                         in 61440-65535 from the job id
  --explicit-coordinator pass --coordinator_address, --num_processes and --process_id to
                         lasegjax.main instead of relying on JAX's SLURM detection

Training options:
  --config FILE          config file relative to the repository root [LASEG_CONFIG];
                         default configs/giant.py
  --workdir DIR          absolute path on the shared filesystem [LASEG_WORKDIR]; required
  --data-root DIR        passed as --config.data.root [LASEG_DATA_ROOT]
  -- TRAIN_ARGS...       every argument after -- is passed on to python -m lasegjax.main

Other options:
  --logs-dir DIR         folder for the sbatch script and the logs; default <workdir>/slurm
  --dry-run              print the sbatch script and the commands instead of running them;
                         needs no SLURM installation
  -h, --help             show this help
EOF

NODES=""
GPUS_PER_NODE=""
PARTITION=""
ACCOUNT=""
TIME_LIMIT=""
CPUS_PER_TASK=""
JOB_NAME=lasegjax
SBATCH_ARGS=()
SETUP=""
VENV=""
PYTHON=python3
COORDINATOR_PORT=""
EXPLICIT_COORDINATOR=0
CONFIG=${LASEG_CONFIG:-configs/giant.py}
WORKDIR=${LASEG_WORKDIR:-}
DATA_ROOT=${LASEG_DATA_ROOT:-}
LOGS_DIR=""
DRY_RUN=0
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
      --explicit-coordinator | --dry-run)
        ((!inline)) || usage_error "option $arg takes no value"
        case $arg in
          --explicit-coordinator) EXPLICIT_COORDINATOR=1 ;;
          --dry-run) DRY_RUN=1 ;;
        esac
        ;;
      --nodes | --gpus-per-node | --partition | --account | --time | --cpus-per-task | \
        --job-name | --sbatch-arg | --setup | --venv | --python | --coordinator-port | \
        --config | --workdir | --data-root | --logs-dir)
        (($#)) || usage_error "option $arg needs a value"
        case $arg in
          --nodes) NODES=$1 ;;
          --gpus-per-node) GPUS_PER_NODE=$1 ;;
          --partition) PARTITION=$1 ;;
          --account) ACCOUNT=$1 ;;
          --time) TIME_LIMIT=$1 ;;
          --cpus-per-task) CPUS_PER_TASK=$1 ;;
          --job-name) JOB_NAME=$1 ;;
          --sbatch-arg) SBATCH_ARGS+=("$1") ;;
          --setup) SETUP=$1 ;;
          --venv) VENV=$1 ;;
          --python) PYTHON=$1 ;;
          --coordinator-port) COORDINATOR_PORT=$1 ;;
          --config) CONFIG=$1 ;;
          --workdir) WORKDIR=$1 ;;
          --data-root) DATA_ROOT=$1 ;;
          --logs-dir) LOGS_DIR=$1 ;;
        esac
        shift
        ;;
      --)
        TRAIN_ARGS=("$@")
        return
        ;;
      *) usage_error "unknown argument $arg (arguments for lasegjax.main go after --)" ;;
    esac
  done
}

validate_args() {
  [[ -n $NODES ]] || usage_error "missing --nodes, e.g. --nodes=4"
  require_positive_int --nodes "$NODES"
  [[ -n $GPUS_PER_NODE ]] || usage_error "missing --gpus-per-node, e.g. --gpus-per-node=8"
  require_positive_int --gpus-per-node "$GPUS_PER_NODE"
  if [[ -n $CPUS_PER_TASK ]]; then
    require_positive_int --cpus-per-task "$CPUS_PER_TASK"
  fi
  if [[ -n $COORDINATOR_PORT ]]; then
    if [[ ! $COORDINATOR_PORT =~ ^[0-9]+$ ]] || ((COORDINATOR_PORT < 1 || COORDINATOR_PORT > 65535))
    then
      usage_error "--coordinator-port must be a port number from 1 to 65535" \
        "(got '$COORDINATOR_PORT')"
    fi
  fi
  [[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] ||
    usage_error "--job-name may contain only letters, digits, '_', '.' and '-' (got '$JOB_NAME')"
  [[ -n $WORKDIR ]] || usage_error "missing --workdir (or LASEG_WORKDIR), e.g. /shared/runs/giant"
  require_absolute --workdir "$WORKDIR"
  if [[ -n $DATA_ROOT ]]; then
    require_absolute --data-root "$DATA_ROOT"
  fi
  if [[ -n $VENV ]]; then
    require_absolute --venv "$VENV"
  fi
  LOGS_DIR=${LOGS_DIR:-$WORKDIR/slurm}
  require_absolute --logs-dir "$LOGS_DIR"
}

# Print "0,1,...,G-1" for G GPUs.
device_ids() {
  local ids=0 i
  for ((i = 1; i < $1; i++)); do
    ids+=",$i"
  done
  printf '%s' "$ids"
}

# Print the sbatch script. Values from the command line go through join_quoted, and the
# single-quoted parts are expanded later, on the nodes.
# shellcheck disable=SC2016
render_sbatch() {
  local train=("$PYTHON" -m lasegjax.main --config="$CONFIG" --workdir="$WORKDIR")
  if [[ -n $DATA_ROOT ]]; then
    train+=(--config.data.root="$DATA_ROOT")
  fi
  train+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})

  printf '%s\n' '#!/bin/bash'
  printf '%s\n' "# lasegjax training on $NODES node(s), generated by launch/slurm_gpu.sh."
  printf '#SBATCH %s\n' --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1 \
    --gpus-per-node="$GPUS_PER_NODE" --output="$LOGS_DIR/%x-%j.out"
  if [[ -n $CPUS_PER_TASK ]]; then
    printf '#SBATCH %s\n' --cpus-per-task="$CPUS_PER_TASK"
  fi
  if [[ -n $PARTITION ]]; then
    printf '#SBATCH %s\n' --partition="$PARTITION"
  fi
  if [[ -n $ACCOUNT ]]; then
    printf '#SBATCH %s\n' --account="$ACCOUNT"
  fi
  if [[ -n $TIME_LIMIT ]]; then
    printf '#SBATCH %s\n' --time="$TIME_LIMIT"
  fi
  if ((${#SBATCH_ARGS[@]})); then
    printf '#SBATCH %s\n' "${SBATCH_ARGS[@]}"
  fi

  printf '%s\n' '' 'set -eo pipefail' "cd $(shell_quote "$REPO_ROOT")"
  if [[ -n $SETUP ]]; then
    printf '%s\n' "$SETUP"
  fi
  if [[ -n $VENV ]]; then
    printf '%s\n' '# shellcheck source=/dev/null' "source $(shell_quote "$VENV/bin/activate")"
  fi
  # Environment modules and some activate scripts read unset variables, so -u comes after them.
  printf '%s\n' 'set -u'

  cat_lines <<'EOF'

# Under SLURM, jax.distributed.initialize() takes the coordinator (first node), process count
# and rank from SLURM_* variables, and also limits each process to the one GPU numbered by
# its SLURM_LOCALID, which would be GPU 0 alone with one process per node. This list makes
# each process use every GPU of its node (checked against jax 0.10.2).
EOF
  printf '%s\n' "export JAX_LOCAL_DEVICE_IDS=$(device_ids "$GPUS_PER_NODE")"
  if [[ -n $COORDINATOR_PORT ]]; then
    printf '%s\n' "export JAX_COORDINATOR_PORT=$COORDINATOR_PORT"
  fi
  cat_lines <<'EOF'
# Let XLA preallocate 90% of each GPU's memory rather than JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90
export PYTHONUNBUFFERED=1
# NCCL settings depend on the cluster's network. Uncomment what its documentation advises:
# export NCCL_DEBUG=INFO            # log the transport and topology that NCCL picks
# export NCCL_SOCKET_IFNAME=ib0     # network interface for NCCL's bootstrap and socket traffic
# export NCCL_IB_HCA=mlx5           # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1          # no InfiniBand on this cluster: use TCP sockets
# export NCCL_NET_GDR_LEVEL=PHB     # allow GPUDirect RDMA between GPU and NIC on the same CPU
EOF
  printf '%s\n' "export LASEG_LOG_DIR=$(shell_quote "$LOGS_DIR")"
  printf '%s\n' "train=($(join_quoted "${train[@]}"))"

  local srun_flags="--ntasks-per-node=1 --kill-on-bad-exit=1 --label"
  if [[ -n $CPUS_PER_TASK ]]; then
    # srun does not inherit sbatch's --cpus-per-task since SLURM 22.05.
    srun_flags+=' --cpus-per-task="$SLURM_CPUS_PER_TASK"'
  fi
  local launch_args='"$@"'
  if ((EXPLICIT_COORDINATOR)); then
    cat_lines <<'EOF'
# Coordinator given explicitly: the first node of the job, and the port JAX would derive
# from the job id unless JAX_COORDINATOR_PORT is set.
coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
coordinator_host=${coordinator_host%%$'\n'*}
coordinator_port=${JAX_COORDINATOR_PORT:-$((SLURM_JOB_ID % 4096 + 61440))}
export LASEG_COORDINATOR="$coordinator_host:$coordinator_port"
EOF
    launch_args+=' --coordinator_address="$LASEG_COORDINATOR" --num_processes="$SLURM_NTASKS"'
    launch_args+=' --process_id="$SLURM_PROCID"'
  fi
  printf '\n%s\n' '# One task per node, each writing to its own log and to the .out file.'
  printf '%s\n' '# shellcheck disable=SC2016 # bash -c expands these on each node'
  printf '%s\n' "srun $srun_flags bash -c '"
  printf '%s\n' '  set -o pipefail'
  printf '%s\n' '  log="$LASEG_LOG_DIR/job$SLURM_JOB_ID-node$SLURM_NODEID.log"'
  printf '%s\n' '  started="$(date -u +%FT%TZ) on $(hostname)"'
  printf '%s\n' '  echo "=== process $SLURM_PROCID of $SLURM_NTASKS, $started" >"$log"'
  printf '%s\n' "  $launch_args 2>&1 | tee -a \"\$log\""
  printf '%s\n' "' lasegjax-task \"\${train[@]}\""
}

# Copy stdin to stdout using only builtins.
cat_lines() {
  local line
  while IFS= read -r line; do
    printf '%s\n' "$line"
  done
}

main() {
  parse_args "$@"
  validate_args
  local script_path=$LOGS_DIR/$JOB_NAME.sbatch script
  script=$(render_sbatch)

  if ((DRY_RUN)); then
    run_cmd mkdir -p "$LOGS_DIR"
    printf "cat >%s <<'%s'\n%s\n%s\n" "$(shell_quote "$script_path")" "$HEREDOC_END" "$script" \
      "$HEREDOC_END"
    run_cmd sbatch "$script_path"
    return
  fi

  require_tool sbatch "run this on a SLURM login node"
  run_cmd mkdir -p "$LOGS_DIR"
  printf '%s\n' "$script" >"$script_path"
  note "wrote $script_path"
  run_cmd sbatch "$script_path"
  note "logs: $LOGS_DIR/$JOB_NAME-<job id>.out and $LOGS_DIR/job<job id>-node<N>.log"
}

main "$@"
