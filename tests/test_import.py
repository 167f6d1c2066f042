"""Importing real sections (cytonet.data.importer, ``cytonet import``): TIFF / OME-TIFF pyramids, HDF5 and zarr
sources, dtype conversions, labels / coords / depth, bounded memory, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import yaml
import zarr

from cytonet import __version__
from cytonet.config import Config, config_from_dict, config_to_dict, load_config
from cytonet.data.importer import LUMA_WEIGHTS, SAMPLE_PIXELS, UINT16_PERCENTILES, import_section
from cytonet.data.sections import list_sections, open_section
from cytonet.errors import ConfigError, InputError, OutputExistsError

REPO = Path(__file__).resolve().parent.parent
H, W = 150, 230  # not multiples of tiles (64) or chunks (64): partial tiles and chunks everywhere
CHUNK = 64


def make_cfg(backend: str = "zarr", chunk_px: int = CHUNK, compression: str = "none", **importer: Any) -> Config:
    importer = {k: str(v) if isinstance(v, Path) else v for k, v in importer.items()}
    return config_from_dict(
        {
            "importer": {"brain": "B07", "section_index": 12, "z_mm": 3.25, "pixel_size_um": 1.5, **importer},
            "sections": {"backend": backend, "chunk_px": chunk_px, "compression": compression},
        }
    )


def rand_u8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def region_labels(ids: int, seed: int, dtype: type = np.int32) -> np.ndarray:
    """H x W labels of ``ids`` ids in 10 x 10 px squares: a map of regions, as real label images are."""
    coarse = np.random.default_rng(seed).integers(0, ids, (H // 10 + 1, W // 10 + 1))
    return np.kron(coarse, np.ones((10, 10), dtype=int))[:H, :W].astype(dtype)


def write_h5(path: Path, datasets: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "a") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value, chunks=True)
    return path


def tree_digest(path: Path) -> str:
    """Hash of every file's name, bytes and mtime below ``path`` (a file or folder)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
        h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# TIFF sources


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_tiled_tiff_exact_with_metadata(tmp_path: Path, backend: str) -> None:
    image = rand_u8((H, W))
    tif = tmp_path / "scan.tif"
    tifffile.imwrite(tif, image, tile=(64, 64))
    cfg = make_cfg(backend, image=tif, label_names={2: "hOc1"})
    out = tmp_path / "out"
    path = import_section(cfg, out, overwrite=False)
    assert path == out / "B07" / ("B07_s0012" + (".zarr" if backend == "zarr" else ".h5"))
    assert list_sections(out) == [path]
    with open_section(path) as r:
        np.testing.assert_array_equal(r.read("image"), image)  # uint8 is copied bit for bit
        assert r.layers == ("image",)
        m = r.meta
        assert (m.brain, m.section_index, m.z_mm, m.pixel_size_um, m.shape) == ("B07", 12, 3.25, 1.5, (H, W))
        assert m.seed is None
        assert m.source == str(tif.resolve())
        assert m.cytonet_version == __version__
        assert m.label_table == {2: "hOc1"}  # no label image: label_names as given
        assert m.extra["config"] == json.loads(json.dumps(config_to_dict(cfg)))
        assert m.extra["image_conversion"]["rule"] == "copy"
    saved = out / "B07_s0012.import.yaml"
    assert load_config(saved) == cfg  # the resolved config is saved beside the store


def test_strip_tiffs_uncompressed_and_zlib(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=1)
    variants: dict[str, dict[str, Any]] = {
        "one_strip.tif": {},  # uncompressed, contiguous: memory-mapped
        "strips.tif": {"rowsperstrip": 16},
        "zlib.tif": {"compression": "zlib", "rowsperstrip": 8},
    }
    for name, kwargs in variants.items():
        tifffile.imwrite(tmp_path / name, image, **kwargs)
        path = import_section(make_cfg(image=tmp_path / name), tmp_path / name.replace(".", "_"), overwrite=False)
        np.testing.assert_array_equal(open_section(path).read("image"), image)


def test_ome_tiff_pyramid_takes_level_0(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=2)
    # OME-TIFF with the reduced levels in sub-IFDs.
    ome = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(ome) as tw:
        tw.write(image, subifds=2, tile=(64, 64), metadata={"axes": "YX"})
        tw.write(image[::2, ::2], subfiletype=1, tile=(64, 64))
        tw.write(image[::4, ::4], subfiletype=1, tile=(64, 64))
    with tifffile.TiffFile(ome) as t:
        assert t.is_ome and len(t.series[0].levels) == 3
    path = import_section(make_cfg(image=ome), tmp_path / "a", overwrite=False)
    np.testing.assert_array_equal(open_section(path).read("image"), image)

    # Plain TIFF whose levels are reduced-resolution pages (a pyramid as series levels), plus a thumbnail page.
    gen = tmp_path / "pyramid_pages.tif"
    with tifffile.TiffWriter(gen) as tw:
        tw.write(image, tile=(64, 64), compression="zlib")
        tw.write(image[::2, ::2], subfiletype=1, tile=(64, 64))
    with tifffile.TiffFile(gen) as t:
        assert len(t.pages) == 2 and len(t.series[0].levels) == 2
    path = import_section(make_cfg(image=gen), tmp_path / "b", overwrite=False)
    np.testing.assert_array_equal(open_section(path).read("image"), image)

    # A full-size image followed by a small separate image (slide-scanner label/thumbnail): first one is taken.
    thumb = tmp_path / "with_thumbnail.tif"
    with tifffile.TiffWriter(thumb) as tw:
        tw.write(image, tile=(64, 64), metadata=None)
        tw.write(image[:40, :50], metadata=None)
    path = import_section(make_cfg(image=thumb), tmp_path / "c", overwrite=False)
    np.testing.assert_array_equal(open_section(path).read("image"), image)


