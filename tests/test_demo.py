"""`cytonet demo` end to end on a shrunken configuration: every stage runs as a real process, the Fig. 2 table
is printed, and a rerun skips the finished stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
TINY = [
    "synth.n_brains=3",
    "synth.sections_per_brain=2",
    "synth.pixel_size_um=16",
    "synth.brain_width_mm=16",
    "synth.brain_height_mm=12",
    "extract.pixel_size_um=32",
    "model.n_blocks=2",
    "model.patch_size_px=49",
    "extract.patches_per_area=8",
    "extract.eval_patches_per_area=4",
    "loader.samples_per_class=2",
    "pretrain.global_batch_size=16",
    "pretrain.epochs=1",
    "probe.global_batch_size=16",
    "probe.epochs=1",
    "scratch.global_batch_size=16",
]


def test_demo_end_to_end_and_rerun(tmp_path: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "cytonet"), "demo", *TINY, "--out", str(tmp_path / "demo")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["model", "dataset", "F1", "top-1", "top-3"]
    rows = [line for line in lines[1:] if line.startswith(("scratch", "distance", "contrastive"))]
    assert [row.split()[0] for row in rows] == ["scratch", "distance", "contrastive"] * 2, r.stdout
    for row in rows:
        f1, top1, top3 = (float(v) for v in row.split()[-3:])
        assert 0 <= top1 <= top3 <= 100 and 0 <= f1 <= 100
    demo = tmp_path / "demo"
    for stage in ("pretrain", "probe", "scratch", "distance-pretrain", "distance"):
        assert (demo / stage / "DONE").is_file()
    assert json.loads((demo / "distance-pretrain" / "DONE").read_text())["identity"]["loss.kind"] == "siamese"
    assert (demo / "sections" / "preview.png").stat().st_size > 10_000
    assert "pixel accuracy" in r.stdout and "after knn2d clean-up" in r.stdout
    assert (demo / "inference-overlay.png").stat().st_size > 10_000
    # The infer step's stdout (its output path, for scripts) is logged as such, not dropped bare into the log.
    assert f"demo: infer printed {demo / 'infer'}" in r.stderr
    assert f"\n{demo / 'infer'}\n" not in r.stderr
    report = Path(lines[-1].removeprefix("report: "))
    assert report.is_file() and report.read_text().count("data:image/png;base64") >= 5
    assert (demo / "results.txt").read_text().strip() == "\n".join(lines[:-1]).strip()
    # A rerun finds every stage finished and prints the same table.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout == r.stdout
    assert "already holds a finished run" in again.stderr


@pytest.mark.parametrize(
    ("override", "says"),
    [("synth.n_brains=1", "leaves no training brain"), ("extract.heldout_brains=[B09]", "names ['B09']")],
)
def test_brains_to_hold_out_are_checked_before_synth_makes_them(override: str, says: str, tmp_path: Path) -> None:
    """Held-out brains that synth will not make are refused at once, not by extract after synth's minutes."""
    cmd = [str(Path(sys.executable).parent / "cytonet"), "demo", override, "--out", str(tmp_path / "demo")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and says in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "demo").exists()
