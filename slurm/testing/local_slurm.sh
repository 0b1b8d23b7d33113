#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests (tests/e2e/test_slurm.py).
#
#   slurm/testing/local_slurm.sh start   # munged (if none answers), slurmctld, slurmd; waits for idle
#   slurm/testing/local_slurm.sh stop    # cancels our jobs, stops what `start` started, by PID file
#   slurm/testing/local_slurm.sh env     # prints `export SLURM_CONF=...` for the client commands
#
# Debian's slurm-wlm (slurmctld, slurmd, slurm-client) and munge must be installed (.ci/run does
# it). Needs root and no systemd: the daemons are started by hand. Its own config, state and
# ports (SLURM_LOCAL_ROOT, default /tmp/fmtrain-slurm; ports 6917/6918), so that it leaves alone
# any other SLURM set up on the machine. Accounting is off: use `scontrol show job`, not sacct.
# One node with the machine's CPUs and memory; partition "debug".
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/fmtrain-slurm}
CONF=$ROOT/slurm.conf
RUN=$ROOT/run
WAIT=${SLURM_LOCAL_WAIT:-60}
export SLURM_CONF=$CONF

log() { echo "[local_slurm $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# True if pid $1 is alive, not a zombie, and named $2 (a PID file can outlive its process).
proc_ok() {
    local pid=$1 name=$2 st
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    st=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    st=${st##*) }; st=${st%% *}
    [[ "$st" != Z && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}
pid_of() { [[ -s "$RUN/$1.pid" ]] && proc_ok "$(cat "$RUN/$1.pid")" "$1" && cat "$RUN/$1.pid"; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already answering"; return
    fi
    getent passwd munge >/dev/null || die "user munge missing (is the munge package installed?)"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$RUN/munged.pid"  # ours: `stop` stops it
    munge -n </dev/null | unmunge >/dev/null || die "munge round trip failed; see /var/log/munge/munged.log"
    log "munged pid $(cat "$RUN/munged.pid")"
}

write_conf() {
    local host hw mem
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || die "hostname $host does not resolve (add it to /etc/hosts)"
    # The node's hardware as slurmd sees it, with 5% of the memory held back.
    hw=$(slurmd -C | head -n1 | sed -e 's/ UpTime=.*//' -e 's/^NodeName=[^ ]* //')
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    hw=$(sed "s/RealMemory=[0-9]*/RealMemory=$(( mem * 95 / 100 ))/" <<<"$hw")
    cat > "$CONF" <<CONF
ClusterName=fmtrain-test
SlurmctldHost=$host
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    chmod 0644 "$CONF"
}

start_daemon() {  # name: slurmctld or slurmd
    local name=$1
    if pid_of "$name" >/dev/null; then log "$name already running"; return; fi
    rm -f "$RUN/$name.pid"
    "/usr/sbin/$name" -f "$CONF"  # daemonizes and writes its PID file
    for _ in $(seq 100); do pid_of "$name" >/dev/null && break; sleep 0.1; done
    pid_of "$name" >/dev/null || die "$name did not start; see $ROOT/log/$name.log"
    log "$name pid $(cat "$RUN/$name.pid")"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "must run as root"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null \
        || die "install slurmctld slurmd slurm-client munge (apt-get install --no-install-recommends ...)"
    mkdir -p "$RUN" "$ROOT/state" "$ROOT/spool" "$ROOT/log"
    start_munge
    if ! pid_of slurmctld >/dev/null; then write_conf; fi
    chown -R slurm:slurm "$ROOT/state" "$ROOT/log" "$RUN"
    start_daemon slurmctld
    start_daemon slurmd
    local host state deadline=$(( $(date +%s) + WAIT ))
    host=$(hostname -s)
    while :; do
        state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true)
        case "$state" in
            idle|mixed|allocated) break ;;
            down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        (( $(date +%s) < deadline )) || die "node $host not idle after ${WAIT}s (state '$state')"
        sleep 0.5
    done
    log "cluster up: node $host $state, SLURM_CONF=$CONF"
}

stop_one() {
    local name=$1 pid
    pid=$(pid_of "$name") || { rm -f "$RUN/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do proc_ok "$pid" "$name" || break; sleep 0.1; done
    proc_ok "$pid" "$name" && kill -KILL "$pid" 2>/dev/null
    rm -f "$RUN/$name.pid"
    log "$name (pid $pid) stopped"
}

stop() {
    if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null; then
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs $jobs"
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 60); do [[ -z "$(squeue -h -o '%i' 2>/dev/null)" ]] && break; sleep 1; done
        fi
    fi
    stop_one slurmd
    stop_one slurmctld
    stop_one munged  # only if `start` started it (else there is no PID file of ours)
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
