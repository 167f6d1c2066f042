"""Direct chunk reads of zarr v3 arrays (cytonet.data.chunks) give exactly what zarr gives, or step aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, GzipCodec, ZstdCodec

from cytonet.data.chunks import ChunkCache, open_chunked

BLOSC = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


def make(path: Path, data: np.ndarray, chunks: tuple[int, ...], **kw: object) -> zarr.Array:
    arr = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, **kw)  # type: ignore[arg-type]
    arr[...] = data
    return arr


@pytest.mark.parametrize(
    ("dtype", "trailing", "compressors", "fill"),
    [
        ("uint8", (), BLOSC, 0),
        ("uint16", (), None, 7),
        ("float32", (), BLOSC, float("nan")),
        ("float32", (3,), BLOSC, float("nan")),
    ],
)
def test_reads_equal_zarr(
    tmp_path: Path, dtype: str, trailing: tuple[int, ...], compressors: object, fill: float
) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((70, 45, *trailing)) * 200).astype(dtype)
    arr = make(tmp_path / "a", data, (16, 16, *trailing), compressors=compressors, fill_value=fill)
    arr[:16, 16:32] = fill  # an all-fill chunk: zarr does not store it
    assert not (tmp_path / "a/c/0/1").exists() or trailing
    fast = open_chunked(tmp_path / "a", ChunkCache(1 << 20))
    assert fast is not None
    ref = arr[...]
    boxes = [(0, 70, 0, 45), (3, 4, 44, 45), (15, 33, 15, 17), (0, 16, 16, 32)]
    boxes += [(*sorted(rng.integers(0, 71, 2)), *sorted(rng.integers(0, 46, 2))) for _ in range(20)]
    for y0, y1, x0, x1 in boxes:
        np.testing.assert_array_equal(fast.read((y0, y1), (x0, x1)), ref[y0:y1, x0:x1], err_msg=str((y0, y1, x0, x1)))
        # decoded into a view of a larger array: the rest of it untouched
        big = np.full((y1 - y0 + 4, x1 - x0 + 6, *trailing), 99, dtype=dtype)
        view = big[2 : 2 + y1 - y0, 3 : 3 + x1 - x0]
        assert fast.read((y0, y1), (x0, x1), out=view) is view
        np.testing.assert_array_equal(view, ref[y0:y1, x0:x1])
        assert (big[:2] == 99).all() and (big[:, :3] == 99).all() and (big[2 + y1 - y0 :] == 99).all()
    with pytest.raises(ValueError, match=r"a: out is .* the box is"):
        fast.read((0, 4), (0, 4), out=np.empty((4, 5, *trailing), dtype=dtype))


def test_cache_decodes_each_chunk_once_and_stays_bounded(tmp_path: Path) -> None:
    data = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    make(tmp_path / "a", data, (16, 16), compressors=BLOSC)
    cache = ChunkCache(3 * 16 * 16)  # three chunks
    fast = open_chunked(tmp_path / "a", cache)
    assert fast is not None
    fast.read((0, 16), (0, 48))  # chunks (0,0) (0,1) (0,2)
    (tmp_path / "a/c/0/1").unlink()  # served from the cache from now on
    np.testing.assert_array_equal(fast.read((0, 16), (16, 32)), data[:16, 16:32])
    fast.read((16, 32), (0, 48))  # three more chunks push the first three out
    assert cache.nbytes <= cache.max_bytes
    np.testing.assert_array_equal(fast.read((0, 16), (16, 32)), 0)  # gone from disk and cache: the fill value
    cache = ChunkCache(1 << 20)
    empty = open_chunked(tmp_path / "a", cache)
    assert empty is not None
    for f in (tmp_path / "a/c").rglob("*"):
        if f.is_file():
            f.unlink()
    np.testing.assert_array_equal(empty.read((0, 64), (0, 64)), 0)
    assert cache.nbytes <= 16, "chunks without a file are cached as their fill value, not as full chunks"


def test_declared_reads_keep_their_chunks_past_the_lru_budget_until_the_last_one(tmp_path: Path) -> None:
    data = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    make(tmp_path / "a", data, (16, 16), compressors=BLOSC)
    chunk = 16 * 16
    cache = ChunkCache(chunk, max_planned_bytes=3 * chunk)  # LRU: one chunk; declared reads: three more
    fast = open_chunked(tmp_path / "a", cache)
    assert fast is not None
    assert fast.chunk_keys((0, 16), (10, 40)) == [(str(tmp_path / "a"), (0, i)) for i in (0, 1, 2)]
    cache.expect(fast.chunk_keys((0, 16), (0, 32)) * 2)  # two reads each of chunks (0,0) and (0,1)
    fast.read((0, 16), (0, 32))
    assert cache.nbytes == 2 * chunk
    for f in (tmp_path / "a/c").rglob("*"):
        if f.is_file():
            f.unlink()
    fast.read((16, 64), (0, 64))  # reads declared by nobody go through the one-chunk LRU
    np.testing.assert_array_equal(fast.read((0, 16), (0, 32)), data[:16, :32])  # the declared second read
    # After their last declared read the two chunks are LRU entries like any other: the last one read stays.
    assert cache.nbytes == chunk
    np.testing.assert_array_equal(fast.read((0, 16), (16, 32)), data[:16, 16:32])
    np.testing.assert_array_equal(fast.read((0, 16), (0, 16)), 0)  # gone from disk and cache: the fill value
    # Beyond max_planned_bytes, declared chunks are not kept apart: the budget bounds memory.
    make(tmp_path / "b", data, (16, 16), compressors=BLOSC)
    small = ChunkCache(chunk, max_planned_bytes=chunk)
    fast = open_chunked(tmp_path / "b", small)
    assert fast is not None
    small.expect(fast.chunk_keys((0, 16), (0, 64)) * 2)
    fast.read((0, 16), (0, 64))
    assert small.nbytes == 2 * chunk  # the first chunk kept for its declared read, the last one in the LRU


def test_points_equal_the_box_and_leave_the_cache_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.random((70, 45)).astype(np.float32)
    arr = make(tmp_path / "a", data, (16, 16), compressors=BLOSC, fill_value=float("nan"))
    arr[16:32, :] = float("nan")  # a row of chunks without files
    ref = arr[...]
    cache = ChunkCache(1 << 20)
    fast = open_chunked(tmp_path / "a", cache)
    assert fast is not None
    grids = [
        (np.arange(70), np.arange(45)),
        (np.array([0, 15, 16, 40, 69]), np.array([44])),
        (np.arange(2, 70, 16), np.arange(5, 45, 32)),  # one point per chunk, some chunks skipped
        *[(np.sort(rng.choice(70, 6, replace=False)), np.sort(rng.choice(45, 4, replace=False))) for _ in range(10)],
        (np.array([], dtype=np.int64), np.arange(3)),
    ]
    for ys, xs in grids:
        np.testing.assert_array_equal(fast.points(ys, xs), ref[np.ix_(ys, xs)], err_msg=f"{ys} {xs}")
    assert cache.nbytes == 0  # sparse points must not push out the chunks that box reads share
    with pytest.raises(ValueError, match="points outside"):
        fast.points(np.array([3, 70]), np.array([0]))


def test_arrays_it_does_not_understand_are_left_to_zarr(tmp_path: Path) -> None:
    data = np.ones((32, 32), np.uint8)
    make(tmp_path / "gzip", data, (16, 16), compressors=GzipCodec())
    make(tmp_path / "zstd", data, (16, 16), compressors=ZstdCodec())
    make(tmp_path / "sharded", data, (8, 8), shards=(16, 16), compressors=BLOSC)
    make(tmp_path / "v2", data, (16, 16), zarr_format=2)
    for name in ("gzip", "zstd", "sharded", "v2", "missing"):
        assert open_chunked(tmp_path / name, ChunkCache(1 << 20)) is None, name


@pytest.mark.parametrize("compressors", [BLOSC, BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle), None])
def test_writes_read_back_through_zarr(tmp_path: Path, compressors: object) -> None:
    """Whole-chunk writes, edge chunks included, equal zarr's own writes; fill-only chunks lose their file."""
    rng = np.random.default_rng(1)
    data = rng.random((3, 40, 37), dtype=np.float32)
    data[:, :16, 16:32] = 0  # one chunk of only the fill value
    ref = make(tmp_path / "ref", data, (3, 16, 16), compressors=compressors, fill_value=0.0)
    arr = make(tmp_path / "a", np.ones_like(data), (3, 16, 16), compressors=compressors, fill_value=0.0)
    fast = open_chunked(tmp_path / "a")
    assert fast is not None and (tmp_path / "a/c/0/0/1").exists()
    for y0 in range(0, 40, 16):
        for x0 in range(0, 37, 32):
            fast.write((0, y0, x0), data[:, y0 : y0 + 16, x0 : x0 + 32])
    np.testing.assert_array_equal(arr[...], ref[...])
    assert not (tmp_path / "a/c/0/0/1").exists()
    with pytest.raises(ValueError, match="whole chunks"):
        fast.write((0, 8, 0), data[:, :16, :16])
    with pytest.raises(ValueError, match="whole chunks"):
        fast.write((0, 0), data[:2])
