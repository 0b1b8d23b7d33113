#!/usr/bin/env bash
# Launch fmtrain on this node with torchrun: one call per node, every node the same command.
#
#   launch/run.sh CONFIG.toml [--section.field=value ...]
#
# Environment (all optional on one node):
#   NGPU            processes on this node (default: the GPUs visible, else 1)
#   NNODES          nodes in the job (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous on the first node (required when NNODES > 1)
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID, else "fmtrain")
#   MAX_RESTARTS    torchrun restarts of the workers after a failure (default 0); a restarted
#                   run resumes from its newest checkpoint by itself
#   PYTHON          interpreter (default python3)
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi

PYTHON=${PYTHON:-python3}
if [[ -z "${NGPU:-}" ]]; then
    NGPU=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-fmtrain}}

args=(--nnodes="$NNODES" --nproc-per-node="$NGPU" --max-restarts="$MAX_RESTARTS")
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

echo "launch/run.sh: $(hostname) nodes=$NNODES procs/node=$NGPU rdzv=${RDZV_ENDPOINT:-standalone} id=$RDZV_ID" >&2
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m fmtrain.train "$@"