def test_uint16_tiff_is_rescaled_by_percentiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(20000, 4000, (H, W)).clip(0, 65535).astype(np.uint16)
    image[5, 5], image[6, 6] = 0, 65535  # outliers beyond the percentiles are clipped
    tif = tmp_path / "scan16.tif"
    tifffile.imwrite(tif, image, tile=(64, 64))
    path = import_section(make_cfg(image=tif), tmp_path / "out", overwrite=False)
    r = open_section(path)
    # The image is small enough to be sampled whole: the rule is exactly the documented one.
    assert H * W < SAMPLE_PIXELS
    lo, hi = np.percentile(image, UINT16_PERCENTILES, method="inverted_cdf")
    conv = r.meta.extra["image_conversion"]
    assert conv == {"rule": "uint16-percentile", "lo": float(lo), "hi": float(hi)}
    expected = np.clip(np.rint((image.astype(np.float64) - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    got = r.read("image")
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 rounding at .5
    assert (got == expected).mean() > 0.999
    assert got[5, 5] == 0 and got[6, 6] == 255
    assert (got[image <= lo] == 0).all() and (got[image >= hi] == 255).all()
    order = np.argsort(image, axis=None, kind="stable")
    assert (np.diff(got.ravel()[order].astype(int)) >= 0).all()  # the mapping is monotonic


def test_rgb_and_float_images(tmp_path: Path) -> None:
    rgb = rand_u8((H, W, 3), seed=4)
    luma = np.clip(np.rint(rgb.astype(np.float64) @ np.array(LUMA_WEIGHTS)), 0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", tile=(64, 64))
    rgba = np.concatenate([rgb, rand_u8((H, W, 1), seed=5)], axis=-1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    planar = np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate", tile=(64, 64))
    for name in ("rgb.tif", "rgba.tif", "planar.tif"):
        path = import_section(make_cfg(image=tmp_path / name), tmp_path / name.replace(".", "_"), overwrite=False)
        got = open_section(path).read("image")
        assert np.abs(got.astype(int) - luma.astype(int)).max() <= 1, name
        assert open_section(path).meta.extra["image_conversion"]["rule"] == "rgb-luma"

    unit = np.random.default_rng(6).random((H, W))
    unit[0, :3] = [0.0, 1.0, 0.5]
    write_h5(tmp_path / "float.h5", {"/img": unit})
    path = import_section(make_cfg(image=f"{tmp_path / 'float.h5'}:/img"), tmp_path / "f", overwrite=False)
    np.testing.assert_array_equal(open_section(path).read("image"), np.rint(unit.astype(np.float32) * 255))


# ---------------------------------------------------------------------------------------------------------
# HDF5 and zarr sources, labels, coords, depth


def test_hdf5_and_zarr_sources_with_all_layers(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    image = rand_u8((H, W), seed=7)
    labels = region_labels(6, seed=7)
    labels[:10] = 300
    coords = rng.normal(size=(3, H, W))  # 3 x H x W float64, mm
    depth = rng.random((H, W), dtype=np.float32)
    depth[:, :20] = np.nan
    h5 = write_h5(tmp_path / "section.hdf5", {"/raw/image": image, "/raw/labels": labels, "/maps/depth": depth})
    zarr.open_group(str(tmp_path / "maps.zarr"), mode="w").create_array("geo/coords", data=coords, chunks=(3, 64, 64))
    cfg = make_cfg(
        "hdf5",
        image=f"{h5}:/raw/image",
        labels=f"{h5}:raw/labels",
        depth=f"{h5}:/maps/depth",
        coords=f"{tmp_path / 'maps.zarr'}:geo/coords",
        label_names={0: "outside", 2: "hOc1", 3: "hOc2"},
    )
    path = import_section(cfg, tmp_path / "out", overwrite=False)
    r = open_section(path)
    assert r.layers == ("image", "labels", "depth", "coords")
    np.testing.assert_array_equal(r.read("image"), image)
    np.testing.assert_array_equal(r.read("labels"), labels.astype(np.uint16))
    np.testing.assert_array_equal(r.read("depth"), depth)  # NaNs stay NaN
    np.testing.assert_array_equal(r.read("coords"), np.moveaxis(coords, 0, -1).astype(np.float32))
    assert r.meta.label_table == {
        0: "outside",  # label_names may rename the defaults
        1: "white_matter",
        2: "hOc1",
        3: "hOc2",
        4: "area_4",
        5: "area_5",
        300: "area_300",
    }
    assert set(r.meta.extra["sources"]) == {"image", "labels", "depth", "coords"}

    # Coordinates as H x W x 3 float32 in an HDF5 file with a single dataset (no key needed); a zarr array.
    write_h5(tmp_path / "coords_only.h5", {"c": np.moveaxis(coords, 0, -1).astype(np.float32)})
    zarr.create_array(str(tmp_path / "image.zarr"), data=image, chunks=(64, 64))
    cfg = make_cfg(image=tmp_path / "image.zarr", coords=tmp_path / "coords_only.h5")
    r = open_section(import_section(cfg, tmp_path / "out2", overwrite=False))
    np.testing.assert_array_equal(r.read("image"), image)
    np.testing.assert_array_equal(r.read("coords"), np.moveaxis(coords, 0, -1).astype(np.float32))


def test_ome_zarr_multiscale_and_singleton_axes(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=8)
    root = zarr.open_group(str(tmp_path / "scan.ome.zarr"), mode="w")
    root.create_array("0", data=image[None, None, None], chunks=(1, 1, 1, 64, 64))
    root.create_array("1", data=image[None, None, None, ::2, ::2], chunks=(1, 1, 1, 64, 64))
    root.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}]}]
    r = open_section(import_section(make_cfg(image=tmp_path / "scan.ome.zarr"), tmp_path / "a", overwrite=False))
    np.testing.assert_array_equal(r.read("image"), image)
    write_h5(tmp_path / "stack1.h5", {"img": image[None, :, :, None]})  # 1 x H x W x 1
    r = open_section(import_section(make_cfg(image=tmp_path / "stack1.h5"), tmp_path / "b", overwrite=False))
    np.testing.assert_array_equal(r.read("image"), image)


def test_import_reads_in_bands_with_bounded_memory(tmp_path: Path) -> None:
    side = 4000
    image = np.random.default_rng(9).integers(0, 256, (side, side), dtype=np.uint8)
    nbytes = image.nbytes  # 16 MB
    tif = tmp_path / "big.tif"
    tifffile.imwrite(tif, image, tile=(128, 128))
    corner = image[-300:, -300:].copy()
    del image
    # Warm up: the first import loads modules and codecs, which tracemalloc would count.
    tifffile.imwrite(tmp_path / "small.tif", rand_u8((64, 64)), tile=(64, 64))
    import_section(make_cfg("hdf5", chunk_px=128, image=tmp_path / "small.tif"), tmp_path / "warm", overwrite=False)

    cfg = make_cfg("hdf5", chunk_px=128, image=tif)
    tracemalloc.start()
    try:
        path = import_section(cfg, tmp_path / "out", overwrite=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One band is 128 x 4000 px = 0.5 MB; the whole image would be 16 MB.
    assert peak < nbytes / 4, f"peak {peak / 2**20:.1f} MiB for a {nbytes / 2**20:.0f} MiB image"
    np.testing.assert_array_equal(open_section(path).read("image", side - 300, side, side - 300, side), corner)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _expect_input_error(cfg: Config, out: Path, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        import_section(cfg, out, overwrite=False)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message
    assert not out.exists() or not any(p.suffix in (".zarr", ".h5", ".partial") for p in out.rglob("*"))
    return message


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _expect_input_error(make_cfg(image=tmp_path / "nothing.tif"), out, "nothing.tif", "does not exist")
    _expect_input_error(make_cfg(image=f"{tmp_path / 'none.h5'}:/img"), out, "none.h5", "does not exist")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n")
    _expect_input_error(make_cfg(image=tmp_path / "scan.png"), out, "scan.png", "unsupported input format", ".tif")
    tifffile.imwrite(tmp_path / "ok.tif", rand_u8((H, W)))
    _expect_input_error(make_cfg(image=f"{tmp_path / 'ok.tif'}:0"), out, "ok.tif:0", "does not exist")
    _expect_input_error(
        make_cfg(image=tmp_path / "ok.tif", labels=tmp_path / "nolabels.tif"), out, "labels", "nolabels.tif"
    )


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, rand_u8((H, W)), tile=(64, 64))
    data = good.read_bytes()
    # Cut in the middle of the tile data (tifffile writes the IFD before the data, so it still opens).
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    _expect_input_error(make_cfg(image=tmp_path / "cut.tif"), out, "cut.tif", "is truncated", "end past")
    # Cut inside the header / IFD.
    (tmp_path / "stub.tif").write_bytes(data[:6])
    _expect_input_error(make_cfg(image=tmp_path / "stub.tif"), out, "stub.tif", "truncated or corrupt")
    (tmp_path / "garbage.tif").write_bytes(b"this is not a tiff" * 20)
    _expect_input_error(make_cfg(image=tmp_path / "garbage.tif"), out, "garbage.tif", "not a readable TIFF")
    # A compressed tile whose bytes are damaged (the file has its full length).
    tifffile.imwrite(tmp_path / "z.tif", rand_u8((H, W)), tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(tmp_path / "z.tif") as t:
        offset = int(t.pages[0].dataoffsets[3])
    raw = bytearray((tmp_path / "z.tif").read_bytes())
    raw[offset : offset + 64] = b"\xff" * 64
    (tmp_path / "damaged.tif").write_bytes(bytes(raw))
    _expect_input_error(make_cfg(image=tmp_path / "damaged.tif"), out, "damaged.tif", "reading rows")
    # HDF5 and zarr that are not what their names say.
    (tmp_path / "bad.h5").write_bytes(b"\x00" * 1000)
    _expect_input_error(make_cfg(image=f"{tmp_path / 'bad.h5'}:/img"), out, "bad.h5", "not a readable HDF5")
    (tmp_path / "empty.zarr").mkdir()
    _expect_input_error(make_cfg(image=tmp_path / "empty.zarr"), out, "empty.zarr", "not a readable zarr")


@pytest.mark.parametrize("compression", ["lzw", "jpeg"])
def test_slide_scanner_codecs_import(tmp_path: Path, compression: str) -> None:
    # Slide scanners write LZW- or JPEG-compressed tiles; imagecodecs (a dependency) decodes them.
    path = tmp_path / f"{compression}.tif"
    image = rand_u8((H, W))
    tifffile.imwrite(path, image, tile=(64, 64), compression=compression)
    expected = tifffile.imread(path)  # JPEG is lossy: compare with what the codec decodes
    if compression == "lzw":
        assert np.array_equal(expected, image)
    store = import_section(make_cfg(image=path), tmp_path / "out", overwrite=False)
    assert np.array_equal(open_section(store).read("image"), expected)


def test_unknown_dataset_keys_list_the_available_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    h5 = write_h5(tmp_path / "s.h5", {"/a/image": rand_u8((H, W)), "/a/labels": np.zeros((H, W), np.uint8)})
    _expect_input_error(make_cfg(image=f"{h5}:/a/imgae"), out, "'/a/imgae'", "/a/image", "/a/labels")
    _expect_input_error(make_cfg(image=str(h5)), out, "holds 2 datasets", "/a/image, /a/labels")
    _expect_input_error(make_cfg(image=f"{h5}:/a"), out, "is a group", "/a/image")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    g.create_array("x/image", data=rand_u8((H, W)))
    g.create_array("y", data=rand_u8((H, W)))
    _expect_input_error(make_cfg(image=f"{tmp_path / 's.zarr'}:x/imgae"), out, "'x/imgae'", "x/image", "y")
    _expect_input_error(make_cfg(image=tmp_path / "s.zarr"), out, "holds 2 arrays", "x/image, y")
    zarr.create_array(str(tmp_path / "arr.zarr"), data=rand_u8((H, W)))
    _expect_input_error(make_cfg(image=f"{tmp_path / 'arr.zarr'}:image"), out, "is a zarr array, not a group")


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.zeros((H, W), dtype=np.complex64), "unsupported dtype complex64"),
        (np.zeros((H, W), dtype=np.int32), "unsupported dtype int32"),
        (np.zeros((2, 2, H, W), dtype=np.uint8), "unsupported shape"),
        (np.zeros((5, H, W), dtype=np.uint8), "unsupported shape"),
        (np.zeros((W,), dtype=np.uint8), "unsupported shape"),
        (np.zeros((H, W, 3), dtype=np.uint16), "colour image must be uint8"),
        (np.zeros((0, W), dtype=np.uint8), "empty"),
    ],
    ids=["complex", "int32", "4d", "stack", "1d", "rgb16", "empty"],
)
def test_unsupported_image_arrays(tmp_path: Path, array: np.ndarray, needle: str) -> None:
    h5 = write_h5(tmp_path / "img.h5", {"img": array, "labels": np.zeros((H, W), np.uint16)})
    msg = _expect_input_error(make_cfg(image=f"{h5}:img"), tmp_path / "out", "img.h5:img", needle)
    if "dtype" in needle or "shape" in needle:
        assert "allowed:" in msg and "uint8" in msg and str(array.dtype) in msg
    # the image is checked before the other layers are compared with it
    _expect_input_error(make_cfg(image=f"{h5}:img", labels=f"{h5}:labels"), tmp_path / "out", "img.h5:img", needle)


def test_multipage_stack_tiff_is_refused(tmp_path: Path) -> None:
    stack = np.stack([rand_u8((H, W), seed=i) for i in range(4)])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")  # 4 pages, not RGBA
    _expect_input_error(make_cfg(image=tmp_path / "stack.tif"), tmp_path / "out", "stack.tif", "multi-page TIFF")
    with tifffile.TiffWriter(tmp_path / "two.tif") as tw:
        tw.write(rand_u8((H, W)), metadata=None)
        tw.write(rand_u8((H + 10, W)), metadata=None)
    _expect_input_error(make_cfg(image=tmp_path / "two.tif"), tmp_path / "out", "two.tif", "multi-page TIFF")


def test_float_image_outside_unit_range(tmp_path: Path) -> None:
    img = np.random.default_rng(0).random((H, W))
    img[H - 3, 17] = 1.5  # in the last band: the error comes mid-copy and must leave nothing behind
    h5 = write_h5(tmp_path / "f.h5", {"img": img})
    out = tmp_path / "out"
    _expect_input_error(make_cfg(image=h5), out, "f.h5", "[0, 1]", f"({H - 3}, 17)", "1.5")
    assert not (out / "B07_s0012.import.yaml").exists()
    img[H - 3, 17] = np.nan
    (tmp_path / "f.h5").unlink()
    write_h5(tmp_path / "f.h5", {"img": img})
    _expect_input_error(make_cfg(image=h5), out, "f.h5", "nan")


def test_bad_labels_coords_depth(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tifffile.imwrite(tmp_path / "img.tif", rand_u8((H, W)), tile=(64, 64))
    img = tmp_path / "img.tif"
    tifffile.imwrite(tmp_path / "small_labels.tif", np.zeros((H, W - 1), np.uint16))
    _expect_input_error(
        make_cfg(image=img, labels=tmp_path / "small_labels.tif"),
        out,
        "small_labels.tif",
        f"{H} x {W - 1}",
        f"{H} x {W}",
        "img.tif",
    )
    big = np.zeros((H, W), np.int32)
    big[H - 1, W - 1] = 70000
    neg = np.zeros((H, W), np.int64)
    neg[3, 3] = -1
    write_h5(tmp_path / "lab.h5", {"big": big, "neg": neg, "float": np.zeros((H, W), np.float32)})
    _expect_input_error(make_cfg(image=img, labels=f"{tmp_path / 'lab.h5'}:big"), out, "lab.h5:big", "70000")
    _expect_input_error(make_cfg(image=img, labels=f"{tmp_path / 'lab.h5'}:neg"), out, "lab.h5:neg", "-1")
    _expect_input_error(make_cfg(image=img, labels=f"{tmp_path / 'lab.h5'}:float"), out, "float32", "integer")
    write_h5(tmp_path / "maps.h5", {"c2": np.zeros((H, W, 2)), "cint": np.zeros((H, W, 3), np.int16)})
    write_h5(tmp_path / "maps.h5", {"cshape": np.zeros((H, W + 1, 3)), "dint": np.zeros((H, W), np.uint8)})
    maps = tmp_path / "maps.h5"
    _expect_input_error(make_cfg(image=img, coords=f"{maps}:c2"), out, "maps.h5:c2", "H x W x 3")
    _expect_input_error(make_cfg(image=img, coords=f"{maps}:cint"), out, "maps.h5:cint", "float")
    _expect_input_error(make_cfg(image=img, coords=f"{maps}:cshape"), out, "maps.h5:cshape", f"{W + 1}")
    _expect_input_error(make_cfg(image=img, depth=f"{maps}:dint"), out, "maps.h5:dint", "float H x W depth")


def test_intensity_image_given_as_labels_is_refused(tmp_path: Path) -> None:
    """A greyscale scan (or its thumbnail) given as importer.labels would make each grey value an area."""
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, rand_u8((H, W)), tile=(64, 64))
    smooth = np.add.outer(np.arange(H), np.arange(W)).astype(np.uint8)  # a gradient: neighbours differ by 1
    tifffile.imwrite(tmp_path / "grey.tif", smooth)
    out = tmp_path / "out"
    _expect_input_error(make_cfg(image=img, labels=tmp_path / "grey.tif"), out, "grey.tif", "100%", "label map")
    tifffile.imwrite(tmp_path / "regions.tif", region_labels(12, seed=3, dtype=np.uint8))
    path = import_section(make_cfg(image=img, labels=tmp_path / "regions.tif"), out, overwrite=False)
    assert open_section(path).has("labels")


def test_empty_image_and_bad_label_names_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"importer\.image"):
        import_section(make_cfg(), tmp_path / "out", overwrite=False)
    tifffile.imwrite(tmp_path / "img.tif", rand_u8((H, W)))
    with pytest.raises(ConfigError, match=r"importer\.label_names"):
        import_section(
            make_cfg(image=tmp_path / "img.tif", label_names={70000: "x"}), tmp_path / "out", overwrite=False
        )


