"""Section stores (cytonet.data.sections): round trips through both backends, metadata, codecs, atomic writes,
refusal to overwrite, fork-safe readers, listing, format versions."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cytonet import __version__
from cytonet.data import sections
from cytonet.data.sections import (
    FORMAT_VERSION,
    SUFFIXES,
    SectionMeta,
    SectionReader,
    create_section,
    list_sections,
    open_section,
)
from cytonet.errors import InputError, OutputExistsError

BACKENDS = ["zarr", "hdf5"]
LAYERS = ("image", "labels", "depth", "coords")
SHAPE = (100, 70)  # not a multiple of the chunk edge: partial edge chunks are exercised
CHUNK = 32


def make_meta(shape: tuple[int, int] = SHAPE, **kw: Any) -> SectionMeta:
    args: dict[str, Any] = {
        "brain": "B03",
        "section_index": 17,
        "z_mm": 12.5,
        "pixel_size_um": 2.0,
        "shape": shape,
        "label_table": {0: "background", 1: "white_matter", 2: "hOc1", 40: "area_40"},
        "seed": 1234,
        "source": "synthetic",
        "extra": {"config": {"synth": {"n_brains": 2, "cortex_thickness_mm": [2.0, 3.0]}}, "note": "x"},
    }
    args.update(kw)
    return SectionMeta(**args)


def make_layers(shape: tuple[int, int] = SHAPE, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    depth = rng.random(shape, dtype=np.float32)
    depth[:, :5] = np.nan  # outside the cortex
    return {
        "image": rng.integers(0, 256, shape, dtype=np.uint8),
        "labels": rng.integers(0, 41, shape).astype(np.uint16),
        "depth": depth,
        "coords": rng.normal(size=(*shape, 3)).astype(np.float32),
    }


def write_store(
    path: Path,
    data: dict[str, np.ndarray],
    meta: SectionMeta | None = None,
    *,
    compression: str = "blosc-zstd",
    overwrite: bool = False,
) -> Path:
    """Write ``data`` one chunk row at a time, as the generator and the importer do."""
    meta = meta or make_meta(data["image"].shape)
    with create_section(
        path,
        meta,
        layers=tuple(data),
        chunk_px=CHUNK,
        compression=compression,  # type: ignore[arg-type]
        overwrite=overwrite,
    ) as w:
        for layer, arr in data.items():
            for y0 in range(0, arr.shape[0], CHUNK):
                w.write(layer, y0, 0, arr[y0 : y0 + CHUNK])
    return path


def store_path(tmp_path: Path, backend: str, name: str = "B03_s0017") -> Path:
    return tmp_path / f"{name}{SUFFIXES[backend]}"


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_all_layers(tmp_path: Path, backend: str) -> None:
    data = make_layers()
    path = write_store(store_path(tmp_path, backend), data)
    with open_section(path) as r:
        assert r.backend == backend
        assert r.shape == SHAPE
        assert r.layers == LAYERS
        for layer, expected in data.items():
            full = r.read(layer)
            assert full.dtype == expected.dtype and full.shape == expected.shape
            np.testing.assert_array_equal(full, expected)  # NaNs compare equal here
            # a region crossing chunk borders
            np.testing.assert_array_equal(r.read(layer, 13, 77, 5, 61), expected[13:77, 5:61])
            # empty and single-pixel regions
            assert r.read(layer, 10, 10, 3, 9).shape[:2] == (0, 6)
            np.testing.assert_array_equal(r.read(layer, 99, 100, 69, 70), expected[99:, 69:])
            # bands of rows
            bands = list(r.iter_rows(layer, 48))
            assert [y0 for y0, _ in bands] == [0, 48, 96]
            np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_reads(tmp_path: Path, backend: str) -> None:
    data = make_layers()
    path = write_store(store_path(tmp_path, backend), data)
    h, w = SHAPE
    with open_section(path) as r:
        for layer, expected in data.items():
            fill = {"image": 0, "labels": 0, "depth": np.nan, "coords": np.nan}[layer]
            box = r.read_padded(layer, -7, h + 5, -3, w + 9)  # past every edge
            assert box.shape[:2] == (h + 12, w + 12) and box.dtype == expected.dtype
            np.testing.assert_array_equal(box[7 : 7 + h, 3 : 3 + w], expected)
            outside = np.ones(box.shape[:2], dtype=bool)
            outside[7 : 7 + h, 3 : 3 + w] = False
            np.testing.assert_array_equal(box[outside], np.full_like(box[outside], fill))
            # entirely outside: all fill
            far = r.read_padded(layer, h + 10, h + 20, 0, 4)
            np.testing.assert_array_equal(far, np.full_like(far, fill))
            # entirely inside: same as read
            np.testing.assert_array_equal(r.read_padded(layer, 3, 40, 2, 50), expected[3:40, 2:50])
        with pytest.raises(ValueError, match="outside the section"):
            r.read("image", 0, h + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_reads_equal_padded_box_reads(tmp_path: Path, backend: str) -> None:
    data = make_layers()
    path = write_store(store_path(tmp_path, backend), data)
    h, w = SHAPE
    rng = np.random.default_rng(3)
    grids = [
        (np.arange(-20, h + 20, 7), np.arange(-5, w + 30, 3)),  # past every edge, several points per chunk
        (np.arange(3, h, CHUNK), np.arange(1, w, 2 * CHUNK)),  # one point per chunk or fewer
        (np.sort(rng.choice(h, 9, replace=False)), np.sort(rng.choice(w, 5, replace=False))),
        (np.array([h + 3, h + 9]), np.arange(0, w, 5)),  # all outside
        (np.array([], dtype=np.int64), np.arange(0, w, 5)),
    ]
    with open_section(path) as r:
        for layer in data:
            for ys, xs in grids:
                lo_y, lo_x = min([0, *ys]), min([0, *xs])
                hi_y, hi_x = max([h, *(ys + 1)]), max([w, *(xs + 1)])
                box = r.read_padded(layer, lo_y, hi_y, lo_x, hi_x)
                expected = box[np.ix_(ys - lo_y, xs - lo_x)]
                got = r.read_points(layer, ys, xs)
                assert got.dtype == expected.dtype
                np.testing.assert_array_equal(got, expected, err_msg=f"{layer} {ys} {xs}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_attributes(tmp_path: Path, backend: str) -> None:
    meta = make_meta()
    path = write_store(store_path(tmp_path, backend), make_layers(), meta)
    r = open_section(path)
    m = r.meta
    assert m.brain == "B03"
    assert m.section_index == 17
    assert m.z_mm == 12.5
    assert m.pixel_size_um == 2.0
    assert m.shape == SHAPE
    assert m.label_table == {0: "background", 1: "white_matter", 2: "hOc1", 40: "area_40"}
    assert all(isinstance(k, int) for k in m.label_table)
    assert m.seed == 1234
    assert m.source == "synthetic"
    assert m.cytonet_version == __version__
    assert m.extra == meta.extra
    assert m == meta  # nothing lost or changed on the way through the attributes
    # seed None (imported sections) survives as None
    path2 = write_store(store_path(tmp_path, backend, "B03_s0018"), make_layers(), make_meta(seed=None))
    assert open_section(path2).meta.seed is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_compression_none_vs_blosc_zstd(tmp_path: Path, backend: str) -> None:
    data = make_layers()
    data["image"] = np.zeros(SHAPE, dtype=np.uint8)  # compresses to nearly nothing
    data["image"][::7] = 200
    sizes = {}
    for compression in ("none", "blosc-zstd"):
        path = write_store(store_path(tmp_path / compression, backend), data, compression=compression)
        with open_section(path) as r:
            for layer, expected in data.items():
                np.testing.assert_array_equal(r.read(layer), expected)
            arr = r.array("image")
            if backend == "zarr":
                codecs = [type(c).__name__ for c in arr.compressors]
                assert codecs == ([] if compression == "none" else ["BloscCodec"])
            else:
                plist = arr.id.get_create_plist()
                filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
                assert filters == ([] if compression == "none" else [32001])  # 32001: the HDF5 blosc filter
        sizes[compression] = tree_bytes(path)
    assert sizes["blosc-zstd"] < sizes["none"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_refuses_to_overwrite_and_overwrite_replaces(tmp_path: Path, backend: str) -> None:
    path = store_path(tmp_path, backend)
    first = make_layers(seed=1)
    write_store(path, first)
    second = make_layers(seed=2)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_store(path, second)
    np.testing.assert_array_equal(open_section(path).read("image"), first["image"])
    write_store(path, second, make_meta(brain="B09"), overwrite=True)
    r = open_section(path)
    assert r.meta.brain == "B09"
    np.testing.assert_array_equal(r.read("image"), second["image"])
    assert not path.with_name(path.name + ".partial").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_writer_leaves_no_store(tmp_path: Path, backend: str) -> None:
    path = store_path(tmp_path, backend)
    partial = path.with_name(path.name + ".partial")
    data = make_layers()
    with pytest.raises(RuntimeError, match="boom"), create_section(path, make_meta(), chunk_px=CHUNK) as w:
        w.write("image", 0, 0, data["image"][:CHUNK])
        assert partial.exists() and not path.exists()
        raise RuntimeError("boom")
    assert not path.exists() and not partial.exists()
    assert list(tmp_path.iterdir()) == []

    # An existing store survives a failed overwrite untouched.
    write_store(path, data, make_meta(brain="OLD"))
    with (
        pytest.raises(RuntimeError, match="boom"),
        create_section(path, make_meta(brain="NEW"), chunk_px=CHUNK, overwrite=True) as w,
    ):
        w.write("image", 0, 0, np.full((CHUNK, SHAPE[1]), 7, dtype=np.uint8))
        raise RuntimeError("boom")
    assert not partial.exists()
    r = open_section(path)
    assert r.meta.brain == "OLD"
    for layer, expected in data.items():
        np.testing.assert_array_equal(r.read(layer), expected)


def test_writer_rejects_bad_layers_and_regions(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="image"):
        create_section(tmp_path / "a.zarr", make_meta(), layers=("labels",))
    with pytest.raises(InputError, match="layers"):
        create_section(tmp_path / "a.zarr", make_meta(), layers=("image", "colour"))
    with pytest.raises(InputError, match="suffix"):
        create_section(tmp_path / "a.n5", make_meta())
    with create_section(tmp_path / "a.h5", make_meta(), layers=("image",), chunk_px=CHUNK) as w:
        with pytest.raises(ValueError, match="outside"):
            w.write("image", 90, 0, np.zeros((20, 10), dtype=np.uint8))
        with pytest.raises(KeyError, match="labels"):
            w.write("labels", 0, 0, np.zeros((2, 2), dtype=np.uint16))
        w.write("image", 0, 0, np.ones(SHAPE, dtype=np.uint8))
    r = open_section(tmp_path / "a.h5")
    assert r.layers == ("image",) and not r.has("labels")
    with pytest.raises(InputError, match="no layer 'labels'"):
        r.read("labels")


def _read_in_child(args: tuple[SectionReader, int, int]) -> np.ndarray:
    reader, y0, y1 = args
    return reader.read("image", y0, y1) + reader.read("labels", y0, y1).astype(np.uint8)


def _child_via_fork(reader: SectionReader, queue: Any) -> None:
    try:
        queue.put(("ok", reader.read("image", 0, 50)))
    except Exception as exc:
        queue.put(("error", repr(exc)))


def test_reader_works_in_forked_children(tmp_path: Path) -> None:
    data = make_layers()
    path = write_store(store_path(tmp_path, "hdf5"), data)
    expected = data["image"] + data["labels"].astype(np.uint8)
    ctx = mp.get_context("fork")

    # Pickled before first use (as a DataLoader does with its dataset): each child opens its own handle.
    reader = open_section(path)
    assert reader._handle is None  # the constructor closed the handle it read the metadata with
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read("image"), data["image"])
    with ctx.Pool(2) as pool:
        parts = pool.map(_read_in_child, [(reader, y0, y0 + 25) for y0 in range(0, SHAPE[0], 25)])
    np.testing.assert_array_equal(np.concatenate(parts), expected)

    # Used in the parent first, then inherited through fork (not pickled): the child sees another pid and
    # opens its own handle instead of sharing the parent's.
    np.testing.assert_array_equal(reader.read("image", 0, 10), data["image"][:10])
    assert reader._handle is not None
    queue = ctx.Queue()
    child = ctx.Process(target=_child_via_fork, args=(reader, queue))
    child.start()
    status, result = queue.get(timeout=60)
    child.join(timeout=60)
    assert status == "ok", result
    np.testing.assert_array_equal(result, data["image"][:50])
    # the parent's handle still works after the child is gone
    np.testing.assert_array_equal(reader.read("image", 50, 100), data["image"][50:])
    reader.close()


def test_list_sections_ignores_partial_stores(tmp_path: Path) -> None:
    data = make_layers((40, 30))
    a = write_store(tmp_path / "B01" / "B01_s0000.zarr", data)
    b = write_store(tmp_path / "B02" / "B02_s0003.h5", data)
    c = write_store(tmp_path / "B01" / "B01_s0001.hdf5", data)
    unfinished = [
        create_section(tmp_path / "B01" / "B01_s0002.zarr", make_meta((40, 30)), chunk_px=CHUNK),
        create_section(tmp_path / "B02" / "B02_s0004.h5", make_meta((40, 30)), chunk_px=CHUNK),
    ]
    assert (tmp_path / "B01" / "B01_s0002.zarr.partial").exists()
    assert (tmp_path / "B02" / "B02_s0004.h5.partial").exists()
    assert list_sections(tmp_path) == sorted([a, b, c])
    for w in unfinished:
        w.abort()
    with pytest.raises(InputError, match="does not exist"):
        list_sections(tmp_path / "nowhere")


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_version_mismatch_is_refused(tmp_path: Path, backend: str) -> None:
    path = write_store(store_path(tmp_path, backend), make_layers((40, 30)))
    if backend == "zarr":
        import zarr

        zarr.open_group(str(path), mode="r+").attrs["format_version"] = FORMAT_VERSION + 98
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f.attrs["format_version"] = json.dumps(FORMAT_VERSION + 98)
    with pytest.raises(InputError, match=rf"format version {FORMAT_VERSION + 98} is not supported.*expected"):
        open_section(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_metadata_and_missing_store(tmp_path: Path, backend: str) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_section(store_path(tmp_path, backend, "absent"))
    path = write_store(store_path(tmp_path, backend), make_layers((40, 30)))
    if backend == "zarr":
        import zarr

        del zarr.open_group(str(path), mode="r+").attrs["brain"]
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            del f.attrs["brain"]
    with pytest.raises(InputError, match="lacks the attribute 'brain'"):
        open_section(path)


def test_corrupt_hdf5_store_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(InputError, match=r"bad\.h5"):
        open_section(path)


@pytest.mark.parametrize(
    "attrs, bad",
    [
        ({"brain": 7}, "brain"),  # a number, not JSON text: json.loads raises TypeError
        ({"title": "scan of slide 4"}, "title"),  # text that is not JSON: JSONDecodeError
        ({"format_version": "1", "brain": '"B00"', "section_index": '"first"'}, "section_index"),  # int("first")
        ({"format_version": "1", "brain": '"B00"', "section_index": "3", "z_mm": "0", "pixel_size_um": "2",
          "shape": "5"}, "shape"),  # 5[0]: TypeError
    ],
)  # fmt: skip
def test_foreign_hdf5_file_is_not_a_section_store(tmp_path: Path, attrs: dict[str, Any], bad: str) -> None:
    """An HDF5 file another program wrote, found among the sections: an InputError naming the file and the
    attribute, never a bare JSONDecodeError or TypeError."""
    import h5py

    path = tmp_path / "B00" / "scan.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((4, 4), np.uint8)
        for key, value in attrs.items():
            f.attrs[key] = value
    assert list_sections(tmp_path) == [path]
    with pytest.raises(InputError, match=rf"scan\.h5: not a cytonet section store \(attribute '{bad}'"):
        open_section(path)


@pytest.mark.parametrize("damage", ["garbage", "array", "empty"])
def test_damaged_zarr_group_metadata_is_an_input_error(tmp_path: Path, damage: str) -> None:
    """Readers take a zarr store's attributes from its zarr.json; a damaged one goes through zarr and fails
    with the store named, as before."""
    path = write_store(store_path(tmp_path, "zarr"), make_layers((40, 30)))
    doc = path / "zarr.json"
    if damage == "garbage":
        doc.write_text("{not json")
    elif damage == "array":  # the image array's metadata in the group's place
        doc.write_text((path / "image" / "zarr.json").read_text())
    else:
        doc.unlink()
    with pytest.raises(InputError, match=rf"{path.name}"):
        open_section(path)


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 16, 260])
def test_block_mean_rounds_half_up_like_the_float_mean(factor: int) -> None:
    from cytonet.data.sections import block_mean_uint8

    rng = np.random.default_rng(factor)
    img = rng.integers(0, 256, (3 * factor - 1, 4 * factor - 1), dtype=np.uint8)  # partial blocks dropped
    img[:factor, :factor] = 255  # the largest sums
    ref = np.floor(img[: 2 * factor, : 3 * factor].reshape(2, factor, 3, factor).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(block_mean_uint8(img, factor), ref.astype(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_levels_equal_averaging_the_full_resolution(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored level gives the same pixels as block-averaging the full resolution, for boxes inside, across
    and past the section's edge (100 x 70 px: no level divides it, so partial edge pixels are exercised), and
    reading in strips on several threads gives them too."""
    monkeypatch.setattr(sections, "READ_STRIP_MIN_ROWS", 2)  # strips in boxes this small
    monkeypatch.setattr(sections, "READ_STRIP_MIN_PX", 2)
    data = {"image": make_layers()["image"]}
    meta = make_meta()
    path = store_path(tmp_path, backend)
    with create_section(path, meta, layers=("image",), chunk_px=CHUNK, image_levels=(2, 4, 16)) as w:
        for y0 in range(0, SHAPE[0], CHUNK):
            w.write("image", y0, 0, data["image"][y0 : y0 + CHUNK])
    plain = write_store(store_path(tmp_path / "plain", backend), data)
    with open_section(path) as r, open_section(plain) as p:
        assert r.image_levels == (2, 4, 16) and p.image_levels == ()
        assert r.meta == SectionMeta.from_attrs(r.meta.to_attrs(), "x")
        assert r.array("image_x4").shape == (25, 18) and r.array("image_x16").shape == (7, 5)
        rng = np.random.default_rng(0)
        for f in (1, 2, 3, 4, 16):
            lh, lw = -(-SHAPE[0] // f), -(-SHAPE[1] // f)
            boxes = [(0, lh, 0, lw), (-3, lh + 2, -1, lw + 4), (lh - 1, lh + 1, 0, 1)]
            boxes += [
                tuple(int(v) for v in (*sorted(rng.integers(-4, lh + 4, 2)), *sorted(rng.integers(-4, lw + 4, 2))))
                for _ in range(6)
            ]
            for y0, y1, x0, x1 in boxes:
                y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
                full = p.read_padded("image", y0 * f, y1 * f, x0 * f, x1 * f).astype(np.float64)
                ref = np.floor(full.reshape(y1 - y0, f, x1 - x0, f).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
                np.testing.assert_array_equal(r.read_image(f, y0, y1, x0, x1), ref, err_msg=f"f={f} {y0, y1, x0, x1}")
                np.testing.assert_array_equal(p.read_image(f, y0, y1, x0, x1), ref)
                for reader in (r, p):
                    np.testing.assert_array_equal(reader.read_image(f, y0, y1, x0, x1, threads=3), ref)
                    buf = np.full((y1 - y0, x1 - x0), 7, dtype=np.uint8)
                    assert reader.read_image(f, y0, y1, x0, x1, threads=2, out=buf) is buf
                    np.testing.assert_array_equal(buf, ref)
        with pytest.raises(ValueError, match=r"out is uint8 \(3, 4\), the box is uint8 \(3, 5\)"):
            r.read_image(1, 0, 3, 0, 5, out=np.empty((3, 4), np.uint8))


def test_declared_image_reads_decode_shared_chunks_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two boxes sharing chunks, declared ahead (as inference declares its blocks' read boxes): the second
    box gets the shared chunks from the cache although the LRU part keeps nothing, even after the first box
    was read in strips on three threads (strips are cut at chunk rows: a chunk row cut in two would be read
    twice by the first box and spend the declared read of the second)."""
    monkeypatch.setattr(sections, "CHUNK_CACHE_BYTES", 0)
    monkeypatch.setattr(sections, "READ_STRIP_MIN_ROWS", 2)
    monkeypatch.setattr(sections, "READ_STRIP_MIN_PX", 2)
    image = make_layers()["image"]
    path = write_store(store_path(tmp_path, "zarr"), {"image": image})
    first, second = (0, 100, 0, 40), (-5, 100, 30, 70)  # chunk columns 0-1 and 0-2 (CHUNK 32)
    with open_section(path) as r:
        r.expect_image(1, [first, second])
        np.testing.assert_array_equal(r.read_image(1, *first, threads=3), image[:, :40])
        for f in (path / "image").rglob("*"):
            if f.is_file() and f.name != "zarr.json" and f.name in ("0", "1"):  # the chunk columns read
                f.unlink()
        got = r.read_image(1, *second)
    np.testing.assert_array_equal(got[5:, :34], image[:, 30:64])  # the shared chunks: from the cache
    np.testing.assert_array_equal(got[5:, 34:], image[:, 64:70])  # a chunk never read: from its file
    assert (got[:5] == 0).all()  # past the edge


def test_image_levels_must_be_powers_of_two(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"B03_s0017\.zarr.*image levels \[4, 3\]"):
        create_section(store_path(tmp_path, "zarr"), make_meta(), image_levels=(4, 3))
    assert not any(tmp_path.iterdir())  # nothing created


@pytest.mark.parametrize("factor", [2, 7, 33, 300])
def test_block_sums_equal_the_wide_sum(factor: int) -> None:
    from cytonet.data.sections import block_sums

    img = np.random.default_rng(factor).integers(0, 256, (2 * factor + 1, 3 * factor), dtype=np.uint8)
    img[:factor, :factor] = 255
    ref = img[: 2 * factor].reshape(2, factor, 3, factor).sum(axis=(1, 3), dtype=np.uint64)
    np.testing.assert_array_equal(block_sums(img, factor), ref)


def _overwrite_array(path: Path, backend: str, name: str, value: float | None) -> None:
    """Set every element of array ``name`` of a closed store to ``value``, or remove the array (None)."""
    if backend == "zarr":
        import shutil

        import zarr

        if value is None:
            shutil.rmtree(path / name)
        else:
            # every chunk written, as the store's writer does (a missing chunk of such a store is damage)
            zarr.open_array(str(path / name), mode="r+").with_config({"write_empty_chunks": True})[...] = value
        return
    import h5py

    with h5py.File(path, "r+") as f:
        if value is None:
            del f[name]
        else:
            f[name][...] = value


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_levels_serve_the_labels_and_depth_at_level_centres(tmp_path: Path, backend: str) -> None:
    """labels_x<f> and depth_x<f> hold the full resolution at m f + f // 2 (the fill past the edge), and
    read_points of points at those pixels reads them, not the full resolution: with the full-resolution
    layers wiped, such points still read right, other points read the wiped values; a store without the
    sampled levels (written before them) reads the full resolution."""
    data = make_layers()
    path = store_path(tmp_path, backend)
    with create_section(path, make_meta(), layers=LAYERS, chunk_px=CHUNK, image_levels=(2, 4, 16)) as w:
        for layer, arr in data.items():
            w.write(layer, 0, 0, arr)
    h, w_ = SHAPE
    with open_section(path) as r:
        for layer in ("labels", "depth"):
            for f in (2, 4, 16):
                level = np.asarray(r.array(f"{layer}_x{f}")[...])
                assert level.shape == (-(-h // f), -(-w_ // f))
                ys, xs = np.arange(level.shape[0]) * f + f // 2, np.arange(level.shape[1]) * f + f // 2
                ref = r.read_padded(layer, 0, ys[-1] + 1, 0, xs[-1] + 1)[np.ix_(ys, xs)]
                np.testing.assert_array_equal(level, ref, err_msg=f"{layer}_x{f}")
    fills = {"labels": 0, "depth": float("nan")}
    for layer, fill in fills.items():
        _overwrite_array(path, backend, layer, fill)
    centres = np.arange(-3, 40) * 4 + 2  # the x4 centres, some past the edges
    rows, cols = centres[(centres > -8) & (centres < h + 9)], centres[(centres > -8) & (centres < w_ + 9)]
    with open_section(path) as r:
        for layer, fill in fills.items():
            padded = np.pad(data[layer], ((8, 9), (8, 9)), constant_values=fill)
            np.testing.assert_array_equal(r.read_points(layer, rows, cols), padded[np.ix_(rows + 8, cols + 8)])
            off = r.read_points(layer, rows[rows >= 0] + 1, cols[cols >= 0])  # not centres: the wiped layer
            np.testing.assert_array_equal(off, np.full_like(off, fill))
    for layer in fills:
        for f in (2, 4, 16):
            _overwrite_array(path, backend, f"{layer}_x{f}", None)
    with open_section(path) as r:  # no sampled levels: the full resolution, wiped
        got = r.read_points("depth", rows[rows >= 0], cols[cols >= 0])
        assert np.isnan(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("layer", "bad"),
    [
        ("image", lambda a: a.astype(np.uint16) * 257),  # a 16-bit scan written directly
        ("coords", lambda a: a[..., 0].copy()),  # coordinates without their axis of 3
        ("labels", lambda a: a.T.copy()),  # transposed
        ("depth", lambda a: np.nan_to_num(a * 100).astype(np.int32)),  # integer percent
    ],
)
def test_a_layer_of_the_wrong_dtype_or_shape_is_refused_naming_it(
    tmp_path: Path, backend: str, layer: str, bad: Any
) -> None:
    """A store written by other tools with a layer that is not what cytonet reads there (16-bit image, 2D
    coordinates, ...) was read as something else without a word; the first read of the array names it."""
    data = make_layers()
    path = write_store(store_path(tmp_path, backend), data)
    replaced = bad(data[layer])
    if backend == "zarr":
        import zarr

        group = zarr.open_group(str(path), mode="r+")
        del group[layer]
        group.create_array(layer, data=replaced, chunks=replaced.shape)
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            del f[layer]
            f.create_dataset(layer, data=replaced)
    with (
        open_section(path) as r,
        pytest.raises(InputError, match=rf"{path}: array '{layer}' is .* the {layer} layer must be"),
    ):
        if layer in ("labels", "depth"):
            r.read_points(layer, np.array([5, 50]), np.array([10, 20]))
        else:
            r.read(layer, 0, 10, 0, 10)


def test_a_missing_chunk_file_of_a_whole_store_is_refused(tmp_path: Path) -> None:
    """Section stores are written whole (chunks of only the fill value too), so a chunk file missing (a copy
    cut short) is damage: reading it names the file instead of returning black pixels. A store written before
    (without the attribute) may omit fill chunks, which read as the fill value."""
    data = make_layers()
    data["labels"][:32, :32] = 0  # a chunk of only the fill value: written all the same
    path = write_store(store_path(tmp_path, "zarr"), data)
    assert (path / "labels" / "c" / "0" / "0").is_file()
    (path / "image" / "c" / "1" / "1").unlink()
    with open_section(path) as r:
        np.testing.assert_array_equal(r.read("image", 0, 32, 0, 70), data["image"][:32])
        with pytest.raises(InputError, match=r"image: chunk file c/1/1 is missing, but every chunk .* copied in part"):
            r.read("image", 30, 40, 30, 40)
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["chunks_written"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with open_section(path) as r:
        assert (r.read("image", 32, 64, 32, 64) == 0).all()


def set_attr(path: Path, key: str, value: Any) -> None:
    """Write one attribute of a store as its writer stores it (zarr: in zarr.json; HDF5: as JSON text), also
    values json.dumps writes as NaN / Infinity."""
    if path.suffix == ".zarr":
        doc = json.loads((path / "zarr.json").read_text())
        doc["attributes"][key] = value
        (path / "zarr.json").write_text(json.dumps(doc))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f.attrs[key] = json.dumps(value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # 0: ZeroDivisionError, NaN: "cannot convert float NaN to integer", 1e-300: OverflowError, -8 accepted.
        ("pixel_size_um", 0, "pixel_size_um=0.0 is invalid: a pixel size is finite and within 0.01..1000 um"),
        ("pixel_size_um", -8, "pixel_size_um=-8.0 is invalid"),
        ("pixel_size_um", float("nan"), "pixel_size_um=nan is invalid"),
        ("pixel_size_um", float("inf"), "pixel_size_um=inf is invalid"),
        ("pixel_size_um", 1e-300, "pixel_size_um=1e-300 is invalid"),
        ("pixel_size_um", 1e300, r"pixel_size_um=1e\+300 is invalid"),
        ("pixel_size_um", "8", "attribute 'pixel_size_um'='8': a number"),
        ("z_mm", float("nan"), "z_mm=nan is invalid: a section plane lies within 1000 mm of the origin"),
        ("z_mm", -1e300, r"z_mm=-1e\+300 is invalid"),
        ("section_index", 1.5, "attribute 'section_index'=1.5: an integer"),
        ("section_index", -1, "section_index=-1 is invalid"),
        ("section_index", True, "attribute 'section_index'=True: an integer"),
        ("shape", [0, 5], r"shape=\[0, 5\] is invalid"),
        ("shape", [40.5, 30], r"attribute 'shape'=\[40.5, 30\]: a list of 2 integers"),
        ("shape", [40], r"attribute 'shape'=\[40\]: a list of 2 integers"),
        ("label_table", {"70000": "x"}, r"label_table=\[70000\] is invalid: area ids are 0..65535"),
        ("label_table", {"two": "x"}, "attribute 'label_table'="),
        ("label_table", {"2": 5}, "attribute 'label_table'="),
        ("brain", "", "brain='' is invalid"),
        ("brain", "../B00", r"brain='\.\./B00' is invalid"),
        ("brain", 7, "attribute 'brain'=7: a text"),
        ("seed", -1, "seed=-1 is invalid"),
        ("image_levels", [3], r"image_levels: image levels \[3\] must be increasing"),
        ("image_levels", [2.0], r"attribute 'image_levels'=\[2.0\]"),
    ],
)
def test_section_metadata_is_validated_when_the_store_is_opened(
    tmp_path: Path, backend: str, key: str, value: Any, message: str
) -> None:
    """An attribute no section has is refused when the store is opened, naming the store, the attribute and the
    value, before extract or infer divide by it."""
    path = write_store(store_path(tmp_path, backend), make_layers((40, 30)))
    set_attr(path, key, value)
    with pytest.raises(InputError, match=rf"^{path}: .*{message}") as caught:
        open_section(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("bad", [{"pixel_size_um": 0.0}, {"z_mm": float("inf")}, {"section_index": -2}])
def test_a_store_readers_would_refuse_is_never_written(tmp_path: Path, bad: dict[str, Any]) -> None:
    path = store_path(tmp_path, "zarr")
    with pytest.raises(InputError, match=rf"^{path}: section store attribute {next(iter(bad))}="):
        write_store(path, make_layers((40, 30)), make_meta((40, 30), **bad))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{\n", "JSONDecodeError: Expecting property name enclosed in double quotes: line 2 column 1"),
        ("[]", "MetadataValidationError"),
        ('{"node_type": "array", "zarr_format": 3}', "KeyError: 'data_type'"),
        ('{"node_type": "group", "zarr_format": 3}', "'image' is a group, not an array"),
    ],
)
def test_damaged_array_metadata_names_the_file(tmp_path: Path, content: str, message: str) -> None:
    """A damaged zarr.json of a layer: zarr's bare JSONDecodeError (or KeyError, or 'no layer') became an
    InputError naming the file."""
    path = write_store(store_path(tmp_path, "zarr"), make_layers((40, 30)))
    meta_file = path / "image" / "zarr.json"
    meta_file.write_text(content)
    with open_section(path) as r, pytest.raises(InputError, match=rf"^{meta_file}: .*{message}"):
        r.read("image", 0, 4, 0, 4)


def test_damaged_group_metadata_names_the_file(tmp_path: Path) -> None:
    path = write_store(store_path(tmp_path, "zarr"), make_layers((40, 30)))
    (path / "zarr.json").write_text("{\n")
    with pytest.raises(InputError, match=rf"^{path / 'zarr.json'}: cannot read the section store's metadata: JSON"):
        open_section(path)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("image-json", "B00_s0000.zarr/image/zarr.json: cannot read the metadata of array 'image': JSONDecodeError"),
        ("pixel-0", "B00_s0000.zarr: section store attribute pixel_size_um=0.0 is invalid"),
        ("pixel-nan", "B00_s0000.zarr: section store attribute pixel_size_um=nan is invalid"),
        ("pixel-tiny", "B00_s0000.zarr: section store attribute pixel_size_um=1e-300 is invalid"),
        ("pixel-negative", "B00_s0000.zarr: section store attribute pixel_size_um=-8.0 is invalid"),
    ],
)
def test_extract_and_infer_name_the_damaged_store(tmp_path: Path, damage: str, message: str) -> None:
    """Real `cytonet extract` and `cytonet infer` over sections of which one is damaged: one line naming the
    store, exit 1 (the old messages named no file: 'unexpected ZeroDivisionError', ...)."""
    import subprocess
    import sys

    from ringdata import make_sections
    from test_extract import write_yaml
    from test_infer import base_config, write_model

    from cytonet.config import save_config

    root = tmp_path / "run"
    make_sections(root / "sections", {"B00": 1, "B01": 1})
    store = root / "sections" / "B00" / "B00_s0000.zarr"
    if damage == "image-json":
        (store / "image" / "zarr.json").write_text("{\n")
    else:
        value = {"pixel-0": 0, "pixel-nan": float("nan"), "pixel-tiny": 1e-300, "pixel-negative": -8}[damage]
        for s in (root / "sections").glob("*/*.zarr"):  # all alike: no "different pixel sizes" first
            set_attr(s, "pixel_size_um", value)
    cfg = base_config(root)
    write_model(cfg, root / "probe")
    save_config(cfg, root, name="infer.yaml")
    commands = {
        "extract": ["extract", str(write_yaml(tmp_path, root / "sections")), "--out", str(tmp_path / "patches")],
        "infer": ["infer", str(root / "infer.yaml")],
    }
    for name, args in commands.items():
        p = subprocess.run(
            [sys.executable, "-m", "cytonet.cli", *args], capture_output=True, text=True, timeout=300, check=False
        )
        errors = [line for line in p.stderr.splitlines() if "error" in line]
        assert p.returncode == 1 and len(errors) == 1, (name, p.stderr)
        assert errors[0].startswith("cytonet: error: ") and message in errors[0], (name, p.stderr)
