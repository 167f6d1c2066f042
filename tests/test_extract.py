"""`cytonet extract`: sampling, class balance, splits, metadata, array tasks as real processes, crash resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ringdata import PIXEL_UM, image_pattern, make_sections, ring_layers

from cytonet.config import Config, layer_overrides, load_config
from cytonet.data.extract import CRASH_ENV, run_extract
from cytonet.data.patches import MANIFEST, METADATA, PatchStore, read_shard_columns, remove_path
from cytonet.data.sections import SectionMeta, create_section
from cytonet.errors import InputError, OutputExistsError, UsageError

REPO = Path(__file__).resolve().parent.parent

#: Small patches (33 px crop, 5 px shift -> 67 px stored), narrow centre line so the tiny area is oversampled.
OVERRIDES = [
    "extract.patch_size_px=33",
    "augment.shift_max_mm=0.04",
    "extract.centerline_tolerance=0.01",
    "extract.patches_per_area=80",
    "extract.eval_patches_per_area=12",
    "extract.patches_per_shard=16",
    "extract.test_fraction=0.34",
]


def make_cfg(*extra: str) -> Config:
    return load_config(None, layer_overrides(OVERRIDES, extra))


def shard_contents(out: Path) -> dict[str, Any]:
    """Every shard's arrays and attributes, the manifest and the metadata table, for equality checks."""
    found: dict[str, Any] = {}
    for p in sorted(out.glob("shard-*")):
        assert not p.name.endswith(".partial"), p
        cols, attrs = read_shard_columns(p)
        if p.suffix == ".h5":
            import h5py

            with h5py.File(p, "r") as f:
                patches = f["patches"][...]
        else:
            import zarr

            patches = zarr.open_group(str(p), mode="r")["patches"][...]
        found[p.name] = (cols, attrs, patches)
    found[MANIFEST] = (out / MANIFEST).read_bytes()
    found[METADATA] = (out / METADATA).read_bytes()
    return found


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = shard_contents(a), shard_contents(b)
    assert sorted(ca) == sorted(cb)
    assert ca[MANIFEST] == cb[MANIFEST]
    assert ca[METADATA] == cb[METADATA]
    for name in ca:
        if name in (MANIFEST, METADATA):
            continue
        (cols_a, attrs_a, pa), (cols_b, attrs_b, pb) = ca[name], cb[name]
        assert attrs_a == attrs_b, name
        assert np.array_equal(pa, pb), name
        for col in cols_a:
            assert np.array_equal(cols_a[col], cols_b[col], equal_nan=True), (name, col)


def test_counts_splits_and_class_balance(reference: Path) -> None:
    store = PatchStore(reference)
    m = store.manifest
    counts = m["counts"]
    # Class balance: a fixed number per area in train, also for the tiny area (oversampled).
    assert counts["area"]["train"] == {"2": 80, "3": 80, "4": 80, "5": 80}
    assert counts["area"]["test"] == {"2": 12, "3": 12, "4": 12, "5": 12}
    # Splits: B02 (last brain) held out; one of the 3 sections of each training brain is test.
    assert counts["brain"]["unseen"] == {"B02": 48}
    assert set(counts["brain"]["train"]) == {"B00", "B01"}
    sec_split = {s["name"]: s["split"] for s in m["sections"]}
    for brain in ("B00", "B01"):
        splits = sorted(v for k, v in sec_split.items() if k.startswith(brain))
        assert splits == ["test", "train", "train"]
    table = store.metadata
    for s in m["sections"]:
        rows = table[table["section"] == m["sections"].index(s)]
        assert set(np.unique(rows["split"]).tolist()) <= {["train", "test", "unseen"].index(s["split"])}
    # Every shard holds one split and patches_per_shard patches (the last of a split may hold fewer).
    for sh in m["shards"]:
        rows = table[sh["first"] : sh["first"] + sh["n"]]
        assert len(set(rows["split"].tolist())) == 1 and sh["n"] <= 16
    # The tiny area has fewer candidates than 80 in the training sections: repeats, and only there.
    train = table[table["split"] == 0]
    for area in (2, 3, 4, 5):
        rows = train[train["area"] == area]
        unique = len({(int(r["section"]), int(r["y"]), int(r["x"])) for r in rows})
        assert (unique < 80) == (area == 5), (area, unique)


