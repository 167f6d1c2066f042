"""Launcher environment detection: torchrun, SLURM, Open MPI / MPICH -> one :class:`LaunchEnv`.

This is the only place in the project that reads launcher variables. cytonet receives what it needs as
plain values (``LaunchEnv.dist()`` gives the ``cytonet.distributed.DistEnv``); nothing in ``cytonet/``
reads ``RANK``, ``SLURM_*`` or ``OMPI_*``.

Precedence when several launchers are visible (e.g. ``srun torchrun`` sets both): torchrun's variables
describe the actual worker processes, so they win; then SLURM's task variables (``srun`` with one task per
rank); then MPI's; otherwise a single process.

Entry points: :func:`detect` (reads ``os.environ`` or a given mapping), :func:`expand_nodelist`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cytonet.distributed import DistEnv

Launcher = Literal["torchrun", "slurm", "mpi", "single"]

#: Port range used when the port is derived from the SLURM job id (unprivileged, away from common services).
PORT_BASE = 20000
PORT_SPAN = 20000

# Variable names per launcher: (rank, local rank, world size, local world size, node rank).
_VARS: dict[str, tuple[str, str, str, str | None, str | None]] = {
    "torchrun": ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"),
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        # Not OMPI_COMM_WORLD_NODE_RANK: that is the process's rank on its node across all jobs, not the
        # node's index; the index is derived as rank // local size (mpiexec's default by-slot mapping).
        None,
    ),
    "mpich": ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS", None),
}


class LaunchEnvError(ValueError):
    """A launcher variable holds a value that cannot be right (names the variable and the value)."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``node[01-03,7],gpu5`` into ``['node01', 'node02', 'node03', 'node7', 'gpu5']``.

    Handles several bracket groups per name (``r[1-2]n[3-4]``) and keeps zero padding, like
    ``scontrol show hostnames``.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"SLURM_JOB_NODELIST={text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST={text!r}: unbalanced '['")
    parts.append("".join(current).strip())
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out = []
    for rng in m.group(1).split(","):
        lo, sep, hi = rng.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchEnvError(f"host list range {rng!r} in {item!r} is not numeric")
        width = len(lo)
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(_expand_one(f"{head}{n:0{width}d}{tail}"))
    return out