def test_existing_store_needs_overwrite(tmp_path: Path) -> None:
    first, second = rand_u8((H, W), seed=1), rand_u8((H, W), seed=2)
    tifffile.imwrite(tmp_path / "a.tif", first)
    tifffile.imwrite(tmp_path / "b.tif", second)
    out = tmp_path / "out"
    path = import_section(make_cfg(image=tmp_path / "a.tif"), out, overwrite=False)
    before = tree_digest(out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        import_section(make_cfg(image=tmp_path / "b.tif"), out, overwrite=False)
    assert tree_digest(out) == before
    assert import_section(make_cfg(image=tmp_path / "b.tif"), out, overwrite=True) == path
    np.testing.assert_array_equal(open_section(path).read("image"), second)
    assert load_config(out / "B07_s0012.import.yaml").importer.image == str(tmp_path / "b.tif")
    # The same section in the other backend counts as existing too (list_sections would see both).
    with pytest.raises(OutputExistsError, match=r"B07_s0012\.zarr already holds section 12.*--overwrite"):
        import_section(make_cfg("hdf5", image=tmp_path / "a.tif"), out, overwrite=False)
    h5_path = import_section(make_cfg("hdf5", image=tmp_path / "a.tif"), out, overwrite=True)
    assert list_sections(out) == [h5_path] and not path.exists()
    np.testing.assert_array_equal(open_section(h5_path).read("image"), first)
    path = import_section(make_cfg(image=tmp_path / "b.tif"), out, overwrite=True)
    assert list_sections(out) == [path]
    # A failed overwrite keeps the existing store.
    (tmp_path / "cut.tif").write_bytes((tmp_path / "a.tif").read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated"):
        import_section(make_cfg(image=tmp_path / "cut.tif"), out, overwrite=True)
    np.testing.assert_array_equal(open_section(path).read("image"), second)


# ---------------------------------------------------------------------------------------------------------
# Command line


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cytonet.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("cytonet: error:")]


def test_cli_import(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=11)
    tifffile.imwrite(tmp_path / "scan.tif", image, tile=(64, 64))
    labels = region_labels(4, seed=11, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    config = tmp_path / "import.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"root_dir": str(tmp_path / "runs")},
                "importer": {"pixel_size_um": 2.0, "brain": "B05", "label_names": {2: "hOc1"}},
                "sections": {"backend": "hdf5", "chunk_px": 64, "compression": "blosc-zstd"},
            }
        )
    )
    out = tmp_path / "out"

    ok = cli("import", config, "importer.image=scan.tif", "importer.labels=labels.tif", "--out", out, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    store = out / "B05" / "B05_s0000.h5"
    assert ok.stdout.strip() == str(store)
    r = open_section(store)
    np.testing.assert_array_equal(r.read("image"), image)
    np.testing.assert_array_equal(r.read("labels"), labels)
    assert r.meta.label_table == {0: "background", 1: "white_matter", 2: "hOc1", 3: "area_3"}
    assert (out / "B05_s0000.import.yaml").is_file()
    before = tree_digest(out)

    again = cli("import", config, "importer.image=scan.tif", "--out", out, cwd=tmp_path)
    assert again.returncode == 1
    assert len(error_lines(again.stderr)) == 1 and "--overwrite" in again.stderr
    assert tree_digest(out) == before  # the first output is untouched

    bad = cli("import", config, "importer.image=missing.tif", "--out", out, cwd=tmp_path)
    assert bad.returncode == 1
    (line,) = error_lines(bad.stderr)
    assert "missing.tif" in line and "does not exist" in line

    unknown = cli("import", config, "importer.imagee=scan.tif", "--out", out, cwd=tmp_path)
    assert unknown.returncode == 2
    (line,) = error_lines(unknown.stderr)
    assert "importer.imagee" in line and "valid keys" in line
    assert tree_digest(out) == before


# ---------------------------------------------------------------------------------------------------------
# Pixel size stated by the file


def ome_tif(path: Path, image: np.ndarray, **physical: Any) -> Path:
    """An OME-TIFF whose OME-XML carries ``physical`` (PhysicalSizeX, PhysicalSizeXUnit, ...)."""
    tifffile.imwrite(path, image, tile=(64, 64), metadata={"axes": "YX", **physical})
    return path


def ome_zarr(path: Path, image: np.ndarray, units: str | None, scale: float, **extra: Any) -> Path:
    """An OME-Zarr (NGFF 0.4) multiscale group of ``image`` as 1 x 1 x 1 x H x W, levels 0 and 1."""
    root = zarr.open_group(str(path), mode="w")
    root.create_array("0", data=image[None, None, None], chunks=(1, 1, 1, 64, 64))
    root.create_array("1", data=image[None, None, None, ::2, ::2], chunks=(1, 1, 1, 64, 64))
    axes: list[dict[str, Any]] = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    for axis in axes[2:]:
        if units:
            axis["unit"] = units
    datasets = [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, s, s]}]}
        for level, s in ((0, scale), (1, 2 * scale))
    ]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets, **extra}]
    return path


