"""Sharded patch stores: fixed-size shards of uint8 patches plus per-patch metadata, one reader for two backends.

Layout of a store folder::

    manifest.json        format version, geometry, extraction settings, shard list, counts per split/area/brain
    metadata.npy         one structured row per patch (global id order): the columns of :data:`META_DTYPE`
    extract.json         the settings the extraction runs with (resume / mismatch check)
    shard-00000.h5       HDF5 backend: datasets ``patches`` (n, S, S) uint8, one chunk per patch, plus columns
    shard-00001.zarr/    zarr backend: a group with the same arrays; ``patches`` uses zarr's sharding codec so
                         that all of a shard's patches live in one file (one inner chunk per patch)

Every shard holds ``patches_per_shard`` patches of one split (the last shard of a split may hold fewer), in
shuffled order, so that reading a few shards gives a mix of areas and sections. Global patch ids run over the
shards in manifest order; the shards of a split are contiguous, so a split is an id range.

Geometry (:class:`PatchGeometry`): the model sees a centre crop of ``crop_px``. Training rotates by any angle,
shifts the centre by up to ``max_shift_px``, and blurs with a kernel of half-width ``pad_px`` before cropping,
so every crop sample lies within ``reach = (crop_px + 2 pad_px - 1) / sqrt 2 + max_shift_px`` of the patch
centre. Patches are stored with edge ``S`` >= 2 reach + 3 (one pixel for the bilinear neighbour, one for
rounding), with the parity of ``crop_px`` so that an unrotated, unshifted crop is an exact pixel copy; the
centre pixel of a stored patch sits at index ``S // 2``. Demo: 265 px crop, 25 px shift, 3 px pad -> 435 px;
paper: 1129 px at 2 um, 100 px shift -> 1807 px (3.3 MB per patch).

Default backend and codec (``extract.backend=hdf5``, ``extract.compression=none``), chosen by measurement
(benchmarks/bench_patch_reads.py, 2-core development machine, warm page cache, random single-patch reads):
435 px demo patches: HDF5 uncompressed 19-21k reads/s (30-34% of copying from memory), HDF5 blosc-zstd
3.2-3.5k/s, zarr (sharding codec) 470-760/s with either codec; 1807 px paper patches: HDF5 uncompressed
1.6-2.1k/s, HDF5 blosc-zstd 230/s, zarr 130-400/s. Patches of the synthetic brains compress only 1.2x (zstd
levels 1-9, any shuffle), which does not pay for 6-7x slower reads. For scans that compress better, on a
bandwidth-bound parallel file system, ``compression=blosc-zstd`` is one setting away (no shuffle: a better
ratio and faster decoding than bitshuffle on uint8). The reader keeps each shard's ``patches`` array object
open: looking it up per read tripled the cost of an HDF5 read.

Readers (:class:`PatchStore`) open shard files lazily, in the process that reads (HDF5 handles never cross a
fork: each DataLoader worker opens its own), and keep a bounded number open.

Writers (:class:`ShardWriter`) write into ``<name>.partial`` and rename on close, so a shard that exists under
its final name is complete; the manifest is written last, after every shard exists (see
:mod:`cytonet.data.extract`). :func:`finalize_store` builds ``metadata.npy`` and ``manifest.json`` from the
shards; :func:`check_store` verifies a store and names the first bad shard; :func:`describe_store` is the text
of ``cytonet store info``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cytonet import __version__
from cytonet.config import is_int, is_number
from cytonet.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

FORMAT = "cytonet-patch-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.npy"
SPLITS: tuple[str, ...] = ("train", "test", "unseen")
SHARD_SUFFIXES = {"hdf5": ".h5", "zarr": ".zarr"}

#: Per-patch metadata, in shards (one array per field) and in ``metadata.npy`` (one structured row per patch).
META_DTYPE = np.dtype(
    [
        ("patch_id", np.int64),  # global id: position in the store
        ("area", np.int32),  # area id of the section's label table (>= 2)
        ("brain", np.int32),  # index into manifest["brains"]
        ("section", np.int32),  # index into manifest["sections"]
        ("section_index", np.int32),  # section number within its brain
        ("y", np.int32),  # patch centre, row in section pixels
        ("x", np.int32),  # patch centre, column in section pixels
        ("depth", np.float32),  # cortical depth at the centre (0 pial .. 1 white matter)
        ("coords", np.float32, (3,)),  # 3D reference coordinate of the centre, mm
        ("split", np.uint8),  # index into SPLITS
    ]
)
COLUMNS: tuple[str, ...] = tuple(META_DTYPE.names or ())


# ----------------------------------------------------------------------------------------------------------
# Geometry


def crop_reach_px(crop_px: int, max_shift_px: float, pad_px: int) -> float:
    """Largest distance from the patch centre of any sample of a rotated, shifted, padded crop."""
    return (crop_px + 2 * pad_px - 1) / math.sqrt(2.0) + max_shift_px


def stored_edge_px(crop_px: int, max_shift_px: float, pad_px: int) -> int:
    """Edge of the stored patch: the smallest ``S`` with the crop's parity and (S - 1) / 2 >= reach + 1."""
    edge = math.ceil(2.0 * crop_reach_px(crop_px, max_shift_px, pad_px) + 3.0 - 1e-9)
    if (edge - crop_px) % 2:
        edge += 1
    return edge


