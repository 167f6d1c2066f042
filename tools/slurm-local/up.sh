#!/usr/bin/env bash
# up.sh - bring up a REAL throwaway Slurm 22.05 cluster on this one host (no systemd, run as root) for
# cytonet's SLURM tests (tests/slurm_cluster.py) and for trying the sbatch scripts by hand:
#   munged + slurmctld + N x slurmd (+ optional mariadb + slurmdbd for sacct, which submitit needs).
# Idempotent: if the same cluster is already up it just prints READY again.
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/cytonet-slurm); nothing in /etc is changed
# (apart from installing the Debian packages when they are missing and SLURM_LOCAL_INSTALL=1).
# Debian 12 packages: slurmctld slurmd slurm-client munge (+ slurmdbd mariadb-server); tools/install.sh --test
# installs them when run as root.
#
# Knobs (environment variables):
#   SLURM_LOCAL_DIR=/tmp/cytonet-slurm state/config/log directory (wiped on a fresh start)
#   SLURM_LOCAL_NODES=1                number of fake nodes (node1..nodeN), one slurmd each
#   SLURM_LOCAL_CPUS=2                 CPUs per fake node (may exceed real cores: config_overrides)
#   SLURM_LOCAL_MEM_MB=8000            RealMemory per fake node (MB)
#   SLURM_LOCAL_ACCOUNTING=0           1 = also start mariadb + slurmdbd so that sacct works
#   SLURM_LOCAL_GPUS=0                 fake GPUs per node (GRES gpu backed by dummy char devices):
#                                      --gres=gpu:N / --gpus-per-node are accepted and Slurm sets
#                                      CUDA_VISIBLE_DEVICES, but there is of course no real GPU
#   SLURM_LOCAL_PROCTRACK=pgid         pgid|linuxproc|cgroup - how slurmd finds a job's processes
#                                      (see NOTES.md: what each one leaks on scancel/timeout)
#   SLURM_LOCAL_PORT_BASE=17817        slurmctld=BASE, slurmdbd=BASE+2, mariadb=BASE+3, slurmd_i=BASE+10+i
#   SLURM_LOCAL_NAMESPACES=auto        auto|1|0: run each slurmd in its own UTS+mount namespace so that
#                                      `hostname` in a job says nodeK and node names resolve (127.0.0.1)
#   SLURM_LOCAL_CRED_EXPIRE=10         AuthInfo cred_expire; also the pause before a requeued job restarts
#   SLURM_LOCAL_INSTALL=1              apt-get install the packages if they are missing
#   SLURM_LOCAL_TIMEOUT=60             seconds to wait for the cluster to become ready
#   SLURM_LOCAL_FIRST_JOB_ID=1         FirstJobId: give two clusters on one host different ranges, since
#                                      jobs derive their rendezvous port from the job id (hpc/env.py)
#
# Usage:  bash up.sh && source /tmp/cytonet-slurm/env.sh && sbatch ...
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/cytonet-slurm}
NODES=${SLURM_LOCAL_NODES:-1}
CPUS=${SLURM_LOCAL_CPUS:-2}
MEM=${SLURM_LOCAL_MEM_MB:-8000}
ACCT=${SLURM_LOCAL_ACCOUNTING:-0}
GPUS=${SLURM_LOCAL_GPUS:-0}
PROCTRACK=${SLURM_LOCAL_PROCTRACK:-pgid}
BASE=${SLURM_LOCAL_PORT_BASE:-17817}
NS=${SLURM_LOCAL_NAMESPACES:-auto}
CRED=${SLURM_LOCAL_CRED_EXPIRE:-10}
INSTALL=${SLURM_LOCAL_INSTALL:-1}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
FIRST_JOB=${SLURM_LOCAL_FIRST_JOB_ID:-1}
CLUSTER=cytolocal
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "slurm-local: $*" >&2; }
STARTED=0
die() {
  echo "slurm-local: ERROR: $*" >&2
  if [ "$STARTED" = 1 ]; then   # do not leave half a cluster behind
    SLURM_LOCAL_DIR="$DIR" SLURM_LOCAL_LOCKED=1 bash "$HERE/down.sh" || true
  fi
  exit 1
}