def stored_pixel_size(path: Path) -> tuple[float, str]:
    meta = open_section(path).meta
    return meta.pixel_size_um, meta.extra["pixel_size_source"]


def test_pixel_size_from_ome_tiff(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=20)
    ome = ome_tif(tmp_path / "scan.ome.tif", image, PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    # importer.pixel_size_um=1.5 contradicts the file: refused, naming both values and the key (old code: 1.5).
    _expect_input_error(
        make_cfg(image=ome), tmp_path / "bad", "scan.ome.tif", "0.5 µm", "pixel_size_um=1.5", "PhysicalSizeX"
    )
    # null takes the file's; the same value given explicitly (to within rounding) is accepted.
    path = import_section(make_cfg(image=ome, pixel_size_um=None), tmp_path / "a", overwrite=False)
    assert stored_pixel_size(path) == (0.5, "OME-XML PhysicalSizeX/Y")
    np.testing.assert_array_equal(open_section(path).read("image"), image)
    path = import_section(make_cfg(image=ome, pixel_size_um=0.50001), tmp_path / "b", overwrite=False)
    assert stored_pixel_size(path) == (0.50001, "importer.pixel_size_um")
    # Units are converted: mm and nm; the default unit (none given) is µm.
    for name, physical in {
        "mm.ome.tif": {
            "PhysicalSizeX": 0.0005,
            "PhysicalSizeXUnit": "mm",
            "PhysicalSizeY": 0.0005,
            "PhysicalSizeYUnit": "mm",
        },
        "nm.ome.tif": {
            "PhysicalSizeX": 500,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 500,
            "PhysicalSizeYUnit": "nm",
        },
    }.items():
        f = ome_tif(tmp_path / name, image, **physical)
        path = import_section(make_cfg(image=f, pixel_size_um=None), tmp_path / name.replace(".", "_"), overwrite=False)
        assert stored_pixel_size(path)[0] == pytest.approx(0.5)
        _expect_input_error(make_cfg(image=f, pixel_size_um=2.0), tmp_path / "bad", name, "pixel_size_um=2")
    # Anisotropic pixels are refused, whatever the config says.
    aniso = ome_tif(tmp_path / "aniso.ome.tif", image, PhysicalSizeX=0.5, PhysicalSizeY=0.25)
    for value in (None, 0.5):
        _expect_input_error(
            make_cfg(image=aniso, pixel_size_um=value), tmp_path / "bad", "aniso.ome.tif", "anisotropic", "0.25"
        )
    # An OME-TIFF without PhysicalSize states none: importer.pixel_size_um is needed.
    plain = ome_tif(tmp_path / "plain.ome.tif", image)
    _expect_input_error(
        make_cfg(image=plain, pixel_size_um=None),
        tmp_path / "bad",
        "plain.ome.tif",
        "no pixel size",
        "importer.pixel_size_um",
    )
    assert stored_pixel_size(import_section(make_cfg(image=plain), tmp_path / "c", overwrite=False))[0] == 1.5


def test_pixel_size_from_imagej_tiff_and_plain_tiff_tags(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=21)
    tifffile.imwrite(tmp_path / "ij.tif", image, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "micron"})
    path = import_section(make_cfg(image=tmp_path / "ij.tif", pixel_size_um=None), tmp_path / "a", overwrite=False)
    assert stored_pixel_size(path)[0] == pytest.approx(0.5)
    _expect_input_error(make_cfg(image=tmp_path / "ij.tif"), tmp_path / "bad", "ij.tif", "ImageJ", "0.5 µm")
    # Plain resolution tags are placeholders as often as not (72 dpi; libvips writes 10 px/cm): ignored.
    tifffile.imwrite(tmp_path / "dpi.tif", image, resolution=(72.0, 72.0), resolutionunit="inch")
    tifffile.imwrite(tmp_path / "cm.tif", image, resolution=(10.0, 10.0), resolutionunit="centimeter")
    for name in ("dpi.tif", "cm.tif"):
        path = import_section(make_cfg(image=tmp_path / name), tmp_path / name.replace(".", "_"), overwrite=False)
        assert stored_pixel_size(path) == (1.5, "importer.pixel_size_um")
        _expect_input_error(
            make_cfg(image=tmp_path / name, pixel_size_um=None), tmp_path / "bad", name, "no pixel size"
        )


