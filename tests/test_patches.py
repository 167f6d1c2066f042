"""Patch stores: margin geometry, both backends and codecs behind one reader, lazy handles, `store info|check`."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ringdata import make_sections

from cytonet.config import load_config
from cytonet.data.extract import run_extract
from cytonet.data.patches import (
    MANIFEST,
    PatchGeometry,
    PatchStore,
    check_store,
    crop_reach_px,
    describe_store,
    stored_edge_px,
)
from cytonet.errors import InputError

OVERRIDES = [
    "extract.patch_size_px=33",
    "augment.shift_max_mm=0.04",
    "extract.patches_per_area=12",
    "extract.eval_patches_per_area=4",
    "extract.patches_per_shard=8",
]


def test_stored_edge_covers_any_rotation_and_shift() -> None:
    # Demo: 265 px crop at 8 um, 0.2 mm = 25 px shift, blur radius 3 -> 435 px; paper: 1129 px at 2 um -> 1807.
    assert stored_edge_px(265, 25.0, 3) == 435
    assert stored_edge_px(1129, 100.0, 3) == 1807
    for crop, shift, pad in [(33, 5.0, 3), (64, 12.5, 3), (265, 25.0, 0), (32, 0.0, 1)]:
        s = stored_edge_px(crop, shift, pad)
        assert (s - crop) % 2 == 0  # same parity: an unrotated crop is an exact pixel copy
        assert (s - 1) / 2 >= crop_reach_px(crop, shift, pad) + 1  # bilinear neighbour stays inside
        assert (s - 3) / 2 < crop_reach_px(crop, shift, pad) + 1  # and it is the smallest such edge
    g = PatchGeometry.for_crop(265, 8.0, 0.2, 3)
    assert g.stored_px == 435 and g.max_shift_px == pytest.approx(25.0)
    assert g.allows(265, 0.2, 3) and g.allows(233, 0.2, 3)
    assert not g.allows(297, 0.2, 3) and not g.allows(265, 0.3, 3)


@pytest.fixture(scope="module")
def sections(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sections")
    make_sections(root, {"B00": 2, "B01": 1}, backend="hdf5")
    return root


@pytest.fixture(scope="module")
def stores(sections: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("stores")
    out = {}
    for backend, codec in [("hdf5", "none"), ("hdf5", "blosc-zstd"), ("zarr", "none"), ("zarr", "blosc-zstd")]:
        cfg = load_config(None, [*OVERRIDES, f"extract.backend={backend}", f"extract.compression={codec}"])
        path = base / f"{backend}-{codec}"
        run_extract(cfg, path, sections_dir=sections)
        out[f"{backend}-{codec}"] = path
    return out


def test_one_reader_for_both_backends_and_codecs(stores: dict[str, Path]) -> None:
    ref = PatchStore(stores["hdf5-none"])
    names = {p.name for p in stores["hdf5-none"].glob("shard-*")}
    assert names and all(n.endswith(".h5") for n in names)
    assert any(p.suffix == ".zarr" for p in stores["zarr-none"].glob("shard-*"))
    for key, path in stores.items():
        store = PatchStore(path)
        assert store.backend == key.split("-")[0] and store.compression == key.split("-", 1)[1]
        assert len(store) == len(ref) and np.array_equal(store.metadata, ref.metadata)
        for i in range(0, len(store), 5):
            assert np.array_equal(store.read(i), ref.read(i)), (key, i)
        assert store.shard_ranges() == ref.shard_ranges()
        store.close()
    # A split is an id range; its shards tile it.
    start, stop = ref.split_range("train")
    ranges = ref.shard_ranges("train")
    assert ranges[0][0] == start and ranges[-1][1] == stop
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert np.all(ref.metadata["split"][start:stop] == 0)
    assert ref.class_index(np.array([2, 5, 3])).tolist() == [0, 3, 1]


def test_handles_open_lazily_per_process(stores: dict[str, Path]) -> None:
    store = PatchStore(stores["hdf5-blosc-zstd"])
    assert not store._handles  # nothing opened by the constructor
    store.read(0)
    assert store._handles
    clone = pickle.loads(pickle.dumps(store))  # what a spawned DataLoader worker receives
    assert not clone._handles and clone._pid is None
    assert np.array_equal(clone.read(3), store.read(3))
    store._pid = -1  # as seen from a forked child: the parent's handles are never used
    store.read(1)
    assert store._pid is not None and store._pid > 0
    store.close()
    clone.close()


def test_info_and_check(stores: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from cytonet.cli import main

    path = stores["zarr-blosc-zstd"]
    assert main(["store", "info", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("train", "test", "unseen", "B00", "B01", "tiny", "per split"):
        assert word in out
    assert describe_store(path).splitlines()[0].endswith(str(path))
    assert main(["store", "check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
    assert check_store(stores["hdf5-none"]).patches == len(PatchStore(stores["hdf5-none"]))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["missing", "truncated", "folder", "metadata", "manifest-count"])
def test_check_names_the_first_bad_shard(stores: dict[str, Path], tmp_path: Path, damage: str) -> None:
    path = _copy(stores["hdf5-blosc-zstd"], tmp_path / "s")
    bad = "shard-00002.h5"
    if damage == "missing":
        (path / bad).unlink()
    elif damage == "folder":  # HDF5's message for it runs over two lines
        (path / bad).unlink()
        (path / bad).mkdir()
    elif damage == "truncated":
        data = (path / bad).read_bytes()
        (path / bad).write_bytes(data[: len(data) // 2])
    elif damage == "metadata":
        import h5py

        with h5py.File(path / bad, "r+") as f:
            f["area"][0] = 99
    else:
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["shards"][2]["n"] += 1
        (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=bad):
        check_store(path)
    for quick in ([], ["--quick"]):
        r = subprocess.run(
            [sys.executable, "-m", "cytonet.cli", "store", "check", str(path), *quick],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1 and bad in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # errors are one line
    if damage in ("truncated", "folder"):  # as training's loader reads it
        store = PatchStore(path)
        with pytest.raises(InputError, match=bad) as caught:
            store.read(store.shard_ranges()[2][0])
        assert "\n" not in str(caught.value)
        store.close()


@pytest.mark.parametrize("key", ["hdf5-none", "zarr-none", "hdf5-blosc-zstd"])
def test_check_finds_changed_pixels_and_notes_stores_without_checksums(
    stores: dict[str, Path], tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pixels changed in an uncompressed shard decompress fine: only the manifest's per-shard pixel checksum
    (the same for every backend and codec) finds them. A store whose manifest predates the checksums is still
    checked for decompression, and the check says its pixels were not checksummed."""
    from cytonet.cli import main

    sums = [s["patches_sha256"] for s in json.loads((stores[key] / MANIFEST).read_text())["shards"]]
    ref = [s["patches_sha256"] for s in json.loads((stores["hdf5-none"] / MANIFEST).read_text())["shards"]]
    assert sums == ref and len(set(sums)) == len(sums)
    path = _copy(stores[key], tmp_path / "s")
    store = PatchStore(path)
    k = 1
    first = int(store.shards[k]["first"])
    patch = store.read(first + 2)
    store.close()
    name = store.shards[k]["name"]
    if key.startswith("hdf5"):
        import h5py

        with h5py.File(path / name, "r+") as f:
            f["patches"][2, 5, 5:25] = 255 - patch[5, 5:25]
    else:
        import zarr

        arr = zarr.open_group(str(path / name), mode="r+")["patches"]
        changed = patch.copy()
        changed[5, 5:25] = 255 - patch[5, 5:25]
        arr[2] = changed
    with pytest.raises(InputError, match=rf"{name}: pixel data differ from the manifest"):
        check_store(path)
    check_store(path, read_patches=False)  # --quick reads metadata only
    # The same damaged store as an older cytonet wrote it: no checksums to compare.
    manifest = json.loads((path / MANIFEST).read_text())
    for entry in manifest["shards"]:
        del entry["patches_sha256"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert check_store(path).unchecked_pixels == len(manifest["shards"])
    assert main(["store", "check", str(path)]) == 0
    assert "not checksummed" in capsys.readouterr().out


def test_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "shard-00000.h5").write_bytes(b"")
    with pytest.raises(InputError, match="unfinished"):
        PatchStore(tmp_path)
    with pytest.raises(InputError, match=r"manifest\.json"):
        PatchStore(tmp_path / "nothing")


