"""Direct chunk I/O for local zarr v3 arrays: chunk files decoded and encoded here, reads through a small LRU
chunk cache.

zarr-python spends about 0.6 ms per chunk call in asyncio and thread hand-offs on top of the codec. For
whole-section inference with small models that is most of the I/O:

- reading: a 2153^2 px read box touches 25 chunks of 512^2 px, 21 ms through zarr against 13 ms decoded
  here; neighbouring blocks share the chunks of their overlapping context, which the cache decodes once;
- writing: a block's 6 output arrays (probabilities and labels at 3 pyramid levels) took 12 ms through zarr.

Only arrays whose metadata this module fully understands take this path (:func:`open_chunked` returns None
otherwise, and the caller goes through zarr): zarr v3, a regular chunk grid, the default chunk key encoding,
codecs ``bytes`` (little endian) optionally followed by ``blosc``, no storage transformers (so no sharding),
a numeric fill value, a store on the local file system. Section stores and output volumes written by
cytonet are such arrays. As in zarr, a chunk that holds only the fill value has no file: reading a missing
file gives the fill value, and writing such a chunk removes its file.

Entry point: :func:`open_chunked` -> :class:`ChunkedArray` with :meth:`~ChunkedArray.read` (any box inside
the array), :meth:`~ChunkedArray.points` (a grid of sparse points) and :meth:`~ChunkedArray.write` (boxes made
of whole chunks, or ending at the array's edge).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cytonet.errors import InputError

#: zarr v3 data type name -> numpy dtype (little endian, as the ``bytes`` codec writes them).
DTYPES = {"uint8": "u1", "uint16": "<u2", "int32": "<i4", "float32": "<f4", "float64": "<f8"}
#: How zarr v3 metadata spells the non-finite float fill values.
FILL_WORDS: dict[Any, float] = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
#: blosc shuffle names in zarr v3 metadata -> numcodecs constants.
SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}

Box = tuple[tuple[int, int], ...]


class ChunkCache:
    """Decoded chunks by key, least recently used dropped first beyond ``max_bytes``; thread safe.

    A reader that knows its reads ahead (inference: the read boxes of a section's blocks, whose context
    overlaps their neighbours') declares them with :meth:`expect`: a chunk with declared reads left is kept,
    outside the LRU budget and up to ``max_planned_bytes``, until its last declared read, however much is read
    in between. LRU order alone re-decodes the overlap of large read boxes: a box larger than the cache pushes
    out its own first rows before the neighbour that shares them is read."""

    def __init__(self, max_bytes: int, max_planned_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_planned_bytes = max_planned_bytes
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._uses: dict[Any, int] = {}  # key -> declared reads not yet made
        self._planned: dict[Any, np.ndarray] = {}  # decoded chunks kept for their declared reads
        self._planned_bytes = 0
        self._lock = threading.Lock()

    def expect(self, keys: Iterable[Any]) -> None:
        """Declare one read to come of each key (a key listed twice: two reads)."""
        with self._lock:
            for key in keys:
                self._uses[key] = self._uses.get(key, 0) + 1

    def get(self, key: Any) -> np.ndarray | None:
        """The chunk, or None; counts as one of the key's declared reads, if it has any left."""
        with self._lock:
            left = self._uses.pop(key, 0) - 1
            if left > 0:
                self._uses[key] = left
            item = self._planned.get(key)
            if item is not None:
                if left <= 0:  # its last declared read: it stays only as long as LRU order keeps it
                    del self._planned[key]
                    self._planned_bytes -= item.nbytes
                    self._put_lru(key, item)
                return item
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Any, value: np.ndarray) -> None:
        with self._lock:
            if key in self._items or key in self._planned:
                return
            if self._uses.get(key, 0) > 0 and self._planned_bytes + value.nbytes <= self.max_planned_bytes:
                self._planned[key] = value
                self._planned_bytes += value.nbytes
                return
            self._put_lru(key, value)

    def _put_lru(self, key: Any, value: np.ndarray) -> None:
        if key in self._items or value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes + self._planned_bytes


