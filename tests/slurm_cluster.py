"""A real single-machine SLURM cluster for the tests marked ``slurm``: slurmctld, two slurmd as nodes node1 and
node2, slurmdbd + mariadb for sacct (submitit needs it), from ``tools/slurm-local/up.sh``.

Use the ``slurm_cluster`` fixture (import it into the test module). It brings the cluster up once per session
in its own folder and ports (so it never touches a cluster started by hand), exports ``SLURM_CONF`` so that
sbatch, srun, scancel and submitit find it, and stops it at the end of the session. Where it cannot start
(not root, Debian packages missing: run ``bash tools/install.sh --test`` as root) the tests skip with the
reason; with ``CYTONET_REQUIRE_SLURM=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tools" / "slurm-local"
CLUSTER_ENV = {
    "SLURM_LOCAL_DIR": "/tmp/cytonet-slurm-pytest",
    "SLURM_LOCAL_PORT_BASE": "18817",
    "SLURM_LOCAL_NODES": "2",
    "SLURM_LOCAL_CPUS": "2",
    "SLURM_LOCAL_ACCOUNTING": "1",
    "SLURM_LOCAL_INSTALL": "0",  # tools/install.sh --test installs the packages; tests never run apt-get
    # Jobs derive their rendezvous port from the job id: ids of their own keep them off the ports of jobs of
    # another cluster on this machine (one started by hand numbers from 1).
    "SLURM_LOCAL_FIRST_JOB_ID": "7001",
}
LOCAL_PROFILE = REPO / "configs" / "sites" / "local.yaml"


def _unavailable(reason: str) -> None:
    if os.environ.get("CYTONET_REQUIRE_SLURM") == "1":
        pytest.fail(f"CYTONET_REQUIRE_SLURM=1 but no local SLURM cluster: {reason}")
    pytest.skip(f"no local SLURM cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Bring the two-node cluster up (or skip); yields the path of its slurm.conf."""
    if os.geteuid() != 0:
        _unavailable("the test cluster's daemons run as root (SlurmUser=root); run the tests as root")
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd") if not shutil.which(c)]
    if missing:
        _unavailable(f"missing {', '.join(missing)}: run `bash tools/install.sh --test` as root")
    env = {**os.environ, **CLUSTER_ENV}
    r = subprocess.run(["bash", str(HARNESS / "up.sh")], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        _unavailable(f"tools/slurm-local/up.sh failed: {r.stderr.strip()[-800:]}")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf)  # sbatch, srun, scancel, submitit and the jobs themselves find it
        yield conf
    subprocess.run(["bash", str(HARNESS / "down.sh")], env=env, capture_output=True, text=True, timeout=300)


# States sacct shows while the job is not over (or before slurmdbd has recorded its end).
_ACTIVE = {"", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED"}


def job_state(job_id: str, timeout: float = 60.0) -> str:
    """The job's final state from sacct (``COMPLETED``, ``FAILED``, ``CANCELLED`` ...).

    slurmctld sends a job's end to slurmdbd asynchronously, so sacct can still say ``RUNNING`` for a moment after
    the job has left squeue (seen in CI after a requeue). This polls until sacct shows a state that is over, and
    returns the last state seen (e.g. ``RUNNING``, which then fails the caller's assertion) after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        r = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, check=False
        )
        states = r.stdout.split()
        state = states[0] if states else ""
        if state not in _ACTIVE or time.monotonic() > end:
            return state
        time.sleep(0.5)


def queued(job_id: str) -> bool:
    """Whether the job (or a task of the array) is still pending or running."""
    r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True, text=True, check=False)
    return r.returncode == 0 and bool(r.stdout.strip())


def wait_gone(job_ids: list[str], timeout: float = 300.0) -> None:
    """Wait until none of ``job_ids`` (jobs or arrays) is in the queue any more."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", *job_ids], check=False)
    pytest.fail(f"jobs {job_ids} still queued after {timeout:.0f} s")


def wait_for(predicate: object, what: str, timeout: float = 300.0) -> None:
    """Poll ``predicate()`` until it is true (fails naming ``what`` after ``timeout``)."""
    assert callable(predicate)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def restarts(job_id: str) -> int:
    """How often the job was requeued (``scontrol show job``'s Restarts)."""
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False)
    for item in r.stdout.split():
        if item.startswith("Restarts="):
            return int(item.split("=", 1)[1])
    return -1
