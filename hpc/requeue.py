"""Run a command; when it exits with the requeue status (75 after a preemption checkpoint), requeue this SLURM job.

Usage (the last line of ``slurm/train.sbatch``, exec'd by the batch shell)::

    exec python -m hpc.requeue [--exit-code 75] [--max-requeues N] -- \\
        srun --kill-on-bad-exit=0 python -m hpc.torchrun ...

The training loop turns SIGUSR1 (or SIGTERM) on any rank into a checkpoint of all ranks and exit status 75
(``pretrain.requeue_exit_code``); this wrapper turns that status into ``scontrol requeue <job>`` so the job goes
back to the queue and, when it runs again, resumes from the run folder. Any other status is passed through.

Signals that reach the wrapper itself:

- SIGUSR1 and SIGUSR2 (``--signal=B:USR1@N``, ``scancel -b --signal=USR1``) are passed on to the command; srun
  forwards them as they are to every task of its step, so they ask for a checkpoint.
- SIGTERM, SIGINT, SIGHUP and SIGQUIT mean the job is ending: a plain ``scancel``, the hard time limit, a
  preemption without the user signal. They are never passed to srun, which answers TERM, HUP and QUIT by
  SIGKILLing every task at once ("forcing job termination", no checkpoint) and INT by printing the tasks' state;
  srun gets the job's own TERM from its step anyway. After one, the job is not requeued even if the command
  still exits 75 (the tasks may checkpoint on the TERM they got within ``KillWait``): ``scontrol requeue``
  accepts a cancelled job, and a cancelled job must stay cancelled. Resubmitting resumes from the checkpoint.
  A command other than srun (the wrapper run by hand) gets them passed on.

``--max-requeues N`` (the site profile's ``max_requeues``, default 10): a job already requeued N times
(``$SLURM_RESTART_COUNT``) is not requeued again and ends with the command's status, so that a job that cannot
make progress (a signal that always comes before training starts) stops.

A command that cannot be started gets one line naming it and the shell's statuses: 127 when it is not found,
126 when it cannot be executed (a folder, no execute permission, not a program). Bad options and launcher
variables that cannot be read (:mod:`hpc.env`) are refused with one line and status 2 before the command runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import subprocess
import sys
from types import FrameType

from hpc.env import LaunchEnv, LaunchEnvError, detect

log = logging.getLogger("hpc.requeue")

#: Passed on to the command: srun forwards these as they are to every task of its step (a checkpoint request).
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)
#: The job is ending: never requeue after one; passed on to a command other than srun only (see the module doc).
ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: ``--max-requeues`` when not given (the site profile's default ``max_requeues``).
DEFAULT_MAX_REQUEUES = 10
#: Statuses of a command that cannot be started, as the shell gives them: not found, found but not executable.
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def requeue_target(env: LaunchEnv) -> str | None:
    """The id ``scontrol requeue`` takes for this job: ``JOB`` or, for an array task, ``ARRAYJOB_TASK``."""
    if env.job_id is None:
        return None
    return f"{env.job_id}_{env.array_task_id}" if env.is_array_task else env.job_id


def _is_srun(command: list[str]) -> bool:
    return os.path.basename(command[0]) == "srun"


def run(command: list[str], exit_code: int = 75, env: LaunchEnv | None = None, max_requeues: int | None = None) -> int:
    """Run ``command``; requeue the job when it exits with ``exit_code``, unless an ending signal arrived or the job
    has been requeued ``max_requeues`` times already (None: no limit). Returns the command's status."""
    proc: subprocess.Popen[bytes] | None = None
    pending: list[int] = []  # signals that came before the command started
    ending: list[str] = []
    pass_ending = not _is_srun(command)

    def handle(signum: int, frame: FrameType | None) -> None:
        if signum in ENDING:
            ending.append(signal.Signals(signum).name)
            log.warning(
                "received %s: the job is ending (scancel, time limit, preemption or scontrol requeue); this "
                "wrapper will not requeue it itself",
                ending[-1],
            )
            if not pass_ending:
                return
        if proc is None:
            pending.append(signum)
        elif proc.poll() is None:
            proc.send_signal(signum)

    # Installed before the command starts, so that no signal finds the wrapper with its default action.
    previous = {sig: signal.signal(sig, handle) for sig in (*FORWARDED, *ENDING)}
    try:
        try:
            proc = subprocess.Popen(command)
        except OSError as exc:
            status = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
            log.error("cannot run %s: %s (exit status %d)", shlex.quote(command[0]), exc.strerror or exc, status)
            return status
        for signum in pending:
            proc.send_signal(signum)
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status != exit_code:
        return status
    if ending:
        log.warning(
            "exit status %d after %s: this wrapper does not requeue a job that is being ended (one requeued by "
            "scontrol runs again by itself; a cancelled one resumes from its checkpoint when resubmitted)",
            status,
            ending[0],
        )
        return status
    env = env or detect()
    target = requeue_target(env)
    if target is None:
        log.warning("exit status %d asks for a requeue, but this is not a SLURM job: rerun to resume", status)
        return status
    if max_requeues is not None and env.restart_count >= max_requeues:
        if max_requeues == 0:
            log.error(
                "exit status %d asks for a requeue, but requeues are off (max_requeues 0): not requeueing job %s; "
                "resubmit to resume from its checkpoint",
                status,
                target,
            )
            return status
        log.error(
            "exit status %d asks for a requeue, but job %s has been requeued %d times already (max_requeues %d): "
            "not requeueing it again. If it keeps stopping before it makes progress, check that the time limit "
            "leaves room for signal_lead_s; resubmit to resume from its checkpoint",
            status,
            target,
            env.restart_count,
            max_requeues,
        )
        return status
    # Said before asking: a granted requeue ends this batch script at once (SIGTERM to the step), often before
    # anything after `scontrol requeue` would run.
    log.warning(
        "exit status %d: requeueing job %s (requeue %d%s); it resumes from its checkpoint when it runs again",
        status,
        target,
        env.restart_count + 1,
        "" if max_requeues is None else f" of at most {max_requeues}",
    )
    r = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log.error("`scontrol requeue %s` failed (%d): %s; resubmit to resume", target, r.returncode, r.stderr.strip())
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.requeue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit-code", type=int, default=75, help="status that asks for a requeue (default 75)")
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=DEFAULT_MAX_REQUEUES,
        help="do not requeue a job that $SLURM_RESTART_COUNT says was requeued this often already "
        f"(default {DEFAULT_MAX_REQUEUES})",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if args.max_requeues < 0:
        parser.error(f"--max-requeues={args.max_requeues} must be >= 0")
    if not 1 <= args.exit_code <= 255:
        parser.error(f"--exit-code={args.exit_code} must be an exit status in 1..255")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hpc.requeue %(levelname)s %(message)s")
    try:
        # Read now, not after the command: a variable that cannot be read is no reason to lose its checkpoint
        # status in a traceback once it has run.
        env = detect()
    except LaunchEnvError as exc:
        log.error("%s", exc)
        return 2
    log.info("running %s", shlex.join(command))
    return run(command, args.exit_code, env=env, max_requeues=args.max_requeues)


if __name__ == "__main__":
    sys.exit(main())
