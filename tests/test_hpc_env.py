"""Launcher detection: torchrun, SLURM (srun steps, arrays, requeues), Open MPI and MPICH -> one LaunchEnv.

The SLURM variables below are those a SLURM 22.05 cluster (tools/slurm-local) set for the layouts named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_mpi import mpiexec, needs_mpiexec

from hpc.env import LaunchEnvError, detect, expand_nodelist, expand_tasks_per_node

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[08-10],cpu5", ["gpu08", "gpu09", "gpu10", "cpu5"]),
        ("jwb[0001,0003-0004]", ["jwb0001", "jwb0003", "jwb0004"]),
        ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[a-b]"])
def test_expand_nodelist_rejects(bad: str) -> None:
    with pytest.raises(LaunchEnvError, match="node"):
        expand_nodelist(bad)


def test_single_process() -> None:
    e = detect({})
    assert (e.launcher, e.rank, e.world_size, e.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert not e.is_array_task and e.restart_count == 0


def test_torchrun_wins_over_slurm() -> None:
    env = {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29400",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NODELIST": "node[01-02]",
    }
    e = detect(env)
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (
        "torchrun",
        5,
        1,
        8,
        4,
        1,
    )
    assert (e.master_addr, e.master_port, e.job_id) == ("node01", 29400, "123")


def test_srun_tasks() -> None:
    env = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2(x2)",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_RESTART_COUNT": "2",
    }
    e = detect(env)
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (
        "slurm",
        3,
        1,
        4,
        2,
        1,
    )
    # Master: first host of the allocation; port derived from the job id, the same on every task.
    assert e.master_addr == "gpu07"
    assert e.master_port == 20000 + 4242 % 20000
    assert e.restart_count == 2


@pytest.mark.parametrize(
    ("value", "counts"),
    [("1", [1]), ("4(x2)", [4, 4]), ("3,2", [3, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3])],
)
def test_expand_tasks_per_node(value: str, counts: list[int]) -> None:
    assert expand_tasks_per_node(value) == counts


@pytest.mark.parametrize("bad", ["", "4(x)", "x2", "4(2)", "3,,2"])
def test_expand_tasks_per_node_rejects(bad: str) -> None:
    with pytest.raises(LaunchEnvError, match="SLURM_STEP_TASKS_PER_NODE="):
        expand_tasks_per_node(bad)


def test_srun_local_world_size_comes_from_the_step_layout() -> None:
    # `srun -N2 -n5` in a job of --ntasks-per-node=4: tasks 3,2 per node; SLURM_NTASKS_PER_NODE is the job's
    # option, inherited unchanged, and does not describe the step.
    step = {"SLURM_NTASKS": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_NTASKS_PER_NODE": "4"}
    first = detect({**step, "SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_NODEID": "0"})
    second = detect({**step, "SLURM_PROCID": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    assert (first.local_world_size, first.node_rank, second.local_world_size, second.node_rank) == (3, 0, 2, 1)
    # `srun -N2 -n8` with no --ntasks-per-node anywhere: 4 per node, not the world of 8.
    even = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"}
    assert detect({**even, "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}).local_world_size == 4
    with pytest.raises(LaunchEnvError, match=r"SLURM_NODEID=2 has no entry in SLURM_STEP_TASKS_PER_NODE='4\(x2\)'"):
        detect({**even, "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})


def test_batch_script_is_one_process() -> None:
    # The batch step sees the job's task count but is a single process: no SLURM_STEP_ID.
    e = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert (e.launcher, e.world_size, e.master_addr) == ("single", 1, "n1")


def test_array_task() -> None:
    env = {
        "SLURM_ARRAY_JOB_ID": "900",
        "SLURM_JOB_ID": "905",
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_ARRAY_TASK_MIN": "3",
        "SLURM_ARRAY_TASK_MAX": "10",
    }
    e = detect(env)
    assert e.is_array_task and e.array_task_id == 7 and e.array_task_count == 8 and e.array_index == 4
    assert e.job_id == "900"


#: What every rank of `mpiexec -n 8` on 2 nodes inside an allocation inherits: Open MPI (and MPICH's hydra) start
#: their daemon on each node with `srun --ntasks-per-node=1`, a step of one task per node (here node 1 of 2).
DAEMON_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
}


@pytest.mark.parametrize(
    "mpi",
    [
        {
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        },
        {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"},
    ],
    ids=["openmpi", "mpich"],
)
def test_mpiexec_inside_a_slurm_allocation_takes_the_ranks_from_mpi(mpi: dict[str, str]) -> None:
    e = detect({**DAEMON_STEP, **mpi})
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == ("mpi", 5, 1, 8, 4, 1)
    # Same world size, other rank: rank 1 runs on node 0, whose daemon is task 0 of the step.
    e = detect({**DAEMON_STEP, "SLURM_PROCID": "0", "SLURM_NODEID": "0", "PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (e.launcher, e.rank, e.world_size) == ("mpi", 1, 2)


def test_srun_starting_mpi_ranks_keeps_slurm_and_torchrun_wins_over_both() -> None:
    # `srun -N2 -n8 --mpi=pmi2`: PMI's rank and size agree with SLURM's, which also give the layout per node.
    step = {**DAEMON_STEP, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    step["SLURM_STEP_TASKS_PER_NODE"] = "4(x2)"
    e = detect({**step, "PMI_RANK": "5", "PMI_SIZE": "8"})
    assert (e.launcher, e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == ("slurm", 5, 1, 8, 4, 1)
    assert (e.master_addr, e.master_port) == ("gpu07", 20000 + 4242)
    # Open MPI started by srun (PMIx) states its local layout too; it agrees.
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect({**step, **ompi, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}).launcher == "slurm"
    # One local size that differs is enough to tell mpiexec's ranks from srun's tasks.
    assert detect({**step, **ompi, "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}).launcher == "mpi"
    torchrun = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0"}
    e = detect({**step, **ompi, **torchrun})
    assert (e.launcher, e.rank, e.world_size, e.local_world_size) == ("torchrun", 3, 16, 4)


@pytest.mark.distributed
@needs_mpiexec
def test_real_mpiexec_ranks_ignore_the_daemon_step_they_inherit() -> None:
    """Real mpiexec, its ranks carrying the variables of a one-task SLURM step (as under an allocation, where
    the daemons run in one): every rank is itself, not task 0 of 1."""
    code = (
        "import json; from hpc.env import detect; e = detect(); print(json.dumps([e.launcher, e.rank, e.world_size]))"
    )
    step = {
        **DAEMON_STEP,
        "SLURM_PROCID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1",
    }
    p = mpiexec(2, sys.executable, "-c", code, env=step)
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(line) for line in p.stdout.splitlines() if line) == [["mpi", 0, 2], ["mpi", 1, 2]]


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, None),
        ({"PMI_RANK": "1", "PMI_SIZE": "3"}, None),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is outside"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ],
)
def test_mpi_and_bad_values(env: dict[str, str], fragment: str | None) -> None:
    if fragment is None:
        e = detect(env)
        assert e.launcher == "mpi" and e.rank == int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", "0")))
    else:
        with pytest.raises(LaunchEnvError, match=fragment):
            detect(env)


def test_task_share_defaults_from_the_array_and_yields_to_flags() -> None:
    array = {
        "SLURM_JOB_ID": "7",
        "SLURM_ARRAY_JOB_ID": "5",
        "SLURM_ARRAY_TASK_ID": "12",
        "SLURM_ARRAY_TASK_MIN": "10",
        "SLURM_ARRAY_TASK_MAX": "13",
        "SLURM_ARRAY_TASK_COUNT": "4",
    }
    assert detect(array).task_share() == (2, 4)
    assert detect(array).task_share(1, 3) == (1, 3)
    assert detect({}).task_share() == (0, 1)
    assert detect({}).task_share(None, 5) == (0, 5)
    with pytest.raises(LaunchEnvError, match="--task-id=4"):
        detect({}).task_share(4, 4)
    assert detect({}).task_share(0) == (0, 1)
    # Alone inside an array, --task-id would make every task "task i of 1", each taking the whole work.
    with pytest.raises(LaunchEnvError, match="--task-id=1 without --num-tasks inside a SLURM job array"):
        detect(array).task_share(1)


def array(task: int, tmin: int, tmax: int, count: int, step: int = 1) -> dict[str, str]:
    """An array task's variables, as SLURM 22.05 sets them (a list such as --array=2,5 has step 1)."""
    return {
        "SLURM_JOB_ID": str(1000 + task),
        "SLURM_ARRAY_JOB_ID": "1000",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(tmin),
        "SLURM_ARRAY_TASK_MAX": str(tmax),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "SLURM_ARRAY_TASK_STEP": str(step),
    }