def test_pixel_size_from_ome_zarr_scale(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=22)
    um = ome_zarr(tmp_path / "um.ome.zarr", image, "micrometer", 0.5)
    path = import_section(make_cfg(image=um, pixel_size_um=None), tmp_path / "a", overwrite=False)
    assert stored_pixel_size(path) == (0.5, "OME-Zarr multiscales scale")
    np.testing.assert_array_equal(open_section(path).read("image"), image)
    _expect_input_error(make_cfg(image=um), tmp_path / "bad", "um.ome.zarr", "0.5 µm", "pixel_size_um=1.5")
    # The scale of the level imported: level 1 named in the spec, or opened as the array's folder.
    path = import_section(make_cfg(image=f"{um}:1", pixel_size_um=None), tmp_path / "b", overwrite=False)
    assert stored_pixel_size(path)[0] == 1.0
    path = import_section(make_cfg(image=um / "1", pixel_size_um=None), tmp_path / "b2", overwrite=False)
    assert stored_pixel_size(path)[0] == 1.0
    # Units are converted; the multiscale's own scale applies after the dataset's.
    mm = ome_zarr(tmp_path / "mm.ome.zarr", image, "millimeter", 0.0005)
    assert stored_pixel_size(import_section(make_cfg(image=mm, pixel_size_um=None), tmp_path / "c", overwrite=False))[
        0
    ] == pytest.approx(0.5)
    both = ome_zarr(
        tmp_path / "both.ome.zarr",
        image,
        "micrometer",
        0.5,
        coordinateTransformations=[{"type": "scale", "scale": [1, 1, 1, 4, 4]}],
    )
    assert stored_pixel_size(
        import_section(make_cfg(image=both, pixel_size_um=None), tmp_path / "d", overwrite=False)
    ) == (2.0, "OME-Zarr multiscales scale")
    # A scale without a unit is no pixel size: importer.pixel_size_um is needed (and is then used).
    bare = ome_zarr(tmp_path / "bare.ome.zarr", image, None, 0.5)
    _expect_input_error(
        make_cfg(image=bare, pixel_size_um=None), tmp_path / "bad", "bare.ome.zarr", "no unit", "importer.pixel_size_um"
    )
    assert stored_pixel_size(import_section(make_cfg(image=bare), tmp_path / "e", overwrite=False))[0] == 1.5


