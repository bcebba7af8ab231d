#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian 12, run as root, no systemd).
#
#   bash script/slurm_cluster.sh start    # install slurm-wlm + munge if missing, write slurm.conf,
#                                         # start munged, slurmctld, slurmd; wait until the node is idle
#   bash script/slurm_cluster.sh stop     # cancel all jobs, stop slurmd, slurmctld, munged
#   bash script/slurm_cluster.sh status   # sinfo + squeue
#
# Both start and stop are idempotent. Works from any cwd. Daemons run as root (SlurmUser=root), so a
# missing `slurm` user does not matter. One partition `debug` (default, MaxTime=INFINITE), one node
# named after `hostname -s` (NodeAddr=127.0.0.1), no accounting database (sacct does not work).
#
# Environment overrides (optional):
#   SLURM_CLUSTER_WAIT_S   seconds to wait for the node to become idle (default 60)
#   SLURM_MIN_JOB_AGE      MinJobAge: seconds a finished job stays visible to squeue/scontrol (default 300)
#   SLURM_CRED_EXPIRE      AuthInfo cred_expire (default 10; Slurm's is 120): a requeued job (scontrol requeue,
#                          preemption, submitit's timeout/preemption requeue) waits cred_expire+1 s before it
#                          may start again
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_LOG_DIR=/var/log/munge
MUNGE_LIB=/var/lib/munge
APT_LOG=/tmp/slurm_cluster_apt.log
WAIT_S=${SLURM_CLUSTER_WAIT_S:-60}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-300}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}

