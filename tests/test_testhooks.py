"""Test hooks (cytonet.testhooks): a malformed CYTONET_*_CRASH value is a one-line usage error naming the variable,
in real `cytonet extract` and `cytonet infer` processes, never read as another crash point or ignored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ringdata import make_sections
from test_extract import write_yaml
from test_infer import base_config, write_model

from cytonet.config import save_config
from cytonet.data.extract import CRASH_ENV as EXTRACT_CRASH
from cytonet.errors import UsageError
from cytonet.infer.run import CRASH_ENV as INFER_CRASH
from cytonet.testhooks import read_hook

pytestmark = pytest.mark.distributed  # subprocess CLIs


def test_read_hook() -> None:
    pattern, form = r"([0-9]+):(a|b)", "<n>:a or <n>:b"
    assert read_hook("H", pattern, form, {}) is None
    assert read_hook("H", pattern, form, {"H": ""}) is None
    assert read_hook("H", pattern, form, {"H": "12:b"}) == ("12", "b")
    for bad in ("12", "12:c", " 12:a", "12:a ", "-1:a", "x:a"):
        with pytest.raises(UsageError, match=f"^H={bad!r} is not <n>:a or <n>:b"):
            read_hook("H", pattern, form, {"H": bad})


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    hooks = {k: v for k, v in os.environ.items() if k not in (EXTRACT_CRASH, INFER_CRASH)}
    return subprocess.run(
        [sys.executable, "-m", "cytonet.cli", *args], env={**hooks, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def small_sections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hooks")
    make_sections(root / "sections", {"B00": 2, "B01": 1})
    return root


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # Read as shard 1 at patch 0 ... before; ignored; "unexpected ValueError" without the variable.
        ("1:sideways", "CYTONET_EXTRACT_CRASH='1:sideways' is not <shard>:<patches>"),
        ("0:-1", "CYTONET_EXTRACT_CRASH='0:-1' is not <shard>:<patches>"),
        ("abc", "CYTONET_EXTRACT_CRASH='abc' is not <shard>:<patches>"),
        ("3", "CYTONET_EXTRACT_CRASH='3' is not <shard>:<patches>"),
        # Well formed, but past the store: the crash would never come.
        ("999:0", "CYTONET_EXTRACT_CRASH=999:0 is never reached: the store has 26 shards (no such shard)"),
        ("0:16", "CYTONET_EXTRACT_CRASH=0:16 is never reached: the store has 26 shards (shard 0 holds 16 patches)"),
    ],
)
def test_extract_refuses_a_malformed_crash_hook(small_sections: Path, tmp_path: Path, value: str, message: str) -> None:
    config = write_yaml(tmp_path, small_sections / "sections")
    out = tmp_path / "patches"
    p = cli(["extract", str(config), "--out", str(out)], {EXTRACT_CRASH: value})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith(f"cytonet: error: {message}"), p.stderr
    assert not list(out.glob("shard-*")), "nothing is extracted under a hook that was refused"


@pytest.mark.parametrize("value", ["1:sideways", "1", "abc", "-1:after", "1:after:x"])
def test_infer_refuses_a_malformed_crash_hook(small_sections: Path, value: str) -> None:
    root = small_sections
    if not (root / "infer.yaml").exists():
        cfg = base_config(root)
        write_model(cfg, root / "probe")
        save_config(cfg, root, name="infer.yaml")
    p = cli(["infer", str(root / "infer.yaml"), "--out", str(root / f"infer-{value}")], {INFER_CRASH: value})
    message = f"CYTONET_INFER_CRASH={value!r} is not <N>:before or <N>:after, such as 5:after"
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith(f"cytonet: error: {message}"), p.stderr
