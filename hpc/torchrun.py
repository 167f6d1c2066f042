"""torchrun for one SLURM task per node: the rendezvous from the allocation, preemption signals to the workers,
and the workers' requeue status (75) kept as this process's exit status.

Usage (in ``slurm/train.sbatch``, one task per node)::

    srun --kill-on-bad-exit=0 python -m hpc.torchrun --nproc-per-node=4 -- pretrain CONFIG [overrides]

runs, on node ``$SLURM_NODEID`` of N, the equivalent of::

    torchrun --nnodes=N --node_rank=$SLURM_NODEID --nproc_per_node=4 --master_addr=<first node>
             --master_port=<20000 + job id % 20000> --signals-to-handle=SIGINT,SIGHUP,SIGQUIT
             -m cytonet.cli pretrain CONFIG [overrides]

(static rendezvous: ``--node_rank`` is respected, unlike c10d's first-come numbering). Outside SLURM it is
``torchrun --standalone``. torch's own launcher runs in this process (``torch.distributed.run``), with two
changes that requeueing needs:

- Signals. SLURM signals the step's tasks, i.e. this agent; torchrun starts its workers in new sessions, so
  with process-group tracking they see nothing, and torchrun's agent would answer SIGTERM by terminating them
  (SIGKILL after 30 s, exit 1) and die on SIGUSR1, whose default action is to exit. Here SIGUSR1 and SIGTERM are
  forwarded to the workers, which checkpoint together at the next step and exit 75; torchrun's agent is told
  (``--signals-to-handle``) to handle only SIGINT, SIGHUP and SIGQUIT. The handlers are installed first thing,
  before the allocation is read (``scontrol`` may take seconds) and torch is imported. A signal that comes
  before the workers are started ends this agent with the requeue status without starting them: the job is
  being preempted.
- Exit status. torchrun reports any worker failure as status 1; here, when the failed workers exited with the
  requeue status, this process exits with it too, so that ``hpc.requeue`` can requeue the job. Workers that
  were still exiting when torch closed the others after the first exit (it SIGTERMs them) count as well: one
  75 means the checkpoint is written. So it does when workers end in any way after a preemption signal reached
  this agent (a signal that comes before the training loop listens ends the workers by its default action;
  the job is preempted all the same).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType

from hpc.env import LaunchEnv, LaunchEnvError, detect

log = logging.getLogger("hpc.torchrun")

#: Signals this agent passes to its workers instead of acting on them (the training loop's preempt_signals).
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
#: torchrun's agent handles these itself (``--signals-to-handle``; SIGTERM is left out: it is forwarded instead).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def resolve_master(name: str) -> str:
    """``name`` if this host can resolve it, else the node's ``NodeAddr`` from ``scontrol show node``.

    Node names usually resolve; on clusters (and test clusters) where they do not, SLURM still knows the
    address it uses to reach the node.
    """
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        r = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return name
    for item in r.stdout.split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1]
    return name


def torchrun_argv(env: LaunchEnv, nproc_per_node: int, cytonet_args: list[str], master_addr: str) -> list[str]:
    """torchrun's arguments for this task (``master_addr`` already resolved)."""
    if env.launcher == "slurm":
        if env.local_world_size != 1:
            raise LaunchEnvError(
                f"hpc.torchrun needs one task per node (--ntasks-per-node=1), got {env.local_world_size}"
            )
        layout = [
            f"--nnodes={env.world_size}",
            f"--node_rank={env.node_rank}",
            f"--master_addr={master_addr}",
            f"--master_port={env.master_port}",
        ]
    elif env.launcher == "single":
        layout = ["--standalone", "--nnodes=1"]
    else:
        raise LaunchEnvError(f"hpc.torchrun runs one per node under srun or alone, not under {env.launcher}")
    return [*layout, f"--nproc_per_node={nproc_per_node}", "-m", "cytonet.cli", *cytonet_args]


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the workers of this agent)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the fields after the last ')' are fixed.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry))
    return kids


#: The preemption signals this agent received, in order (see :func:`run`).
_received: list[str] = []
#: Received while no worker was running yet (torch's agent in its rendezvous): passed on once workers appear.
_undelivered: list[int] = []
_launched = threading.Event()