@dataclass(frozen=True)
class PatchGeometry:
    """Sizes of stored patches and the augmentation range they were stored for."""

    crop_px: int
    """Edge of the crop the model sees."""
    stored_px: int
    """Edge of the stored patch (crop plus margin)."""
    pixel_size_um: float
    """Pixel size of the stored patches."""
    max_shift_mm: float
    """Largest centre shift the margin allows."""
    pad_px: int
    """Extra border resampled around the crop for the blur kernel."""

    @property
    def max_shift_px(self) -> float:
        return self.max_shift_mm * 1000.0 / self.pixel_size_um

    @classmethod
    def for_crop(cls, crop_px: int, pixel_size_um: float, max_shift_mm: float, pad_px: int) -> PatchGeometry:
        shift_px = max_shift_mm * 1000.0 / pixel_size_um
        return cls(crop_px, stored_edge_px(crop_px, shift_px, pad_px), pixel_size_um, max_shift_mm, pad_px)

    def allows(self, crop_px: int, max_shift_mm: float, pad_px: int) -> bool:
        """True when a crop of ``crop_px`` shifted by up to ``max_shift_mm`` stays inside the stored patch."""
        shift_px = max_shift_mm * 1000.0 / self.pixel_size_um
        return stored_edge_px(crop_px, shift_px, pad_px) <= self.stored_px

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatchGeometry:
        return cls(
            crop_px=int(d["crop_px"]),
            stored_px=int(d["stored_px"]),
            pixel_size_um=float(d["pixel_size_um"]),
            max_shift_mm=float(d["max_shift_mm"]),
            pad_px=int(d["pad_px"]),
        )


# ----------------------------------------------------------------------------------------------------------
# Small file helpers


def shard_name(index: int, backend: str) -> str:
    """File name of shard ``index``: ``shard-00012.h5`` or ``shard-00012.zarr``."""
    return f"shard-{index:05d}{SHARD_SUFFIXES[backend]}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


#: The lock file a step holds (flock) in its output folder while it runs (pipeline steps, training stages): a
#: started marker under a free lock is an interrupted step.
STEP_LOCK = ".cytonet-step.lock"
#: A pipeline step's done marker in its output folder (synth), holding its settings.
DONE_MARKER = ".cytonet-done.json"
#: Written when a pipeline step starts (before any output), holding its settings; replaced by the done marker
#: at the end.
STARTED_MARKER = ".cytonet-started.json"


def unfinished_step(folder: Path) -> str | None:
    """Why ``folder`` (a pipeline step's output, e.g. synth's sections) is not finished, or None: a step is
    writing it right now (it holds the lock), or one started and never ended (its started marker remains).
    Looks only: creates nothing (the folder may be read-only)."""
    if not (folder / STARTED_MARKER).is_file():
        return None
    if lock_held(folder / STEP_LOCK):
        return f"a step is writing it right now (it holds {folder / STEP_LOCK})"
    return f"a step started there and never ended ({folder / STARTED_MARKER} remains): rerun it to finish"