class ChunkedArray:
    """A local zarr v3 array read and written chunk file by chunk file (see the module doc)."""

    def __init__(self, path: Path, meta: dict[str, Any], cache: ChunkCache | None, whole: bool = False) -> None:
        self.path = path
        #: Every chunk file was written (a section store): reading a missing one is an error, not the fill value.
        self.whole = whole
        self.shape = tuple(int(n) for n in meta["shape"])
        self.chunks = tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(DTYPES[meta["data_type"]])
        self.fill = FILL_WORDS.get(meta["fill_value"], meta["fill_value"])
        self.separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        blosc = meta["codecs"][1].get("configuration", {}) if len(meta["codecs"]) == 2 else None
        self._codec: Any = None
        if blosc is not None:
            from numcodecs import Blosc

            self._codec = Blosc(
                cname=blosc.get("cname", "lz4"),
                clevel=int(blosc.get("clevel", 5)),
                shuffle=SHUFFLES[blosc.get("shuffle", "noshuffle")],
                blocksize=int(blosc.get("blocksize", 0)),
            )
        self.cache = cache
        self._made: set[Path] = set()  # chunk folders known to exist (a mkdir per chunk written is a syscall)

    def _file(self, index: tuple[int, ...]) -> Path:
        return self.path / self.separator.join(["c", *(str(i) for i in index)])

    def _ranges(self, box: Box) -> list[range]:
        return [range(a // c, -(-b // c)) for (a, b), c in zip(box, self.chunks)]

    def _full_box(self, box: Box) -> Box:
        """``box`` with the axes it leaves out taken whole."""
        return tuple(box) + tuple((0, n) for n in self.shape[len(box) :])

    def chunk_keys(self, *box: tuple[int, int]) -> list[Any]:
        """Cache keys of the chunks a :meth:`read` of ``box`` decodes (for :meth:`ChunkCache.expect`)."""
        return [self._key(index) for index in itertools.product(*self._ranges(self._full_box(box)))]

    def _key(self, index: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """The cache key of chunk ``index`` (one cache serves all the arrays of a store)."""
        return (str(self.path), index)

    def _chunk(self, index: tuple[int, ...], cached: bool = True) -> np.ndarray:
        """The decoded chunk, or a 0-d array of the fill value when it has no file (cached as such: a
        section's many empty chunks cost the cache nothing and are never materialised). ``cached=False``
        neither looks in the cache nor adds to it."""
        key = self._key(index)
        cache = self.cache if cached else None
        chunk = cache.get(key) if cache is not None else None
        if chunk is not None:
            return chunk
        try:
            raw = self._file(index).read_bytes()
        except FileNotFoundError:
            if self.whole:
                raise InputError(
                    f"{self.path}: chunk file {self._file(index).relative_to(self.path)} is missing, but every chunk "
                    "of this array was written: the store is damaged or was copied in part; copy it again"
                ) from None
            chunk = np.full((), self.fill, dtype=self.dtype)
        else:
            if self._codec is not None:
                raw = self._codec.decode(raw)  # the blosc frame names its own codec, shuffle and type size
            chunk = np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks)
        if cache is not None:
            cache.put(key, chunk)
        return chunk

    def read(self, *box: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """``array[a0:b0, a1:b1, ...]`` for ``box = ((a0, b0), (a1, b1), ...)`` (omitted axes whole); the box
        must lie inside the array. ``out``: an array (or a view) of the box's shape and the array's dtype to
        decode into, instead of a new one; it is returned."""
        full = self._full_box(box)
        shape = tuple(b - a for a, b in full)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype:
            raise ValueError(f"{self.path}: out is {out.dtype} {out.shape}, the box is {self.dtype} {shape}")
        for index in itertools.product(*self._ranges(full)):
            src, dst = [], []
            for i, (a, b), c in zip(index, full, self.chunks):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            chunk = self._chunk(index)
            out[tuple(dst)] = chunk if chunk.ndim == 0 else chunk[tuple(src)]
        return out

    def points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """``array[np.ix_(ys, xs)]`` of a 2D array: the values at the rows ``ys`` and columns ``xs`` (increasing
        indices inside the array), e.g. a section layer at the patch centres of an output grid.

        Each chunk holding points is decoded once into its own buffer and only the points are copied out,
        without the cache: a box around sparse points (inference's region of interest: one point per 32
        section px or more) would write every decoded value into one large array and push the image chunks
        that neighbouring reads share out of the cache. On a 192 MP section's depth layer: 0.11 s of CPU
        against 0.2-1.2 s for the box."""
        ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
        if len(self.shape) != 2:
            raise ValueError(f"{self.path}: points needs a 2D array, this one is {self.shape}")
        out = np.empty((len(ys), len(xs)), dtype=self.dtype)
        if not (len(ys) and len(xs)):
            return out
        if ys[0] < 0 or xs[0] < 0 or ys[-1] >= self.shape[0] or xs[-1] >= self.shape[1]:
            raise ValueError(f"{self.path}: points outside the array's {self.shape}")
        cy, cx = self.chunks
        row_edges = np.searchsorted(ys, np.arange(ys[0] // cy, ys[-1] // cy + 2) * cy)
        col_edges = np.searchsorted(xs, np.arange(xs[0] // cx, xs[-1] // cx + 2) * cx)
        for i, (r0, r1) in enumerate(itertools.pairwise(row_edges)):
            iy = int(ys[0] // cy) + i
            for j, (c0, c1) in enumerate(itertools.pairwise(col_edges)):
                if r0 == r1 or c0 == c1:
                    continue
                ix = int(xs[0] // cx) + j
                chunk = self._chunk((iy, ix), cached=False)
                at = np.ix_(ys[r0:r1] - iy * cy, xs[c0:c1] - ix * cx)
                out[r0:r1, c0:c1] = chunk if chunk.ndim == 0 else chunk[at]
        return out

    def write(self, start: tuple[int, ...], data: np.ndarray) -> None:
        """Write ``data`` with its first element at ``start`` (omitted axes from 0). The box must consist of
        whole chunks, except where it ends at the array's edge; chunks of only the fill value lose their
        file. Not atomic per chunk: callers that need it mark completion after writing (done markers)."""
        full = self._full_box(tuple((a, a + n) for a, n in zip(start, data.shape)))
        for (a, b), c, n in zip(full, self.chunks, self.shape):
            if a % c or (b % c and b != n) or b > n:
                raise ValueError(f"{self.path}: box {full} is not made of whole chunks {self.chunks} of {self.shape}")
        data = np.asarray(data, dtype=self.dtype)
        for index in itertools.product(*self._ranges(full)):
            part = data[tuple(slice(i * c - a, (i + 1) * c - a) for i, (a, _), c in zip(index, full, self.chunks))]
            file = self._file(index)
            if _all_fill(part, self.fill):
                file.unlink(missing_ok=True)
                continue
            if part.shape != self.chunks:  # an edge chunk: stored whole, padded with the fill value
                padded = np.full(self.chunks, self.fill, dtype=self.dtype)
                padded[tuple(slice(0, m) for m in part.shape)] = part
                part = padded
            part = np.ascontiguousarray(part)
            raw = self._codec.encode(part) if self._codec is not None else part.tobytes()
            if file.parent not in self._made:
                file.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(file.parent)
            file.write_bytes(raw)
            if self.cache is not None:
                self.cache.put(self._key(index), np.array(part))


def _all_fill(part: np.ndarray, fill: float) -> bool:
    if isinstance(fill, float) and math.isnan(fill):
        return bool(np.isnan(part).all())
    return bool((part == fill).all())


def _understood(meta: dict[str, Any]) -> bool:
    codecs = meta.get("codecs", [])
    names = [c.get("name") for c in codecs]
    if names not in (["bytes"], ["bytes", "blosc"]):
        return False
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    blosc = codecs[1].get("configuration", {}) if len(codecs) == 2 else {}
    encoding = meta.get("chunk_key_encoding", {})
    grid = meta.get("chunk_grid", {})
    chunks = grid.get("configuration", {}).get("chunk_shape", [])
    return (
        meta.get("zarr_format") == 3
        and meta.get("node_type") == "array"
        and meta.get("data_type") in DTYPES
        and endian in ("little", None)
        and blosc.get("shuffle", "noshuffle") in SHUFFLES
        and grid.get("name") == "regular"
        and encoding.get("name") == "default"
        and encoding.get("configuration", {}).get("separator", "/") in ("/", ".")
        and not meta.get("storage_transformers")
        and len(chunks) == len(meta.get("shape", [])) >= 1
        and (isinstance(meta.get("fill_value"), (int, float)) or meta.get("fill_value") in FILL_WORDS)
    )


def open_chunked(path: str | Path, cache: ChunkCache | None = None, whole: bool = False) -> ChunkedArray | None:
    """The array at ``path`` (a folder with its ``zarr.json``) for direct chunk I/O, or None when it is not one
    this module understands (see the module doc). ``cache``: decoded chunks to share between reads; ``whole``:
    every chunk file was written, so a missing one is an error (:class:`ChunkedArray`)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not _understood(meta):
        return None
    return ChunkedArray(Path(path), meta, cache, whole)
