"""Training stages as real processes: single process, torchrun with 2 ranks, 2 simulated nodes; kill-and-resume
bitwise, preemption signals, non-finite loss, a dead rank, probe and scratch reports."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from procs import run, tail, wait_all
from ringdata import training_data

from cytonet.config import load_config
from cytonet.data.patches import file_sha256
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
    # The steps between the last checkpoint and the kill ran twice; the log has each step once.
    rows = (out / "train-log.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in rows[1:]] == list(range(1, 25))


def test_kill_with_loader_workers_then_an_immediate_rerun_resumes(
    data: Path, reference: dict[str, torch.Tensor]
) -> None:
    """The loader's worker processes die with the trainer: a forked worker inherits the run folder's lock, and
    torch's workers used to notice their parent's death only seconds later, so a rerun right after a kill -9
    (an OOM kill, a node's cleanup) was refused as a concurrent run."""
    out = data / "killed-workers"
    workers = "loader.workers=2"
    proc = subprocess.Popen(cli(data, "pretrain", out, workers), env=ENV, stdout=subprocess.DEVNULL, text=True)
    wait_for_checkpoint(out, proc, 2)  # type: ignore[arg-type]
    proc.kill()
    proc.wait()
    r = run(cli(data, "pretrain", out, workers), 300, env=ENV)
    assert r.returncode == 0 and "resumed from" in r.stderr, tail(r.stderr)
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
    # A resume under other settings is refused and leaves the run's record of its settings as it was.
    recorded = (out / "config.resolved.yaml").read_bytes()
    r = run(cli(data, "pretrain", out, "optim.base_lr=0.5"), 300, env=ENV)
    assert r.returncode == 1 and "optim.base_lr" in r.stderr, tail(r.stderr)
    assert (out / "config.resolved.yaml").read_bytes() == recorded
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


def test_resuming_with_another_number_of_ranks_is_refused(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "ref"
    out.mkdir()
    last = latest_checkpoint(data / "ref")
    assert last is not None
    shutil.copy(last, out / last.name)  # a single-process run's checkpoint, not finished
    cmd = torchrun("--standalone", "--nproc_per_node=2") + ["pretrain", str(data / "base.yaml"), "--out", str(out)]
    r = run(cmd, 300, env=ENV)
    assert r.returncode != 0
    assert r.stderr.count("was written by 1 rank, this run has 2") == 2, tail(r.stderr)


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
    # Settings that do not change the weights may differ: logging, checkpoint cadence, loader workers, and the
    # sections of later steps (inference, analysis) in a config shared by the whole pipeline.
    neutral = ["pretrain.log_every_steps=3", "pretrain.checkpoint_every_steps=7", "loader.prefetch_factor=2"]
    r = run(cli(data, "pretrain", data / "ref", *neutral, "infer.stride_px=4", "analysis.n_clusters=3"), 300, env=ENV)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr, tail(r.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in (data / "ref").iterdir()} == before
    r = run(cli(data, "pretrain", data / "ref", "--no-resume"), 300, env=ENV)
    assert r.returncode == 1 and "holds checkpoint" in r.stderr
    # Another temperature changes the weights: the finished run is not taken for it.
    r = run(cli(data, "pretrain", data / "ref", "loss.temperature=0.5"), 300, env=ENV)
    assert r.returncode == 1 and "other settings" in r.stderr and "loss.temperature" in r.stderr, tail(r.stderr)


def test_finished_stage_without_its_checkpoints_is_not_trained_again(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Deleting a finished run's large checkpoints is common; DONE alone must keep the run finished.
    out = tmp_path / "ref"
    shutil.copytree(data / "ref", out)
    for p in list_checkpoints(out):
        p.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr, tail(r.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    r = run(cli(data, "pretrain", out, "optim.base_lr=0.5"), 300, env=ENV)
    assert r.returncode == 1 and "other settings" in r.stderr and "optim.base_lr" in r.stderr, tail(r.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # An --overwrite refused for its inputs (a mistyped patch store) deletes nothing of the finished run.
    r = run(cli(data, "pretrain", out, f"extract.out_dir={tmp_path / 'patchez'}", "--overwrite"), 300, env=ENV)
    assert r.returncode != 0 and "patchez" in r.stderr, tail(r.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_preemption_signal_outside_the_steps_is_not_fatal(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 while a stage sets up makes it checkpoint and stop for requeue at the first step boundary; after its
    last step, before the next evaluation, and the requeued run evaluates without a step. (The handlers used to
    cover the steps only: the signal's default action killed the process.) In process, with the signal sent at
    those points."""
    import cytonet.train.loop as loop
    from cytonet.distributed import DistEnv
    from cytonet.train.preempt import Preempted

    def signal_first(fn: Any) -> Any:
        def signalled(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGUSR1)
            return fn(*args, **kwargs)

        return signalled

    with monkeypatch.context() as mp:
        mp.setattr(loop, "build_loader", signal_first(loop.build_loader))  # while it sets up
        with pytest.raises(Preempted):
            loop.run_stage(load_config(data / "base.yaml"), DistEnv(), "pretrain", out=tmp_path / "pre")
    assert latest_checkpoint(tmp_path / "pre") is not None and not (tmp_path / "pre" / "DONE").exists()
    cfg = load_config(data / "base.yaml", [f"probe.encoder_from={data / 'ref'}"])
    with monkeypatch.context() as mp:
        mp.setattr(loop, "predict", signal_first(loop.predict))  # the evaluation after the last step
        with pytest.raises(Preempted) as info:
            loop.run_stage(cfg, DistEnv(), "probe", out=tmp_path / "probe")
    final = latest_checkpoint(tmp_path / "probe")
    assert final is not None and info.value.step == int(final.stem.split("-")[1]) > 0
    assert not (tmp_path / "probe" / "DONE").exists()
    loop.run_stage(cfg, DistEnv(), "probe", out=tmp_path / "probe")  # the requeued run: evaluation only
    assert (tmp_path / "probe" / "DONE").is_file() and latest_checkpoint(tmp_path / "probe") == final


def test_a_finished_run_missing_its_results_writes_them_again_from_its_last_checkpoint(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """DONE without encoder.pt (a partial copy of the folder) used to count as finished, so nothing could use the
    run short of retraining it: the last checkpoint gives the results again, without a step of training."""
    out = tmp_path / "ref"
    shutil.copytree(data / "ref", out)
    expected = torch.load(out / "encoder.pt", weights_only=True)["encoder"]
    (out / "encoder.pt").unlink()
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0 and "finished run without its encoder.pt: writing them again" in r.stderr, tail(r.stderr)
    assert_bitwise_equal(torch.load(out / "encoder.pt", weights_only=True)["encoder"], expected)
    assert "pretrain step" not in r.stderr and "resumed from ckpt-000000024" in r.stderr  # no training step
    # Without a checkpoint to write them from, it says so; a probe of the missing encoder names the file.
    (out / "encoder.pt").unlink()
    for p in list_checkpoints(out):
        p.unlink()
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 1 and "without its encoder.pt, and no checkpoint" in r.stderr, tail(r.stderr)
    r = run(cli(data, "probe", tmp_path / "probe", f"probe.encoder_from={out}"), 300, env=ENV)
    assert r.returncode == 1 and f"{out / 'encoder.pt'} does not exist" in r.stderr, tail(r.stderr)


def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Checkpoints are written atomically, so a damaged one was damaged since (a disk error, a copy cut short): the
    run resumes from the one before it, with a warning, and ends with the uninterrupted weights. It used to fail
    with an empty "EOFError:" (or a bare KeyError for junk) and no way forward but --overwrite."""
    out = tmp_path / "run"
    out.mkdir()
    older, newest = list_checkpoints(data / "ref")[-2:]  # keep_checkpoints=2: the last two
    shutil.copy(older, out)
    (out / newest.name).write_bytes(b"")
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    assert f"{newest.name} cannot be read (an empty file)" in r.stderr, tail(r.stderr)
    assert f"resumed from {older.name}" in r.stderr
    assert_bitwise_equal(final_state(out), reference)
    # Set aside, the damaged file no longer counts among the newest kept (it got the new ones pruned).
    assert (out / (newest.name + ".damaged")).read_bytes() == b""
    assert [p.name for p in list_checkpoints(out)] == [older.name, newest.name]
    # A finished run reads no checkpoint: damaged ones do not stop its rerun from being skipped.
    for p in list_checkpoints(out):
        p.write_bytes(b"")
    r = run(cli(data, "pretrain", out), 300, env=ENV)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr, tail(r.stderr)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / newest.name).write_bytes(b"junk" * 100)
    r = run(cli(data, "pretrain", alone), 300, env=ENV)
    assert r.returncode == 1 and "no checkpoint in" in r.stderr and "pass --overwrite" in r.stderr, tail(r.stderr)


def test_probe_refuses_an_encoder_of_another_store_and_a_replaced_encoder(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    from cytonet.data.extract import run_extract

    # The same sections extracted with another seed: other patches, and an encoder pretrained on the first store
    # may have seen the second one's test patches.
    other = tmp_path / "patches"
    run_extract(load_config(data / "base.yaml", ["extract.seed=5"]), other)
    enc = tmp_path / "enc"
    shutil.copytree(data / "ref", enc)
    r = run(cli(data, "probe", tmp_path / "p1", f"probe.encoder_from={enc}", f"extract.out_dir={other}"), 300, env=ENV)
    assert r.returncode == 1 and "trained on another patch store" in r.stderr, tail(r.stderr)
    # A finished probe belongs to its encoder: a pretraining redone since then must not pass for it.
    r = run(cli(data, "probe", tmp_path / "p2", f"probe.encoder_from={enc}"), 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    state = torch.load(enc / "encoder.pt", weights_only=True)
    next(iter(state["encoder"].values())).add_(1.0)
    torch.save(state, enc / "encoder.pt")
    r = run(cli(data, "probe", tmp_path / "p2", f"probe.encoder_from={enc}"), 300, env=ENV)
    assert r.returncode == 1 and "other settings (encoder:" in r.stderr, tail(r.stderr)


def test_a_folder_that_is_not_this_stages_run_is_refused_and_kept(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Training writes only into its own run folder: a folder of files of the same names but no run, a patch
    store, another stage's run (also with --overwrite, which used to delete a pretraining's encoder before the
    probe found it missing) and the folder of the encoder a stage starts from are refused, unchanged."""

    def snapshot(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "encoder.pt").write_text("a colleague's encoder")
    (mine / "train-log.csv").write_text("my notes")
    pretrain_run = tmp_path / "pretrain"
    shutil.copytree(data / "ref", pretrain_run)
    cases = [
        (mine, ["pretrain"], "holds encoder.pt and 1 more but no cytonet pretrain run (no config, checkpoint or DONE)"),
        (data / "patches", ["pretrain"], "is not written by training"),
        (pretrain_run, ["probe", f"probe.encoder_from={data / 'ref'}"], "holds a pretrain run"),
        (pretrain_run, ["probe", f"probe.encoder_from={data / 'ref'}", "--overwrite"], "holds a pretrain run"),
        (pretrain_run, ["probe", f"probe.encoder_from={pretrain_run}"], "is the folder of the encoder it starts"),
        (pretrain_run, ["scratch", f"scratch.init_from={pretrain_run}", "--overwrite"], "(scratch.init_from)"),
    ]
    for folder, (command, *extra), message in cases:
        before = snapshot(folder)
        r = run(cli(data, command, folder, *extra), 300, env=ENV)
        assert r.returncode == 1 and message in r.stderr, (command, extra, tail(r.stderr))
        assert snapshot(folder) == before, (command, extra)
    # What a run killed (or stopped by a full disk) before its first file leaves: the lock and a temp file.
    from cytonet.data.patches import STEP_LOCK
    from cytonet.train.loop import check_run_folder, training_identity

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / STEP_LOCK).touch()
    (stub / "config.resolved.yaml.tmp").write_text("cut short")
    check_run_folder(load_config(data / "base.yaml"), "pretrain", stub)
    # loss.scale_mm is the siamese task's alone: the identities of other pretrainings, and so the runs made
    # before it existed, do not hold it.
    from cytonet.data.patches import PatchStore

    store = PatchStore(data / "patches")
    assert "loss.scale_mm" not in training_identity(load_config(data / "base.yaml"), "pretrain", store)
    siamese = load_config(data / "base.yaml", ["loss.kind=siamese"])
    assert training_identity(siamese, "pretrain", store)["loss.scale_mm"] == 10.0


def test_a_second_run_into_a_folder_being_trained_is_refused(data: Path, tmp_path: Path) -> None:
    """Two launches into one run folder at once (other settings, or the same job twice) used to both train
    there and both report success, one result lost: the folder's lock, held by the running stage's rank 0,
    refuses the second. The lock goes with the process, so a later run (a requeue) takes it."""
    from cytonet.data.patches import STEP_LOCK, exclusive_lock

    out = tmp_path / "busy"
    with exclusive_lock(out / STEP_LOCK, blocking=False):  # as a running stage holds it
        r = run(cli(data, "pretrain", out, "pretrain.max_steps=1"), 300, env=ENV)
    assert r.returncode == 1 and "is being trained by another process right now" in r.stderr, tail(r.stderr)
    assert sorted(p.name for p in out.iterdir()) == [STEP_LOCK]  # nothing written
    r = run(cli(data, "pretrain", out, "pretrain.max_steps=1"), 300, env=ENV)
    assert r.returncode == 0 and (out / "DONE").is_file(), tail(r.stderr)


def test_the_store_a_run_reads_is_not_replaced_under_it(data: Path, tmp_path: Path) -> None:
    """extract --overwrite of the patch store a training run is reading is refused while it runs: the run read the
    labels at its start and would pair them with the new store's pixels (it used to finish with exit 0, its DONE
    naming the old store). The store is read under a shared lock, which the rewrite needs exclusively."""
    store = tmp_path / "patches"
    shutil.copytree(data / "patches", store)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli(data, "pretrain", out, f"extract.out_dir={store}", "pretrain.epochs=50"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_checkpoint(out, proc, 1)  # type: ignore[arg-type]
        manifest = (store / "manifest.json").read_bytes()
        r = run([str(BIN / "cytonet"), "extract", str(data / "base.yaml"), "--out", str(store), "--overwrite"], 300)
        assert r.returncode == 1 and "is being read by a training run or an analysis right now" in r.stderr, tail(
            r.stderr
        )
        assert (store / "manifest.json").read_bytes() == manifest and any(store.glob("shard-*"))
    finally:
        proc.kill()
        proc.wait()


def test_a_missing_shard_fails_in_one_line_through_the_loader_workers(data: Path, tmp_path: Path) -> None:
    """An error in a DataLoader worker comes back wrapped in the worker's traceback ("Original Traceback ...");
    the CLI prints its message alone, naming the shard."""
    shutil.copytree(data / "patches", tmp_path / "patches")
    shard = sorted((tmp_path / "patches").glob("shard-*"))[0]
    shard.unlink()
    r = run(cli(data, "pretrain", tmp_path / "p", f"extract.out_dir={tmp_path / 'patches'}", "loader.workers=1"), 300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("cytonet: error:")]
    assert r.returncode == 1 and len(errors) == 1, tail(r.stderr)
    assert (
        f"shard {shard} does not exist" in errors[0]
        and "Original Traceback" not in r.stderr.split("cytonet: error:")[-1]
    )


def test_a_checkpoint_that_cannot_be_written_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports a short write (a full disk, a quota) as '[enforce fail ...] unexpected pos': the error
    names the file and the free space, and no temporary file is left."""
    from cytonet.errors import CytonetError
    from cytonet.train import checkpoint

    def full(obj: object, fh: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 426880 vs 426768")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CytonetError, match=r"writing .*ckpt-000000003\.pt failed \(\[enforce .*\); \d+ MiB are free"):
        checkpoint.save_checkpoint(tmp_path, {"step": 3}, 3, keep=2)
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_on_a_read_only_mount_is_skipped(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Rerunning a finished stage whose folder is on a read-only mount skips it: the folder lock, which it
    cannot create there, guards nothing on a folder nobody can write. Needs root for the bind mount."""
    from procs import read_only_view

    finished = tmp_path / "finished"
    shutil.copytree(data / "ref", finished)
    (finished / ".cytonet-step.lock").unlink(missing_ok=True)
    with read_only_view(finished, tmp_path / "ro") as ro:
        r = run(cli(data, "pretrain", ro), 300, env=ENV)
        assert r.returncode == 0 and "already holds a finished run" in r.stderr, tail(r.stderr)


def test_distance_loss_refuses_patches_without_coordinates(data: Path, tmp_path: Path) -> None:
    from cytonet.data.patches import PatchStore
    from cytonet.errors import CytonetError
    from cytonet.train.loop import _check_coordinates

    shutil.copytree(data / "patches", tmp_path / "patches")
    _check_coordinates(PatchStore(tmp_path / "patches"), "distance")  # ring sections all have coordinates
    meta = np.load(tmp_path / "patches" / "metadata.npy")
    meta["coords"][meta["split"] == 0] = np.nan  # as extract stores them for sections without a coordinate map
    np.save(tmp_path / "patches" / "metadata.npy", meta)
    with pytest.raises(CytonetError, match=r"loss.kind=distance needs 3D coordinates, but \d+ training patches"):
        _check_coordinates(PatchStore(tmp_path / "patches"), "distance")
    r = run(
        cli(data, "pretrain", tmp_path / "s", "loss.kind=siamese", f"extract.out_dir={tmp_path / 'patches'}"),
        300,
        env=ENV,
    )
    assert r.returncode == 1 and "loss.kind=siamese needs 3D coordinates" in r.stderr, tail(r.stderr)
    # A run refused as it set up leaves no folder holding its lock file alone (nor does --resume of no run).
    assert not (tmp_path / "s").exists()
    r = run([*cli(data, "pretrain", tmp_path / "r"), "--resume"], 300, env=ENV)
    assert r.returncode == 1 and "no checkpoint" in r.stderr and not (tmp_path / "r").exists(), tail(r.stderr)


def test_distance_baseline_siamese_pretraining_then_scratch_from_its_encoder(data: Path, tmp_path: Path) -> None:
    """Seed 002's ``distance`` model: the siamese distance task pretrains the encoder under torchrun (2 ranks,
    identical weights), and scratch.init_from starts the end-to-end training from it: at a vanishing learning
    rate the trained encoder's weights are the pretrained ones, while plain scratch starts elsewhere. The
    run identity holds the encoder's hash; a missing folder is named by its key."""
    pre = tmp_path / "distance-pretrain"
    cmd = torchrun("--standalone", "--nproc_per_node=2", f"--master_port={free_port()}")
    # LARS with trust coefficient 1 (as the demo): the encoder moves away from its (seeded) initial weights,
    # which are those plain scratch starts from.
    cmd += cli(data, "pretrain", pre, "loss.kind=siamese", "pretrain.max_steps=6", "optim.trust_coefficient=1")[1:]
    r = run(cmd, 300, env=ENV)
    assert r.returncode == 0, tail(r.stderr)
    done = json.loads((pre / "DONE").read_text())
    assert done["step"] == 6 and done["identity"]["loss.kind"] == "siamese"
    encoder = torch.load(pre / "encoder.pt", weights_only=True)["encoder"]
    tiny = ["optim.base_lr=1e-12", "scratch.max_steps=2"]
    runs = {"from": [f"scratch.init_from={pre}"], "random": []}
    trained = {}
    for name, extra in runs.items():
        out = tmp_path / name
        r = run(cli(data, "scratch", out, *tiny, *extra), 300, env=ENV)
        assert r.returncode == 0, tail(r.stderr)
        trained[name] = torch.load(out / "encoder.pt", weights_only=True)["encoder"]
        assert (out / "metrics-test.json").is_file() and (out / "model.pt").is_file()
    weights = [k for k, v in encoder.items() if v.dim() == 4]  # the convolutions' kernels
    assert len(weights) >= 4
    for k in weights:
        torch.testing.assert_close(trained["from"][k], encoder[k], rtol=0, atol=1e-6)
    assert max(float((trained["random"][k] - encoder[k]).abs().max()) for k in weights) > 1e-4
    identity = json.loads((tmp_path / "from" / "DONE").read_text())["identity"]
    assert identity["encoder"] == file_sha256(pre / "encoder.pt")
    assert "encoder" not in json.loads((tmp_path / "random" / "DONE").read_text())["identity"]
    r = run(cli(data, "scratch", tmp_path / "x", f"scratch.init_from={tmp_path / 'nowhere'}"), 300, env=ENV)
    assert r.returncode == 1 and "nowhere/encoder.pt does not exist" in r.stderr and "scratch.init_from" in r.stderr


def test_top_k_breaks_ties_like_top_1_and_counts_all_classes() -> None:
    # Equal scores (a collapsed model): the first class is the prediction for top-1 and top-3 alike.
    assert classification_metrics(np.zeros((4, 5)), np.array([0, 0, 1, 2]), 5) == {
        "f1": pytest.approx(100 * 0.5 * 2 / 3),
        "top1": 50.0,
        "top3": 100.0,
        "n": 4,
    }
    assert classification_metrics(np.zeros((2, 5)), np.array([3, 4]), 5)["top3"] == 0.0
    # Three classes or fewer: every label is among the top 3.
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert classification_metrics(scores, np.array([2, 0]), 3)["top3"] == 100.0
    assert classification_metrics(scores[:, :2], np.array([1, 0]), 2) == {"f1": 0.0, "top1": 0.0, "top3": 100.0, "n": 2}


def test_classification_metrics_by_hand() -> None:
    scores = np.array([[0.9, 0.05, 0.05, 0.0], [0.1, 0.2, 0.7, 0.0], [0.3, 0.4, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    labels = np.array([0, 1, 1, 3])
    m = classification_metrics(scores, labels, 4)
    assert m["top1"] == pytest.approx(75.0)  # rows 0, 2, 3 right
    assert m["top3"] == pytest.approx(100.0)
    # weighted F1: class 0 f1=1 (w 1/4), class 1: p=1, r=1/2, f1=2/3 (w 2/4), class 3 f1=1 (w 1/4)
    assert m["f1"] == pytest.approx(100 * (0.25 + 0.5 * 2 / 3 + 0.25))


def test_checkpoint_of_another_format_kind_or_identity_is_refused(tmp_path: Path, data: Path) -> None:
    from cytonet.config import config_to_dict
    from cytonet.data.patches import PatchStore
    from cytonet.train.checkpoint import (
        FORMAT_VERSION,
        CheckpointError,
        fingerprint,
        legacy_fingerprint,
        load_checkpoint,
        save_checkpoint,
    )
    from cytonet.train.loop import training_identity

    store = PatchStore(data / "patches")
    cfg = load_config(data / "base.yaml")
    config = config_to_dict(cfg)
    identity = training_identity(cfg, "pretrain", store)
    state = {
        "format_version": FORMAT_VERSION,
        "kind": "pretrain",
        "step": 3,
        "config": config,
        "identity": identity,
        "fingerprint": fingerprint(identity),
    }
    path = save_checkpoint(tmp_path, state, 3, keep=2)
    assert load_checkpoint(path, kind="pretrain", identity=identity, config=config)["step"] == 3
    # A resumed run may log, checkpoint and read differently, and carry other inference and analysis settings.
    neutral = load_config(
        data / "base.yaml",
        ["loader.workers=3", "pretrain.keep_checkpoints=5", "dist.timeout_s=9", "infer.stride_px=4", "probe.epochs=9"],
    )
    same = training_identity(neutral, "pretrain", store)
    assert load_checkpoint(path, kind="pretrain", identity=same, config=config_to_dict(neutral))["step"] == 3
    for override, key in [
        ("optim.base_lr=0.5", "optim.base_lr"),
        ("dist.sync_batchnorm=false", "dist.sync_batchnorm"),
        ("pretrain.global_batch_size=16", "pretrain.global_batch_size"),
        ("augment.mirror_p=0.1", "augment.mirror_p"),
    ]:
        other = load_config(data / "base.yaml", [override])
        with pytest.raises(CheckpointError, match=f"other settings \\({key}: "):
            load_checkpoint(path, kind="pretrain", identity=training_identity(other, "pretrain", store), config=config)
    # Checkpoints of an earlier cytonet carry a fingerprint of the whole config (but run and dist): still read.
    legacy = {k: v for k, v in state.items() if k != "identity"} | {"fingerprint": legacy_fingerprint(config)}
    old_path = save_checkpoint(tmp_path / "legacy", legacy, 3, keep=2)
    assert load_checkpoint(old_path, kind="pretrain", identity=identity, config=config)["step"] == 3
    with pytest.raises(CheckpointError, match="other settings"):
        load_checkpoint(old_path, kind="pretrain", identity=same, config=config_to_dict(neutral))
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint, this run is 'probe'"):
        load_checkpoint(path, kind="probe", identity=identity, config=config)
    old = save_checkpoint(tmp_path, {**state, "format_version": FORMAT_VERSION + 1}, 4, keep=2)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}"):
        load_checkpoint(old, kind="pretrain", identity=identity, config=config)
    (tmp_path / "ckpt-000000005.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "ckpt-000000005.pt", kind="pretrain", identity=identity, config=config)
    # keep=2: only the two newest complete checkpoints remain after another save, and a temporary file left
    # by a writer killed mid-write goes too
    (tmp_path / "ckpt-000000005.pt.tmp4242").write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, state, 6, keep=2)
    assert not (tmp_path / "ckpt-000000005.pt.tmp4242").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000005.pt", "ckpt-000000006.pt"]


def test_training_log_keeps_each_step_once_across_a_resumption(tmp_path: Path) -> None:
    from cytonet.train.progress import Progress

    # A run killed after logging step 9 (its last line cut short), resumed from the checkpoint of step 6.
    rows = "".join(f"{s},0,{1 / s:.6f},0.1,50.0\n" for s in range(1, 10))
    (tmp_path / "train-log.csv").write_text("step,epoch,loss,lr,images_per_s\n" + rows + "10,0,0.1")
    progress = Progress(tmp_path, "pretrain", 12, 6, active=True)
    for step in (7, 8):
        progress.update(step, 0, 0.5, 0.1, 60.0)
    # Line-buffered: what was logged is on disk before close (a killed run keeps it).
    steps = [line.split(",")[0] for line in (tmp_path / "train-log.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3", "4", "5", "6", "7", "8"]
    progress.close()
    # Killed while writing the row of the step it resumes from: the row is whole but its newline is missing.
    (tmp_path / "train-log.csv").write_text("step,epoch,loss,lr,images_per_s\n1,0,0.9,0.1,10.0\n2,0,0.8,0.1,10")
    progress = Progress(tmp_path, "pretrain", 12, 2, active=True)
    progress.update(3, 0, 0.7, 0.1, 10.0)
    progress.close()
    rows = (tmp_path / "train-log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["step", "1", "2", "3"] and all(len(r.split(",")) == 5 for r in rows)


def test_a_done_file_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    """A hand-edited DONE used to end in an "unexpected TypeError"; it is named as not a DONE file."""
    from cytonet.errors import CytonetError
    from cytonet.train.loop import _finished

    for content in ('{"identity": 5}', "[1, 2]"):
        (tmp_path / "DONE").write_text(content)
        with pytest.raises(CytonetError, match=r"DONE is not a cytonet DONE file; pass --overwrite"):
            _finished(tmp_path)


def test_an_encoder_replaced_while_a_probe_starts_is_refused(
    data: Path, reference: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe records its encoder's hash, then loads the weights: the two used to come from two reads, so an
    encoder replaced in between (a pretraining finishing) was trained on while DONE named the old one."""
    import cytonet.train.loop as loop
    from cytonet.distributed import DistEnv
    from cytonet.errors import CytonetError

    enc = tmp_path / "enc"
    shutil.copytree(data / "ref", enc)
    real = loop.build_loader

    def replace_then_build(*args: Any, **kwargs: Any) -> Any:
        state = torch.load(enc / "encoder.pt", weights_only=True)
        next(iter(state["encoder"].values())).add_(1.0)
        torch.save(state, enc / "encoder.pt")  # after the hash, before the weights are loaded
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "build_loader", replace_then_build)
    cfg = load_config(data / "base.yaml", [f"probe.encoder_from={enc}"])
    with pytest.raises(CytonetError, match=r"encoder.pt was replaced while this stage started"):
        loop.run_stage(cfg, DistEnv(), "probe", out=tmp_path / "probe")
    assert not (tmp_path / "probe" / "DONE").exists()
