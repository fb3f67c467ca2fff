#!/usr/bin/env bash
# Sourced by the scripts/pretrain_*.sh stage scripts: `launch_pretrain ARGS...` runs
# `torchrun ... main_pretrain_cook.py ARGS...` on this node, for one node or many.
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: the GPUs nvidia-smi lists, else 1)
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0; informational under c10d rendezvous)
#   MASTER_ADDR, MASTER_PORT   rendezvous endpoint, a host every node can reach (default: a single-node
#                   standalone rendezvous on a free local port)
#   RDZV_ID         rendezvous id shared by the nodes of one job (default: $SLURM_JOB_ID, else "vlmo")
#   TORCHRUN        the torchrun executable (default: .venv/bin/torchrun if present, else torchrun)
#   SHUTDOWN_TIMEOUT  seconds torchrun lets the workers save after SIGTERM/SIGINT/SIGUSR1 before SIGKILL
#                   (default 240; keep it below the sbatch's --signal lead time, 300 s)
#   MAX_RESTARTS    torchrun --max-restarts (default 0): a restart resumes from the output folder's checkpoint
#   SKIP_CHECK      1: do not run `main_pretrain_cook.py --check` first (it validates the flags and files,
#                   reads one batch and builds the model on the meta device in one process, and a mistake
#                   then stops the launch with its one error line and exit 2, before torchrun starts N ranks)

launch_pretrain() {
  local nproc=${NPROC_PER_NODE:-}
  if [ -z "$nproc" ]; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${nproc:-0}" -gt 0 ] || nproc=1
  fi
  local torchrun=${TORCHRUN:-}
  if [ -z "$torchrun" ]; then
    if [ -x .venv/bin/torchrun ]; then torchrun=.venv/bin/torchrun; else torchrun=torchrun; fi
  fi
  local nnodes=${NNODES:-1}
  local -a rdzv
  if [ "$nnodes" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    rdzv=(--standalone)
  else
    : "${MASTER_ADDR:?set MASTER_ADDR (and MASTER_PORT) to the rendezvous host for a multi-node run}"
    rdzv=(--nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
          --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-vlmo}}")
  fi
  # torchrun passes these signals on to every worker, which finish the step, save together and exit 75
  local -a signals=(--signals-to-handle SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-240}"
                    --max-restarts "${MAX_RESTARTS:-0}")
  if [ "${SKIP_CHECK:-0}" != 1 ]; then
    local python=python
    [ -x .venv/bin/python ] && python=.venv/bin/python
    echo "[launch] checking: $python main_pretrain_cook.py --check $*"
    "$python" main_pretrain_cook.py --check "$@" || return $?
  fi
  echo "[launch] $torchrun ${rdzv[*]} ${signals[*]} --nproc_per_node $nproc main_pretrain_cook.py $*"
  "$torchrun" "${rdzv[@]}" "${signals[@]}" --nproc_per_node "$nproc" main_pretrain_cook.py "$@"
}
