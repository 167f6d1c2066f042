"""Launcher environment detection: torchrun, SLURM, Open MPI / MPICH -> one :class:`LaunchEnv`.

This is the only place in the project that reads launcher variables. cytonet receives what it needs as
plain values (``LaunchEnv.dist()`` gives the ``cytonet.distributed.DistEnv``); nothing in ``cytonet/``
reads ``RANK``, ``SLURM_*`` or ``OMPI_*``.

Precedence when several launchers are visible: torchrun's variables describe the actual worker processes
(``srun torchrun`` sets both), so they win. Then MPI's: ``mpiexec`` inside a SLURM allocation starts its
daemons with ``srun --ntasks-per-node=1``, so every rank also inherits that step's ``SLURM_PROCID`` (the node's
index) and ``SLURM_NTASKS`` (the number of nodes), which describe the daemons, not the ranks. Where SLURM's
task variables agree with every value MPI's state (rank, world size, local rank and size: ``srun`` itself
starting the ranks through a PMI plugin), SLURM's are used, since they also give the layout per node and the
rendezvous host. Then SLURM's alone (``srun`` with one task per rank); otherwise a single process.

Every number is read strictly: a whole decimal integer (ASCII digits only, as SLURM, torchrun and MPI write
them) within the variable's range, else :class:`LaunchEnvError` naming the variable and its value. A value
such as ``WORLD_SIZE=2x`` or ``SLURM_ARRAY_TASK_STEP=0`` is never read as some other number, since every task
would then take a share of the work that no other task covers. The compressed task lists (``2(x3),1``) and host
lists (``node[01-03]``) are the only other forms accepted, where SLURM writes them.

Entry points: :func:`detect` (reads ``os.environ`` or a given mapping), :func:`expand_nodelist`,
:func:`expand_tasks_per_node`.
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
#: Largest rank, process count or array task id a launcher variable may state: MPI ranks and sizes are C ints.
MAX_INDEX = 2**31 - 1
#: Most nodes a compressed task list (``4(x2)``) may list: far more than any cluster has, and a bound on its memory.
MAX_NODES = 2**20
#: Largest SLURM job id (``uint32_t`` in SLURM).
MAX_JOB_ID = 2**32 - 1
_DECIMAL = re.compile(r"[0-9]+")

# Variable names per launcher: (rank, local rank, world size, local world size, node rank).
_VARS: dict[str, tuple[str, str, str, str | None, str | None]] = {
    "torchrun": ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"),
    # Local world size: this node's entry of SLURM_STEP_TASKS_PER_NODE (see _slurm_tasks_on_node).
    "slurm": ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", None, "SLURM_NODEID"),
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


def expand_tasks_per_node(value: str, name: str = "SLURM_STEP_TASKS_PER_NODE") -> list[int]:
    """Tasks on each node, in node order, from SLURM's compressed form: ``4(x2)`` -> ``[4, 4]``, ``3,2`` ->
    ``[3, 2]``, ``2(x3),1`` -> ``[2, 2, 2, 1]`` (``name`` is the variable named in errors)."""
    counts: list[int] = []
    for item in value.split(","):
        m = re.fullmatch(r"([0-9]{1,10})(?:\(x([0-9]{1,10})\))?", item)
        if m is None:
            raise LaunchEnvError(f"{name}={value!r}: {item!r} is not a task count such as 4 or 4(x2)")
        count, repeat = int(m.group(1)), int(m.group(2) or 1)
        if not (1 <= count <= MAX_INDEX and 1 <= repeat):
            raise LaunchEnvError(f"{name}={value!r}: {item!r} is not a task count such as 4 or 4(x2)")
        if len(counts) + repeat > MAX_NODES:
            raise LaunchEnvError(f"{name}={value!r} lists more than {MAX_NODES} nodes")
        counts.extend([count] * repeat)
    return counts


def _slurm_tasks_on_node(env: Mapping[str, str], node_id: int | None) -> int | None:
    """Tasks of this srun step on this node (``node_id``: SLURM_NODEID), None when SLURM does not say.

    SLURM_STEP_TASKS_PER_NODE describes the step (``srun -N2 -n5``: ``3,2``); SLURM_NTASKS_PER_NODE is only the
    job's ``--ntasks-per-node``, which an srun with other -n/-N inherits unchanged, so it is the fallback.
    """
    if "SLURM_STEP_TASKS_PER_NODE" in env and node_id is not None:
        counts = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        if not 0 <= node_id < len(counts):
            raise LaunchEnvError(
                f"SLURM_NODEID={node_id} has no entry in SLURM_STEP_TASKS_PER_NODE="
                f"{env['SLURM_STEP_TASKS_PER_NODE']!r} ({len(counts)} nodes)"
            )
        return counts[node_id]
    if "SLURM_NTASKS_PER_NODE" not in env:
        return None
    # SLURM 22.05 writes the job's --ntasks-per-node as one figure; the compressed form of a list is read too,
    # one entry applying to every node, else this node's entry.
    counts = expand_tasks_per_node(env["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")
    if len(counts) == 1:
        return counts[0]
    if node_id is None or not 0 <= node_id < len(counts):
        raise LaunchEnvError(
            f"SLURM_NTASKS_PER_NODE={env['SLURM_NTASKS_PER_NODE']!r} differs between nodes and "
            + ("SLURM_NODEID is unset" if node_id is None else f"SLURM_NODEID={node_id} has no entry in it")
        )
    return counts[node_id]


def _stated(env: Mapping[str, str], launcher: str) -> tuple[int | None, int | None, int | None, int | None]:
    """(rank, local rank, world size, local world size) as ``launcher``'s variables state them (None: unset)."""
    names = _VARS[launcher]
    if launcher == "slurm":
        local_world = _slurm_tasks_on_node(env, _int(env, "SLURM_NODEID"))
    else:
        local_world = _int(env, names[3], lo=1)
    return _int(env, names[0]), _int(env, names[1]), _int(env, names[2], lo=1), local_world