trap 'die "command failed at line $LINENO"' ERR
case "$DIR" in /|"") die "refusing SLURM_LOCAL_DIR='$DIR'";; esac
[ "$(id -u)" = 0 ] || die "must run as root (daemons run as root, SlurmUser=root)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_NODES must be >= 1"
[[ "$FIRST_JOB" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_FIRST_JOB_ID must be >= 1"
case "$PROCTRACK" in pgid|linuxproc|cgroup) ;; *) die "SLURM_LOCAL_PROCTRACK must be pgid|linuxproc|cgroup";; esac
# serialise concurrent callers (e.g. several pytest-xdist workers calling up.sh at once)
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock -w 300 9 || die "could not lock $DIR.lock"
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------- 0. packages
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=()
for p in $PKGS; do   # (dpkg -s is not enough: it succeeds for removed-but-not-purged packages)
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$INSTALL" = 1 ] || die "missing packages: ${missing[*]} (set SLURM_LOCAL_INSTALL=1)"
  log "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  # invoke-rc.d/policy-rc.d may refuse to start services; that is fine, we start them by hand
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"/tmp/cytonet-slurm-apt.log" 2>&1 \
    || { tail -20 /tmp/cytonet-slurm-apt.log >&2; die "apt-get install failed"; }
  log "packages installed after $(elapsed)s"
fi

# ---------------------------------------------------------------- 1. already up?
PARAMS="nodes=$NODES cpus=$CPUS mem=$MEM gpus=$GPUS acct=$ACCT proctrack=$PROCTRACK base=$BASE ns=$NS cred=$CRED first=$FIRST_JOB"
export SLURM_CONF="$DIR/etc/slurm.conf"
all_alive() {
  [ -s "$DIR/pids" ] || return 1
  local name pid cmd
  while read -r name pid; do   # kill -0 is not enough: unreaped zombies (PID 1 may not reap) pass it
    cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
    [[ "$cmd" == *"$name"* ]] || return 1
  done <"$DIR/pids"
}
nodes_ready() {   # every node idle/mixed/allocated, none down/unknown/not-responding
  local st
  st=$(sinfo -h -N -o '%t' 2>/dev/null) || return 1
  [ "$(echo "$st" | grep -c .)" -eq "$NODES" ] || return 1
  ! echo "$st" | grep -qvE '^(idle|mix|alloc|comp)$'
}
if [ -f "$DIR/params" ] && [ "$(cat "$DIR/params")" = "$PARAMS" ] && all_alive && nodes_ready; then
  log "already up ($PARAMS)"
  echo "export SLURM_CONF=$SLURM_CONF"
  log "READY"
  exit 0
fi
if [ -s "$DIR/pids" ]; then
  log "stale or different cluster in $DIR - stopping it first"
  SLURM_LOCAL_DIR="$DIR" SLURM_LOCAL_LOCKED=1 bash "$HERE/down.sh" || true
fi

# ---------------------------------------------------------------- 2. namespaces?
if [ "$NS" = auto ]; then
  if unshare --uts --mount --propagation slave true 2>/dev/null; then NS=1; else NS=0; fi
fi
if [ "$NS" = 1 ]; then
  NODENAMES=$(seq -f 'node%g' 1 "$NODES" | tr '\n' ' ')
elif [ "$NODES" = 1 ]; then
  NODENAMES=$(hostname -s)
else
  NODENAMES=$(seq -f 'node%g' 1 "$NODES" | tr '\n' ' ')
  log "WARNING: no namespaces: node names are not resolvable and all nodes share hostname $(hostname -s);"
  log "         derive MASTER_ADDR from 'scontrol show node NAME' (NodeAddr=127.0.0.1)"
fi

