"""hpc.requeue as a real process: a command that cannot start, and settings that cannot be read, end with one line
naming them and a status, never a traceback (requeueing itself is tested on a SLURM cluster in test_slurm.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed  # subprocesses


def requeue(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [sys.executable, "-m", "hpc.requeue", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " INFO " not in line]


def test_a_command_that_cannot_start_is_one_line_with_the_shells_status(tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    for command, status, why in [
        ("/nonexistent/cmd", 127, "No such file or directory"),
        ("no-such-command-on-path", 127, "No such file or directory"),
        (str(tmp_path), 126, ""),  # a folder
        (str(script), 126, ""),
    ]:
        r = requeue("--", command, "--some-arg")
        lines = error_lines(r.stderr)
        assert r.returncode == status, r.stderr
        assert len(lines) == 1 and f"ERROR cannot run {command}: {why}" in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_no_command_is_a_usage_error() -> None:
    r = requeue("--")
    assert r.returncode == 2 and "give the command after --" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("options", "env", "message"),
    [
        (["--exit-code", "0"], {}, "--exit-code=0 must be an exit status in 1..255"),
        (["--exit-code", "300"], {}, "--exit-code=300 must be an exit status in 1..255"),
        ([], {"SLURM_RESTART_COUNT": "x"}, "SLURM_RESTART_COUNT='x' is not an integer"),
        ([], {"SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID='12a' is not an integer"),
    ],
)
def test_bad_settings_are_refused_before_the_command_runs(
    options: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    """Refused up front: read after the command, a bad variable ended the wrapper in a traceback once the command
    had checkpointed, and an exit code outside 1..255 never matched."""
    marker = tmp_path / "ran"
    r = requeue(*options, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')", env=env)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