def _agree(mpi: tuple[int | None, ...], slurm: tuple[int | None, ...]) -> bool:
    """Whether every value MPI states equals SLURM's: ``srun`` started the MPI ranks itself (a PMI plugin)."""
    return all(m is None or m == s for m, s in zip(mpi, slurm, strict=True))


def _int(env: Mapping[str, str], name: str | None, lo: int = 0, hi: int = MAX_INDEX, what: str = "") -> int | None:
    """Variable ``name`` as an integer in ``lo..hi``, None when unset (or ``name`` is None); a value that is not
    a whole decimal number in that range raises :class:`LaunchEnvError` naming the variable, the value and
    ``what`` it is."""
    if name is None or name not in env:
        return None
    raw = env[name]
    if _DECIMAL.fullmatch(raw) is None:
        raise LaunchEnvError(f"{name}={raw!r} is not an integer (a whole decimal number is expected)")
    # Python refuses to convert more than 4300 digits; any value that long is out of range anyway.
    value = int(raw) if len(raw.lstrip("0")) <= 20 else hi + 1
    if not lo <= value <= hi:
        shown = raw if len(raw) <= 40 else f"{raw[:20]}...({len(raw)} digits)"
        raise LaunchEnvError(f"{name}={shown} is outside {lo}..{hi}{f' ({what})' if what else ''}")
    return value