def test_pixel_size_of_other_layers_and_section_stores(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=23)
    ome = ome_tif(tmp_path / "scan.ome.tif", image, PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    labels = ome_tif(tmp_path / "labels.ome.tif", np.zeros((H, W), np.uint16), PhysicalSizeX=1.0, PhysicalSizeY=1.0)
    _expect_input_error(
        make_cfg(image=ome, labels=labels, pixel_size_um=None),
        tmp_path / "bad",
        "labels.ome.tif",
        "states a pixel size of 1 µm",
        "image's is 0.5 µm",
    )
    # A cytonet section store states its pixel size: its full-resolution layers re-import without a setting.
    for backend in ("zarr", "hdf5"):
        store = import_section(make_cfg(backend, image=ome, pixel_size_um=None), tmp_path / backend, overwrite=False)
        spec = f"{store}:image" if backend == "hdf5" else str(store / "image")
        again = import_section(make_cfg(image=spec, pixel_size_um=None), tmp_path / f"re_{backend}", overwrite=False)
        assert stored_pixel_size(again)[0] == 0.5
        np.testing.assert_array_equal(open_section(again).read("image"), image)
        # Its image levels are smaller: the store's pixel size is not theirs.
        level = f"{store}:image_x2" if backend == "hdf5" else str(store / "image_x2")
        _expect_input_error(make_cfg(image=level, pixel_size_um=None), tmp_path / "bad", "image_x2", "no pixel size")


# ---------------------------------------------------------------------------------------------------------
# TIFF photometric interpretations


def test_tiff_photometric_miniswhite_and_palette(tmp_path: Path) -> None:
    image = rand_u8((H, W), seed=24)
    tifffile.imwrite(tmp_path / "white.tif", image, photometric="miniswhite", tile=(64, 64))
    path = import_section(make_cfg(image=tmp_path / "white.tif"), tmp_path / "a", overwrite=False)
    np.testing.assert_array_equal(open_section(path).read("image"), 255 - image)  # old code: stored raw
    assert open_section(path).meta.extra["image_conversion"] == {
        "rule": "copy",
        "lo": 0,
        "hi": 255,
        "inverted_max": 255,
    }
    # uint16 min-is-white: inverted before the percentile mapping (memory-mapped, uncompressed).
    deep = np.random.default_rng(24).integers(1000, 60000, (H, W)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "white16.tif", deep, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "black16.tif", (65535 - deep).astype(np.uint16))
    white = import_section(make_cfg(image=tmp_path / "white16.tif"), tmp_path / "b", overwrite=False)
    black = import_section(make_cfg(image=tmp_path / "black16.tif"), tmp_path / "c", overwrite=False)
    np.testing.assert_array_equal(open_section(white).read("image"), open_section(black).read("image"))
    # Labels are ids: a min-is-white label image is not inverted.
    labels = region_labels(7, seed=24, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="miniswhite")
    path = import_section(
        make_cfg(image=tmp_path / "white.tif", labels=tmp_path / "labels.tif"), tmp_path / "d", overwrite=False
    )
    np.testing.assert_array_equal(open_section(path).read("labels"), labels)
    # Float min-is-white is refused.
    tifffile.imwrite(tmp_path / "whitef.tif", image.astype(np.float32) / 255, photometric="miniswhite")
    _expect_input_error(make_cfg(image=tmp_path / "whitef.tif"), tmp_path / "bad", "whitef.tif", "MINISWHITE", "float")

    # Palette: a grey palette gives its grey (here a reversed ramp), a colour one the luma of each colour.
    ramp = np.arange(256)[::-1].astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "pgrey.tif", image, photometric="palette", colormap=np.stack([ramp] * 3))
    path = import_section(make_cfg(image=tmp_path / "pgrey.tif"), tmp_path / "e", overwrite=False)
    np.testing.assert_array_equal(open_section(path).read("image"), 255 - image)  # old code: the indices
    assert open_section(path).meta.extra["image_conversion"]["rule"] == "palette-grey"
    colours = np.random.default_rng(25).integers(0, 256, (3, 256)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "pcolour.tif", image, photometric="palette", colormap=colours * 257, tile=(64, 64))
    path = import_section(make_cfg(image=tmp_path / "pcolour.tif"), tmp_path / "f", overwrite=False)
    luma = np.clip(np.rint(np.array(LUMA_WEIGHTS) @ colours), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(open_section(path).read("image"), luma[image])
    assert open_section(path).meta.extra["image_conversion"]["rule"] == "palette-luma"


@pytest.mark.parametrize(
    ("photometric", "kwargs"),
    [
        ("separated", {"shape": (H, W, 4)}),
        ("cielab", {"shape": (H, W, 3)}),
        ("ycbcr", {"shape": (H, W, 3), "subsampling": (1, 1)}),
    ],
    ids=["cmyk", "cielab", "ycbcr-raw"],
)
def test_tiff_photometric_refused(tmp_path: Path, photometric: str, kwargs: dict[str, Any]) -> None:
    data = rand_u8(kwargs.pop("shape"), seed=26)
    tifffile.imwrite(tmp_path / "colour.tif", data, photometric=photometric, **kwargs)
    # Old code: converted as if RGB(A).
    _expect_input_error(
        make_cfg(image=tmp_path / "colour.tif"), tmp_path / "out", "colour.tif", photometric.upper(), "not supported"
    )


def test_tiff_jpeg_ycbcr_is_decoded_as_rgb(tmp_path: Path) -> None:
    rgb = rand_u8((H, W, 3), seed=27)
    tifffile.imwrite(tmp_path / "ycc.tif", rgb, photometric="ycbcr", compression="jpeg", tile=(64, 64))
    decoded = tifffile.imread(tmp_path / "ycc.tif")  # RGB, lossy
    path = import_section(make_cfg(image=tmp_path / "ycc.tif"), tmp_path / "out", overwrite=False)
    luma = np.clip(np.rint(decoded.astype(np.float64) @ np.array(LUMA_WEIGHTS)), 0, 255).astype(np.uint8)
    assert np.abs(open_section(path).read("image").astype(int) - luma.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------------------
# Coordinate units, axis layouts, output folder


def test_coords_in_micrometres(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "img.tif", rand_u8((H, W)))
    rng = np.random.default_rng(28)
    coords_um = (rng.random((H, W, 3)) * 1000 + np.array([50000, 60000, 40000])).astype(np.float32)
    coords_um[:4, :4] = np.nan  # outside the brain: ignored by the check
    write_h5(tmp_path / "um.h5", {"xyz": coords_um})
    # Old code: stored as if mm.
    _expect_input_error(
        make_cfg(image=tmp_path / "img.tif", coords=tmp_path / "um.h5"),
        tmp_path / "bad",
        "um.h5",
        "[50000",
        "mm",
        "importer.coords_unit=um",
    )
    path = import_section(
        make_cfg(image=tmp_path / "img.tif", coords=tmp_path / "um.h5", coords_unit="um"),
        tmp_path / "a",
        overwrite=False,
    )
    np.testing.assert_allclose(open_section(path).read("coords"), coords_um / 1000, rtol=1e-7)
    # An axis that is NaN everywhere (a map without z) does not hide the others from the check.
    no_z = coords_um.copy()
    no_z[..., 2] = np.nan
    write_h5(tmp_path / "noz.h5", {"xyz": no_z})
    _expect_input_error(
        make_cfg(image=tmp_path / "img.tif", coords=tmp_path / "noz.h5"), tmp_path / "nz", "noz.h5", "[50000"
    )
    # A stray value in a band the subsample skips is caught while copying, and nothing is left behind.
    coords_mm = coords_um / 1000
    coords_mm[7 * 16 + 3, 11] = [1e5, 0, 0]  # band 7 of 10 (16-row bands): not among the 8 sampled
    write_h5(tmp_path / "mm.h5", {"xyz": coords_mm})
    out = tmp_path / "mid"
    _expect_input_error(
        make_cfg(image=tmp_path / "img.tif", coords=tmp_path / "mm.h5", chunk_px=16),
        out,
        "mm.h5",
        "100000",
        "rows 0:128",
    )
    assert not (out / "B07_s0012.import.yaml").exists()


def test_channels_first_with_trailing_singleton_axis(tmp_path: Path) -> None:
    rgb = rand_u8((3, H, W), seed=29)
    coords = np.random.default_rng(29).normal(size=(3, H, W)).astype(np.float32)
    write_h5(tmp_path / "s.h5", {"rgb": rgb[..., None], "xyz": coords[..., None]})  # 3 x H x W x 1
    cfg = make_cfg(image=f"{tmp_path / 's.h5'}:rgb", coords=f"{tmp_path / 's.h5'}:xyz")
    r = open_section(import_section(cfg, tmp_path / "out", overwrite=False))  # old code: broadcast ValueError
    luma = np.clip(np.rint(np.moveaxis(rgb, 0, -1).astype(np.float64) @ np.array(LUMA_WEIGHTS)), 0, 255)
    assert np.abs(r.read("image").astype(int) - luma.astype(int)).max() <= 1
    np.testing.assert_array_equal(r.read("coords"), np.moveaxis(coords, 0, -1))


def test_ome_zarr_rgb_with_singleton_t_and_z(tmp_path: Path) -> None:
    rgb = rand_u8((3, H, W), seed=30)
    luma = np.clip(np.rint(np.moveaxis(rgb, 0, -1).astype(np.float64) @ np.array(LUMA_WEIGHTS)), 0, 255).astype(int)
    # bioformats2raw layout: a root group (bioformats2raw.layout) with one multiscale group per image, t,c,z,y,x.
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w")
    root.attrs["bioformats2raw.layout"] = 3
    series = root.create_group("0")
    series.create_array("0", data=rgb[None, :, None], chunks=(1, 1, 1, 64, 64))
    series.create_array("1", data=rgb[None, :, None, ::2, ::2], chunks=(1, 1, 1, 64, 64))
    axes = [
        {"name": "t", "type": "time", "unit": "second"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 0.5 * 2**i, 0.5 * 2**i]}]}
        for i in (0, 1)
    ]
    series.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    root.create_group("OME").attrs["series"] = ["0"]
    # Old code: "unsupported shape" (and the root group alone: "holds 2 arrays").
    for spec in (tmp_path / "b2r.zarr", f"{tmp_path / 'b2r.zarr'}:0/0"):
        path = import_section(
            make_cfg(image=spec, pixel_size_um=None), tmp_path / f"out{len(str(spec))}", overwrite=False
        )
        assert np.abs(open_section(path).read("image").astype(int) - luma).max() <= 1
        assert stored_pixel_size(path)[0] == 0.5
    # OME-Zarr 0.5 keeps the layout marker under "ome".
    v05 = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="r+")
    del v05.attrs["bioformats2raw.layout"]
    v05.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    path = import_section(make_cfg(image=tmp_path / "b2r.zarr", pixel_size_um=None), tmp_path / "v05", overwrite=False)
    assert stored_pixel_size(path)[0] == 0.5
    # Without axes metadata, a 5-D array is read as t, c, z, y, x (the OME-Zarr order).
    write_h5(tmp_path / "tczyx.h5", {"img": rgb[None, :, None]})
    path = import_section(make_cfg(image=tmp_path / "tczyx.h5"), tmp_path / "h5", overwrite=False)
    assert np.abs(open_section(path).read("image").astype(int) - luma).max() <= 1
    # A z (or t) axis of more than one plane is refused, naming it.
    stack = zarr.open_group(str(tmp_path / "stack.zarr"), mode="w")
    stack.create_array("0", data=np.zeros((1, 1, 2, H, W), np.uint8))
    stack.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [{"path": "0"}]}]
    _expect_input_error(make_cfg(image=tmp_path / "stack.zarr"), tmp_path / "bad", "stack.zarr", "axis 'z'", "size 2")


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "img.tif", rand_u8((H, W)))
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep me")
    for out in (afile, afile / "sub"):
        with pytest.raises(OutputExistsError, match="afile exists and is not a folder"):
            import_section(make_cfg(image=tmp_path / "img.tif"), out, overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "B07").write_bytes(b"not a brain folder")
    with pytest.raises(OutputExistsError, match="B07 exists and is not a folder"):
        import_section(make_cfg(image=tmp_path / "img.tif"), tmp_path / "out", overwrite=True)
    assert afile.read_bytes() == b"keep me"
    assert (tmp_path / "out" / "B07").read_bytes() == b"not a brain folder"
    # From the command line: one error line, exit 1, no "unexpected NotADirectoryError".
    config = tmp_path / "import.yaml"
    config.write_text(yaml.safe_dump({"importer": {"pixel_size_um": 2.0}}))
    res = cli("import", config, "importer.image=img.tif", "--out", afile, cwd=tmp_path)
    assert res.returncode == 1
    (line,) = error_lines(res.stderr)
    assert "afile" in line and "not a folder" in line and "unexpected" not in line
    assert afile.read_bytes() == b"keep me"


