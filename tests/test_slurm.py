"""cytonet on a real SLURM cluster (slurmctld + two slurmd on this machine, tests/slurm_cluster.py): sbatch scripts
rendered from configs/sites/local.yaml, two-node srun + torchrun pretraining, a preemption by scancel that
checkpoints, requeues and ends with the weights of an uninterrupted run, the pipeline chained with afterok,
extraction and inference job arrays, hostile strings under sbatch, and submitit (submit, map_array, requeue).

The jobs are submitted together where they can share the two nodes, and each test waits for its own."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ringdata import make_sections
from slurm_cluster import LOCAL_PROFILE, job_state, queued, restarts, slurm_cluster, wait_for, wait_gone
from test_extract import assert_same_store
from test_infer import assert_same_outputs

from cytonet.config import load_config
from cytonet.data.extract import run_extract
from cytonet.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]
CYTONET = str(Path(sys.executable).with_name("cytonet"))
__all__ = ["slurm_cluster"]  # the fixture is used through the ones below

TINY = {
    "extract": {"patches_per_area": 16, "eval_patches_per_area": 4, "patches_per_shard": 16},
    "model": {"n_blocks": 2, "patch_size_px": 49},
    "loader": {"workers": 0, "samples_per_class": 2},
    "pretrain": {"epochs": 3, "max_steps": 12, "global_batch_size": 8, "checkpoint_every_steps": 1},
    "probe": {"epochs": 1, "max_steps": 4, "global_batch_size": 8},
    "dist": {"timeout_s": 60.0},
    "infer": {"stride_px": 8, "chunk_px": 8, "pyramid_levels": 2, "cleanup": "none"},
}


def write_config(path: Path, root: Path, sections: Path) -> Path:
    data: dict[str, Any] = json.loads(json.dumps(TINY))
    data["run"] = {"root_dir": str(root)}
    data["extract"]["sections_dir"] = str(sections)
    path.write_text(yaml.safe_dump(data))
    return path


def cytonet(*args: str, cwd: Path | None = None) -> str:
    r = subprocess.run([CYTONET, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, f"cytonet {shlex.join(args)}: {r.stderr[-3000:]}"
    return r.stdout


def sbatch(script: Path, cwd: Path) -> str:
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def encoder(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "encoder.pt", weights_only=True)["encoder"]  # type: ignore[no-any-return]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return int(found[-1].stem.split("-")[1]) if found else 0


def log_of(root: Path, job_id: str) -> str:
    """The job's log (``%x-%j.out``), or its array tasks' logs (``%x-%A_%a.out``) one after the other."""
    logs = sorted((root / "slurm").glob(f"*-{job_id}.out")) + sorted((root / "slurm").glob(f"*-{job_id}_*.out"))
    return "".join(p.read_text() for p in logs)


@pytest.fixture(scope="module")
def data(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ring sections, the tiny config (base.yaml) and its one-process patch store (the reference of the arrays)."""
    root = tmp_path_factory.mktemp("slurm")
    make_sections(root / "sections")
    write_config(root / "base.yaml", root, root / "sections")
    run_extract(load_config(root / "base.yaml"), root / "patches")
    return root


@pytest.fixture(scope="module")
def jobs(data: Path) -> dict[str, str]:
    """Submits at once: a pretraining that is preempted by `scancel --signal=USR1` once it has 3 checkpoints, and
    the pipeline pretrain (2 nodes, uninterrupted: the reference) -> probe -> infer array (3 tasks)."""
    script = data / "preempted.sbatch"
    cytonet(
        "slurm", "pretrain", str(data / "base.yaml"), f"pretrain.out_dir={data / 'preempted'}",
        "--profile", str(LOCAL_PROFILE), "--write", str(script),
    )  # fmt: skip
    preempted = sbatch(script, data)
    out = cytonet(
        "slurm", "pipeline", str(data / "base.yaml"), "--profile", str(LOCAL_PROFILE), "--stages",
        "pretrain,probe,infer", "--array", "3", cwd=data,
    )  # fmt: skip
    ids = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert sorted(ids) == ["infer", "pretrain", "probe"], out
    wait_for(lambda: newest_step(data / "preempted") >= 3 or not queued(preempted), "3 checkpoints of the run")
    assert newest_step(data / "preempted") >= 3, log_of(data, preempted)[-3000:]
    subprocess.run(["scancel", "--signal=USR1", preempted], check=True)  # to the job's steps: srun's tasks
    return {"preempted": preempted, **ids}