def _job_id(env: Mapping[str, str], name: str) -> str | None:
    """A SLURM job id variable as SLURM writes it (a positive decimal number), None when unset."""
    return None if _int(env, name, lo=1, hi=MAX_JOB_ID) is None else env[name]


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
    """Number of tasks in the array (SLURM_ARRAY_TASK_COUNT, or from min, max and step)."""
    array_task_min: int | None = None
    """Lowest task id of the array (SLURM_ARRAY_TASK_MIN)."""
    array_task_max: int | None = None
    """Highest task id of the array (SLURM_ARRAY_TASK_MAX)."""
    array_task_step: int = 1
    """SLURM_ARRAY_TASK_STEP: the ``:2`` of ``--array=3-9:2`` (1 for a list such as ``--array=2,5``)."""
    restart_count: int = 0
    """SLURM_RESTART_COUNT: how often this job was requeued (0 on the first run)."""

    @property
    def is_array_task(self) -> bool:
        return self.array_task_id is not None

    @property
    def array_index(self) -> int | None:
        """0-based position of this task in its array, None outside arrays.

        Task ids may start anywhere and step (``--array=3-9:2``: ids 3, 5, 7, 9 are positions 0..3). An array
        whose ids are no such range (a list like ``--array=2,5``, e.g. failed tasks resubmitted) does not tell
        a task its position: that raises :class:`LaunchEnvError` suggesting ``--num-tasks``.
        """
        position = self._array_position()
        return None if position is None else position[0]

    def _array_position(self) -> tuple[int, int] | None:
        """(position, number of tasks) of this array task (see :attr:`array_index`), None outside arrays."""
        if self.array_task_id is None:
            return None
        tid, tmin, tmax, count, step = (
            self.array_task_id,
            self.array_task_min,
            self.array_task_max,
            self.array_task_count,
            self.array_task_step,
        )
        if tmin is None or count is None:
            raise LaunchEnvError(
                f"SLURM_ARRAY_TASK_ID={tid} comes without the array's size (SLURM_ARRAY_TASK_MIN, "
                "SLURM_ARRAY_TASK_COUNT): give --num-tasks N (the task id is then SLURM_ARRAY_TASK_ID)"
            )
        if tmax is None:
            tmax = tmin + (count - 1) * step
        regular = (
            step >= 1
            and (tmax - tmin) % step == 0
            and (tid - tmin) % step == 0
            and tmin <= tid <= tmax
            and count == (tmax - tmin) // step + 1
        )
        if not regular:
            raise LaunchEnvError(
                f"SLURM_ARRAY_TASK_ID={tid} belongs to an array of {count} ids in {tmin}..{tmax} that is not a range "
                f"with step {step} (e.g. a list such as --array=2,5): its position is unknown; give --num-tasks N "
                "so that the task id is SLURM_ARRAY_TASK_ID itself (the rendered array scripts do)"
            )
        return (tid - tmin) // step, count

    def task_share(self, task_id: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
        """(this task's index, number of tasks) of a job array.

        - ``--task-id`` and ``--num-tasks`` given: those.
        - ``--num-tasks N`` only: in a SLURM array the task id is ``SLURM_ARRAY_TASK_ID`` itself (it must be
          below N), so any subset of the ids 0..N-1 can be (re)submitted (``sbatch --array=2,5``); outside an
          array, 0.
        - ``--task-id`` only: one task (``--num-tasks`` 1) outside an array; refused inside one, where every
          task given it would take the whole work as its share (two writers of each output).
        - neither: this task's position in its array (:attr:`array_index`) and the array's size, else (0, 1).
        """
        if num_tasks is not None and num_tasks < 1:
            raise LaunchEnvError(f"--num-tasks={num_tasks} must be >= 1")
        if task_id is not None and num_tasks is None and self.array_task_id is not None:
            raise LaunchEnvError(
                f"--task-id={task_id} without --num-tasks inside a SLURM job array (SLURM_ARRAY_TASK_ID="
                f"{self.array_task_id}): give --num-tasks N too, or neither (the array's own share)"
            )
        if task_id is None and self.array_task_id is not None:
            if num_tasks is None:
                position = self._array_position()
                if position is not None:
                    task_id, num_tasks = position
            elif self.array_task_id >= num_tasks:
                raise LaunchEnvError(
                    f"SLURM_ARRAY_TASK_ID={self.array_task_id} is not below --num-tasks={num_tasks}: with "
                    f"--num-tasks the array's task ids must lie in 0..{num_tasks - 1}"
                )
            else:
                task_id = self.array_task_id
        if num_tasks is None:
            num_tasks = 1
        if task_id is None:
            task_id = 0
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
    """The rendezvous port of a SLURM job (``job_id``: checked by :func:`_job_id`), 29500 outside SLURM."""
    return 29500 if job_id is None else PORT_BASE + int(job_id) % PORT_SPAN


def detect(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Build the :class:`LaunchEnv` of this process from ``env`` (default: ``os.environ``)."""
    import os

    e: Mapping[str, str] = os.environ if env is None else env
    own_job = _job_id(e, "SLURM_JOB_ID")
    job_id = _job_id(e, "SLURM_ARRAY_JOB_ID") or own_job
    master_addr = e.get("MASTER_ADDR")
    if master_addr is None and e.get("SLURM_JOB_NODELIST"):
        master_addr = expand_nodelist(e["SLURM_JOB_NODELIST"])[0]
    # 0 would be "any free port", which the ranks cannot agree on.
    port = _int(e, "MASTER_PORT", lo=1, hi=65535, what="a TCP port")
    if port is None:
        port = _port_from_job(own_job)

    mpi = "openmpi" if "OMPI_COMM_WORLD_RANK" in e else "mpich" if "PMI_RANK" in e else None
    # Only inside an srun step do SLURM_PROCID/NTASKS describe processes (the batch script sees the job's task
    # count but is one process).
    srun_step = "SLURM_PROCID" in e and "SLURM_NTASKS" in e and "SLURM_STEP_ID" in e
    if "RANK" in e and "WORLD_SIZE" in e:
        launcher: Launcher = "torchrun"
        key = "torchrun"
    elif mpi is not None and not (srun_step and _agree(_stated(e, mpi), _stated(e, "slurm"))):
        # mpiexec started the ranks; SLURM's variables, if any, are those of the step running its daemons.
        launcher, key = "mpi", mpi
    elif srun_step:
        launcher, key = "slurm", "slurm"
    else:
        launcher, key = "single", ""

    names: tuple[str, str, str, str | None, str | None] = _VARS[key] if key else ("", "", "", None, None)
    if launcher == "single":
        rank, local_rank, world, local_world, node_rank = 0, 0, 1, 1, 0
    else:
        stated = _stated(e, key)
        rank = 0 if stated[0] is None else stated[0]
        world = 1 if stated[2] is None else stated[2]
        local_rank = rank if stated[1] is None else stated[1]
        local_world = world if stated[3] is None else stated[3]
        stated_node = _int(e, names[4])
        node_rank = rank // local_world if stated_node is None else stated_node
    if not 0 <= rank < world:
        raise LaunchEnvError(f"{names[0]}={rank} is outside the world of {names[2]}={world} processes")
    if local_world > world:
        raise LaunchEnvError(f"{local_world} processes on this node exceed the world of {names[2]}={world}")
    if not 0 <= local_rank < local_world:
        raise LaunchEnvError(f"{names[1]}={local_rank} is outside the node's {local_world} processes")

    task_id = _int(e, "SLURM_ARRAY_TASK_ID")
    count = _int(e, "SLURM_ARRAY_TASK_COUNT", lo=1)
    tmin = _int(e, "SLURM_ARRAY_TASK_MIN")
    tmax = _int(e, "SLURM_ARRAY_TASK_MAX")
    stated_step = _int(e, "SLURM_ARRAY_TASK_STEP", lo=1, what="the step of --array=A-B:STEP")
    step = 1 if stated_step is None else stated_step
    if tmin is not None and tmax is not None and tmin > tmax:
        raise LaunchEnvError(f"SLURM_ARRAY_TASK_MIN={tmin} is above SLURM_ARRAY_TASK_MAX={tmax}")
    if count is None and tmin is not None and tmax is not None:
        count = (tmax - tmin) // step + 1
    restarts = _int(e, "SLURM_RESTART_COUNT")
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
        array_task_max=tmax,
        array_task_step=step,
        restart_count=0 if restarts is None else restarts,
    )
