#!/usr/bin/env bash
# down.sh - stop the cytonet test cluster started by up.sh, and only that: it cancels the cluster's jobs,
# then stops the PIDs that up.sh saved in $SLURM_LOCAL_DIR/pids (each checked against its
# expected command name first), then any slurmstepd still holding a socket in our spool dir.
# Idempotent; leaves the directory (logs) in place. SLURM_LOCAL_PURGE=1 also deletes it.
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/cytonet-slurm}
case "$DIR" in /|"") echo "slurm-local: refusing SLURM_LOCAL_DIR='$DIR'" >&2; exit 1;; esac
log() { echo "slurm-local: $*" >&2; }
export SLURM_CONF="$DIR/etc/slurm.conf"

is_ours() {  # pid expected-name: true if pid is alive and its command is the expected daemon
  local pid=$1 name=$2 cmd
  cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  case "$name" in
    slurmstepd) [[ "$cmd" == slurmstepd* ]] ;;
    *) [[ "$cmd" == *"$name"* ]] ;;
  esac
}
stop_pid() {  # pid name
  local pid=$1 name=$2
  is_ours "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 50); do is_ours "$pid" "$name" || return 0; sleep 0.2; done
  log "$name ($pid) ignored TERM, sending KILL"
  kill -KILL "$pid" 2>/dev/null
}
tree() {  # pid and all its descendants (collect before killing: orphans get re-parented)
  local all queue=$1 out="" p
  all=$(ps -eo pid=,ppid=)
  while [ -n "${queue// /}" ]; do
    set -- $queue; p=$1; shift; queue="$*"
    out="$out $p"
    queue="$queue $(echo "$all" | awk -v p="$p" '$2==p{print $1}' | tr '\n' ' ')"
  done
  echo $out
}
# pids of processes holding unix sockets under our spool dir (slurmstepd of our slurmd's)
stepd_pids() {
  ss -xlpn 2>/dev/null | grep -F "$DIR/spool/" | grep -oE 'pid=[0-9]+' | cut -d= -f2 | sort -u
}

if [ "${SLURM_LOCAL_LOCKED:-0}" != 1 ]; then   # up.sh already holds the lock when it calls us
  exec 9>"$DIR.lock"; flock -w 300 9 || { log "could not lock $DIR.lock"; exit 1; }
fi
if [ ! -s "$DIR/pids" ]; then log "nothing to stop in $DIR"; exit 0; fi

# 1. cancel this cluster's jobs so that no slurmstepd/user processes outlive slurmd
if grep -q '^slurmctld ' "$DIR/pids" && [ -f "$SLURM_CONF" ]; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    timeout 10 scancel --full --quiet $jobs 2>/dev/null
    for _ in $(seq 1 50); do timeout 5 squeue -h -o %i 2>/dev/null | grep -q . || break; sleep 0.2; done
  fi
fi

# 2. daemons, in dependency order
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  while read -r n pid; do
    [ "$n" = "$name" ] && stop_pid "$pid" "$name"
  done <"$DIR/pids"
done

# 3. leftover job steps of this cluster (none after a successful scancel; happens when slurmctld
#    was already dead). slurmstepd ignores TERM and KILLing it orphans the job's processes, so
#    kill each stepd's whole process tree (job script, srun, tasks) first.
for pid in $(stepd_pids); do
  is_ours "$pid" slurmstepd || continue
  kids=$(tree "$pid"); kids=${kids#"$pid"}
  [ -n "${kids// /}" ] && kill -TERM $kids 2>/dev/null
  sleep 1
  [ -n "${kids// /}" ] && kill -KILL $kids 2>/dev/null
  kill -KILL "$pid" 2>/dev/null
  log "killed leftover slurmstepd $pid and its processes:$kids"
done

# 4. proctrack/cgroup leaves an empty slurm_<node> cgroup per node behind: remove the empty ones
if [ -f "$SLURM_CONF" ] && grep -q '^ProctrackType=proctrack/cgroup' "$SLURM_CONF"; then
  for n in $(grep -oP '^NodeName=\K\S+' "$SLURM_CONF"); do
    for d in /sys/fs/cgroup/*/slurm_"$n" /sys/fs/cgroup/slurm_"$n"; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  done
fi

rm -f "$DIR/pids" "$DIR/params"
[ "${SLURM_LOCAL_PURGE:-0}" = 1 ] && rm -rf "${DIR:?}"
log "stopped"