def _set(manifest: dict, key: str, value: object) -> None:
    node = manifest
    *parents, last = key.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is KeyError:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("shards", 5, "'shards'"),
        ("shards.0", {}, r"'shards\[0\]\.name'"),
        ("shards.1.first", "8", r"'shards\[1\]\.first'"),
        ("shards.1.n", None, r"'shards\[1\]\.n'"),
        ("shards.1.split", "validation", r"'shards\[1\]\.split'"),
        ("shards.2.name", "../../elsewhere.h5", r"'shards\[2\]\.name'"),
        ("shards.0", "shard-00000.h5", r"'shards\[0\]'"),
        ("geometry", [], "'geometry'"),
        ("geometry.stored_px", KeyError, r"'geometry\.stored_px'"),
        ("areas", ["a", "b"], "'areas'"),
        ("areas", {"two": "hOc1"}, "'areas'"),
        ("brains", "B00", "'brains'"),
        ("splits.train", 24, r"'splits\.train'"),
        ("splits.test.n", -1, r"'splits\.test\.n'"),
        ("counts", KeyError, "'counts' is missing"),
        ("counts.area", {"train": 3}, r"'counts\.area'"),
        ("n_patches", "48", "'n_patches'"),
        ("backend", "tiff", "'backend'"),
        ("sections.0", "B00_s0000", r"'sections\[0\]'"),
    ],
)
def test_a_malformed_manifest_names_the_file_and_key(
    stores: dict[str, Path], tmp_path: Path, key: str, value: object, named: str
) -> None:
    manifest = json.loads((stores["hdf5-none"] / MANIFEST).read_text())
    _set(manifest, key, value)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=rf"{tmp_path / MANIFEST}: manifest key {named}"):
        PatchStore(tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", '"a store"', "null"])
def test_a_manifest_that_is_not_an_object_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(InputError, match=rf"{tmp_path / MANIFEST}: the manifest must be a JSON object"):
        PatchStore(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "cytonet.cli", "store", "info", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and MANIFEST in r.stderr and "Traceback" not in r.stderr and "unexpected" not in r.stderr


def test_an_hdf5_shard_that_may_not_fit_is_refused_before_hdf5_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HDF5 crashes the interpreter at exit after a write that failed for want of space (a half-closed
    handle): a shard that may not fit, uncompressed, is refused with ENOSPC before the file is created."""
    import errno
    import shutil
    from collections import namedtuple

    from cytonet.data.patches import ShardWriter

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(OSError) as info:
        ShardWriter(tmp_path / "shard-00000.h5", 64, 121, "none", {})
    assert info.value.errno == errno.ENOSPC and "needs up to 2 MiB, 1 MiB are free" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    ShardWriter(tmp_path / "shard-00000.zarr", 64, 121, "none", {}).abort()  # zarr writes at close: no crash
