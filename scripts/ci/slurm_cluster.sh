#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on loopback, for tests. Its munge key and socket, state, logs, pid files
# and ports all live under DIR, so nothing in /etc is touched and a system Slurm (if any) is left alone.
#
#   scripts/ci/slurm_cluster.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   scripts/ci/slurm_cluster.sh stop DIR    # cancels jobs, stops the daemons, removes DIR (also after a failed start)
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages; it installs nothing.
set -euo pipefail

MARKER=.star-mcore-slurm-cluster
NODE=localhost
CPUS=$(nproc)

die() { echo "slurm_cluster.sh: error: $*" >&2; exit 2; }

write_conf() {
    local dir=$1 ports
    # Two free loopback ports, so a second cluster (or a real slurmctld on 6817) does not collide.
    ports=$(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
    read -r ctld_port slurmd_port <<<"$ports"
    cat >"$dir/slurm.conf" <<CONF
ClusterName=star-mcore-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups, no accounting database: the least a container needs to run jobs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

show_logs() {
    local f
    for f in "$1"/log/*.log; do
        [[ -f $f ]] || continue
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
}

start() {
    local dir=$1 b state
    [[ $EUID -eq 0 ]] || die "needs root (munged, slurmctld and slurmd run as root here)"
    for b in munged slurmctld slurmd sinfo scontrol python3; do
        command -v "$b" >/dev/null || die "$b not found (apt-get install slurmctld slurmd slurm-client munge)"
    done
    [[ ! -e $dir ]] || die "$dir already exists; give a directory to create"
    mkdir -p "$dir"/{munge,state,spool,log}
    touch "$dir/$MARKER"
    chmod 700 "$dir/munge"
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf

    # --force: munged refuses to run as root and to use a socket under /tmp without it.
    munged --force --socket="$dir/munge/socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munged.pid" --seed-file="$dir/munge/seed" --log-file="$dir/log/munged.log"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N "$NODE"

    for _ in $(seq 60); do
        state=$(timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        if [[ $state == idle ]]; then
            echo "slurm_cluster.sh: node $NODE idle; SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 1
    done
    show_logs "$dir"
    die "node $NODE did not become idle within 60 s (state: ${state:-unknown})"
}

# Stop one daemon by its pid file: TERM, then KILL after 15 s. Checks the pid still names that daemon.
stop_daemon() {
    local pidfile=$1 name=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1 jobs
    [[ -e $dir ]] || return 0
    [[ -f $dir/$MARKER ]] || die "$dir was not made by slurm_cluster.sh start; not touching it"
    if [[ -f $dir/slurm.conf && -f $dir/slurmctld.pid ]]; then
        export SLURM_CONF=$dir/slurm.conf
        jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one job id per word
            timeout 10 scancel $jobs || true
            for _ in $(seq 30); do
                [[ -z $(timeout 10 squeue -h -o %A 2>/dev/null || true) ]] && break
                sleep 1
            done
        fi
    fi
    stop_daemon "$dir/slurmd.pid" slurmd
    stop_daemon "$dir/slurmctld.pid" slurmctld
    stop_daemon "$dir/munged.pid" munged
    rm -rf "$dir"
}

(( $# == 2 )) || die "usage: $0 start|stop DIR"
case $1 in
    start) start "$2" ;;
    stop) stop "$2" ;;
    *) die "usage: $0 start|stop DIR (got '$1')" ;;
esac