log() { echo "[slurm] $*"; }
die() { echo "[slurm] ERROR: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }

# Is this pid a live process? A zombie is not: PID 1 here (not an init that reaps at once) may leave a
# killed daemon as a zombie for a while, and `kill -0` succeeds on zombies.
alive() {
    local st
    st=$(sed -n 's/^.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid from a pidfile if that process is alive and named $2 (not a reused pid), else nothing
live_pid() {
    local f=$1 name=$2 pid
    [ -s "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] \
        && { echo "$pid"; return 0; }
    return 1
}

# the pid of a running daemon: from its pidfile, else the oldest live process with exactly that name
daemon_pid() {
    local name=$1 pidfile=$2 pid
    live_pid "$pidfile" "$name" && return 0
    for pid in $(pgrep -x "$name" 2>/dev/null); do
        alive "$pid" && { echo "$pid"; return 0; }
    done
    return 1
}

# send TERM, wait up to $2 tenths of a second, then KILL
terminate() {
    local pid=$1 tenths=$2 _
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 "$tenths"); do alive "$pid" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$MUNGE_LOG_DIR/munged.log"; do
        [ -f "$f" ] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge (apt-get; output in $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$APT_LOG" 2>&1; then
        tail -n 30 "$APT_LOG" >&2
        die "apt-get failed"
    fi
    command -v slurmctld >/dev/null || die "slurmctld missing after apt-get install"
}

start_munge() {
    local user=root pid _
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /etc/munge "$MUNGE_RUN" "$MUNGE_LOG_DIR" "$MUNGE_LIB"
    if [ ! -s "$MUNGE_KEY" ]; then
        log "generating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    # munged insists: key owned by the user it runs as, mode 0400 (0600 ok); dirs not world-writable
    chown "$user:$user" "$MUNGE_KEY" /etc/munge "$MUNGE_RUN"
    chown -R "$user:$user" "$MUNGE_LOG_DIR" "$MUNGE_LIB"
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 /etc/munge "$MUNGE_LOG_DIR" "$MUNGE_LIB"
    chmod 0755 "$MUNGE_RUN"
    if pid=$(daemon_pid munged "$MUNGE_PID"); then
        log "munged already running (pid $pid)"
    else
        log "starting munged (as $user)"
        rm -f "$MUNGE_RUN/munge.socket.2.lock"
        if [ "$user" = munge ]; then
            runuser -u munge -- /usr/sbin/munged
        else
            /usr/sbin/munged --force
        fi
    fi
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    show_logs
    die "munge does not work (munge -n | unmunge failed)"
}

write_conf() {
    local node cpus_line tmp
    node=$(hostname -s)
    # `slurmd -C` prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
    # ThreadsPerCore=1 RealMemory=24036" (plus an UpTime line); keep the hardware fields.
    cpus_line=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1 \
        | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' \
        | tr '\n' ' ' || true)
    [ -n "$cpus_line" ] || cpus_line="CPUs=$(nproc) RealMemory=$(($(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024))"
    mkdir -p "$CONF_DIR"
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by script/slurm_cluster.sh: one-node test cluster. Regenerated by every start.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# scan the queue every 5 s (defaults 60/30 s): a requeued job otherwise waits up to 30 s more after it
# becomes eligible again, since becoming eligible by time does not trigger a scheduling pass
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
KillWait=10
MinJobAge=$MIN_JOB_AGE
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node ${cpus_line}State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    mv "$tmp" "$CONF"
    chmod 0644 "$CONF"
    log "wrote $CONF ($node: $cpus_line)"
    return 0
}

stop_slurm_daemons() {
    local name pidfile pid
    for name in slurmd slurmctld; do
        pidfile=$SLURMD_PID
        [ $name = slurmctld ] && pidfile=$CTLD_PID
        pid=$(daemon_pid $name "$pidfile") || continue
        log "stopping $name (pid $pid)"
        terminate "$pid" 150
        rm -f "$pidfile"
    done
}

node_state() { sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -n1; }

start() {
    need_root
    local t0=$SECONDS changed=0 node state slurmd_t0=0 reg ready=0 pid
    install_packages
    start_munge
    mkdir -p "$LOG_DIR" "$CTLD_STATE" "$SLURMD_SPOOL"
    write_conf && changed=1
    if [ $changed = 1 ] && { daemon_pid slurmctld "$CTLD_PID" >/dev/null || daemon_pid slurmd "$SLURMD_PID" >/dev/null; }; then
        log "slurm.conf changed: restarting the slurm daemons"
        stop_slurm_daemons
    fi
    node=$(hostname -s)
    if pid=$(daemon_pid slurmctld "$CTLD_PID"); then
        log "slurmctld already running (pid $pid)"
    else
        log "starting slurmctld"
        /usr/sbin/slurmctld -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
    fi
    if pid=$(daemon_pid slurmd "$SLURMD_PID"); then
        log "slurmd already running (pid $pid)"
    else
        log "starting slurmd"
        slurmd_t0=$(date +%s)
        /usr/sbin/slurmd -f "$CONF" -N "$node" || { show_logs; die "slurmd failed to start"; }
    fi
    # Ready = node idle (or busy) AND, when we just started slurmd, that slurmd has registered: after a
    # restart slurmctld restores the old node state from its state file and shows "idle" at once.
    for _ in $(seq 1 $((WAIT_S * 2))); do
        state=$(node_state || true)
        reg=$(scontrol show node "$node" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' || true)
        reg=$(date -d "$reg" +%s 2>/dev/null || echo 0)
        case "$state" in
            idle | mixed | allocated | completing) [ "$reg" -ge "$slurmd_t0" ] && { ready=1; break; } ;;
            drain* | down* | fail*)
                # left over from an earlier run (e.g. killed daemons): bring it back
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    if [ $ready = 0 ]; then
        sinfo -N -l >&2 || true
        show_logs
        die "node $node not ready after ${WAIT_S}s (state: '${state:-none}'; slurmd registered: $([ "$reg" -ge "$slurmd_t0" ] && echo yes || echo no))"
    fi
    log "cluster up: node $node is $state ($((SECONDS - t0))s)"
}

stop() {
    need_root
    local pid jobs
    if command -v squeue >/dev/null && [ -f "$CONF" ] && daemon_pid slurmctld "$CTLD_PID" >/dev/null \
        && [ -n "$(squeue -h -o %A 2>/dev/null)" ]; then
        # jobs left running would survive as orphaned slurmstepd processes once slurmd is gone
        log "cancelling all jobs (waits up to KillWait for them to end)"
        mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
        scancel "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 1 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    stop_slurm_daemons
    if pid=$(daemon_pid munged "$MUNGE_PID"); then
        log "stopping munged (pid $pid)"
        terminate "$pid" 50
    fi
    log "stopped"
}

status() {
    command -v sinfo >/dev/null || die "slurm is not installed (run: $0 start)"
    sinfo
    squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
