"""Training stages as real processes: single process, torchrun with 2 ranks, 2 simulated nodes; kill-and-resume
bitwise, preemption signals, non-finite loss, a dead rank, probe and scratch reports."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import run, tail, wait_all
from ringdata import training_data

from cytonet.config import load_config
from cytonet.train.checkpoint import latest_checkpoint, list_checkpoints
from cytonet.train.metrics import classification_metrics

pytestmark = pytest.mark.distributed
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ring sections of 3 brains and their patch store; returns the folder holding base.yaml."""
    root = tmp_path_factory.mktemp("train")
    training_data(
        root,
        extract={"patches_per_shard": 16},
        pretrain={"epochs": 3, "global_batch_size": 8, "checkpoint_every_steps": 1, "log_every_steps": 4},
        probe={"epochs": 2, "global_batch_size": 8},
        scratch={"epochs": 2, "global_batch_size": 8},
        dist={"timeout_s": 20.0},
    )
    return root


def cli(data: Path, command: str, out: Path, *overrides: str) -> list[str]:
    return [str(BIN / "cytonet"), command, str(data / "base.yaml"), *overrides, "--out", str(out)]


def torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), *args, "-m", "cytonet.cli"]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    path = latest_checkpoint(out)
    assert path is not None, f"no checkpoint in {out}"
    return torch.load(path, weights_only=True)["model"]  # type: ignore[no-any-return]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def wait_for_checkpoint(out: Path, proc: subprocess.Popen[str], min_step: int, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list_checkpoints(out)
        if found and int(found[-1].stem.split("-")[1]) >= min_step:
            return int(found[-1].stem.split("-")[1])
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before checkpoint {min_step}: {proc.stdout}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint >= {min_step} in {out} after {timeout} s")


