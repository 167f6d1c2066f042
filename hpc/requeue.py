"""Run a command; when it exits with the requeue status (75 after a preemption checkpoint), requeue this SLURM job.

Usage (the last line of ``slurm/train.sbatch``)::

    python -m hpc.requeue [--exit-code 75] -- srun python -m hpc.torchrun -- pretrain CONFIG

The training loop turns SIGUSR1 or SIGTERM on any rank into a checkpoint of all ranks and exit status 75
(``pretrain.requeue_exit_code``); this wrapper turns that status into ``scontrol requeue <job>`` so the job goes
back to the queue and, when it runs again, resumes from the run folder. Any other status is passed through.
Signals the wrapper itself receives (``--signal=B:USR1@N``, ``scancel -b``, the time limit's TERM) are forwarded
to the command: srun passes them on to every task of the step.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import subprocess
import sys
from types import FrameType

from hpc.env import LaunchEnv, detect

log = logging.getLogger("hpc.requeue")

#: Signals passed on to the command (srun forwards each of them to the step's tasks).
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


def requeue_target(env: LaunchEnv) -> str | None:
    """The id ``scontrol requeue`` takes for this job: ``JOB`` or, for an array task, ``ARRAYJOB_TASK``."""
    if env.job_id is None:
        return None
    return f"{env.job_id}_{env.array_task_id}" if env.is_array_task else env.job_id


def run(command: list[str], exit_code: int = 75, env: LaunchEnv | None = None) -> int:
    """Run ``command``; requeue the job when it exits with ``exit_code``. Returns the command's status."""
    proc = subprocess.Popen(command)

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status != exit_code:
        return status
    target = requeue_target(env or detect())
    if target is None:
        log.warning("exit status %d asks for a requeue, but this is not a SLURM job: rerun to resume", status)
        return status
    # Said before asking: a granted requeue ends this batch script at once (SIGTERM to the step), often before
    # anything after `scontrol requeue` would run.
    log.warning("exit status %d: requeueing job %s; it resumes from its checkpoint when it runs again", status, target)
    r = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log.error("`scontrol requeue %s` failed (%d): %s; resubmit to resume", target, r.returncode, r.stderr.strip())
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.requeue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit-code", type=int, default=75, help="status that asks for a requeue (default 75)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hpc.requeue %(levelname)s %(message)s")
    log.info("running %s", shlex.join(command))
    return run(command, args.exit_code)


if __name__ == "__main__":
    sys.exit(main())