def test_two_node_srun_torchrun_pretraining(data: Path, jobs: dict[str, str]) -> None:
    wait_gone([jobs["pretrain"]])
    log = log_of(data, jobs["pretrain"])
    assert job_state(jobs["pretrain"]) == "COMPLETED", log[-3000:]
    # One torchrun per node, node ranks from SLURM, the rendezvous at the first node of the allocation.
    assert "node node1 (0 of 2): torchrun --nnodes=2 --node_rank=0 --master_addr=node1" in log, log[-3000:]
    assert "node node2 (1 of 2): torchrun --nnodes=2 --node_rank=1 --master_addr=node1" in log, log[-3000:]
    assert "rank 0/2" in log
    assert json.loads((data / "pretrain" / "DONE").read_text())["step"] == 12


def test_preemption_checkpoints_requeues_and_ends_with_uninterrupted_weights(data: Path, jobs: dict[str, str]) -> None:
    wait_gone([jobs["preempted"], jobs["pretrain"]])
    log = log_of(data, jobs["preempted"])
    assert job_state(jobs["preempted"]) == "COMPLETED", log[-3000:]
    assert restarts(jobs["preempted"]) == 1, log[-3000:]
    assert "received SIGUSR1: passing it to workers" in log
    assert log.count("exiting with 75 for requeue") == 2, log[-3000:]  # both ranks, at the same step
    # slurmstepd's "DUE TO JOB REQUEUE" line appears only when the requeue overtakes the batch script's exit
    # (a race); hpc.requeue's own line and sacct's restart count above say the same without one.
    assert f"exit status 75: requeueing job {jobs['preempted']}" in log and "resumed from ckpt-" in log, log[-3000:]
    assert_bitwise_equal(encoder(data / "preempted"), encoder(data / "pretrain"))


def test_pipeline_runs_probe_after_pretrain(data: Path, jobs: dict[str, str]) -> None:
    wait_gone([jobs["probe"]])
    assert job_state(jobs["probe"]) == "COMPLETED", log_of(data, jobs["probe"])[-3000:]
    r = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,Start,End", "-j", f"{jobs['pretrain']},{jobs['probe']}"],
        capture_output=True,
        text=True,
        check=True,
    )
    times = {line.split("|")[0]: line.split("|")[1:] for line in r.stdout.split()}
    assert times[jobs["probe"]][0] >= times[jobs["pretrain"]][1], times  # afterok: started after the end
    assert (data / "probe" / "model.pt").is_file()


def test_inference_array_covers_every_block_once_and_equals_one_process(data: Path, jobs: dict[str, str]) -> None:
    wait_gone([jobs["infer"]])
    r = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", jobs["infer"]], capture_output=True, text=True
    )
    states = dict(line.split("|") for line in r.stdout.split())
    assert states == {f"{jobs['infer']}_{t}": "COMPLETED" for t in range(3)}, (states, log_of(data, jobs["infer"]))
    out = data / "infer"
    written: dict[str, list[int]] = {}
    for marker in (out / ".cytonet").glob("*/blocks/*.json"):
        written.setdefault(f"{marker.parent.parent.name}/{marker.stem}", []).append(
            json.loads(marker.read_text())["worker"]
        )
    assert written and all(len(w) == 1 for w in written.values())
    assert {w[0] for w in written.values()} == {0, 1, 2}  # every task of the array wrote blocks
    single = data / "infer-single"
    cytonet("infer", str(data / "base.yaml"), "--out", str(single), cwd=data)
    assert len(list((single / ".cytonet").glob("*/blocks/*.json"))) == len(written)
    assert_same_outputs(single, out)


