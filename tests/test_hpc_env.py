"""Launcher detection: torchrun, SLURM (srun steps, arrays, requeues), Open MPI and MPICH -> one LaunchEnv."""

from __future__ import annotations

import pytest

from hpc.env import LaunchEnvError, detect, expand_nodelist


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