def test_array_with_a_step_gives_consecutive_shares() -> None:
    # --array=3-9:2: ids 3, 5, 7, 9
    assert [detect(array(t, 3, 9, 4, 2)).task_share() for t in (3, 5, 7, 9)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # Without SLURM_ARRAY_TASK_COUNT the size follows from min, max and step.
    no_count = {k: v for k, v in array(7, 3, 9, 4, 2).items() if k != "SLURM_ARRAY_TASK_COUNT"}
    assert detect(no_count).task_share() == (2, 4)


@pytest.mark.parametrize(
    ("task", "tmin", "tmax", "count", "step"),
    [(2, 2, 5, 2, 1), (5, 2, 5, 2, 1), (0, 0, 9, 4, 1), (10, 0, 10, 4, 3)],  # --array=2,5 / 0,3,6,9 / 0-6:3,10
    ids=["2,5:2", "2,5:5", "0,3,6,9", "0-6:3,10"],
)
def test_array_given_as_a_list_needs_num_tasks(task: int, tmin: int, tmax: int, count: int, step: int) -> None:
    env = detect(array(task, tmin, tmax, count, step))
    with pytest.raises(LaunchEnvError, match=rf"SLURM_ARRAY_TASK_ID={task} .*--num-tasks"):
        env.task_share()
    # With --num-tasks the task id is SLURM_ARRAY_TASK_ID itself: any ids of 0..N-1 can be resubmitted.
    assert env.task_share(None, 11) == (task, 11)


def test_num_tasks_in_an_array_of_another_size_uses_the_absolute_task_id() -> None:
    env = detect(array(2, 0, 3, 4))  # --array=0-3 with --num-tasks 8: task 2 of 8, not 0 of 8
    assert env.task_share(None, 8) == (2, 8)
    assert env.task_share(5, 8) == (5, 8)  # an explicit --task-id wins
    assert detect(array(3, 1, 3, 3)).task_share(None, 4) == (3, 4)  # --array=1-3: the ids, not their positions
    with pytest.raises(LaunchEnvError, match=r"SLURM_ARRAY_TASK_ID=9 is not below --num-tasks=8"):
        detect(array(9, 0, 9, 10)).task_share(None, 8)
    with pytest.raises(LaunchEnvError, match=r"--num-tasks=0 must be >= 1"):
        env.task_share(None, 0)


def test_array_task_id_alone_asks_for_num_tasks() -> None:
    env = detect({"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"})
    with pytest.raises(LaunchEnvError, match=r"SLURM_ARRAY_TASK_ID=3 comes without the array's size.*--num-tasks"):
        env.task_share()
    assert env.task_share(None, 4) == (3, 4)


#: What SLURM 22.05 (tools/slurm-local) set for task 4 of `srun` in `sbatch -N2 -n5` (tasks 4,1 per node) and for
#: a task of `--array=3-9:3`, recorded from a real cluster: every number SLURM writes is a plain decimal integer,
#: only the per-node task lists are compressed.
SLURM_REAL = {
    "SLURM_JOB_ID": "70000",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "5",
    "SLURM_PROCID": "4",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "5",
    "SLURM_STEP_TASKS_PER_NODE": "4,1",
    "SLURM_TASKS_PER_NODE": "4,1",
    "SLURM_NTASKS_PER_NODE": "3",
    "SLURM_RESTART_COUNT": "0",
}
SLURM_REAL_ARRAY = {
    "SLURM_ARRAY_JOB_ID": "70002",
    "SLURM_ARRAY_TASK_COUNT": "3",
    "SLURM_ARRAY_TASK_ID": "6",
    "SLURM_ARRAY_TASK_MAX": "9",
    "SLURM_ARRAY_TASK_MIN": "3",
    "SLURM_ARRAY_TASK_STEP": "3",
    "SLURM_JOB_ID": "70004",
    "SLURM_JOB_NODELIST": "node1",
}


def test_values_as_slurm_writes_them_are_accepted() -> None:
    e = detect(SLURM_REAL)
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank) == ("slurm", 4, 5, 0, 1, 1)
    assert (e.master_addr, e.master_port, e.job_id) == ("node1", 20000 + 70000 % 20000, "70000")
    a = detect(SLURM_REAL_ARRAY)
    assert (a.job_id, a.array_task_step, a.task_share()) == ("70002", 3, (1, 3))
    # The job's --ntasks-per-node is one figure; a compressed list is read per node.
    step = {k: v for k, v in SLURM_REAL.items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    assert detect(step).local_world_size == 3
    assert detect({**step, "SLURM_NTASKS_PER_NODE": "4,1"}).local_world_size == 1
    assert detect({**step, "SLURM_NTASKS_PER_NODE": "1(x2)"}).local_world_size == 1
    with pytest.raises(LaunchEnvError, match=r"SLURM_NTASKS_PER_NODE='4,1,1' .*SLURM_NODEID=3 has no entry"):
        detect({**step, "SLURM_NTASKS_PER_NODE": "4,1,1", "SLURM_NODEID": "3"})


TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
OMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
PMI = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


@pytest.mark.parametrize(
    ("base", "name", "value", "fragment"),
    [
        # A prefix of digits was read as the number: 2x and 2.9 as 2, 0 as 1, any size taken as it came.
        (TORCHRUN, "WORLD_SIZE", "0", "WORLD_SIZE=0 is outside 1.."),
        (TORCHRUN, "WORLD_SIZE", "2x", "WORLD_SIZE='2x' is not an integer"),
        (TORCHRUN, "WORLD_SIZE", "2.9", "WORLD_SIZE='2.9' is not an integer"),
        (TORCHRUN, "WORLD_SIZE", "99999999999999999999999", "WORLD_SIZE=99999999999999999999999 is outside 1.."),
        (TORCHRUN, "WORLD_SIZE", "9" * 5000, r"WORLD_SIZE=99999999999999999999\.\.\.\(5000 digits\) is outside"),
        (TORCHRUN, "WORLD_SIZE", " 2", "WORLD_SIZE=' 2' is not an integer"),
        (TORCHRUN, "WORLD_SIZE", "\u0662", "WORLD_SIZE='\u0662' is not an integer"),  # an Arabic-Indic 2
        (TORCHRUN, "WORLD_SIZE", "", "WORLD_SIZE='' is not an integer"),
        (TORCHRUN, "RANK", "-1", "RANK='-1' is not an integer"),
        (TORCHRUN, "RANK", "1e0", "RANK='1e0' is not an integer"),
        (TORCHRUN, "LOCAL_RANK", "1.0", "LOCAL_RANK='1.0' is not an integer"),
        (TORCHRUN, "LOCAL_WORLD_SIZE", "0", "LOCAL_WORLD_SIZE=0 is outside 1.."),
        (TORCHRUN, "LOCAL_WORLD_SIZE", "4", "4 processes on this node exceed the world of WORLD_SIZE=2"),
        (TORCHRUN, "GROUP_RANK", "0x1", "GROUP_RANK='0x1' is not an integer"),
        (TORCHRUN, "MASTER_PORT", "99999", r"MASTER_PORT=99999 is outside 1..65535 \(a TCP port\)"),
        (TORCHRUN, "MASTER_PORT", "0", r"MASTER_PORT=0 is outside 1..65535"),
        (TORCHRUN, "MASTER_PORT", "29500 ", "MASTER_PORT='29500 ' is not an integer"),
        (OMPI, "OMPI_COMM_WORLD_SIZE", "2.0", "OMPI_COMM_WORLD_SIZE='2.0' is not an integer"),
        (OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE", "0", "OMPI_COMM_WORLD_LOCAL_SIZE=0 is outside 1.."),
        (PMI, "PMI_SIZE", "0", "PMI_SIZE=0 is outside 1.."),
        (PMI, "MPI_LOCALRANKID", "one", "MPI_LOCALRANKID='one' is not an integer"),
        (SLURM_REAL, "SLURM_NTASKS", "5 ", "SLURM_NTASKS='5 ' is not an integer"),
        (SLURM_REAL, "SLURM_PROCID", "4a", "SLURM_PROCID='4a' is not an integer"),
        (SLURM_REAL, "SLURM_NODEID", "-1", "SLURM_NODEID='-1' is not an integer"),
        (SLURM_REAL, "SLURM_STEP_TASKS_PER_NODE", "4,0", "SLURM_STEP_TASKS_PER_NODE='4,0'"),
        (SLURM_REAL, "SLURM_STEP_TASKS_PER_NODE", "4, 1", "SLURM_STEP_TASKS_PER_NODE='4, 1'"),
        (
            SLURM_REAL,
            "SLURM_STEP_TASKS_PER_NODE",
            "1(x9999999999)",
            r"SLURM_STEP_TASKS_PER_NODE='1\(x9999999999\)' lists",
        ),
        (SLURM_REAL, "SLURM_RESTART_COUNT", "1x", "SLURM_RESTART_COUNT='1x' is not an integer"),
        (SLURM_REAL, "SLURM_JOB_ID", "7000x", "SLURM_JOB_ID='7000x' is not an integer"),
        (SLURM_REAL, "SLURM_JOB_ID", "0", "SLURM_JOB_ID=0 is outside 1.."),
        (SLURM_REAL_ARRAY, "SLURM_ARRAY_TASK_STEP", "0", "SLURM_ARRAY_TASK_STEP=0 is outside 1.."),
        (SLURM_REAL_ARRAY, "SLURM_ARRAY_TASK_STEP", "3.5", "SLURM_ARRAY_TASK_STEP='3.5' is not an integer"),
        (SLURM_REAL_ARRAY, "SLURM_ARRAY_TASK_COUNT", "0", "SLURM_ARRAY_TASK_COUNT=0 is outside 1.."),
        (SLURM_REAL_ARRAY, "SLURM_ARRAY_TASK_ID", "6:", "SLURM_ARRAY_TASK_ID='6:' is not an integer"),
        (SLURM_REAL_ARRAY, "SLURM_ARRAY_TASK_MIN", "10", "SLURM_ARRAY_TASK_MIN=10 is above SLURM_ARRAY_TASK_MAX=9"),
        (SLURM_REAL_ARRAY, "SLURM_ARRAY_JOB_ID", "x", "SLURM_ARRAY_JOB_ID='x' is not an integer"),
    ],
)
def test_launcher_variables_are_whole_integers_in_range(
    base: dict[str, str], name: str, value: str, fragment: str
) -> None:
    detect(base)  # the layout itself is fine
    with pytest.raises(LaunchEnvError, match=fragment):
        detect({**base, name: value}).task_share()


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2x"}, "WORLD_SIZE='2x' is not an integer"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is outside 1..65535 (a TCP port)"),
        (
            {"SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_MAX": "3", "SLURM_ARRAY_TASK_STEP": "0"},
            "SLURM_ARRAY_TASK_STEP=0 is outside",
        ),
    ],
)  # fmt: skip
def test_a_bad_launcher_variable_is_a_one_line_usage_error(env: dict[str, str], message: str, tmp_path: Path) -> None:
    """The command exits 2 (a usage error) naming the variable, before it reads a section; the old reading ran
    extract with a partial share, or stopped with 'unexpected ValueError' (exit 1) at the process group."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "GROUP_RANK")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in launcher}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cytonet.cli",
            "extract",
            str(DEMO),
            "extract.sections_dir=/nonexistent",
            "--out",
            str(tmp_path),
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert (p.returncode, len(lines)) == (2, 1), p.stderr
    assert lines[0].startswith(f"cytonet: error: {message}"), p.stderr