@pytest.fixture(scope="module")
def reference(data: Path) -> dict[str, torch.Tensor]:
    """An uninterrupted single-process pretraining: 3 epochs of 8 steps."""
    out = data / "ref"
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    assert (out / "DONE").is_file() and (out / "encoder.pt").is_file()
    assert json.loads((out / "DONE").read_text())["step"] == 24
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), (
        "no TensorBoard events (tensorboard is a test extra)"
    )
    rows = (out / "train-log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,images_per_s" and [int(r.split(",")[0]) for r in rows[1:]] == list(
        range(1, 25)
    )
    return final_state(out)


def test_kill_at_random_step_and_resume_is_bitwise(data: Path, reference: dict[str, torch.Tensor]) -> None:
    out = data / "killed"
    kill_after = random.Random().randint(1, 20)
    proc = subprocess.Popen(cli(data, "pretrain", out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(out, proc, kill_after)  # type: ignore[arg-type]
    proc.kill()  # SIGKILL: no handler runs, possibly in the middle of a step or a checkpoint write
    proc.wait()
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    assert "resumed from" in r.stderr, f"killed after checkpoint {kill_after} but the rerun did not resume"
    assert_bitwise_equal(final_state(out), reference)


def test_signal_checkpoints_exits_for_requeue_and_resumes(data: Path, reference: dict[str, torch.Tensor]) -> None:
    out = data / "signalled"
    proc = subprocess.Popen(
        cli(data, "pretrain", out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(out, proc, 3)  # type: ignore[arg-type]
    proc.send_signal(signal.SIGUSR1)
    (err,) = wait_all([proc], 120)
    assert proc.returncode == 75, tail(err)
    assert "preempted at step" in err
    # Completing from the preemption checkpoint gives the uninterrupted weights.
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    assert_bitwise_equal(final_state(out), reference)


def test_torchrun_two_ranks_identical_weights(data: Path, reference: dict[str, torch.Tensor]) -> None:
    out = data / "ddp2"
    cmd = torchrun("--standalone", "--nproc_per_node=2") + [
        "pretrain",
        str(data / "base.yaml"),
        "dist.check_replicas=true",
        "--out",
        str(out),
    ]
    r = run(cmd, 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    assert "rank 0/2" in r.stderr
    # Synced BN and gathered negatives make 2 ranks x 4 samples train like 1 rank x 8 (up to float order).
    two = final_state(out)
    for k, v in reference.items():
        if v.is_floating_point():
            torch.testing.assert_close(two[k], v, rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_two_simulated_nodes(data: Path) -> None:
    out = data / "nodes2"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            torchrun(
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            )
            + [
                "pretrain",
                str(data / "base.yaml"),
                "pretrain.max_steps=6",
                "dist.check_replicas=true",
                "--out",
                str(out),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    errs = wait_all(procs, 300)
    assert [p.returncode for p in procs] == [0, 0], tail(errs[0]) + tail(errs[1])
    assert json.loads((out / "DONE").read_text())["step"] == 6


def test_signal_on_one_rank_stops_all_ranks_together(data: Path) -> None:
    out = data / "ddp-signal"
    cmd = torchrun("--standalone", "--nproc_per_node=2") + [
        "pretrain",
        str(data / "base.yaml"),
        "pretrain.epochs=50",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out, proc, 2)  # type: ignore[arg-type]
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children
    os.kill(int(children[1]), signal.SIGUSR1)  # one worker only: the ranks must agree before acting
    (err,) = wait_all([proc], 120)
    assert proc.returncode != 0
    assert "preempted at step" in err
    assert "exitcode  : 75" in err or "exit code 75" in err or "exitcode: 75" in err, tail(err)
    state = torch.load(latest_checkpoint(out), weights_only=True)  # type: ignore[arg-type]
    assert len(state["rng"]) == 2 and state["step"] >= 2


def test_non_finite_loss_stops_every_rank(data: Path) -> None:
    out = data / "nan"
    cmd = torchrun("--standalone", "--nproc_per_node=2") + [
        "pretrain",
        str(data / "base.yaml"),
        "optim.name=sgd",
        "optim.base_lr=1e30",
        "--out",
        str(out),
    ]
    r = run(cmd, 300, env=ENV)
    assert r.returncode != 0
    assert r.stderr.count("the loss is not finite at step") == 2, tail(r.stderr)


def test_dead_rank_fails_the_others_within_timeout(data: Path) -> None:
    out = data / "dead"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = cli(data, "pretrain", out, "pretrain.epochs=50", "dist.timeout_s=10")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    wait_for_checkpoint(out, procs[0], 2)  # type: ignore[arg-type]
    procs[1].kill()
    started = time.monotonic()
    (err,) = wait_all([procs[0]], 120)
    assert procs[0].returncode == 1, tail(err)
    assert time.monotonic() - started < 10 + 30
    assert "cytonet: error:" in err


def test_probe_and_scratch_write_reports(data: Path, reference: dict[str, torch.Tensor]) -> None:
    for stage in ("probe", "scratch"):
        out = data / stage
        extra = [f"probe.encoder_from={data / 'ref'}"] if stage == "probe" else []
        r = run(cli(data, stage, out, *extra), 300, env=ENV)
        assert r.returncode == 0, tail(r.stderr)
        for split in ("test", "unseen"):
            m = json.loads((out / f"metrics-{split}.json").read_text())
            assert set(m) == {"f1", "top1", "top3", "n"} and m["n"] > 0
            assert 0 <= m["top1"] <= m["top3"] <= 100
            assert (out / f"per-area-{split}.csv").read_text().count("\n") == 1 + 4
            assert (out / f"confusion-{split}.png").stat().st_size > 1000
    # The probe trained only the linear layer: its encoder equals the pretrained one.
    probe_encoder = torch.load(data / "probe" / "encoder.pt", weights_only=True)["encoder"]
    ref_encoder = torch.load(data / "ref" / "encoder.pt", weights_only=True)["encoder"]
    assert_bitwise_equal(probe_encoder, ref_encoder)
    # model.pt carries what inference needs, and loads into a working classifier.
    from cytonet.infer.run import load_classifier

    clf = load_classifier(data / "probe")
    assert clf.area_ids == [2, 3, 4, 5] and clf.area_names == ["big", "mid", "small", "tiny"]
    assert {s["split"] for s in clf.sections} == {"train", "test", "unseen"}
    assert_bitwise_equal(clf.encoder.state_dict(), ref_encoder)
    with torch.no_grad():
        assert clf.head(clf.encoder(torch.rand(2, 1, 121, 121))).shape == (2, 4)


def test_rerun_of_finished_stage_is_skipped_and_no_resume_refuses(
    data: Path, reference: dict[str, torch.Tensor]
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (data / "ref").iterdir()}
    r = run(cli(data, "pretrain", data / "ref"), 300, env=ENV)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (data / "ref").iterdir()} == before
    r = run(cli(data, "pretrain", data / "ref", "--no-resume"), 300, env=ENV)
    assert r.returncode == 1 and "holds checkpoint" in r.stderr
    # Another config (a different temperature) must not resume these checkpoints.
    r = run(cli(data, "pretrain", data / "ref", "loss.temperature=0.5"), 300, env=ENV)
    assert r.returncode == 1 and "another config" in r.stderr and "loss.temperature" in r.stderr


def test_classification_metrics_by_hand() -> None:
    scores = np.array([[0.9, 0.05, 0.05, 0.0], [0.1, 0.2, 0.7, 0.0], [0.3, 0.4, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    labels = np.array([0, 1, 1, 3])
    m = classification_metrics(scores, labels, 4)
    assert m["top1"] == pytest.approx(75.0)  # rows 0, 2, 3 right
    assert m["top3"] == pytest.approx(100.0)
    # weighted F1: class 0 f1=1 (w 1/4), class 1: p=1, r=1/2, f1=2/3 (w 2/4), class 3 f1=1 (w 1/4)
    assert m["f1"] == pytest.approx(100 * (0.25 + 0.5 * 2 / 3 + 0.25))


def test_checkpoint_of_another_format_or_kind_is_refused(tmp_path: Path) -> None:
    from cytonet.config import config_to_dict
    from cytonet.train.checkpoint import (
        FORMAT_VERSION,
        CheckpointError,
        config_fingerprint,
        load_checkpoint,
        save_checkpoint,
    )

    config = config_to_dict(load_config(None))
    state = {
        "format_version": FORMAT_VERSION,
        "kind": "pretrain",
        "step": 3,
        "config": config,
        "fingerprint": config_fingerprint(config),
    }
    path = save_checkpoint(tmp_path, state, 3, keep=2)
    assert load_checkpoint(path, kind="pretrain", config=config)["step"] == 3
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint, this run is 'probe'"):
        load_checkpoint(path, kind="probe", config=config)
    old = save_checkpoint(tmp_path, {**state, "format_version": FORMAT_VERSION + 1}, 4, keep=2)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}"):
        load_checkpoint(old, kind="pretrain", config=config)
    (tmp_path / "ckpt-000000005.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "ckpt-000000005.pt", kind="pretrain", config=config)
    # keep=2: only the two newest complete checkpoints remain after another save
    save_checkpoint(tmp_path, state, 6, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000005.pt", "ckpt-000000006.pt"]
