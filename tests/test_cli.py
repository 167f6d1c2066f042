"""The command line: help, exit codes (0 ok, 1 runtime failure, 2 usage/config), one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ringdata import tiny_synth

from cytonet.cli import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cytonet.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_every_command() -> None:
    r = run("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c.name in r.stdout


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_command_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert command in out
    writes = next(c for c in COMMANDS if c.name == command).writes
    assert ("--out" in out) == writes


def test_no_command_is_usage_error() -> None:
    assert run().returncode == 2


def test_unknown_command_is_usage_error() -> None:
    r = run("frobnicate")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_check_config_prints_resolved(tmp_path: Path) -> None:
    r = run("check-config", str(REPO / "configs" / "demo.yaml"), "synth.n_brains=2")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["synth"]["n_brains"] == 2
    assert resolved["model"]["patch_size_px"] == 121


def test_config_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    r = run("check-config", str(REPO / "configs" / "demo.yaml"), "synth.nbrains=2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "synth.nbrains" in lines[0] and "n_brains" in lines[0]
    r = run("check-config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr
    r = run("check-config", str(REPO / "configs" / "demo.yaml"), "notanoverride")
    assert r.returncode == 2 and "section.key=value" in r.stderr


def test_overwrite_with_resume_is_usage_error(tmp_path: Path) -> None:
    # --overwrite deletes the checkpoints --resume requires: refused before anything is touched.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt-000000003.pt").write_bytes(b"kept")
    for flag in ("--resume", "--no-resume"):
        r = run("pretrain", str(REPO / "configs" / "demo.yaml"), flag, "--overwrite", "--out", str(tmp_path / "run"))
        assert r.returncode == 2 and "--overwrite" in r.stderr and flag in r.stderr, r.stderr
    assert (tmp_path / "run" / "ckpt-000000003.pt").read_bytes() == b"kept"


def test_an_empty_path_is_refused_not_taken_for_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out "$OUT"` with OUT unset: refused, naming the option, rather than writing into the config's folder."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "demo.yaml")
    for args in (
        ["synth", config, "--out", ""],
        ["features", config, "--encoder", " "],
        ["slurm", "probe", config, "--profile", str(REPO / "configs" / "sites" / "example.yaml"), "--write", ""],
        ["check-config", ""],
    ):
        assert main(args) == 2
        assert "an empty path" in capsys.readouterr().err, args
    assert main(["synth", config, "--workers", "100000"]) == 2  # a process flood, refused
    assert "argument --workers: 100000 is more than 256 processes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_is_wanted_and_the_reverse_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("mine\n")
    config = str(REPO / "configs" / "demo.yaml")
    for args, says in (
        (
            ["synth", config, "--out", str(tmp_path / "file")],
            f"synth: output {tmp_path / 'file'} exists and is not a folder",
        ),
        (["features", config, "--encoder", str(tmp_path)], f"encoder file {tmp_path} is a folder"),
        (
            ["extract", config, f"extract.sections_dir={tmp_path / 'file'}"],
            f"section folder {tmp_path / 'file'} is not a folder",
        ),
    ):
        assert main(args) == 1
        assert says in capsys.readouterr().err, args
    assert (tmp_path / "file").read_text() == "mine\n"
    assert main(["check-config", "/dev/null"]) == 2
    assert "config file /dev/null is not a regular file" in capsys.readouterr().err


def test_debug_shows_traceback() -> None:
    r = run("check-config", str(REPO / "configs" / "demo.yaml"), "synth.n_brains=x", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_runtime_failure_exits_1(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"importer": {"image": str(tmp_path / "nothing.tif")}}))
    r = run("import", str(cfg), "--out", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert "nothing.tif" in r.stderr and "Traceback" not in r.stderr


HUNG = """
import subprocess, sys, time
from cytonet.cli import main
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
main(["--help"])
def waiting_for_a_peer_that_never_answers():
    time.sleep(600)