def test_patch_metadata_matches_the_section(reference: Path) -> None:
    store = PatchStore(reference)
    table = store.metadata
    geometry = store.geometry
    assert (geometry.crop_px, geometry.stored_px, geometry.pixel_size_um) == (33, 67, PIXEL_UM)
    c = geometry.stored_px // 2
    layers = {i: ring_layers(i) for i in range(3)}
    for row in table[:: max(1, len(table) // 40)]:
        y, x, index = int(row["y"]), int(row["x"]), int(row["section_index"])
        patch = store.read(int(row["patch_id"]))
        assert patch.shape == (67, 67) and patch.dtype == np.uint8
        # The stored patch is the section image around (y, x) (zero outside the section).
        yy, xx = np.mgrid[y - c : y + c + 1, x - c : x + c + 1]
        inside = (yy >= 0) & (yy < 160) & (xx >= 0) & (xx < 160)
        expected = np.where(inside, image_pattern(yy, xx, index), 0)
        assert np.array_equal(patch, expected)
        lay = layers[index]
        assert lay["labels"][y, x] == row["area"] >= 2
        assert abs(float(row["depth"]) - 0.5) <= 0.01 + 1e-6  # centre line
        assert np.allclose(row["coords"], lay["coords"][y, x])
        assert store.brains[int(row["brain"])] == store.manifest["sections"][int(row["section"])]["brain"]


def test_cortex_sampling_and_downsampling(sections: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        "extract.sampling=cortex", "extract.pixel_size_um=16", "extract.patches_per_area=20", "extract.backend=zarr"
    )
    run_extract(cfg, tmp_path / "p", sections_dir=sections)
    store = PatchStore(tmp_path / "p")
    table = store.metadata
    assert store.geometry.pixel_size_um == 16.0
    # Uniform in the cortex: depths spread over the whole ribbon, not only the centre line.
    assert table["depth"].min() < 0.15 and table["depth"].max() > 0.85
    # Block-averaged 2x: the patch pixel covering (y, x) is the mean of a 2x2 block of the section.
    row = table[0]
    y, x, index = int(row["y"]), int(row["x"]), int(row["section_index"])
    y0, x0 = y - 1, x - 1  # factor 2: pixel edge//2 covers rows y-1, y
    block = image_pattern(*np.mgrid[y0 : y0 + 2, x0 : x0 + 2], index).astype(float)
    c = store.geometry.stored_px // 2
    assert store.read(int(row["patch_id"]))[c, c] == int(np.floor(block.mean() + 0.5))


def write_yaml(tmp_path: Path, sections: Path) -> Path:
    data: dict[str, Any] = {}
    for item in OVERRIDES:
        key, value = item.split("=")
        sec, k = key.split(".")
        data.setdefault(sec, {})[k] = yaml.safe_load(value)
    data["extract"]["sections_dir"] = str(sections)
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cytonet.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_two_array_tasks_as_processes_equal_one_task(sections: Path, reference: Path, tmp_path: Path) -> None:
    config = write_yaml(tmp_path, sections)
    out = tmp_path / "two"
    # Task 1 also runs its shards in a pool of 2 processes.
    procs = [
        cli("extract", str(config), "--out", str(out), "--task-id", str(t), "--num-tasks", "2", "--workers", str(t + 1))
        for t in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    # Whichever task finished last wrote the manifest; the store equals the one-task store byte for byte.
    assert (out / MANIFEST).is_file()
    assert_same_store(out, reference)


def test_crash_then_resume_skips_finished_shards(sections: Path, reference: Path, tmp_path: Path) -> None:
    config = write_yaml(tmp_path, sections)
    out = tmp_path / "crash"
    p = cli("extract", str(config), "--out", str(out), env={CRASH_ENV: "3:5"})
    p.communicate(timeout=120)
    assert p.returncode == 17  # killed in the middle of shard 3
    assert (out / "shard-00003.h5.partial").exists()
    assert not (out / "shard-00003.h5").exists() and not (out / MANIFEST).exists()
    finished = {q.name: q.stat().st_mtime_ns for q in out.glob("shard-*.h5")}
    assert sorted(finished) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]

    cfg = make_cfg()
    result = run_extract(cfg, out, sections_dir=sections)
    assert result.manifest is not None and result.skipped == 3
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # untouched
    assert not list(out.glob("*.partial"))
    assert_same_store(out, reference)

    # A lost shard and a stale partial are redone; the rest stays untouched; the result is the same store.
    (out / "shard-00005.h5").unlink()
    (out / "shard-00006.h5").unlink()
    (out / "shard-00006.h5.partial").write_bytes(b"garbage")
    before = {q.name: q.stat().st_mtime_ns for q in out.glob("shard-*.h5")}
    result = run_extract(cfg, out, sections_dir=sections)
    assert result.written == 2
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())
    assert_same_store(out, reference)


def test_the_same_task_launched_twice_is_refused(sections: Path, tmp_path: Path) -> None:
    """Each worker's share has one writer: a second launch of the same task while the first runs (an array
    resubmitted) is refused, instead of both writing the same shards with confusing errors. Other tasks go on;
    the lock files are the extraction's own (a rerun and --overwrite accept them)."""
    from cytonet.data.extract import worker_lock_name
    from cytonet.data.patches import exclusive_lock

    out = tmp_path / "p"
    cfg = make_cfg(*SMALL)
    out.mkdir()
    with exclusive_lock(out / worker_lock_name(1, 2), blocking=False):  # task 1 of 2 is running elsewhere
        with pytest.raises(OutputExistsError, match=r"extract worker 1 of 2: .* is being written by another process"):
            run_extract(cfg, out, sections_dir=sections, task_id=1, num_tasks=2)
        assert run_extract(cfg, out, sections_dir=sections, task_id=0, num_tasks=2).manifest is None
        with pytest.raises(OutputExistsError, match=r"--overwrite would delete its files"):
            run_extract(cfg, out, sections_dir=sections, overwrite=True)  # not the running task's files
        assert any(out.glob("shard-*"))
    assert run_extract(cfg, out, sections_dir=sections, task_id=1, num_tasks=2).manifest is not None
    assert run_extract(cfg, out, sections_dir=sections, overwrite=True).manifest is not None
    # A rerun of the complete store writes nothing at all (it may be on a read-only mount); a shard deleted
    # since is written again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_extract(cfg, out, sections_dir=sections)
    assert again.written == 0 and again.manifest is not None
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    shard = sorted(out.glob("shard-*"))[1]
    remove_path(shard)
    assert run_extract(cfg, out, sections_dir=sections).written == 1 and shard.exists()


def test_a_shard_another_process_is_writing_is_left_to_it(sections: Path, reference: Path, tmp_path: Path) -> None:
    """Arrays of different sizes deal the shards out differently, so two running at once can both be given a
    shard: the one that finds its lock held leaves it, and the other's .partial, alone (the old code deleted
    that .partial and wrote the shard beside the other writer). A later run completes the same store."""
    from cytonet.data.extract import shard_lock_name
    from cytonet.data.patches import exclusive_lock

    cfg = make_cfg()
    out = tmp_path / "p"
    out.mkdir()
    partial = out / "shard-00002.h5.partial"
    partial.write_bytes(b"being written")  # the other writer's file
    with exclusive_lock(out / shard_lock_name("shard-00002.h5"), blocking=False):
        result = run_extract(cfg, out, sections_dir=sections)
        assert result.manifest is None and not (out / "shard-00002.h5").exists()
        assert partial.read_bytes() == b"being written"
    result = run_extract(cfg, out, sections_dir=sections)  # the lock is free: a killed writer's partial
    assert result.manifest is not None and result.written == 1
    assert not list(out.glob(".shard-*.lock"))  # each goes once its shard is there
    assert_same_store(out, reference)


def test_overwrite_waits_for_no_reader_of_the_store(sections: Path, tmp_path: Path) -> None:
    """A store a training run reads (its readers' lock held shared) is not deleted by extract --overwrite."""
    from cytonet.data.patches import READERS_LOCK, reading_store, rewriting_store

    out = tmp_path / "p"
    cfg = make_cfg(*SMALL)
    run_extract(cfg, out, sections_dir=sections)
    before = sorted(p.name for p in out.iterdir())
    with reading_store(out, "pretrain"):
        with pytest.raises(OutputExistsError, match=r"being read by a training run or an analysis right now"):
            run_extract(cfg, out, sections_dir=sections, overwrite=True)
        assert sorted(p.name for p in out.iterdir() if p.name != READERS_LOCK) == before
    # The rewrite holds the lock throughout, and keeps its file: deleted, a reader would lock a new file beside it.
    inode = (out / READERS_LOCK).stat().st_ino
    with rewriting_store(out, "extract --overwrite"):
        with pytest.raises(OutputExistsError, match=r"pretrain: the patch store .* is being rewritten"):
            with reading_store(out, "pretrain"):
                pass
    assert run_extract(cfg, out, sections_dir=sections, overwrite=True).manifest is not None
    assert (out / READERS_LOCK).stat().st_ino == inode


def test_rerun_with_other_settings_is_refused(sections: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    cfg = make_cfg("extract.patches_per_area=10", "extract.eval_patches_per_area=2")
    run_extract(cfg, out, sections_dir=sections)
    other = make_cfg("extract.patches_per_area=11", "extract.eval_patches_per_area=2")
    with pytest.raises(OutputExistsError, match=r"differing: extract\.patches_per_area: 10 -> 11\)"):
        run_extract(other, out, sections_dir=sections)
    with pytest.raises(UsageError, match="overwrite"):
        run_extract(other, out, sections_dir=sections, overwrite=True, num_tasks=2)
    with pytest.raises(UsageError, match="task-id"):
        run_extract(other, out, sections_dir=sections, task_id=2, num_tasks=2)
    result = run_extract(other, out, sections_dir=sections, overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["counts"]["area"]["train"]["2"] == 11
    (out / "extract.json").write_text("xx")  # damaged: say so, not "other settings"
    with pytest.raises(OutputExistsError, match=r"extract\.json cannot be read \(.*\): it records the settings"):
        run_extract(other, out, sections_dir=sections)
    assert result.manifest is not None
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="other files"):
        run_extract(cfg, tmp_path / "foreign", sections_dir=sections)


#: Few patches, so that the tests below extract in a fraction of a second.
SMALL = ("extract.patches_per_area=10", "extract.eval_patches_per_area=2")
TABLE = {0: "background", 1: "white_matter", 2: "big", 3: "mid", 4: "small", 5: "tiny"}


def write_rings(
    root: Path,
    brains: dict[str, int],
    change: Any = None,
    tables: dict[str, dict[int, str]] | None = None,
) -> None:
    """Ring sections like ringdata.make_sections; ``change(brain, layers)`` edits a section's layers in place
    before they are written, ``tables`` gives some brains their own label table."""
    for brain, n in brains.items():
        for index in range(n):
            layers = ring_layers(index)
            if change is not None:
                change(brain, layers)
            meta = SectionMeta(
                brain=brain,
                section_index=index,
                z_mm=index * 0.1,
                pixel_size_um=PIXEL_UM,
                shape=layers["image"].shape,
                label_table=(tables or {}).get(brain, TABLE),
            )
            path = root / brain / f"{brain}_s{index:04d}.zarr"
            with create_section(path, meta, chunk_px=64, compression="none") as w:
                for layer, data in layers.items():
                    w.write(layer, 0, 0, data)


def test_overwrite_deletes_only_the_extractions_own_files(sections: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    cfg = make_cfg(*SMALL)
    run_extract(cfg, out, sections_dir=sections)
    (out / "notes.txt").write_text("mine")
    (out / ".git").mkdir()
    with pytest.raises(OutputExistsError, match=r"not an extraction's \(\.git and 1 more\)") as info:
        run_extract(cfg, out, sections_dir=sections, overwrite=True)
    assert str(out) in str(info.value)
    # Nothing was deleted: the foreign files and the finished extraction are all there.
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git").is_dir()
    assert (out / MANIFEST).is_file() and list(out.glob("shard-*"))
    (out / "notes.txt").unlink()
    (out / ".git").rmdir()
    # Only the extraction's own files: --overwrite redoes it.
    assert run_extract(cfg, out, sections_dir=sections, overwrite=True).manifest is not None

    # Sections inside the output folder: refused, with or without --overwrite, and the sections stay.
    nested = tmp_path / "nested"
    make_sections(nested / "sections", brains={"B00": 2, "B01": 1})
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"sections folder .* lies inside the output folder"):
            run_extract(cfg, nested, sections_dir=nested / "sections", overwrite=overwrite)
    assert len(list((nested / "sections").glob("*/*.zarr"))) == 3
    assert sorted(p.name for p in nested.iterdir()) == ["sections"]

    # A folder with other files, without --overwrite: the message does not send the user to --overwrite.
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="other files") as info:
        run_extract(cfg, tmp_path / "foreign", sections_dir=sections)
    assert "pass --overwrite" not in str(info.value)


def test_no_candidates_is_an_input_error(tmp_path: Path) -> None:
    """Depth stored in percent: the centre line (|depth - 0.5| <= tol) finds nothing; no empty 'complete'
    store is written."""

    def percent(brain: str, layers: dict[str, np.ndarray]) -> None:
        layers["depth"] = np.round(layers["depth"] * 100)

    write_rings(tmp_path / "s", {"B00": 2, "B01": 1}, percent)
    out = tmp_path / "p"
    with pytest.raises(InputError, match=r"sampling=centerline.*centerline_tolerance=0\.01.*depth 0 \.\. 100"):
        run_extract(make_cfg(*SMALL), out, sections_dir=tmp_path / "s")
    assert not (out / MANIFEST).exists()
    # The corrected command runs in the same folder: the failed attempt wrote no shard, so its recorded
    # settings hold nothing to protect (it used to be refused as "an extraction with other settings").
    assert (out / "extract.json").is_file()
    assert run_extract(make_cfg(*SMALL, "extract.sampling=cortex"), out, sections_dir=tmp_path / "s").manifest

    def white(brain: str, layers: dict[str, np.ndarray]) -> None:
        layers["labels"] = np.minimum(layers["labels"], 1)

    write_rings(tmp_path / "w", {"B00": 2, "B01": 1}, white)
    with pytest.raises(InputError, match=r"sampling=cortex.*label ids \[0, 1\]"):
        run_extract(make_cfg(*SMALL, "extract.sampling=cortex"), tmp_path / "q", sections_dir=tmp_path / "w")


def test_areas_missing_from_training_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def other_area(brain: str, layers: dict[str, np.ndarray]) -> None:
        if brain == "B01":  # the held-out brain: its smallest area is one the training brain does not have
            layers["labels"][layers["labels"] == 5] = 6

    table = {**TABLE, 6: "other"}
    write_rings(tmp_path / "s", {"B00": 2, "B01": 1}, other_area, tables={"B00": table, "B01": table})
    with caplog.at_level("WARNING", logger="cytonet.data.extract"):
        result = run_extract(make_cfg(*SMALL), tmp_path / "p", sections_dir=tmp_path / "s")
    assert result.manifest is not None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("not in the training split" in m and "6 (other, in unseen)" in m for m in warned), warned


def test_conflicting_area_names_are_refused_and_placeholders_give_way(tmp_path: Path) -> None:
    swapped = {**TABLE, 2: "mid", 3: "big"}
    write_rings(tmp_path / "s", {"B00": 2, "B01": 1}, tables={"B01": swapped})
    with pytest.raises(InputError, match=r"area id 2 is 'big' in .*B00_s0000\.zarr but 'mid' in .*B01_s0000\.zarr"):
        run_extract(make_cfg(*SMALL), tmp_path / "p", sections_dir=tmp_path / "s")
    assert not (tmp_path / "p").exists()

    # `cytonet import` names an id without a name area_<id>: compatible with the real name, which wins.
    write_rings(tmp_path / "t", {"B00": 2, "B01": 1}, tables={"B00": {**TABLE, 2: "area_2"}})
    run_extract(make_cfg(*SMALL), tmp_path / "q", sections_dir=tmp_path / "t")
    assert json.loads((tmp_path / "q" / MANIFEST).read_text())["areas"]["2"] == "big"


def test_more_heldout_brains_than_brains_is_refused(sections: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"extract\.n_heldout_brains=4 exceeds the 3 brains found.*B00"):
        run_extract(make_cfg(*SMALL, "extract.n_heldout_brains=4"), tmp_path / "p", sections_dir=sections)


def test_rerun_after_the_sections_were_remade_is_refused(tmp_path: Path) -> None:
    """Sections written anew with the same names and shapes (areas swapped): the old shards and surveys no
    longer describe them, so a rerun refuses and --overwrite extracts the new sections."""
    src, out = tmp_path / "s", tmp_path / "p"
    brains = {"B00": 2, "B01": 1}
    write_rings(src, brains)
    cfg = make_cfg(*SMALL)
    run_extract(cfg, out, sections_dir=src)
    assert run_extract(cfg, out, sections_dir=src).written == 0  # unchanged sections: a rerun reuses everything

    def swap(brain: str, layers: dict[str, np.ndarray]) -> None:
        lab = layers["labels"]
        layers["labels"] = np.where(lab == 2, 3, np.where(lab == 3, 2, lab)).astype(lab.dtype)

    import shutil

    shutil.rmtree(src)
    write_rings(src, brains, swap)
    with pytest.raises(
        OutputExistsError, match=r"differing: sections; sections new or changed since: B00_s0000.*--overwrite"
    ):
        run_extract(cfg, out, sections_dir=src)
    run_extract(cfg, out, sections_dir=src, overwrite=True)
    for row in PatchStore(out).metadata:
        old = int(ring_layers(int(row["section_index"]))["labels"][int(row["y"]), int(row["x"])])
        assert int(row["area"]) == {2: 3, 3: 2}.get(old, old)
    # A store of a cytonet that recorded no section identities is still reused (it cannot tell, so it trusts).
    settings = json.loads((out / "extract.json").read_text())
    for entry in settings["sections"]:
        del entry["store"]
    (out / "extract.json").write_text(json.dumps(settings))
    assert run_extract(cfg, out, sections_dir=src).written == 0
