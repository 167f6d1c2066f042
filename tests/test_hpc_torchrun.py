"""``python -m hpc.torchrun`` without SLURM (torchrun --standalone): SIGUSR1 or SIGTERM to the agent reaches the
workers, which checkpoint together, and the agent exits with their requeue status 75 (torchrun itself would say 1,
and would take SIGTERM itself); a rerun resumes and ends with the weights of an uninterrupted run. Workers that
exit at different times still give 75, and a signal that comes while the agent is still reading the allocation
does not kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import run, tail, wait_all
from ringdata import training_data

from cytonet.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.distributed
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return int(found[-1].stem.split("-")[1]) if found else 0


def test_usr1_to_the_agent_checkpoints_all_ranks_and_exits_75(tmp_path: Path) -> None:
    config = training_data(
        tmp_path, "c.yaml", pretrain={"epochs": 4, "global_batch_size": 8, "checkpoint_every_steps": 1}
    )

    def command(out: str) -> list[str]:
        return pretrain_command(config, out)

    def launch(out: str) -> subprocess.Popen[str]:
        return subprocess.Popen(command(out), env=ENV, stderr=subprocess.PIPE, text=True)

    reference, preempted = launch("ref"), launch("pre")
    end = time.monotonic() + 300
    while not (newest_step(tmp_path / "pre") >= 3 or preempted.poll() is not None or time.monotonic() > end):
        time.sleep(0.05)
    preempted.send_signal(signal.SIGUSR1)  # the agent only, as SLURM signals a step's tasks
    (err,) = wait_all([preempted], 300)
    assert preempted.returncode == 75, tail(err)
    assert err.count("exiting with 75 for requeue") == 2 and "received SIGUSR1: passing it to workers" in err
    (err,) = wait_all([reference], 300)
    assert reference.returncode == 0, tail(err)
    r = run(command("pre"), 300, env=ENV)
    assert r.returncode == 0 and "resumed from" in r.stderr, tail(r.stderr)
    a = torch.load(tmp_path / "ref" / "encoder.pt", weights_only=True)["encoder"]
    b = torch.load(tmp_path / "pre" / "encoder.pt", weights_only=True)["encoder"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pretrain_command(config: Path, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hpc.torchrun",
        "--nproc-per-node=2",
        "--",
        "pretrain",
        str(config),
        f"pretrain.out_dir={out}",
    ]


def test_sigterm_to_the_agent_checkpoints_all_ranks_and_exits_75(tmp_path: Path) -> None:
    """torch's launcher would take SIGTERM itself (its --signals-to-handle default): SIGTERM the workers, SIGKILL
    them after 30 s and exit 1, so the job would not be requeued. hpc.torchrun forwards it like SIGUSR1."""
    config = training_data(
        tmp_path, "c.yaml", pretrain={"epochs": 4, "global_batch_size": 8, "checkpoint_every_steps": 1}
    )
    agent = subprocess.Popen(pretrain_command(config, "pre"), env=ENV, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while not (newest_step(tmp_path / "pre") >= 1 or agent.poll() is not None or time.monotonic() > end):
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    (err,) = wait_all([agent], 300)
    assert agent.returncode == 75, tail(err)
    assert err.count("exiting with 75 for requeue") == 2 and "received SIGTERM: passing it to workers" in err, tail(err)
    assert "SignalException" not in err


STAGGERED_WORKER = """
import os, sys, time
if os.environ["LOCAL_RANK"] == "0":
    time.sleep(3)  # still tearing down after the collective checkpoint when torch closes the others
sys.exit(75)
"""


def test_workers_that_exit_75_at_different_times_give_75(tmp_path: Path) -> None:
    """torch records the failures after closing the other workers: local rank 1 exits 75 at once, rank 0 (still
    exiting) is SIGTERMed and recorded as -15. One 75 means the checkpoint, which ends in a barrier of all ranks,
    is written: the agent exits 75."""
    worker = tmp_path / "worker.py"
    worker.write_text(STAGGERED_WORKER)
    code = (
        "import logging, sys; from hpc.torchrun import run; logging.basicConfig(level=logging.INFO); "
        f"sys.exit(run(['--standalone', '--nnodes=1', '--nproc_per_node=2', {str(worker)!r}]))"
    )
    r = run([sys.executable, "-c", code], 120, env=ENV)
    assert r.returncode == 75, tail(r.stderr)
    assert "workers exited with [-15, 75] after a preemption checkpoint" in r.stderr, tail(r.stderr)


def test_a_signal_while_the_agent_reads_the_allocation_requeues_without_starting_workers(tmp_path: Path) -> None:
    """On a node whose name does not resolve, the agent asks `scontrol show node` (up to 30 s) before torch is even
    imported; SIGUSR1 then must not kill it (status -10, no requeue): it exits 75 and starts no worker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "scontrol-started"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/bash\ntouch {started}\nsleep 3\necho NodeName=x NodeAddr=127.0.0.1\n")
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NODEID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NODELIST": "cytonet-no-such-node",
    }
    env = {**ENV, **slurm, "PATH": f"{bin_dir}:{ENV['PATH']}"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "hpc.torchrun", "--", "pretrain", str(tmp_path / "never-read.yaml")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 60
    while not started.exists() and agent.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    agent.send_signal(signal.SIGUSR1)
    (err,) = wait_all([agent], 120)
    assert agent.returncode == 75, tail(err)
    assert "received SIGUSR1 before the workers were started: not starting them" in err, tail(err)