def test_failed_stage_cancels_the_rest_and_hostile_strings_stay_literal(data: Path, tmp_path: Path) -> None:
    """A pipeline whose config lives at a hostile path, with hostile overrides: pretrain fails (no patch store),
    probe is cancelled (afterok, --kill-on-invalid-dep); nothing in the strings was executed by any shell."""
    folder = tmp_path / "x'$(touch PWNED_path)'"
    folder.mkdir()
    config = write_config(folder / "cfg.yaml", tmp_path / "run", data / "sections")
    hostile = ["importer.image=a;touch PWNED_semicolon", "importer.labels=$(touch PWNED_subst)`touch PWNED_tick`"]
    out = cytonet(
        "slurm", "pipeline", str(config), *hostile, f"extract.out_dir={tmp_path / 'no-store'}",
        "--profile", str(LOCAL_PROFILE), "--stages", "pretrain,probe", cwd=tmp_path,
    )  # fmt: skip
    ids = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    wait_gone(list(ids.values()))
    assert job_state(ids["pretrain"]) == "FAILED"
    assert job_state(ids["probe"]) == "CANCELLED"
    log = log_of(tmp_path / "run", ids["pretrain"])
    assert shlex.join(["pretrain", str(config), *hostile]) in log, log[-2000:]
    assert not list(tmp_path.rglob("PWNED*")) and not list(data.rglob("PWNED*"))


