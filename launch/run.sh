#!/usr/bin/env bash
# Launch fmtrain on this node with torchrun: one call per node, every node the same command.
#
#   launch/run.sh CONFIG.toml [--section.field=value ...]
#
# Environment (all optional on one node):
#   NPROC_PER_NODE  processes on this node (torchrun's --nproc-per-node; default: the GPUs
#                   visible, else 1). NPROC and NGPU are accepted as other names for it.
#   NNODES          nodes in the job (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous on the first node (required when NNODES > 1)
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID, else "fmtrain")
#   MAX_RESTARTS    torchrun restarts of the workers after a failure (default 0); a restarted
#                   run resumes from its newest checkpoint by itself
#   STOP_GRACE      seconds torchrun gives the workers to checkpoint and exit after a signal
#                   (default 300), then SIGKILL
#   PYTHON          interpreter (default python3)
#
# Exit status: 0 the run finished, 75 it stopped early with a checkpoint (a signal, e.g. SLURM's
# --signal warning, or train.max_minutes: run the same command again to continue), 2 a problem to
# fix (config, data, checkpoint, full disk: one "error:" line above says which), 3 the training
# diverged (the last finite checkpoint is kept), else failed.
# (If the caller sets FMTRAIN_STATUS_FILE, as slurm/train.sbatch does, torchrun's own status is
# returned and the trainer's outcome, "finished", "stopped", "error" or "diverged", is in that file.)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
if [[ "$1" == -h || "$1" == --help ]]; then
    usage  # help only: the trainer's own field list is python -m fmtrain.train --help
    exit 0
fi

PYTHON=${PYTHON:-python3}
# torchrun's own name first; NPROC and NGPU (this script's earlier name) as aliases.
NPROC_PER_NODE=${NPROC_PER_NODE:-${NPROC:-${NGPU:-}}}
if [[ -z "$NPROC_PER_NODE" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NGPU=$NPROC_PER_NODE
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-fmtrain}}

args=(--nnodes="$NNODES" --nproc-per-node="$NGPU" --max-restarts="$MAX_RESTARTS")
# Restarted workers must not meet in the previous round's store. By default torchrun's agent
# hosts one TCPStore that outlives its worker groups and hands every round the same address,
# unprefixed, so a restarted rank can read a dead peer's gloo address from before the kill and
# connectFullMesh fails or hangs (pytorch issue 135712; seen in about half the killed-worker
# runs here). With sharing off, the rendezvous round (the same on every node) gives each
# worker group a fresh store of its own on rank 0.
if (( MAX_RESTARTS > 0 )); then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
if [[ "$NNODES" == 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
    args+=(--standalone)
else
    if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
        echo "launch/run.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node's address)" >&2
        exit 2
    fi
    args+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID")
fi
# A default torchrun agent dies on SIGUSR1 (SLURM's warning before a time limit) and orphans its
# workers; where torchrun can forward signals, have it forward that one to the workers.
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--signals-to-handle"; then
    args+=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
fi
# After forwarding a signal torchrun waits this long for the workers' checkpoint before SIGKILL.
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--shutdown-timeout"; then
    args+=(--shutdown-timeout="${STOP_GRACE:-300}")
fi

echo "launch/run.sh: $(hostname) nodes=$NNODES procs/node=$NGPU rdzv=${RDZV_ENDPOINT:-standalone} id=$RDZV_ID" >&2
cmd=("$PYTHON" -m torch.distributed.run "${args[@]}" -m fmtrain.train "$@")
if [[ -n "${FMTRAIN_STATUS_FILE:-}" ]]; then
    exec "${cmd[@]}"  # the caller reads the status file (and signals reach torchrun directly)
fi

# torchrun would restart workers that exit 75, so the trainer reports a stop through a file
# (fmtrain/signals.py) and this wrapper turns it into the exit status.
export FMTRAIN_STATUS_FILE
FMTRAIN_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/fmtrain-status.XXXXXX")
trap 'rm -f "$FMTRAIN_STATUS_FILE"' EXIT
"${cmd[@]}" &
child=$!
# Pass on signals sent to this script alone (kill -USR1 <pid>); Ctrl-C reaches torchrun by itself.
for sig in USR1 TERM HUP QUIT; do
    trap "kill -s $sig $child 2>/dev/null || true" "$sig"
done
trap '' INT
while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # else wait was cut short by a trapped signal
done
case "$(cat "$FMTRAIN_STATUS_FILE" 2>/dev/null)" in
    finished) exit 0 ;;  # (even if a gloo thread aborted at teardown after the results)
    stopped) echo "launch/run.sh: stopped early with a checkpoint; run again to continue" >&2; exit 75 ;;
    error) exit 2 ;;  # the trainer printed one error: line (rank 0)
    diverged) exit 3 ;;
    *) exit $(( rc == 0 ? 1 : rc )) ;;
esac