def _signal_workers(signum: int) -> list[int]:
    """Send ``signum`` to this agent's workers; returns their pids (none: no worker is running yet)."""
    workers = _children(os.getpid())
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return workers


def _forward_to_workers(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    _received.append(name)
    # Before the launch the only children are this process's own helpers (`scontrol show node`): the signal is
    # just recorded, and run() does not start the workers.
    workers = _signal_workers(signum) if _launched.is_set() else []
    if workers:
        log.warning("received %s: passing it to workers %s", name, workers)
    else:
        _undelivered.append(signum)
        log.warning("received %s while no worker is running", name)


def install_handlers() -> None:
    """Forward SIGUSR1 and SIGTERM to the workers from now on (first thing: a signal before this would end the
    agent by its default action, with no requeue)."""
    for sig in FORWARDED:
        signal.signal(sig, _forward_to_workers)


def _deliver_late_signals() -> None:
    """While torch's agent waits for its rendezvous and starts the workers, pass on what arrived meanwhile."""
    while True:
        time.sleep(0.2)
        while _undelivered:
            workers = _signal_workers(_undelivered[0])
            if not workers:
                break
            log.warning("passing %s to workers %s", signal.Signals(_undelivered.pop(0)).name, workers)


def run(torchrun_args: list[str], requeue_exit_code: int = 75) -> int:
    """torch.distributed.run in this process; returns 0, the requeue status, or 1."""
    install_handlers()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, parse_args
    from torch.distributed.run import run as torch_run

    # torch's launcher (2.9 and later) sets TORCHELASTIC_SIGNALS_TO_HANDLE from this option (default
    # SIGTERM,SIGINT,SIGHUP,SIGQUIT) and its agent would then take SIGTERM itself: SIGTERM the workers, SIGKILL
    # them 30 s later, exit 1. Older torch has no such option (and leaves SIGTERM to us). A later
    # --signals-to-handle in torchrun_args wins.
    known = "--signals-to-handle" in get_args_parser()._option_string_actions
    args = parse_args([f"--signals-to-handle={AGENT_SIGNALS}"] * known + torchrun_args)
    if _received:
        log.warning("received %s before the workers were started: not starting them, requeueing", _received[0])
        return requeue_exit_code
    _launched.set()
    threading.Thread(target=_deliver_late_signals, name="late-signals", daemon=True).start()
    try:
        torch_run(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        # A worker that exits 75 has passed the preemption checkpoint, which ends in a barrier of all ranks after
        # rank 0 wrote it. torch then closes the other workers with SIGTERM, and one that is still exiting (a
        # slower teardown) is recorded as -SIGTERM: the checkpoint is there all the same.
        if requeue_exit_code in codes and codes <= {requeue_exit_code, -signal.SIGTERM}:
            log.warning("workers exited with %s after a preemption checkpoint", sorted(codes))
            return requeue_exit_code
        if _received:
            # The signal came before the workers' training loop was listening (still importing or loading) and
            # ended them: the job was being preempted all the same, so requeue it; it resumes from the newest
            # checkpoint there is.
            log.warning("workers ended with %s after %s: requeueing", sorted(codes), _received[0])
            return requeue_exit_code
        log.error("%s", exc.format_msg())
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    install_handlers()  # before detect(): `scontrol show node` and torch's imports can take seconds
    parser = argparse.ArgumentParser(prog="python -m hpc.torchrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", type=int, default=1, help="workers on this node: one per GPU")
    parser.add_argument("--exit-code", type=int, default=75, help="the workers' requeue status (default 75)")
    parser.add_argument("cytonet_args", nargs=argparse.REMAINDER, help="-- COMMAND CONFIG [overrides]")
    args = parser.parse_args(argv)
    rest = args.cytonet_args[1:] if args.cytonet_args[:1] == ["--"] else args.cytonet_args
    if not rest:
        parser.error("give the cytonet command after --, e.g. -- pretrain CONFIG")
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hpc.torchrun %(levelname)s %(message)s")
    env = detect()
    master = resolve_master(env.master_addr) if env.launcher == "slurm" else env.master_addr
    targs = torchrun_argv(env, args.nproc_per_node, rest, master)
    log.info("node %s (%d of %d): torchrun %s", socket.gethostname(), env.node_rank, env.world_size, " ".join(targs))
    return run(targs, args.exit_code)


if __name__ == "__main__":
    sys.exit(main())