# ---------------------------------------------------------------------------------------------------------
# Values no section has: refused naming the file (or key) and the layer, before or while the store is written


def test_coordinates_must_be_finite_and_depth_within_0_to_1(tmp_path: Path) -> None:
    """A coordinate map full of inf and a depth map of -5 were imported (depth with a warning only); every
    reader would then see them as positions and depths."""
    tifffile.imwrite(tmp_path / "img.tif", rand_u8((H, W)))
    img = tmp_path / "img.tif"
    rng = np.random.default_rng(5)
    coords = rng.normal(size=(H, W, 3))
    depth = rng.random((H, W)).astype(np.float32)
    depth[:, :10] = np.nan  # outside the cortex
    stray_coords, stray_depth = coords.copy(), depth.copy()
    stray_coords[7 * 16 + 3, 11, 2] = -np.inf  # band 7 of 10 (16-row bands): not among the 8 sampled
    stray_depth[7 * 16 + 3, 11] = 1.25
    maps = write_h5(
        tmp_path / "maps.h5",
        {
            "inf": np.full((H, W, 3), np.inf),
            "huge": np.full((H, W, 3), 1e300),  # inf as float32
            "stray_coords": stray_coords,
            "minus5": np.full((H, W), -5.0),
            "depth_inf": np.where(np.isnan(depth), np.inf, depth),
            "stray_depth": stray_depth,
            "depth_huge": np.full((H, W), 1e300),  # inf as float32
        },
    )
    out = tmp_path / "out"
    for key, needles in [
        ("inf", ["coords", "maps.h5:inf", "value inf at pixel (0, 0), axis 0", "not a finite coordinate"]),
        ("huge", ["coords", "maps.h5:huge", "value 1e+300 at pixel (0, 0)", "not a finite coordinate"]),
        ("stray_coords", ["coords", "maps.h5:stray_coords", "value -inf at pixel (115, 11), axis 2"]),
    ]:
        _expect_input_error(make_cfg(image=img, coords=f"{maps}:{key}", chunk_px=16), out, *needles)
    for key, needles in [
        ("minus5", ["depth", "maps.h5:minus5", "value -5 at pixel (0, 0)", "0 at the pial surface .. 1"]),
        ("depth_inf", ["depth", "maps.h5:depth_inf", "value inf at pixel (0, 0)"]),
        ("stray_depth", ["depth", "maps.h5:stray_depth", "value 1.25 at pixel (115, 11)"]),
        ("depth_huge", ["depth", "maps.h5:depth_huge", "value 1e+300 at pixel (0, 0)"]),
    ]:
        _expect_input_error(make_cfg(image=img, depth=f"{maps}:{key}", chunk_px=16), out, *needles)
    assert not (out / "B07_s0012.import.yaml").exists()
    # NaN is what the layers hold where there is no value: imported as it is.
    coords[:4, :4] = np.nan
    write_h5(tmp_path / "ok.h5", {"coords": coords, "depth": depth})
    ok = tmp_path / "ok.h5"
    r = open_section(
        import_section(make_cfg(image=img, coords=f"{ok}:coords", depth=f"{ok}:depth"), out, overwrite=False)
    )
    np.testing.assert_array_equal(r.read("depth"), depth)
    np.testing.assert_array_equal(r.read("coords"), coords.astype(np.float32))
    # A solver's rounding past either end (within 0.01) is clipped into [0, 1], not refused.
    rounded = depth.copy()
    rounded[5, :3] = [-1e-7, 1.004, 0.5]
    write_h5(tmp_path / "rounded.h5", {"depth": rounded})
    cfg = make_cfg(image=img, depth=f"{tmp_path / 'rounded.h5'}:depth")
    r = open_section(import_section(cfg, tmp_path / "out-rounded", overwrite=False))
    np.testing.assert_array_equal(r.read("depth")[5, :3], np.array([0.0, 1.0, 0.5], np.float32))