def _int(env: Mapping[str, str], name: str | None, default: int | None = None) -> int | None:
    if name is None or name not in env:
        return default
    raw = env[name]
    # SLURM_NTASKS_PER_NODE may read "4(x2)" or "4,2"; the first figure is this layout's per-node count.
    m = re.match(r"\s*(\d+)", raw)
    if m is None:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer")
    return int(m.group(1))


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process, its peers and its job."""

    launcher: Launcher
    """Which launcher's variables were used for rank and world size."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    job_id: str | None = None
    """SLURM job id (of the array as a whole for array jobs)."""
    array_task_id: int | None = None
    """SLURM_ARRAY_TASK_ID, None outside job arrays."""
    array_task_count: int | None = None
    """Number of tasks in the array (SLURM_ARRAY_TASK_COUNT, or max - min + 1)."""
    array_task_min: int | None = None
    """Lowest task id of the array (SLURM_ARRAY_TASK_MIN)."""
    restart_count: int = 0
    """SLURM_RESTART_COUNT: how often this job was requeued (0 on the first run)."""

    @property
    def is_array_task(self) -> bool:
        return self.array_task_id is not None

    @property
    def array_index(self) -> int | None:
        """0-based position of this task in its array (task ids may start at any number)."""
        if self.array_task_id is None:
            return None
        return self.array_task_id - (self.array_task_min or 0)

    def task_share(self, task_id: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
        """(this task's index, number of tasks) of a job array: the explicit values when given (``--task-id``,
        ``--num-tasks``), else this SLURM array task's 0-based position and the array size, else (0, 1).

        Array ids must be contiguous (``--array=0-99%10``, not a step such as ``0-99:2``).
        """
        if num_tasks is None:
            num_tasks = self.array_task_count if self.is_array_task and task_id is None else 1
        if task_id is None:
            task_id = self.array_index if self.is_array_task and num_tasks == self.array_task_count else 0
        assert task_id is not None and num_tasks is not None
        if num_tasks < 1:
            raise LaunchEnvError(f"--num-tasks={num_tasks} must be >= 1")
        if not 0 <= task_id < num_tasks:
            raise LaunchEnvError(f"--task-id={task_id} is outside 0..{num_tasks - 1} (--num-tasks={num_tasks})")
        return task_id, num_tasks

    def dist(self) -> DistEnv:
        """The ``cytonet.distributed.DistEnv`` for this process (an MPI launch names no rendezvous host: use
        :func:`hpc.launch.dist_env` when a process group is formed)."""
        from cytonet.distributed import DistEnv

        return DistEnv(
            rank=self.rank,
            local_rank=self.local_rank,
            world_size=self.world_size,
            master_addr=self.master_addr,
            master_port=self.master_port,
            local_world_size=self.local_world_size,
            node_rank=self.node_rank,
        )


def _port_from_job(job_id: str | None) -> int:
    if job_id and job_id.isdigit():
        return PORT_BASE + int(job_id) % PORT_SPAN
    return 29500


def detect(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Build the :class:`LaunchEnv` of this process from ``env`` (default: ``os.environ``)."""
    import os

    e: Mapping[str, str] = os.environ if env is None else env
    job_id = e.get("SLURM_ARRAY_JOB_ID") or e.get("SLURM_JOB_ID")
    master_addr = e.get("MASTER_ADDR")
    if master_addr is None and e.get("SLURM_JOB_NODELIST"):
        master_addr = expand_nodelist(e["SLURM_JOB_NODELIST"])[0]
    port = _int(e, "MASTER_PORT") or _port_from_job(e.get("SLURM_JOB_ID"))

    if "RANK" in e and "WORLD_SIZE" in e:
        launcher: Launcher = "torchrun"
        names = _VARS["torchrun"]
    elif "SLURM_PROCID" in e and "SLURM_NTASKS" in e and "SLURM_STEP_ID" in e:
        # Only inside an srun step do SLURM_PROCID/NTASKS describe processes (the batch script sees the job's
        # task count but is one process).
        launcher, names = "slurm", _VARS["slurm"]
    elif "OMPI_COMM_WORLD_RANK" in e:
        launcher, names = "mpi", _VARS["openmpi"]
    elif "PMI_RANK" in e:
        launcher, names = "mpi", _VARS["mpich"]
    else:
        launcher, names = "single", ("", "", "", None, None)

    if launcher == "single":
        rank, local_rank, world, local_world, node_rank = 0, 0, 1, 1, 0
    else:
        rank = _int(e, names[0]) or 0
        world = _int(e, names[2]) or 1
        local_rank = _int(e, names[1], rank) or 0
        local_world = _int(e, names[3], world) or 1
        node_rank = _int(e, names[4], rank // max(local_world, 1)) or 0
    if not 0 <= rank < world:
        raise LaunchEnvError(f"{names[0]}={rank} is outside the world of {names[2]}={world} processes")
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchEnvError(f"{names[1]}={local_rank} is outside the node's {local_world} processes")

    task_id = _int(e, "SLURM_ARRAY_TASK_ID")
    count = _int(e, "SLURM_ARRAY_TASK_COUNT")
    tmin = _int(e, "SLURM_ARRAY_TASK_MIN")
    tmax = _int(e, "SLURM_ARRAY_TASK_MAX")
    if count is None and tmin is not None and tmax is not None:
        count = tmax - tmin + 1
    return LaunchEnv(
        launcher=launcher,
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=master_addr or "127.0.0.1",
        master_port=port,
        job_id=job_id,
        array_task_id=task_id,
        array_task_count=count,
        array_task_min=tmin,
        restart_count=_int(e, "SLURM_RESTART_COUNT", 0) or 0,
    )