# ---------------------------------------------------------------- 3. ports free?
ports="$BASE"; [ "$ACCT" = 1 ] && ports="$ports $((BASE+2)) $((BASE+3))"
for i in $(seq 1 "$NODES"); do ports="$ports $((BASE+10+i))"; done
for p in $ports; do
  if ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
    die "TCP port $p already in use (another cluster? set SLURM_LOCAL_PORT_BASE)"
  fi
done

# ---------------------------------------------------------------- 4. fresh directory layout
for d in etc state spool log munge run db dev; do rm -rf "${DIR:?}/$d"; done
rm -f "$DIR/pids" "$DIR/params" "$DIR/env.sh"
mkdir -p "$DIR"/{etc,state,spool,log,munge,run,db,dev}
chmod 755 "$DIR" "$DIR/run"      # munged: socket dir must be executable by all
chmod 700 "$DIR/munge"
: >"$DIR/pids"
STARTED=1
H=$(hostname -s)

# ---------------------------------------------------------------- 5. munge (own key, own socket)
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
SOCK="$DIR/run/munge.socket"
munged --key-file="$DIR/munge/munge.key" --socket="$SOCK" --pid-file="$DIR/run/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --num-threads=4 \
       </dev/null 9>&- >>"$DIR/log/munged.out" 2>&1 || { cat "$DIR/log/munged.log" >&2; die "munged failed"; }
echo "munged $(cat "$DIR/run/munged.pid")" >>"$DIR/pids"
munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null || die "munge self-test failed"

# ---------------------------------------------------------------- 6. slurm.conf
{
cat <<EOF
# generated by $HERE/up.sh ($PARAMS)
ClusterName=$CLUSTER
$([ "$GPUS" -gt 0 ] && echo "GresTypes=gpu")
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# own munge socket; cred_expire also sets how long a requeued job waits (default 120 s)
AuthInfo=socket=$SOCK,cred_expire=$CRED
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# pgid/linuxproc need no cgroups (containers, VMs); cgroup needs a writable cgroup fs + cgroup.conf
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
# allow CPUs/RealMemory larger than the hardware (fake nodes)
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
MailProg=/bin/true
JobRequeue=1
FirstJobId=$FIRST_JOB
EOF
if [ "$ACCT" = 1 ]; then
cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((BASE+2))
# the slurmdbd connection does NOT use AuthInfo's socket: name our munge socket here
AccountingStoragePass=$SOCK
JobCompType=jobcomp/none
EOF
else
cat <<EOF
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
EOF
fi
i=0
for n in $NODENAMES; do
  i=$((i+1))
  echo "NodeName=$n NodeHostname=$([ "$NS" = 1 ] && echo "$n" || echo "$H") NodeAddr=127.0.0.1 Port=$((BASE+10+i)) CPUs=$CPUS RealMemory=$MEM$([ "$GPUS" -gt 0 ] && echo " Gres=gpu:$GPUS") State=UNKNOWN"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} >"$SLURM_CONF"
for n in $NODENAMES; do mkdir -p "$DIR/spool/$n"; done
[ "$PROCTRACK" = cgroup ] && echo "CgroupPlugin=autodetect" >"$DIR/etc/cgroup.conf"
if [ "$GPUS" -gt 0 ]; then
  # gres/gpu insists on character devices; clones of /dev/null (1,3) are enough for Slurm to
  # allocate them and export CUDA_VISIBLE_DEVICES / SLURM_STEP_GPUS (task/none: nothing is bound)
  : >"$DIR/etc/gres.conf"
  for n in $NODENAMES; do
    for g in $(seq 0 $((GPUS-1))); do mknod "$DIR/dev/$n-gpu$g" c 1 3; done
    files=$(seq -f "$DIR/dev/$n-gpu%g" 0 $((GPUS-1)) | paste -sd,)
    echo "NodeName=$n Name=gpu File=$files" >>"$DIR/etc/gres.conf"
  done
fi

# hosts file seen only inside the per-node mount namespaces
{ cat /etc/hosts; echo "127.0.0.1 $NODENAMES"; } >"$DIR/etc/hosts"