def test_pixel_size_and_z_outside_what_a_section_store_holds_are_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "img.tif", rand_u8((H, W)))
    img = tmp_path / "img.tif"
    out = tmp_path / "out"
    for value in (1e-300, 1e300, 0.001, 5000.5):
        with pytest.raises(
            ConfigError, match=rf"^importer\.pixel_size_um={re.escape(f'{value:g}')} is invalid: use 0\.01-1000"
        ):
            import_section(make_cfg(image=img, pixel_size_um=value), out, overwrite=False)
    with pytest.raises(ConfigError, match=r"^importer\.z_mm=-5000(\.0)? is invalid: use -1000 to 1000"):
        import_section(make_cfg(image=img, z_mm=-5000.0), out, overwrite=False)
    # A size the file states (here in nm read as if um: 2 um as 2000) is refused naming the file.
    ome_tif(tmp_path / "nm.ome.tif", rand_u8((H, W)), PhysicalSizeX=2000, PhysicalSizeY=2000)
    _expect_input_error(make_cfg(image=tmp_path / "nm.ome.tif", pixel_size_um=None), out, "nm.ome.tif", "out of range")
    assert not out.exists()


@pytest.mark.distributed
def test_cli_import_refuses_a_pixel_size_readers_would_refuse(tmp_path: Path) -> None:
    """`cytonet import ... importer.pixel_size_um=1e-300` exited 0 and wrote a store that extract and infer then
    failed on with OverflowError."""
    tifffile.imwrite(tmp_path / "scan.tif", rand_u8((H, W)))
    write_h5(tmp_path / "maps.h5", {"inf": np.full((H, W, 3), 1e300), "minus5": np.full((H, W), -5.0)})
    config = REPO / "configs" / "import.yaml"
    for extra, status, needle in [
        (["importer.pixel_size_um=1e-300"], 2, "importer.pixel_size_um=1e-300 is invalid: use 0.01-1000"),
        (["importer.pixel_size_um=1e300"], 2, "importer.pixel_size_um=1e+300 is invalid: use 0.01-1000"),
        (["importer.pixel_size_um=2", "importer.coords=maps.h5:inf"], 1, "coords maps.h5:inf: value 1e+300"),
        (["importer.pixel_size_um=2", "importer.depth=maps.h5:minus5"], 1, "depth maps.h5:minus5: value -5"),
    ]:
        p = cli("import", config, "importer.image=scan.tif", *extra, "--out", tmp_path / "out", cwd=tmp_path)
        (line,) = error_lines(p.stderr)
        assert p.returncode == status and needle in line and "Warning" not in p.stderr, p.stderr
    assert not list((tmp_path / "out").rglob("*.zarr"))
