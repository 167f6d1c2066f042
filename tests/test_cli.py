"""The command line: help, exit codes (0 ok, 1 runtime failure, 2 usage/config), one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
