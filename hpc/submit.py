"""``cytonet submit <command> CONFIG``: run a cytonet command as a submitit job on SLURM (or locally).

Entry points: :func:`submit` (returns the submitit jobs), :class:`CytonetJob` (the Checkpointable).

- Training commands (pretrain, probe, scratch) become one job: ``profile.pretrain_nodes`` nodes for pretrain
  (one for the others) with one task per GPU; each task runs ``cytonet <command>`` and finds its rank in
  SLURM's variables (``hpc/env.py``).
- Array commands (extract, infer) become a job array through ``map_array``: task i runs ``cytonet <command>
  --task-id i --num-tasks N``; at most ``profile.array_parallelism`` run at once.
- ``--local`` uses submitit's local executor instead (same code path, one machine, no SLURM).

Preemption and time-outs: SLURM (``--signal=USR2@signal_lead_s``) or ``scancel --signal=USR2`` sends USR2 to
every task. submitit calls :meth:`CytonetJob.checkpoint` on task 0, which passes SIGUSR1 on to its cytonet
process and waits until it has written its checkpoint and exited (75), at most :func:`checkpoint_wait_s` (less
than ``signal_lead_s``: submitit must requeue before the time limit ends the job); the training loop's collective
stop takes the other ranks along. submitit then requeues the job, and the rerun resumes from the run folder. The
cytonet process runs as a child with USR2 ignored, so that the signal meant for submitit cannot kill it.

A cytonet process that exits 75 (or is terminated) on its own, without submitit's checkpoint call (SIGTERM of a
preemption with ``GraceTime``, a USR1 sent to it directly), has checkpointed too; on every task, rank 0 included,
the job then waits to be requeued or ended by SLURM rather than report a failure that the requeued run would have
to overwrite, and ends with :class:`JobPreemptedError` if neither comes within :data:`REQUEUE_WAIT_S`.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from cytonet.config import load_config
from cytonet.errors import CytonetError, UsageError
from hpc.env import detect
from hpc.site import SiteProfile
from hpc.slurm import ARRAY_KINDS, KINDS, TRAIN_KINDS, check_array_kind

log = logging.getLogger(__name__)

#: Seconds the checkpoint handler leaves before the time limit: USR2 comes up to ~30 s late (slurmctld checks
#: time limits about every 30 s), and submitit still has to requeue the job after the handler returns.
CHECKPOINT_MARGIN_S = 60.0
#: How long a task whose cytonet process stopped for a requeue waits for SLURM to requeue or end the job.
REQUEUE_WAIT_S = 600.0


def checkpoint_wait_s(signal_lead_s: float) -> float:
    """How long the checkpoint handler waits for cytonet to write its checkpoint and exit, for a signal that comes
    ``signal_lead_s`` before the time limit: all but :data:`CHECKPOINT_MARGIN_S` of it, and at least half of it
    (short leads, e.g. the test cluster's 60 s)."""
    return max(signal_lead_s - CHECKPOINT_MARGIN_S, signal_lead_s / 2)


#: For the site profile's default ``signal_lead_s`` (300 s).
DEFAULT_CHECKPOINT_WAIT_S = checkpoint_wait_s(300)


class JobFailedError(CytonetError):
    """The cytonet command of a submitit job failed (carries its exit status)."""


class JobPreemptedError(JobFailedError):
    """The cytonet command checkpointed and stopped for a requeue (exit 75, or terminated after it), but SLURM
    neither requeued nor ended the job: resubmit it to resume from the checkpoint."""


def _ignore_usr2() -> None:
    # Runs in the child between fork and exec; SIG_IGN survives exec, a Python handler would not.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _has_exited(pid: int) -> bool:
    """Whether child ``pid`` has ended (a zombie not yet reaped counts), without reaping it: the interrupted
    poll loop in :meth:`CytonetJob.__call__` still collects its status."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


class CytonetJob(submitit.helpers.Checkpointable):
    """``cytonet <argv>`` as a checkpointable submitit job: preempted or timed out, it checkpoints, is requeued
    and resumes. Called with ``extra`` arguments by ``map_array`` (``--task-id i --num-tasks N``)."""

    #: Seconds :meth:`checkpoint` waits for cytonet's checkpoint and exit (a class default too: jobs pickled by
    #: an older cytonet lack the attribute).
    checkpoint_wait_s: float = DEFAULT_CHECKPOINT_WAIT_S

    def __init__(
        self,
        argv: Sequence[str],
        python: str = "",
        requeue_exit_code: int = 75,
        checkpoint_wait_s: float = DEFAULT_CHECKPOINT_WAIT_S,
    ) -> None:
        self.argv = list(argv)
        self.python = python or sys.executable
        self.requeue_exit_code = requeue_exit_code
        self.checkpoint_wait_s = checkpoint_wait_s
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self, extra: Sequence[str] = ()) -> list[str]:
        return [self.python, "-m", "cytonet.cli", *self.argv, *extra]

    def __call__(self, extra: Sequence[str] = ()) -> str:
        cmd = self.command(extra)
        env = detect()
        print(f"cytonet job (rank {env.rank}/{env.world_size}, restart {env.restart_count}): {shlex.join(cmd)}")
        sys.stdout.flush()
        self._proc = proc = subprocess.Popen(cmd, preexec_fn=_ignore_usr2)
        # Poll instead of wait(): submitit's USR2 handler (checkpoint) runs on this thread, and a wait() it
        # interrupts would hold the lock that the handler needs to see the process end.
        while proc.poll() is None:
            time.sleep(0.2)
        status = proc.returncode
        if status == 0:
            return shlex.join(cmd)
        if status in (self.requeue_exit_code, -signal.SIGTERM):
            # cytonet checkpointed for a requeue. Task 0's checkpoint handler requeues the whole job, which ends
            # every task (task 0 too, when the handler runs: submitit exits after requeueing); a preemption that
            # reached cytonet as SIGTERM (GraceTime) is requeued or ended by SLURM. Wait for that rather than
            # report a failure the requeued run would have to overwrite (and that could be read as the job's
            # result before it does). SIGTERM is how SLURM ends the job's steps for a requeue: it can reach
            # cytonet after its checkpoint, while it is still exiting (seen under load: killed 1.9 s after
            # "checkpoint written"). Outside SLURM (the local executor) nothing would come.
            if env.job_id is not None:
                time.sleep(REQUEUE_WAIT_S)
            raise JobPreemptedError(
                f"`{shlex.join(cmd)}` stopped for a requeue (status {status}) but the job was not requeued"
                + (f" within {REQUEUE_WAIT_S:.0f} s" if env.job_id is not None else "")
                + ": resubmit it to resume from its checkpoint"
            )
        raise JobFailedError(f"`{shlex.join(cmd)}` exited with status {status}")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running process is not part of the job's description
        return state

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on task 0 when USR2 arrives: let cytonet checkpoint, then requeue this job as is."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("preempted: asking cytonet (pid %d) to checkpoint", proc.pid)
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + self.checkpoint_wait_s
            while not _has_exited(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _has_exited(proc.pid):
                log.warning("cytonet has checkpointed and exited; requeueing")
            else:
                log.error(
                    "cytonet did not exit within %.0f s; requeueing from its last checkpoint", self.checkpoint_wait_s
                )
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)  # pickled without the process


def _additional(options: Sequence[str]) -> dict[str, Any]:
    """``["--constraint=a100", "--exclusive"]`` -> submitit's ``additional_parameters``."""
    out: dict[str, Any] = {}
    for option in options:
        name, sep, value = option[2:].partition("=")
        out[name.replace("-", "_")] = value if sep else ""
    return out


def make_executor(command: str, profile: SiteProfile, folder: Path, *, local: bool) -> submitit.Executor:
    """The submitit executor for ``command`` with the profile's resources."""
    train = command in TRAIN_KINDS
    nodes = profile.pretrain_nodes if command == "pretrain" else 1
    gpus = profile.gpus_per_node if train else (1 if command == "infer" and profile.gpus_per_node else 0)
    tasks = profile.nproc_per_node if train else 1
    name = f"{profile.job_name_prefix}-{command}"
    executor: submitit.Executor
    if local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=profile.minutes(command), nodes=1, tasks_per_node=tasks if nodes == 1 else 1, gpus_per_node=gpus
        )
        return executor
    slurm = submitit.SlurmExecutor(
        folder=folder, max_num_timeout=profile.max_requeues, python=shlex.quote(profile.python_path)
    )
    params: dict[str, Any] = {
        "job_name": name,
        "time": profile.minutes(command),
        "nodes": nodes,
        "ntasks_per_node": tasks,
        "signal_delay_s": profile.signal_lead_s,
        "array_parallelism": profile.array_parallelism,
        "setup": list(profile.setup),
    }
    if gpus:
        params["gpus_per_node"] = f"{profile.gpu_type}:{gpus}" if profile.gpu_type else gpus
    if gpus and profile.cpus_per_gpu:
        params["cpus_per_gpu"] = profile.cpus_per_gpu
    elif profile.cpus_per_task:
        params["cpus_per_task"] = profile.cpus_per_task
    for key in ("account", "partition", "qos"):
        if getattr(profile, key):
            params[key] = getattr(profile, key)
    # Training jobs hold whole nodes (``mem``, possibly 0: all of it); array tasks share them (see hpc.slurm).
    mem = profile.array_mem if command in ARRAY_KINDS else profile.mem
    if mem:
        params["mem"] = mem
    if profile.extra_sbatch:
        params["additional_parameters"] = _additional(profile.extra_sbatch)
    slurm.update_parameters(**params)
    return slurm