def test_a_refused_submission_cancels_the_stages_before_it_and_keeps_the_scripts(data: Path, tmp_path: Path) -> None:
    """sbatch refuses the infer array (more memory than a node has): the pipeline's pretrain and probe, already
    queued, are cancelled rather than left to run, and the scripts of an earlier submission stay as they were
    (`sbatch --array=2,5 <run>/slurm/infer.sbatch` resubmits failed tasks with them). sbatch is a site's
    wrapper here, which prints a notice before the job id: the ids are still found, and cancelled."""
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "site notice: maintenance on Friday"\nexec {shutil.which("sbatch")} "$@"\n')
    wrapper.chmod(0o755)
    profile = tmp_path / "big.yaml"
    profile.write_text(LOCAL_PROFILE.read_text() + "array_mem: 900G\n")
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data / "sections")
    old = {
        k: f"#!/bin/bash\n# cytonet {k}: the script of an earlier submission\n" for k in ("pretrain", "probe", "infer")
    }
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    for kind, text in old.items():
        (tmp_path / "run" / "slurm" / f"{kind}.sbatch").write_text(text)
    r = subprocess.run(
        [CYTONET, "slurm", "pipeline", str(config), "--profile", str(profile), "--stages", "pretrain,probe,infer"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == "", r.stderr
    message = r.stderr.strip().splitlines()[-1]  # the error is one line
    assert message.startswith("cytonet: error: `sbatch") and "cancelled the jobs submitted" in message
    ids = re.findall(r"(pretrain|probe) (\d+)", message.split("cancelled", 1)[1])
    assert [kind for kind, _ in ids] == ["pretrain", "probe"], message
    wait_gone([job for _, job in ids])
    assert [job_state(job) for _, job in ids] == ["CANCELLED", "CANCELLED"]
    for kind, text in old.items():
        assert (tmp_path / "run" / "slurm" / f"{kind}.sbatch").read_text() == text


def test_extraction_array_equals_one_process(data: Path, tmp_path: Path) -> None:
    """Also: the script runs where it was rendered, so a relative run.root_dir (as the shipped configs have) names
    the same run when the script is submitted from another folder (a failed task resubmitted from elsewhere)."""
    config = write_config(tmp_path / "array.yaml", Path("run"), data / "sections")
    script = tmp_path / "extract.sbatch"
    cytonet(
        "slurm", "extract", str(config), "--profile", str(LOCAL_PROFILE), "--array", "3", "--write", str(script),
        cwd=tmp_path,
    )  # fmt: skip
    job = sbatch(script, data)
    wait_gone([job])
    assert_same_store(tmp_path / "run" / "patches", data / "patches")
    # The profile's array_parallelism (2) is the %2 of the array: never more than 2 tasks ran at once.
    r = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Start,End", "-j", job],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("|") for line in r.stdout.split()]
    assert sorted(row[:2] for row in rows) == [[f"{job}_{t}", "COMPLETED"] for t in range(3)], rows
    events = sorted([(row[2], 1) for row in rows] + [(row[3], -1) for row in rows])  # an end sorts before a start
    running = [sum(change for _, change in events[: i + 1]) for i in range(len(events))]
    assert max(running) <= 2, rows


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_finishes(data: Path, tmp_path: Path) -> None:
    """The real time-limit path: --time=3 with --signal=USR1@100 (slurmctld checks every ~30 s: the signal comes
    roughly 60-100 s into the run); the run checkpoints, is requeued, resumes and finishes within the next
    allocations, with the weights of a run without a time limit. 240 steps (about 2 min on an idle 2-core
    machine): 90 steps were done before the signal came once the machine was idle, and the test failed."""
    profile = tmp_path / "short.yaml"
    site = yaml.safe_load(LOCAL_PROFILE.read_text())
    site["time"]["pretrain"] = "3"
    site["signal_lead_s"] = 100
    profile.write_text(yaml.safe_dump(site))
    common = [
        str(data / "base.yaml"),
        "pretrain.epochs=40",
        "pretrain.max_steps=240",
        "pretrain.checkpoint_every_steps=10",
    ]
    ids = {}
    for name, site_file in (("limited", profile), ("unlimited", LOCAL_PROFILE)):
        script = tmp_path / f"{name}.sbatch"
        cytonet("slurm", "pretrain", *common, f"pretrain.out_dir={tmp_path / name}", "--profile", str(site_file),
                "--write", str(script))  # fmt: skip
        ids[name] = sbatch(script, tmp_path)
    wait_gone(list(ids.values()), timeout=900)
    log = log_of(data, ids["limited"])
    assert job_state(ids["limited"]) == "COMPLETED", log[-3000:]
    assert restarts(ids["limited"]) >= 1 and "received SIGUSR1" in log, log[-3000:]
    assert_bitwise_equal(encoder(tmp_path / "limited"), encoder(tmp_path / "unlimited"))


STAND_IN_PYTHON = """#!{python}
# The interpreter of a rendered training script: hpc.requeue runs for real; in place of hpc.torchrun, a task that
# waits for USR1 or TERM, "checkpoints" for 1 s and exits 75 (no signal within 120 s: exit 0).
import os, signal, sys, time
if sys.argv[1:3] == ["-m", "hpc.requeue"]:
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name))
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
open(os.path.join({ready!r}, "ready-" + restart), "w").close()
end = time.monotonic() + 120
while not got and time.monotonic() < end:
    time.sleep(0.05)
if got:
    print(f"task got {{got[0]}} (restart {{restart}}): checkpoint, exit 75", flush=True)
    time.sleep(1)
    sys.exit(75)
"""


def test_usr1_to_the_batch_shell_requeues_and_a_plain_scancel_cancels(slurm_cluster: str, tmp_path: Path) -> None:
    """The rendered training script with a stand-in task on the real cluster. `scancel -b --signal=USR1` (what
    `--signal=B:USR1@N` does) reaches hpc.requeue, which the batch shell exec'd (bash itself would die of it),
    and srun passes it to the task: checkpoint, 75, requeued. Then a plain `scancel`: the task gets TERM and
    still exits 75 within KillWait, but a cancelled job stays cancelled (`scontrol requeue` would accept it)."""
    ready = tmp_path / "ready"
    ready.mkdir()
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable, ready=str(ready)))
    python.chmod(0o755)
    site = yaml.safe_load(LOCAL_PROFILE.read_text())
    site["python"] = str(python)
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump(site))
    config = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "sections")
    script = tmp_path / "probe.sbatch"
    cytonet("slurm", "probe", str(config), "--profile", str(profile), "--write", str(script))
    job = sbatch(script, tmp_path)
    try:
        wait_for(lambda: (ready / "ready-0").exists() or not queued(job), "the task of the first run", 120)
        subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True)  # the batch shell only
        wait_for(lambda: (ready / "ready-1").exists() or not queued(job), "the task of the requeued run", 120)
        log = log_of(tmp_path, job)
        assert (ready / "ready-1").exists(), log[-3000:]
        assert "task got SIGUSR1 (restart 0)" in log and f"requeueing job {job}" in log, log[-3000:]
        subprocess.run(["scancel", job], check=True)
        wait_gone([job], 120)
    finally:
        subprocess.run(["scancel", job], check=False)
    log = log_of(tmp_path, job)
    assert job_state(job) == "CANCELLED", log[-3000:]
    assert restarts(job) == 1, log[-3000:]
    assert "received SIGTERM: the job is ending" in log, log[-3000:]