waiting_for_a_peer_that_never_answers()
"""


def test_a_hung_process_fails_its_test_with_its_python_stack_and_leaves_nothing_running() -> None:
    """The CLI turns on faulthandler; tests/procs.py, past its deadline, makes each process print its stack and
    kills the whole tree (a torchrun agent's workers included)."""
    from procs import wait_all

    proc = subprocess.Popen([sys.executable, "-c", HUNG], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    with pytest.raises(pytest.fail.Exception) as failed:
        wait_all([proc], timeout=3, dump_s=1)
    message = str(failed.value)
    assert "still running after 3 s" in message
    assert "Fatal Python error: Aborted" in message and "in waiting_for_a_peer_that_never_answers" in message
    assert proc.returncode is not None
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_an_aborting_process_prints_its_stack_and_failure_messages_keep_it() -> None:
    """A rank aborted by a C++ library prints its Python stack (the CLI's faulthandler); the launcher's report
    that follows would push it out of a plain tail, so tests/procs.py's tail keeps it whole."""
    from procs import tail

    script = "from cytonet.cli import main\nmain(['--help'])\nimport os\nos.abort()\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -6
    assert "Fatal Python error: Aborted" in r.stderr and 'File "<string>", line 4' in r.stderr
    launcher_report = "\n".join(f"agent line {i}" for i in range(2000))
    kept = tail(r.stderr + launcher_report)
    assert 'File "<string>", line 4' in kept and kept.endswith("agent line 1999")
    assert tail("short") == "short"


# ---------------------------------------------------------------------------------------------------------
# Where options and overrides may go; one-line usage errors


def test_overrides_may_follow_the_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = str(REPO / "configs" / "demo.yaml")
    assert main(["check-config", demo, "--debug", "synth.n_brains=2", "synth.seed=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["synth"]["n_brains"], resolved["synth"]["seed"]) == (2, 7)
    # After --out and --overwrite too: the override reaches the command (which then fails on the missing image).
    missing = tmp_path / "nothing.tif"
    code = main(["import", demo, "--out", str(tmp_path / "out"), "--overwrite", f"importer.image={missing}"])
    assert code == 1 and str(missing) in capsys.readouterr().err


def test_usage_errors_name_the_program_once() -> None:
    r = run("check-config", str(REPO / "configs" / "demo.yaml"), "--bogus")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cytonet: cytonet" not in lines[0], r.stderr
    assert lines[0].startswith("cytonet: error: unrecognized arguments: --bogus") and "check-config --help" in lines[0]
    r = run("features", str(REPO / "configs" / "demo.yaml"), "--split", "nope")
    assert r.returncode == 2 and r.stderr.count("cytonet") == 2 and "cytonet features --help" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------------
# --out: taken as typed (never parsed as YAML), ~ expanded

#: A tiny brain at 32 um/px (188 x 250 px): about 0.2 s a section.
TINY_SYNTH = tiny_synth(32)


def _block_synth(root: Path) -> None:
    """Make the demo's first step refuse ``root`` at once (its sections folder holds a file of someone else)."""
    (root / "sections").mkdir(parents=True)
    (root / "sections" / "mine.txt").write_text("not the demo's")


@pytest.mark.parametrize(
    ("out", "as_yaml"),
    [
        ("runs/try #2", "runs/try"),  # YAML: a comment; with --overwrite the demo redid another run
        ("2024-06-01", None),  # YAML: a date, refused as run.root_dir
        ("null", None),
        ("on", None),
        ("0755", None),
        ("~/demo", "~/demo"),  # a folder named ~ in the working folder
    ],
)
def test_demo_out_is_the_folder_as_typed(
    out: str, as_yaml: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wanted = Path(out).expanduser()
    _block_synth(wanted)
    if as_yaml is not None:
        _block_synth(tmp_path / as_yaml)  # the folder YAML made of it: stop there too rather than run a demo
    assert main(["demo", "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"synth: output folder {wanted / 'sections'} holds mine.txt, which synth did not write" in err, err
    assert sorted(p.name for p in (wanted / "sections").iterdir()) == ["mine.txt"]  # refused before its lock
    if as_yaml is not None:
        assert sorted(p.name for p in (tmp_path / as_yaml).iterdir()) == ["sections"]  # nothing written there


def test_out_expands_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--out=~/x` reaches the program unexpanded (the shell expands ~ only at the start of a word).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    demo = str(REPO / "configs" / "demo.yaml")
    assert main(["synth", demo, *TINY_SYNTH, "synth.n_brains=1", "synth.sections_per_brain=1", "--out=~/brains"]) == 0
    assert (tmp_path / "home" / "brains" / "B00" / "B00_s0000.zarr").is_dir()
    assert not (tmp_path / "~").exists()


# ---------------------------------------------------------------------------------------------------------
# The demo's run folder: its config is saved only where the demo may write, once the steps accepted it


def test_demo_refuses_a_folder_of_something_else_and_saves_no_config_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    _block_synth(root)
    (root / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(root)]) == 1
    assert f"{root} holds notes.txt, which the demo does not write" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "sections"]


def test_demo_rerun_refused_by_a_step_keeps_the_run_folders_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    _block_synth(root)
    (root / "config.resolved.yaml").write_text("run:\n  seed: 5\n")  # the config of the outputs there
    assert main(["demo", "--out", str(root), "run.seed=6"]) == 1
    assert "synth: output folder" in capsys.readouterr().err
    assert (root / "config.resolved.yaml").read_text() == "run:\n  seed: 5\n"


# ---------------------------------------------------------------------------------------------------------
# An interrupted step


def _synth(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cytonet.cli", "synth", str(REPO / "configs" / "demo.yaml"), *TINY_SYNTH,
            "synth.n_brains=3", "synth.sections_per_brain=3", *extra, "--workers", "1", "--out", str(out)]  # fmt: skip


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_interrupted_synth_is_redone_by_a_rerun_with_the_same_settings(tmp_path: Path) -> None:
    import shutil
    import signal
    import time

    from cytonet.data.sections import list_sections
    from cytonet.pipeline import DONE_MARKER, STARTED_MARKER

    # Kill a real synth once its first section store is finished (9 stores, ~0.2 s each).
    out = tmp_path / "killed"
    proc = subprocess.Popen(_synth(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and list_sections(out)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = list_sections(out)
    assert proc.returncode == -signal.SIGKILL and 1 <= len(done) < 9, done
    assert (out / STARTED_MARKER).is_file() and not (out / DONE_MARKER).exists()
    assert (out / "config.resolved.yaml").is_file()
    if not list(out.rglob("*.partial")):  # killed between two stores: leave the next one half-written
        name = "B02/B02_s0002.zarr.partial"
        shutil.copytree(done[0], out / name)
        shutil.rmtree(out / name / "labels")
    interrupted = tmp_path / "interrupted"
    shutil.copytree(out, interrupted)
    # Extraction refuses the half-made folder: a store from the sections that happen to be there would pass
    # for complete.
    from cytonet.data.extract import discover_sections
    from cytonet.errors import InputError

    with pytest.raises(InputError, match=r"is not finished: a step started there and never ended"):
        discover_sections(interrupted)

    # Other settings: still refused without --overwrite, and nothing changes.
    before = _tree(interrupted)
    r = subprocess.run(_synth(interrupted, "synth.seed=1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "pass --overwrite" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _tree(interrupted) == before

    # The same settings: the step is redone, and the folder ends as an uninterrupted run leaves it.
    r = subprocess.run(_synth(out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "unfinished run with these settings" in r.stderr
    whole = tmp_path / "whole"
    r = subprocess.run(_synth(whole), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.partial")) and len(list_sections(out)) == 9
    assert _tree(out) == _tree(whole)
    # ...which a further rerun finds finished.
    r = subprocess.run(_synth(out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already holds a finished run" in r.stderr


def test_store_shows_and_takes_no_overrides(tmp_path: Path) -> None:
    r = run("store", "--help")
    assert r.returncode == 0 and "section.key=value" not in r.stdout
    r = run("store", "info", str(tmp_path), "synth.n_brains=2")
    assert r.returncode == 2 and "unrecognized arguments: synth.n_brains=2" in r.stderr


def test_a_synth_still_running_is_not_taken_for_an_interrupted_one(tmp_path: Path) -> None:
    import fcntl

    from cytonet.config import load_config
    from cytonet.data.extract import discover_sections
    from cytonet.errors import InputError, OutputExistsError
    from cytonet.pipeline import STARTED_MARKER, STEP_LOCK, run_synth

    cfg = load_config(REPO / "configs" / "demo.yaml", [*TINY_SYNTH, "synth.n_brains=1", "synth.sections_per_brain=1"])
    out = tmp_path / "s"
    run_synth(cfg, out, overwrite=False, preview=False)
    (out / ".cytonet-done.json").rename(out / STARTED_MARKER)  # as a step still running with these settings
    before = _tree(out)
    with open(out / STEP_LOCK, "a+") as fh:  # ... held by its process
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(OutputExistsError, match="is being written by another process"):
            run_synth(cfg, out, overwrite=False, preview=False)
        with pytest.raises(InputError, match=r"is not finished: a step is writing it right now"):
            discover_sections(out)
    assert _tree(out) == before
    assert run_synth(cfg, out, overwrite=False, preview=False)  # its process gone (lock free): redone
    assert discover_sections(out)  # finished: extraction takes it


def test_a_full_disk_is_named_and_kept_to_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC (or a quota) anywhere in a step: one line naming the file and what to do, exit 1."""
    import errno

    from cytonet import cli

    def full(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/scratch/run/patches/shard-00005.h5.partial")

    import dataclasses

    # synth, where a store's write fails for want of space
    commands = [dataclasses.replace(c, run=full) if c.name == "synth" else c for c in cli.COMMANDS]
    monkeypatch.setattr(cli, "COMMANDS", commands)
    assert cli.main(["synth", str(REPO / "configs" / "demo.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "cytonet: error: No space left on device writing /scratch/run/patches/shard-00005.h5.partial: free space "
        "(or quota) and rerun; finished work is kept and skipped"
    )
