"""``python -m hpc.torchrun`` without SLURM (torchrun --standalone): SIGUSR1 to the agent reaches the workers, which
checkpoint together, and the agent exits with their requeue status 75 (torchrun itself would say 1); a rerun
resumes and ends with the weights of an uninterrupted run."""

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