# ---------------------------------------------------------------------------------------------------------
# submitit


def test_submitit_submit_result_and_requeue(data: Path, jobs: dict[str, str]) -> None:
    """Two submitit pretrainings on 2 nodes: one runs through (`cytonet submit --wait`), the other is preempted
    (USR2 to every task, as SLURM sends it ahead of the time limit), checkpoints, is requeued and resumes.
    Both end with the weights of the sbatch + torchrun run."""
    from hpc.site import load_profile
    from hpc.submit import submit

    profile = load_profile(LOCAL_PROFILE)
    [job] = submit("pretrain", data / "base.yaml", [f"pretrain.out_dir={data / 'sub-preempted'}"], profile)
    plain = subprocess.Popen(
        [CYTONET, "submit", "pretrain", str(data / "base.yaml"), f"pretrain.out_dir={data / 'sub-plain'}",
         "--profile", str(LOCAL_PROFILE), "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: newest_step(data / "sub-preempted") >= 3 or not queued(job.job_id), "3 checkpoints of the run")
    assert newest_step(data / "sub-preempted") >= 3, job.stderr()
    # What job._interrupt(timeout=True) does; plain _interrupt() also sends TERM, racing with the requeue.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    out, err = plain.communicate(timeout=300)
    assert plain.returncode == 0, err[-3000:]
    assert out.strip().isdigit()
    job.results()  # raises if a task failed
    assert restarts(job.job_id) == 1
    assert "preempted: asking cytonet" in job.stderr()  # type: ignore[operator]
    wait_gone([jobs["pretrain"]])
    reference = encoder(data / "pretrain")
    assert_bitwise_equal(encoder(data / "sub-plain"), reference)
    assert_bitwise_equal(encoder(data / "sub-preempted"), reference)


def test_submitit_map_array_extraction_equals_one_process(data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "array.yaml", tmp_path, data / "sections")
    out = cytonet("submit", "extract", str(config), "--profile", str(LOCAL_PROFILE), "--array", "2", "--wait")
    assert len(out.split()) == 2  # one submitit job per array task
    assert_same_store(tmp_path / "patches", data / "patches")


def test_submitit_local_executor_runs_the_same_job(tmp_path: Path) -> None:
    """`--local`: submitit's local executor, no SLURM involved (runs wherever submitit is installed)."""
    make_sections(tmp_path / "sections")
    config = write_config(tmp_path / "local.yaml", tmp_path, tmp_path / "sections")
    run_extract(load_config(config), tmp_path / "patches")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        [CYTONET, "submit", "pretrain", str(config), "pretrain.max_steps=3", "--profile", str(LOCAL_PROFILE),
         "--local", "--wait"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "pretrain" / "DONE").read_text())["step"] == 3