def submit(
    command: str,
    config_path: str | Path,
    overrides: Sequence[str],
    profile: SiteProfile,
    *,
    local: bool = False,
    array_tasks: int | None = None,
    folder: str | Path | None = None,
) -> list[submitit.Job[Any]]:
    """Submit ``cytonet <command> CONFIG [overrides]``; one job, or one per array task for extract and infer.

    submitit's files (scripts, pickles, logs) go to ``folder`` (default ``<run.root_dir>/submitit``).
    """
    if command not in KINDS:
        raise UsageError(f"cytonet submit: unknown command {command!r}; use one of {', '.join(KINDS)}")
    check_array_kind(command, array_tasks)
    config = Path(config_path).resolve()
    cfg = load_config(config, list(overrides))  # a bad config fails here, not in the queue
    out = Path(folder) if folder is not None else cfg.resolve_path("submitit")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    executor = make_executor(command, profile, out / "%j", local=local)
    job = CytonetJob(
        [command, str(config), *overrides],
        profile.python_path,
        checkpoint_wait_s=checkpoint_wait_s(profile.signal_lead_s),
    )
    if command in ARRAY_KINDS:
        n = profile.array_tasks if array_tasks is None else array_tasks
        if n < 1:
            raise UsageError(f"--array={n}: an array needs at least 1 task")
        extras = [["--task-id", str(i), "--num-tasks", str(n)] for i in range(n)]
        return executor.map_array(job, extras)
    return [executor.submit(job)]