def lock_held(lock: Path) -> bool:
    """Whether another process holds the flock on ``lock`` right now. Looks only, without waiting: creates
    nothing and needs no write access (the folder may be read-only); False for a missing file, or where the
    file system has no locks."""
    try:
        with open(lock, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:  # missing, or no locks here: nothing to tell
        return False
    return False


#: errnos of a lock file that cannot be created or opened for writing: a read-only folder (nobody writes it).
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES)
#: errnos of a file system without flock (Lustre mounted noflock, some NFS): locks cannot guard anything there.
NO_LOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def exclusive_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path``, created if missing; released on exit, and by the kernel
    when the process ends, killed or not. ``blocking=False``: raises :class:`BlockingIOError` at once when
    another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def try_exclusive_lock(path: Path) -> Iterator[bool]:
    """:func:`exclusive_lock` without waiting: yields False when another process holds ``path``, else True
    while this one holds it. Where the file system has no locks, or is read-only, it yields True unguarded
    (a write there fails on its own, naming its file)."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(path, blocking=False))
        except BlockingIOError:
            yield False
            return
        except OSError as exc:
            if exc.errno not in (*READ_ONLY_ERRNOS, *NO_LOCK_ERRNOS):
                raise
            log.debug("%s: no lock taken (%s)", path, exc)
        yield True


#: A patch store's readers' lock: training stages and analyses hold it shared while they read the store, an
#: extraction with --overwrite holds it exclusively while it deletes and rewrites the store (:func:`reading_store`,
#: :func:`rewriting_store`). It is never deleted (a reader would lock a new file beside the deleted one).
READERS_LOCK = ".cytonet-readers.lock"


def _readers_lock_fd(store: Path) -> int | None:
    """A descriptor of ``store``'s readers' lock, created if missing; read-only, as flock needs no more (the file
    may be another user's). None where it cannot be had: no store folder, a read-only one without the file."""
    if not store.is_dir():
        return None
    try:
        return os.open(store / READERS_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno not in (*READ_ONLY_ERRNOS, errno.EPERM):
            raise
        return None  # read-only: nobody rewrites it from here either


@contextlib.contextmanager
def _readers_lock(store: Path, mode: int, refusal: str) -> Iterator[None]:
    """Hold ``store``'s readers' lock in ``mode`` (LOCK_SH or LOCK_EX) without waiting, else raise
    :class:`OutputExistsError` with ``refusal``; unguarded where the file system has no locks."""
    fd = _readers_lock_fd(store)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputExistsError(refusal) from None
            except OSError as exc:
                if exc.errno not in NO_LOCK_ERRNOS:
                    raise
        yield
    finally:
        if fd is not None:
            os.close(fd)


def reading_store(store: Path, what: str) -> contextlib.AbstractContextManager[None]:
    """Hold ``store``'s readers' lock shared while ``what`` (a training stage, an analysis) reads it, so that an
    extraction cannot replace the store under it: its labels, read at the start, would be paired with other
    pixels."""
    return _readers_lock(
        store,
        fcntl.LOCK_SH,
        f"{what}: the patch store {store} is being rewritten by an extraction right now (it holds "
        f"{store / READERS_LOCK}); wait for it to finish",
    )


def rewriting_store(store: Path, what: str) -> contextlib.AbstractContextManager[None]:
    """Hold ``store``'s readers' lock exclusively while ``what`` deletes and rewrites it; refused while a training
    stage reads the store (:func:`reading_store`)."""
    return _readers_lock(
        store,
        fcntl.LOCK_EX,
        f"{what}: the patch store {store} is being read by a training run or an analysis right now (it holds "
        f"{store / READERS_LOCK}); --overwrite would replace its patches under it: wait for it to finish, or "
        "extract into another --out",
    )


def require_folder(out: Path, what: str) -> None:
    """Refuse an output ``out`` of step ``what`` that exists and is not a folder (a file given as ``--out``)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{what}: output {out} exists and is not a folder")


@contextlib.contextmanager
def step_lock(out: Path, what: str, doing: str = "written", name: str = STEP_LOCK) -> Iterator[None]:
    """Hold ``out``'s lock file ``name`` while a step runs (``what``: the step, for the messages): a second
    process on the same folder at the same time is refused, rather than taking a running step for an
    interrupted one or writing beside it. An flock, released when the process ends, killed or not; on a file
    system without flock the step goes on unguarded, with a warning."""
    require_folder(out, what)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(out / name, blocking=False))
        except BlockingIOError:
            raise OutputExistsError(
                f"{what}: {out} is being {doing} by another process right now (it holds {out / name}); "
                "wait for it to finish, or choose another --out"
            ) from None
        except OSError as exc:
            if exc.errno in READ_ONLY_ERRNOS:
                # A read-only folder (a finished run on a read-only mount): nobody can write it, so there is
                # nothing to guard; a step that does have to write fails there, naming the file.
                log.debug("%s: %s is read-only (%s): no lock taken", what, out, exc)
            elif exc.errno in NO_LOCK_ERRNOS:
                log.warning("%s: %s has no file locks (%s): a second process would not be refused", what, out, exc)
            else:
                raise
        yield


def ensure_space(path: Path, need: int, what: str) -> None:
    """Refuse, as ENOSPC naming ``path``, an HDF5 write of up to ``need`` bytes (uncompressed) into a file system
    with less free (plus 1 MiB). HDF5 cannot recover from a write that fails for want of space: its handle stays
    half closed and the library crashes the interpreter when it flushes it at exit (exit 139)."""
    free = shutil.disk_usage(path.parent).free
    if free < need + 2**20:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: {what} needs up to {(need + 2**20) / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free",
            str(path),
        )


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_bytes_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file unique to this process (and thread), fsync, then rename.

    Several processes may write the same file (e.g. the manifest, by whichever array task finishes last):
    each uses its own temp name, so a reader sees one complete version, never a mix. ``fsync=False`` keeps the
    atomicity against a killed process but not against a lost node (for markers of data that is not fsynced
    either).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temporary file behind
        raise


def publish(partial: Path, final: Path) -> None:
    """Move a finished store (a file, or a folder of files) from ``partial`` to ``final``, durably.

    Its bytes are fsynced before the rename and the folder holding it after, so that "exists under the final
    name" means complete after a lost node too, not only after a killed process (readers and reruns trust it).
    """
    files = [partial] if partial.is_file() else [p for p in sorted(partial.rglob("*")) if p.is_file()]
    for path in files:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    if partial.is_dir():
        for folder in [partial, *(p for p in sorted(partial.rglob("*")) if p.is_dir())]:
            fsync_dir(folder)
    os.replace(partial, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, fsync: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), fsync)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (identifies the model or encoder an output came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def columns_sha256(columns: dict[str, np.ndarray]) -> str:
    """Digest of a shard's metadata columns (what ``store check`` compares with the manifest)."""
    h = hashlib.sha256()
    for name in COLUMNS:
        arr = np.ascontiguousarray(columns[name], dtype=META_DTYPE[name].base)
        h.update(name.encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def table_from_columns(columns: dict[str, np.ndarray]) -> np.ndarray:
    n = len(columns["patch_id"])
    table = np.zeros(n, dtype=META_DTYPE)
    for name in COLUMNS:
        table[name] = columns[name]
    return table


# ----------------------------------------------------------------------------------------------------------
# Writing one shard


def patch_digest(patch: np.ndarray) -> bytes:
    """SHA-256 of one stored patch's pixels (S x S uint8, row-major)."""
    return hashlib.sha256(np.ascontiguousarray(patch, dtype=np.uint8).data).digest()


def patches_sha256(digests: Iterable[bytes]) -> str:
    """A shard's pixel checksum: SHA-256 of its patches' :func:`patch_digest` in order (computed as they are
    written, checked by ``store check``, whatever the backend or compression)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


class ShardWriter:
    """Writes one shard of ``n`` patches into ``<path>.partial``; :meth:`close` renames it to ``path``.

    Use as a context manager: leaving through an exception removes the partial shard. An HDF5 shard is written
    patch by patch; a zarr shard is buffered in memory and written at close (the sharding codec rewrites a
    whole shard per write, so incremental writes would cost O(n^2)).
    """

    def __init__(
        self,
        path: Path,
        n: int,
        stored_px: int,
        compression: str,
        attrs: dict[str, Any],
    ) -> None:
        if compression not in ("blosc-zstd", "none"):
            raise ValueError(f"compression {compression!r} is not supported; use 'blosc-zstd' or 'none'")
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.backend = "zarr" if self.path.suffix == ".zarr" else "hdf5"
        self.n = n
        self.stored_px = stored_px
        self.compression = compression
        self.attrs = {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "n": n}
        remove_path(self.partial)
        self._closed = False
        self._digests: list[bytes | None] = [None] * n  # per patch, for the shard's patches_sha256
        self._buffer: np.ndarray | None = None
        self._file: Any = None
        if self.backend == "hdf5":
            import h5py

            ensure_space(self.partial, n * stored_px * stored_px, "the shard")
            kwargs: dict[str, Any] = {}
            if compression == "blosc-zstd":
                import hdf5plugin  # only for the filter: uncompressed shards need no plugin (GPU images lack it)

                # No shuffle: on uint8 patches of the synthetic brains it compresses better than bitshuffle
                # (1.23x vs 1.14x at level 3) and decodes faster.
                kwargs.update(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.NOSHUFFLE))
            self._file = h5py.File(self.partial, "w")
            self._patches = self._file.create_dataset(
                "patches",
                shape=(n, stored_px, stored_px),
                chunks=(1, stored_px, stored_px),
                dtype=np.uint8,
                **kwargs,
            )
        else:
            self._buffer = np.zeros((n, stored_px, stored_px), dtype=np.uint8)

    def write(self, j: int, patch: np.ndarray) -> None:
        """Store patch ``j`` (S x S uint8) of this shard."""
        if patch.shape != (self.stored_px, self.stored_px) or patch.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: patch {j} is {patch.shape} {patch.dtype}, expected {self.stored_px}^2 uint8"
            )
        self._digests[j] = patch_digest(patch)
        if self._buffer is not None:
            self._buffer[j] = patch
        else:
            self._patches[j] = patch

    def close(self, columns: dict[str, np.ndarray]) -> Path:
        """Write the metadata ``columns`` (each of length n), finish the shard and move it into place."""
        for name in COLUMNS:
            if name not in columns or len(columns[name]) != self.n:
                raise ValueError(f"{self.path}: column {name!r} missing or not of length {self.n}")
        blank = patch_digest(np.zeros((self.stored_px, self.stored_px), np.uint8))  # unwritten: the fill value
        self.attrs["patches_sha256"] = patches_sha256(d if d is not None else blank for d in self._digests)
        if self.backend == "hdf5":
            for name in COLUMNS:
                self._file.create_dataset(name, data=np.asarray(columns[name], dtype=META_DTYPE[name].base))
            for key, value in self.attrs.items():
                self._file.attrs[key] = json.dumps(value)
            handle, self._file, self._patches = self._file, None, None
            try:
                handle.close()
            except Exception as exc:
                # A failed flush (a full disk) leaves the file half closed: closing it again (abort) made HDF5
                # crash the interpreter later, so the handle is dropped without a second close.
                raise OSError(
                    getattr(exc, "errno", None) or errno.EIO, f"writing the shard failed: {exc}", str(self.partial)
                ) from None
        else:
            self._write_zarr(columns)
        self._closed = True
        remove_path(self.path)
        publish(self.partial, self.path)
        return self.path

    def _write_zarr(self, columns: dict[str, np.ndarray]) -> None:
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        assert self._buffer is not None
        group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        codec: Any = None
        if self.compression == "blosc-zstd":
            codec = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.noshuffle)
        s = self.stored_px
        arr = group.create_array(
            "patches",
            shape=(self.n, s, s),
            chunks=(1, s, s),
            shards=(max(self.n, 1), s, s),
            dtype=np.uint8,
            compressors=codec,
            fill_value=0,
        )
        arr[:] = self._buffer
        for name in COLUMNS:
            data = np.asarray(columns[name], dtype=META_DTYPE[name].base)
            col = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,))
            col[...] = data
        group.attrs.update(self.attrs)
        self._buffer = None

    def abort(self) -> None:
        if self.backend == "hdf5" and not self._closed and self._file is not None:
            self._file.close()
        self._closed = True
        remove_path(self.partial)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------------------------------------
# Reading shards


def _open_shard(path: Path) -> Any:
    """Open a shard for reading (h5py.File or zarr.Group); raises InputError naming it."""
    if not path.exists():
        raise InputError(f"shard {path} does not exist")
    try:
        if path.suffix == ".zarr":
            import zarr

            return zarr.open_group(str(path), mode="r")
        import h5py

        with contextlib.suppress(ImportError):  # uncompressed shards read without it
            import hdf5plugin  # noqa: F401  registers the blosc filter; reading blosc shards fails without it
        return h5py.File(path, "r")
    except Exception as exc:  # h5py and zarr raise many error types for damaged files
        raise InputError(f"cannot open shard {path}: {library_error(exc)}") from None


def _shard_attrs(handle: Any) -> dict[str, Any]:
    if hasattr(handle, "filename"):  # h5py.File
        return {k: json.loads(v) for k, v in handle.attrs.items()}
    return dict(handle.attrs)


def read_shard_columns(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The metadata columns and attributes of one shard."""
    handle = _open_shard(path)
    try:
        attrs = _shard_attrs(handle)
        cols = {name: np.asarray(handle[name][...]) for name in COLUMNS}
    except Exception as exc:
        raise InputError(f"shard {path}: cannot read its metadata: {library_error(exc)}") from None
    finally:
        if hasattr(handle, "close"):
            handle.close()
    return cols, attrs


def library_error(exc: BaseException, named: bool = True) -> str:
    """A library's error as one line, ``Type: message`` (``named=False``: the message only). HDF5's messages
    hold newlines (``... time = Mon Dec  7 23:02:14 2026\n, filename = ...``), and an error is one line."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if named else text


def _is_count(v: Any) -> bool:
    return is_int(v) and v >= 0


def _is_finite_number(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def _is_str_map(v: Any, value_ok: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items())


def _is_area_key(k: str) -> bool:
    try:
        int(k)
    except ValueError:
        return False
    return True


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` (parsed ``manifest.json``) if its structure is what :class:`PatchStore` and ``store
    info|check`` read; else :class:`InputError` naming ``path`` and the first bad key (a damaged or hand-edited
    manifest would otherwise fail later with a bare KeyError, TypeError or AttributeError)."""

    def need(ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise InputError(f"{path}: manifest key '{key}' must be {expected}, got {shown}")

    if not isinstance(manifest, dict):
        raise InputError(f"{path}: the manifest must be a JSON object, got a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r} is not supported (expected {FORMAT} {FORMAT_VERSION})"
        )
    required = ("geometry", "backend", "compression", "n_patches", "areas", "brains", "sections", "splits")
    missing = [k for k in (*required, "counts", "shards", "extract") if k not in manifest]
    if missing:
        raise InputError(f"{path}: manifest key '{missing[0]}' is missing")
    geometry = manifest["geometry"]
    need(isinstance(geometry, dict), "geometry", "an object", geometry)
    for key, ok, expected in (
        ("crop_px", _is_count, "a non-negative integer"),
        ("stored_px", _is_count, "a non-negative integer"),
        ("pad_px", _is_count, "a non-negative integer"),
        ("pixel_size_um", _is_finite_number, "a number"),
        ("max_shift_mm", _is_finite_number, "a number"),
    ):
        need(ok(geometry.get(key)), f"geometry.{key}", expected, geometry.get(key))
    backend = manifest["backend"]
    need(isinstance(backend, str) and backend in SHARD_SUFFIXES, "backend", f"one of {sorted(SHARD_SUFFIXES)}", backend)
    need(isinstance(manifest["compression"], str), "compression", "a string", manifest["compression"])
    need(_is_count(manifest["n_patches"]), "n_patches", "a non-negative integer", manifest["n_patches"])
    areas = manifest["areas"]
    need(
        _is_str_map(areas, lambda v: isinstance(v, str)) and all(_is_area_key(k) for k in areas),
        "areas",
        'an object of area id -> name ({"2": "hOc1", ...})',
        areas,
    )
    brains = manifest["brains"]
    need(isinstance(brains, list) and all(isinstance(b, str) for b in brains), "brains", "a list of names", brains)
    sections = manifest["sections"]
    need(isinstance(sections, list), "sections", "a list of section entries", sections)
    for i, entry in enumerate(sections):
        need(isinstance(entry, dict), f"sections[{i}]", "an object", entry)
        need(isinstance(entry.get("name"), str), f"sections[{i}].name", "a string", entry.get("name"))
    splits = manifest["splits"]
    need(isinstance(splits, dict), "splits", "an object of split -> {start, n}", splits)
    for split, info in splits.items():
        need(isinstance(info, dict), f"splits.{split}", "an object with start and n", info)
        for key in ("start", "n"):
            need(_is_count(info.get(key)), f"splits.{split}.{key}", "a non-negative integer", info.get(key))
    counts = manifest["counts"]
    need(isinstance(counts, dict), "counts", "an object with split, area and brain counts", counts)
    need(
        _is_str_map(counts.get("split"), _is_count), "counts.split", "an object of split -> count", counts.get("split")
    )
    for key in ("area", "brain"):
        value = counts.get(key)
        need(
            _is_str_map(value, lambda per: _is_str_map(per, _is_count)),
            f"counts.{key}",
            f"an object of split -> {{{key} -> count}}",
            value,
        )
    need(isinstance(manifest["extract"], dict), "extract", "an object (the extraction settings)", manifest["extract"])
    shards = manifest["shards"]
    need(isinstance(shards, list), "shards", "a list of shard entries", shards)
    for i, entry in enumerate(shards):
        key = f"shards[{i}]"
        need(isinstance(entry, dict), key, "an object with name, split, n, first and meta_sha256", entry)
        name = entry.get("name")
        need(
            isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name,
            f"{key}.name",
            "a file name inside the store",
            name,
        )
        need(entry.get("split") in SPLITS, f"{key}.split", f"one of {list(SPLITS)}", entry.get("split"))
        for field in ("n", "first"):
            need(_is_count(entry.get(field)), f"{key}.{field}", "a non-negative integer", entry.get(field))
        need(isinstance(entry.get("meta_sha256"), str), f"{key}.meta_sha256", "a string", entry.get("meta_sha256"))
        if "patches_sha256" in entry:  # stores extracted before pixel checksums lack it
            need(isinstance(entry["patches_sha256"], str), f"{key}.patches_sha256", "a string", entry["patches_sha256"])
    return manifest


class PatchStore:
    """Read access to a finished patch store (any backend). Picklable; handles open lazily per process.

    ``store.read(i)`` returns patch ``i`` (S x S uint8); ``store.metadata`` the table of all patches;
    ``store.split_range("train")`` the id range of a split; ``store.shard_ranges("train")`` the id ranges of
    its shards (for shard-local sampling).
    """

    def __init__(self, path: str | Path, max_open: int = 64) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            partial = self.path.is_dir() and any(self.path.glob("shard-*"))
            hint = " (extraction unfinished: rerun `cytonet extract` until every task is done)" if partial else ""
            raise InputError(f"{self.path} is not a patch store: {MANIFEST} is missing{hint}")
        try:
            raw = manifest_path.read_bytes()
            data = json.loads(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{manifest_path}: cannot read the manifest: {library_error(exc, named=False)}") from None
        self.manifest: dict[str, Any] = check_manifest(data, manifest_path)
        #: SHA-256 of ``manifest.json`` as read here: the store's identity (it lists every shard's metadata hash
        #: and the split of every section), recorded by training and analysis to tell which store a model was
        #: trained on. Hashed from the bytes this object reads, so it always describes the store it serves.
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.geometry = PatchGeometry.from_dict(self.manifest["geometry"])
        self.backend: str = self.manifest["backend"]
        self.compression: str = self.manifest["compression"]
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        self._starts = np.array([s["first"] for s in self.shards], dtype=np.int64)
        self.n = int(self.manifest["n_patches"])
        self.areas: dict[int, str] = {int(k): v for k, v in self.manifest["areas"].items()}
        self.area_ids: list[int] = sorted(self.areas)
        self.brains: list[str] = list(self.manifest["brains"])
        self.max_open = max_open
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid: int | None = None
        self._metadata: np.ndarray | None = None

    # -- structure --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if self.manifest["splits"].get(s, {}).get("n", 0) > 0]

    def split_range(self, split: str) -> tuple[int, int]:
        """Global id range ``[start, stop)`` of ``split``."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        info = self.manifest["splits"].get(split)
        if not info or info["n"] == 0:
            raise InputError(f"{self.path} holds no patches of split {split!r}; it has: {', '.join(self.splits)}")
        return int(info["start"]), int(info["start"]) + int(info["n"])

    def shard_ranges(self, split: str | None = None) -> list[tuple[int, int]]:
        """``[start, stop)`` of every shard (of ``split``), in manifest order."""
        return [
            (int(s["first"]), int(s["first"]) + int(s["n"]))
            for s in self.shards
            if split is None or s["split"] == split
        ]

    @property
    def metadata(self) -> np.ndarray:
        """Structured array (:data:`META_DTYPE`) with one row per patch, loaded on first use."""
        if self._metadata is None:
            path = self.path / METADATA
            try:
                table = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: cannot read the patch metadata: {library_error(exc, named=False)}") from None
            if table.dtype != META_DTYPE or len(table) != self.n:
                raise InputError(f"{path}: metadata table does not match the manifest ({len(table)} rows)")
            self._metadata = table
        return self._metadata

    def class_index(self, area_ids: np.ndarray) -> np.ndarray:
        """Contiguous class numbers 0..K-1 of area ids, in the order of :attr:`area_ids`."""
        ids = np.asarray(self.area_ids)
        idx = np.searchsorted(ids, area_ids)
        if np.any(idx >= len(ids)) or np.any(ids[np.minimum(idx, len(ids) - 1)] != area_ids):
            raise InputError(f"{self.path}: area ids outside the store's areas {self.area_ids}")
        return idx.astype(np.int64)

    # -- reading ----------------------------------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, row within the shard) of global id ``i``."""
        if not 0 <= i < self.n:
            raise IndexError(f"patch id {i} outside 0..{self.n - 1}")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def _open(self, k: int) -> tuple[Any, Any]:
        """(file or group handle, its ``patches`` array) of shard ``k``, opened once per process.

        The array object is kept too: looking it up per read costs zarr a metadata read each time.
        """
        if self._pid != os.getpid():  # first use in this process (e.g. a fresh DataLoader worker)
            self._handles = OrderedDict()
            self._pid = os.getpid()
        entry = self._handles.get(k)
        if entry is None:
            handle = _open_shard(self.path / self.shards[k]["name"])
            try:
                entry = (handle, handle["patches"])
            except Exception as exc:
                raise InputError(
                    f"shard {self.shards[k]['name']}: no patches array ({library_error(exc, named=False)})"
                ) from None
            self._handles[k] = entry
            if len(self._handles) > self.max_open:
                _, (old, _) = self._handles.popitem(last=False)
                if hasattr(old, "close"):
                    old.close()
        else:
            self._handles.move_to_end(k)
        return entry

    def read(self, i: int) -> np.ndarray:
        """Patch ``i`` as an S x S uint8 array."""
        k, j = self.locate(i)
        try:
            return np.asarray(self._open(k)[1][j])
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"shard {self.shards[k]['name']}: reading patch {j} failed: {library_error(exc)}"
            ) from None

    def iter_shard_patches(self, k: int) -> Iterator[np.ndarray]:
        """All patches of shard ``k`` in order (sequential read, used by ``store check``)."""
        arr = self._open(k)[1]
        n = int(self.shards[k]["n"])
        step = 16
        for j0 in range(0, n, step):
            block = np.asarray(arr[j0 : min(j0 + step, n)])
            yield from block

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle, _ in self._handles.values():
                if hasattr(handle, "close"):
                    handle.close()
        self._handles = OrderedDict()
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_pid"] = None
        return state

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PatchStore({str(self.path)!r}, n={self.n}, backend={self.backend}, stored_px={self.geometry.stored_px})"
        )


def open_patch_store(path: str | Path) -> PatchStore:
    """Open a finished patch store for reading."""
    return PatchStore(path)


# ----------------------------------------------------------------------------------------------------------
# Manifest


def _counts(table: np.ndarray, brains: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"split": {}, "area": {}, "brain": {}}
    for code, split in enumerate(SPLITS):
        rows = table[table["split"] == code]
        if len(rows) == 0:
            continue
        out["split"][split] = len(rows)
        ids, n = np.unique(rows["area"], return_counts=True)
        out["area"][split] = {str(int(a)): int(c) for a, c in zip(ids, n)}
        ids, n = np.unique(rows["brain"], return_counts=True)
        out["brain"][split] = {brains[int(b)]: int(c) for b, c in zip(ids, n)}
    return out


def finalize_store(out: Path, header: dict[str, Any], shards: list[dict[str, Any]]) -> Path:
    """Write ``metadata.npy`` and ``manifest.json`` once every shard exists; returns the manifest path.

    ``header`` holds the store-level entries (backend, compression, geometry, extraction settings, areas,
    brains, sections); ``shards`` the planned shards (name, split, n, first). Each shard's columns are read back
    and checked against the plan (its ids must be first..first+n-1). The content depends only on the plan and
    the shards, never on which process or how many tasks wrote them, so concurrent finalizers write the same
    bytes (each through its own temp file).
    """
    parts = []
    listed = []
    for s in shards:
        cols, attrs = read_shard_columns(out / s["name"])
        n = int(s["n"])
        expected = np.arange(int(s["first"]), int(s["first"]) + n)
        if len(cols["patch_id"]) != n or not np.array_equal(cols["patch_id"], expected):
            raise InputError(f"shard {out / s['name']}: holds other patches than planned; rerun with --overwrite")
        if attrs.get("split") != s["split"]:
            raise InputError(f"shard {out / s['name']}: split {attrs.get('split')!r}, expected {s['split']!r}")
        parts.append(table_from_columns(cols))
        entry = {**s, "meta_sha256": columns_sha256(cols)}
        if isinstance(attrs.get("patches_sha256"), str):
            entry["patches_sha256"] = attrs["patches_sha256"]
        listed.append(entry)
    table = np.concatenate(parts) if parts else np.zeros(0, dtype=META_DTYPE)
    splits: dict[str, Any] = {}
    for code, split in enumerate(SPLITS):
        ids = table["patch_id"][table["split"] == code]
        splits[split] = {"start": int(ids[0]) if len(ids) else 0, "n": len(ids)}
        splits[split]["shards"] = [i for i, s in enumerate(shards) if s["split"] == split]
    manifest = {
        **header,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cytonet_version": __version__,
        "n_patches": len(table),
        "metadata_file": METADATA,
        "splits": splits,
        "counts": _counts(table, header["brains"]),
        "shards": listed,
    }
    buf = _npy_bytes(table)
    write_bytes_atomic(out / METADATA, buf)
    path = out / MANIFEST
    write_json_atomic(path, manifest)
    return path


def _npy_bytes(table: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.save(bio, table, allow_pickle=False)
    return bio.getvalue()


# ----------------------------------------------------------------------------------------------------------
# store info / store check


def describe_store(path: str | Path) -> str:
    """Counts per split, area and brain, as ``cytonet store info`` prints them."""
    store = PatchStore(path)
    m = store.manifest
    g = store.geometry
    counts = m["counts"]
    lines = [
        f"patch store {store.path}",
        f"  format {m['format']} v{m['format_version']}, backend {store.backend}, compression {store.compression}",
        f"  {store.n} patches in {len(store.shards)} shards; patches {g.stored_px} px stored for a "
        f"{g.crop_px} px crop at {g.pixel_size_um:g} um/px (shift up to {g.max_shift_mm:g} mm)",
        f"  sampling: {m['extract'].get('sampling')}",
    ]
    splits = [s for s in SPLITS if s in counts["split"]]
    lines.append("")
    lines.append("per split: " + ", ".join(f"{s} {counts['split'][s]}" for s in splits))
    header = f"{'area':>6} {'name':<20}" + "".join(f"{s:>8}" for s in splits)
    lines += ["", header]
    for area in store.area_ids:
        row = "".join(f"{counts['area'][s].get(str(area), 0):>8}" for s in splits)
        lines.append(f"{area:>6} {store.areas[area]:<20}{row}")
    lines += ["", f"{'brain':<12}" + "".join(f"{s:>8}" for s in splits)]
    for brain in store.brains:
        row = "".join(f"{counts['brain'][s].get(brain, 0):>8}" for s in splits)
        lines.append(f"{brain:<12}{row}")
    return "\n".join(lines)


@dataclass
class CheckResult:
    """What ``store check`` verified."""

    shards: int
    patches: int
    unchecked_pixels: int = 0
    """Shards whose pixels could only be decompressed: their manifest has no checksum (an older cytonet)."""


def check_store(path: str | Path, read_patches: bool = True) -> CheckResult:
    """Verify that every shard is readable and matches the manifest; raise :class:`InputError` at the first bad one.

    Checks per shard (in manifest order): it exists and opens; its attributes name the planned split and size;
    its metadata columns hash to the manifest's digest and equal the rows of ``metadata.npy``; ``patches`` has
    shape (n, S, S) uint8; and (``read_patches``) every patch decompresses and the pixels hash to the shard's
    ``patches_sha256`` in the manifest (stores extracted before it existed: decompression only,
    :attr:`CheckResult.unchecked_pixels`). Then the manifest's counts are recomputed from the table.
    """
    store = PatchStore(path)
    table = store.metadata
    s_px = store.geometry.stored_px
    total = unchecked = 0
    for k, s in enumerate(store.shards):
        where = f"shard {s['name']}"
        cols, attrs = read_shard_columns(store.path / s["name"])
        n = int(s["n"])
        if attrs.get("split") != s["split"] or int(attrs.get("n", -1)) != n:
            raise InputError(
                f"{where}: attributes (split {attrs.get('split')!r}, n {attrs.get('n')}) differ from the manifest"
            )
        if columns_sha256(cols) != s["meta_sha256"]:
            raise InputError(f"{where}: metadata differ from the manifest (digest mismatch)")
        rows = table[int(s["first"]) : int(s["first"]) + n]
        if len(rows) != n or not np.array_equal(table_from_columns(cols), rows):
            raise InputError(f"{where}: metadata differ from {METADATA}")
        try:
            arr = store._open(k)[1]
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            if shape != (n, s_px, s_px) or dtype != np.uint8:
                raise InputError(f"{where}: patches have shape {shape} {dtype}, expected ({n}, {s_px}, {s_px}) uint8")
            if read_patches:
                digests = (patch_digest(p) for p in store.iter_shard_patches(k))
                if "patches_sha256" not in s:
                    for _ in digests:
                        pass
                    unchecked += 1
                elif patches_sha256(digests) != s["patches_sha256"]:
                    raise InputError(f"{where}: pixel data differ from the manifest (checksum mismatch)")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{where}: patches unreadable: {library_error(exc)}") from None
        total += n
    if total != store.n:
        raise InputError(f"{store.path}: shards hold {total} patches, the manifest lists {store.n}")
    if _counts(table, store.brains) != store.manifest["counts"]:
        raise InputError(f"{store.path}: counts in {MANIFEST} do not match {METADATA}")
    store.close()
    return CheckResult(shards=len(store.shards), patches=total, unchecked_pixels=unchecked)
