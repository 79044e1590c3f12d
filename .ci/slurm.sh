#!/usr/bin/env bash
# A one-machine Slurm cluster for the Slurm launcher's tests (tests/tests/slurm.rs): Debian's
# slurm-wlm and munge, one slurmctld and two slurmd (nodes slurm1 and slurm2, whose names
# resolve to loopback addresses of their own through /etc/hosts), no cgroups, no accounting.
# Run as root (.ci/run does, before the tests). Idempotent: a second run keeps the daemons that
# already run (restarting them only when the configuration it writes changed) and checks again
# that the nodes are up and `srun` works. Needs no network beyond the Debian mirror (and that
# only when a package is missing). Everything listens on loopback only. Prints one summary line
# at the end.
#
# Debian's slurmd is built with --enable-multiple-slurmd, so one machine runs one slurmd per
# node (`slurmd -N NAME`, each on its own port). Each node offers 8 CPUs whatever `nproc` says
# (SlurmdParameters=config_overrides): every Slurm-started worker is one 1-CPU task, mostly
# waiting on the others, and a tiny job's gang plus a replacement batch job must fit at once.
set -euo pipefail
# The daemons and munge's tools are in sbin.
export PATH="/usr/sbin:/sbin:$PATH"

[ "$(id -u)" -eq 0 ] || {
  echo "slurm.sh: run as root (it installs packages and starts daemons)" >&2
  exit 1
}

conf_dir=/etc/slurm
conf=$conf_dir/slurm.conf
run_dir=/run/slurm
log_dir=/var/log/slurm
state_dir=/var/lib/slurm
# The nodes: name, loopback address, slurmd port. The slurmds themselves listen on 127.0.0.1
# (NoInAddrAny binds to what the machine's own name resolves to), each on its port; the node's
# own address is for what runs on it: the workers advertise their node's name.
nodes=("slurm1 127.0.2.1 6818" "slurm2 127.0.2.2 6819")
names=()
for n in "${nodes[@]}"; do
  read -r name _ <<<"$n"
  names+=("$name")
done
list=$(IFS=,; echo "${names[*]}")
host=$(hostname -s)

# Packages: the metapackage without its recommends (~20 plugin -dev packages).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
  ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: a key (Debian's postinst makes one; made here if missing), then the daemon, as `munge`.
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
  munge_ok || {
    echo "slurm.sh: munged does not answer" >&2
    exit 1
  }
fi

# Node names resolve (the Slurm-started workers advertise $SLURMD_NODENAME), each to its own
# loopback address, as separate hosts' names would.
for n in "${nodes[@]}"; do
  read -r name addr _ <<<"$n"
  grep -qE "^[^#]*[[:space:]]$name([[:space:]]|\$)" /etc/hosts ||
    echo "$addr $name # .ci/slurm.sh" >>/etc/hosts
  [ "$(getent ahostsv4 "$name" | awk 'NR == 1 {print $1}')" = "$addr" ] || {
    echo "slurm.sh: $name does not resolve to $addr (see /etc/hosts)" >&2
    exit 1
  }
done

# The configuration. Memory is not a consumable (CR_CPU): a step takes a CPU, not a share of RAM.
cpus=$(nproc)
[ "$cpus" -ge 8 ] || cpus=8
memory=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 / 2 }' /proc/meminfo)
install -d -o slurm -g slurm -m 0755 "$run_dir" "$log_dir" "$state_dir" "$state_dir/slurmctld"
for name in "${names[@]}"; do
  install -d -o root -g root -m 0755 "$state_dir/slurmd-$name"
done
install -d -m 0755 "$conf_dir"
new=$(mktemp)
cat >"$new" <<EOF
# Written by .ci/slurm.sh: a one-machine cluster for the Slurm launcher's tests.
ClusterName=rlhf-ci
SlurmctldHost=$host(127.0.0.1)
# Bind to what the names resolve to (loopback), not to every address.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroup setup needed: processes tracked through /proc, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=$state_dir/slurmctld
SlurmdSpoolDir=$state_dir/slurmd-%n
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd-%n.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd-%n.log
SlurmdParameters=config_overrides
ReturnToService=2
# A cancelled job's steps get SIGKILL 5 s after SIGTERM (default 30 s).
KillWait=5
InactiveLimit=0
MinJobAge=300
MailProg=/bin/true
EOF
for n in "${nodes[@]}"; do
  read -r name _ port <<<"$n"
  echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$memory State=UNKNOWN" >>"$new"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$new"
changed=0
if ! cmp -s "$new" "$conf"; then
  install -m 0644 "$new" "$conf"
  changed=1
fi
rm -f "$new"

# Whether the daemon of pid file $1 (named $2) runs: a stale file's pid may be someone else's.
running() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }
stop() {
  if running "$1" "$2"; then
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$1"
}
if [ "$changed" -eq 1 ]; then
  for name in "${names[@]}"; do stop "$run_dir/slurmd-$name.pid" slurmd; done
  stop "$run_dir/slurmctld.pid" slurmctld
fi
running "$run_dir/slurmctld.pid" slurmctld || slurmctld
for _ in $(seq 100); do
  scontrol ping 2>/dev/null | grep -q 'is UP' && break
  sleep 0.2
done
scontrol ping | grep -q 'is UP' || {
  echo "slurm.sh: slurmctld does not answer; its log:" >&2
  tail -n 20 "$log_dir/slurmctld.log" >&2
  exit 1
}
for name in "${names[@]}"; do
  running "$run_dir/slurmd-$name.pid" slurmd || slurmd -N "$name"
done

# Every node up: idle, or running jobs (resumed if an earlier run left it down or drained),
# then a step on each.
ready() {
  local states
  states=$(sinfo -h -N -n "$list" -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE ' (idle|mix|alloc)$')" -eq ${#names[@]} ]
}
for i in $(seq 150); do
  ready && break
  if [ $((i % 10)) -eq 0 ]; then
    for name in "${names[@]}"; do
      case "$(sinfo -h -N -n "$name" -o '%t' 2>/dev/null)" in
        down* | drain* | drng*) scontrol update nodename="$name" state=resume 2>/dev/null || true ;;
      esac
    done
  fi
  sleep 0.2
done
if ! ready; then
  echo "slurm.sh: the nodes are not up:" >&2
  sinfo -N >&2 || true
  tail -n 20 "$log_dir/slurmctld.log" "$log_dir"/slurmd-*.log >&2
  exit 1
fi
if ! out=$(timeout 60 srun -N${#names[@]} -n${#names[@]} -t 1 bash -c 'echo $SLURMD_NODENAME' 2>&1); then
  echo "slurm.sh: \`srun -N${#names[@]} true\` failed: $out; the logs:" >&2
  tail -n 20 "$log_dir/slurmctld.log" "$log_dir"/slurmd-*.log >&2
  exit 1
fi
echo "slurm $(sinfo -V | awk '{print $2}'): cluster rlhf-ci, nodes $list ($cpus CPUs each, up), slurmctld on 127.0.0.1:6817, srun ran on $(echo "$out" | sort | paste -sd,)"