# ---------------------------------------------------------------- 7. accounting (optional)
if [ "$ACCT" = 1 ]; then
  mariadb-install-db --user=root --datadir="$DIR/db/data" --auth-root-authentication-method=socket \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || { tail "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  setsid mariadbd --user=root --datadir="$DIR/db/data" --socket="$DIR/run/mysqld.sock" \
      --port=$((BASE+3)) --bind-address=127.0.0.1 --pid-file="$DIR/run/mysqld.pid" \
      --log-error="$DIR/log/mariadb.err" --skip-name-resolve --innodb-buffer-pool-size=64M \
      --innodb-lock-wait-timeout=900 </dev/null 9>&- >/dev/null 2>&1 &
  echo "mariadbd $!" >>"$DIR/pids"
  for _ in $(seq 1 200); do mariadb -S "$DIR/run/mysqld.sock" -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb -S "$DIR/run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" || die "mariadb not up"
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((BASE+2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((BASE+3))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"    # slurmdbd refuses a world-readable conf
  # slurmdbd finds slurmdbd.conf next to $SLURM_CONF
  slurmdbd </dev/null 9>&- >>"$DIR/log/slurmdbd.out" 2>&1 || die "slurmdbd failed (see $DIR/log/slurmdbd.log)"
  for _ in $(seq 1 100); do [ -s "$DIR/run/slurmdbd.pid" ] && break; sleep 0.1; done
  echo "slurmdbd $(cat "$DIR/run/slurmdbd.pid")" >>"$DIR/pids"
  for _ in $(seq 1 100); do ss -Htln "sport = :$((BASE+2))" | grep -q . && break; sleep 0.1; done
fi

# ---------------------------------------------------------------- 8. slurmctld + slurmd(s)
slurmctld -f "$SLURM_CONF" </dev/null 9>&- >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld failed (see $DIR/log/slurmctld.log)"
for _ in $(seq 1 100); do [ -s "$DIR/run/slurmctld.pid" ] && break; sleep 0.1; done
echo "slurmctld $(cat "$DIR/run/slurmctld.pid")" >>"$DIR/pids"

for n in $NODENAMES; do
  if [ "$NS" = 1 ]; then
    # own hostname (UTS ns) + private /etc/hosts bind mount (mount ns) for this "node" only
    unshare --uts --mount --propagation slave sh -c \
      "mount --bind '$DIR/etc/hosts' /etc/hosts && hostname '$n' && exec slurmd -f '$SLURM_CONF' -N '$n'" \
      </dev/null 9>&- >>"$DIR/log/slurmd-$n.out" 2>&1 || die "slurmd $n failed (see $DIR/log/slurmd-$n.log)"
  else
    slurmd -f "$SLURM_CONF" -N "$n" </dev/null 9>&- >>"$DIR/log/slurmd-$n.out" 2>&1 || die "slurmd $n failed"
  fi
  for _ in $(seq 1 100); do [ -s "$DIR/run/slurmd-$n.pid" ] && break; sleep 0.1; done
  echo "slurmd $(cat "$DIR/run/slurmd-$n.pid")" >>"$DIR/pids"
done

# ---------------------------------------------------------------- 9. wait until ready
deadline=$(( $(date +%s) + TIMEOUT ))
until nodes_ready; do
  [ "$(date +%s)" -lt "$deadline" ] || { sinfo -N >&2 || true; tail -5 "$DIR"/log/*.log >&2; die "not ready after ${TIMEOUT}s"; }
  sleep 0.2
done
if [ "$ACCT" = 1 ]; then
  until sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "slurmdbd never registered cluster $CLUSTER"
    sleep 0.2
  done
fi
echo "$PARAMS" >"$DIR/params"
cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$SLURM_CONF
export SLURM_LOCAL_DIR=$DIR
EOF
log "nodes: $(sinfo -h -N -o '%N:%c:%G:%t' | tr '\n' ' ')accounting=$ACCT namespaces=$NS"
log "up in $(elapsed)s; use:  source $DIR/env.sh"
echo "export SLURM_CONF=$SLURM_CONF"
log "READY"
