"""Output volumes of ``cytonet infer``: one per section, OME-Zarr (default) or HDF5, with per-block done markers.

OME-Zarr (NGFF 0.5 on zarr v3), ``<out>/<section>.ome.zarr``::

    zarr.json               ome.multiscales (axes c, y, x in micrometer; one scale per level), ome.omero
                            (channel names = areas), cytonet provenance
    0, 1, ...               float32 (K, h, w) per-area probabilities, level l 2^l times coarser
    labels/argmax/0, 1, ... uint16 (h, w) area id of the most probable area (0: no tissue), an NGFF image-label
    labels/cleaned/...      the same after the kNN clean-up (when infer.cleanup is not none)

HDF5, ``<out>/<section>.h5``: datasets ``probabilities/<l>``, ``labels/argmax/<l>``, ``labels/cleaned/<l>``,
the same attributes (JSON strings) on the root.

A volume is created once, complete with all its arrays, in a temporary folder renamed into place (zarr) or
under an exclusive lock (HDF5), so concurrent workers never see half-made metadata. Every later opener
compares the settings it would write with those stored and refuses a mismatch, naming the keys that differ.
Workers write whole chunks (or shards) only: a block's write box is a whole number of chunks at every level.

Done markers: ``<out>/.cytonet/<section>/blocks/<by>.<bx>.json``, written atomically after the block's data
(and, for HDF5, after a flush), holding the writer's worker number; ``.../cleaned.json`` after the clean-up,
naming the sections cleaned together (one, or a brain's for the 3D clean-up).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cytonet.config import diff_keys
from cytonet.data.chunks import open_chunked
from cytonet.data.patches import ensure_space, exclusive_lock, remove_path, write_json_atomic
from cytonet.errors import InputError, OutputExistsError
from cytonet.infer.blocks import Block, Grid

STATE_DIR = ".cytonet"
LABEL_IMAGES = ("argmax", "cleaned")


#: infer.compression -> (blosc codec, level) of the output arrays.
BLOSC: dict[str, tuple[Literal["lz4", "zstd"], int]] = {"blosc-lz4": ("lz4", 5), "blosc-zstd": ("zstd", 3)}


def volume_path(out: Path, section: str, fmt: str) -> Path:
    return out / (f"{section}.ome.zarr" if fmt == "ome-zarr" else f"{section}.h5")


def state_dir(out: Path, section: str) -> Path:
    return out / STATE_DIR / section


class DoneMarkers:
    """Per-block done markers of one section."""

    def __init__(self, out: Path, section: str) -> None:
        self.dir = state_dir(out, section) / "blocks"

    def path(self, block: Block) -> Path:
        return self.dir / f"{block.id}.json"

    def is_done(self, block: Block) -> bool:
        return self.path(block).is_file()

    def done_ids(self) -> set[str]:
        """Ids of the blocks marked done: one listing of the folder, not a look per block (thousands of them
        on a parallel file system). Temporary files of markers being written start with a dot."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        return {n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")}

    def mark(self, block: Block, info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Atomic (a killed worker leaves no half marker) but not fsynced: the chunks it vouches for are not
        # fsynced by zarr either, so syncing the marker alone would not survive a lost node any better.
        write_json_atomic(self.path(block), info, fsync=False)

    def read(self, block: Block) -> dict[str, Any]:
        return json.loads(self.path(block).read_text())


def _ngff_axes(channel: bool) -> list[dict[str, str]]:
    yx = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channel else []) + yx


def ngff_multiscales(name: str, levels: int, pixel_um: float, origin_um: float, channel: bool) -> list[dict[str, Any]]:
    """NGFF 0.5 ``multiscales``: level l has pixel size pixel_um * 2^l, and a pixel's coordinate, index * scale +
    translation, is the position of its centre (as napari and ome-zarr place pixels).

    Positions are in the section's frame (section pixel j's centre at j times the section's pixel size, what
    the section image shown with only its pixel size as scale gives), and a prediction lies at the centre of
    the patch it was made from: level-0 pixel i at ``origin_um`` + i * pixel_um, ``origin_um`` being the
    centre of output pixel 0's patch (:meth:`Grid.patch_centre_um`). A level-l pixel is the mean of the 2^l x
    2^l level-0 pixels of its window, so it lies at their mean position: translation ``origin_um`` + (2^l - 1)
    / 2 * pixel_um. (Partial windows at the far edges average fewer pixels; their centre is not moved.)"""
    datasets = []
    for lvl in range(levels):
        s = pixel_um * 2**lvl
        scale = ([1.0] if channel else []) + [s, s]
        shift = ([0.0] if channel else []) + [origin_um + (s - pixel_um) / 2] * 2
        datasets.append(
            {
                "path": str(lvl),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": shift},
                ],
            }
        )
    return [{"name": name, "axes": _ngff_axes(channel), "datasets": datasets}]


#: Matplotlib's "tab20" palette, spelt out: importing matplotlib costs ~0.2 s per worker process.
TAB20 = (
    "1f77b4 aec7e8 ff7f0e ffbb78 2ca02c 98df8a d62728 ff9896 9467bd c5b0d5 "
    "8c564b c49c94 e377c2 f7b6d2 7f7f7f c7c7c7 bcbd22 dbdb8d 17becf 9edae5"
).split()


def _label_colors(area_ids: list[int]) -> list[dict[str, Any]]:
    out = []
    for i, a in enumerate(area_ids):
        rgb = bytes.fromhex(TAB20[i % 20])
        out.append({"label-value": int(a), "rgba": [*rgb, 255]})
    return out


class Volume:
    """One section's output, created (or opened) by :func:`open_volume`."""

    def __init__(self, path: Path, grid: Grid, spec: dict[str, Any]) -> None:
        self.path = path
        self.grid = grid
        self.spec = spec
        self.levels = int(spec["pyramid_levels"])

    def write_block(self, block: Block, probs: list[np.ndarray], labels: list[np.ndarray]) -> None:
        raise NotImplementedError

    def read_labels(self, name: str = "argmax", level: int = 0) -> np.ndarray:
        raise NotImplementedError

    def read_probs(self, level: int = 0) -> np.ndarray:
        raise NotImplementedError

    def write_labels(self, name: str, levels: list[np.ndarray]) -> None:
        """Whole label images of every level (the clean-up; one writer per section)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _level_chunks(spec: dict[str, Any], level: int) -> tuple[int, int | None]:
    """(chunk edge, shard edge or None) at ``level``: both halve per level so blocks stay whole."""
    c = int(spec["chunk_px"]) // 2**level
    n = int(spec["shard_chunks"])
    return c, (c * n if n else None)


class ZarrVolume(Volume):
    def __init__(self, path: Path, grid: Grid, spec: dict[str, Any]) -> None:
        super().__init__(path, grid, spec)
        # Blocks own whole chunks, so they are written chunk file by chunk file, bypassing zarr's per-call
        # overhead (cytonet.data.chunks); sharded arrays (and any array it does not understand) go through
        # zarr, which is opened only when needed (it costs ~1 ms per array).
        self._direct = {
            key: open_chunked(path / key) for lvl in range(self.levels) for key in (str(lvl), f"labels/argmax/{lvl}")
        }
        self._zarr: Any = None

    def _array(self, key: str) -> Any:
        if self._zarr is None:
            import zarr

            self._zarr = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        return self._zarr[key]

    @staticmethod
    def create(path: Path, grid: Grid, spec: dict[str, Any], attrs: dict[str, Any]) -> None:
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        levels = int(spec["pyramid_levels"])
        k = len(spec["area_ids"])

        # byte shuffle suits both float32 probabilities and uint16 labels
        codec: Any = None
        if spec["compression"] != "none":
            cname, clevel = BLOSC[spec["compression"]]
            codec = BloscCodec(cname=cname, clevel=clevel, shuffle=BloscShuffle.shuffle)

        # The hierarchy (metadata only: no chunk exists yet) is built in memory, where zarr takes a third of
        # the time it takes on disk, then its documents are written to the temporary folder in one go.
        docs: dict[str, Any] = {}
        root = zarr.open_group(zarr.storage.MemoryStore(docs), mode="w", zarr_format=3)
        pixel_um = float(spec["output_pixel_size_um"])
        origin_um = grid.patch_centre_um(0, float(spec["model_pixel_size_um"]), int(spec["section_factor"]))
        for lvl in range(levels):
            c, s = _level_chunks(spec, lvl)
            root.create_array(
                str(lvl),
                shape=(k, *grid.level_shape(lvl)),
                chunks=(k, c, c),
                shards=(k, s, s) if s else None,
                dtype="float32",
                fill_value=0.0,
                compressors=codec,
                dimension_names=("c", "y", "x"),
            )
        labels = root.create_group("labels")
        labels.attrs["ome"] = {"version": "0.5", "labels": list(spec["label_images"])}
        for name in spec["label_images"]:
            g = labels.create_group(name)
            for lvl in range(levels):
                c, s = _level_chunks(spec, lvl)
                g.create_array(
                    str(lvl),
                    shape=grid.level_shape(lvl),
                    chunks=(c, c),
                    shards=(s, s) if s else None,
                    dtype="uint16",
                    fill_value=0,
                    compressors=codec,
                    dimension_names=("y", "x"),
                )
            g.attrs["ome"] = {
                "version": "0.5",
                "image-label": {
                    "version": "0.5",
                    "colors": _label_colors(spec["area_ids"]),
                    "properties": [
                        {"label-value": int(a), "name": n} for a, n in zip(spec["area_ids"], spec["area_names"])
                    ],
                    "source": {"image": "../../"},
                },
                "multiscales": ngff_multiscales(f"{grid.section} {name}", levels, pixel_um, origin_um, channel=False),
            }
        root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": ngff_multiscales(grid.section, levels, pixel_um, origin_um, channel=True),
            "omero": {
                "channels": [
                    {"label": n, "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}, "active": True}
                    for n in spec["area_names"]
                ],
            },
        }
        root.attrs["cytonet"] = attrs
        for key, buf in docs.items():
            file = tmp / key
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(buf.to_bytes())
        try:
            os.rename(tmp, path)  # atomic: other workers see no volume or a complete one
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.is_dir():
                raise

    @staticmethod
    def stored_attrs(path: Path) -> dict[str, Any]:
        meta = json.loads((path / "zarr.json").read_text())
        return dict(meta.get("attributes", {}).get("cytonet", {}))

    def write_block(self, block: Block, probs: list[np.ndarray], labels: list[np.ndarray]) -> None:
        for lvl in range(self.levels):
            y0, y1, x0, x1 = block.at_level(lvl, self.grid.level_shape(lvl))
            for key, data, start in (
                (str(lvl), probs[lvl], (0, y0, x0)),
                (f"labels/argmax/{lvl}", labels[lvl], (y0, x0)),
            ):
                direct = self._direct[key]
                if direct is not None:
                    direct.write(start, data)
                else:
                    self._array(key)[..., y0:y1, x0:x1] = data

    def read_labels(self, name: str = "argmax", level: int = 0) -> np.ndarray:
        return np.asarray(self._array(f"labels/{name}/{level}")[...])

    def read_probs(self, level: int = 0) -> np.ndarray:
        return np.asarray(self._array(str(level))[...])

    def write_labels(self, name: str, levels: list[np.ndarray]) -> None:
        for lvl, arr in enumerate(levels):
            self._array(f"labels/{name}/{lvl}")[...] = arr


class HDF5Volume(Volume):
    def __init__(self, path: Path, grid: Grid, spec: dict[str, Any], writable: bool = True) -> None:
        super().__init__(path, grid, spec)
        import h5py
        import hdf5plugin  # noqa: F401  (registers the blosc filter for reading)

        self._file = h5py.File(path, "r+" if writable else "r")

    @staticmethod
    def create(path: Path, grid: Grid, spec: dict[str, Any], attrs: dict[str, Any]) -> None:
        import h5py
        import hdf5plugin

        levels = int(spec["pyramid_levels"])
        k = len(spec["area_ids"])
        kwargs: dict[str, Any] = {}
        if spec["compression"] != "none":
            cname, clevel = BLOSC[spec["compression"]]
            kwargs.update(hdf5plugin.Blosc(cname=cname, clevel=clevel, shuffle=hdf5plugin.Blosc.SHUFFLE))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with h5py.File(tmp, "w") as f:
            for lvl in range(levels):
                c, _ = _level_chunks(spec, lvl)
                h, w = grid.level_shape(lvl)
                ch = (k, min(c, h), min(c, w))
                f.create_dataset(f"probabilities/{lvl}", shape=(k, h, w), chunks=ch, dtype="f4", fillvalue=0, **kwargs)
                for name in spec["label_images"]:
                    f.create_dataset(
                        f"labels/{name}/{lvl}", shape=(h, w), chunks=ch[1:], dtype="u2", fillvalue=0, **kwargs
                    )
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value)
        os.replace(tmp, path)

    @staticmethod
    def stored_attrs(path: Path) -> dict[str, Any]:
        import h5py

        with h5py.File(path, "r") as f:
            return {k: json.loads(v) for k, v in f.attrs.items()}

    def write_block(self, block: Block, probs: list[np.ndarray], labels: list[np.ndarray]) -> None:
        ensure_space(self.path, sum(a.nbytes for a in [*probs, *labels]), "a block")
        for lvl in range(self.levels):
            y0, y1, x0, x1 = block.at_level(lvl, self.grid.level_shape(lvl))
            self._file[f"probabilities/{lvl}"][:, y0:y1, x0:x1] = probs[lvl]
            self._file[f"labels/argmax/{lvl}"][y0:y1, x0:x1] = labels[lvl]
        self._file.flush()  # the done marker follows: the block must be on disk first

    def read_labels(self, name: str = "argmax", level: int = 0) -> np.ndarray:
        return np.asarray(self._file[f"labels/{name}/{level}"][...])

    def read_probs(self, level: int = 0) -> np.ndarray:
        return np.asarray(self._file[f"probabilities/{level}"][...])

    def write_labels(self, name: str, levels: list[np.ndarray]) -> None:
        ensure_space(self.path, sum(a.nbytes for a in levels), "a label image")
        for lvl, arr in enumerate(levels):
            self._file[f"labels/{name}/{lvl}"][...] = arr
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def check_existing(out: Path, section: str, spec: dict[str, Any]) -> None:
    """Refuse to continue a section whose existing volume was made with other settings, or whose done markers
    outlived their volume (both would mix results of different runs)."""
    path = volume_path(out, section, spec["format"])
    cls: type[ZarrVolume] | type[HDF5Volume] = ZarrVolume if spec["format"] == "ome-zarr" else HDF5Volume
    if not path.exists():
        if any((state_dir(out, section) / "blocks").glob("*.json")):
            raise InputError(
                f"{state_dir(out, section)} holds done markers but {path} is missing; "
                "remove the markers folder or rerun with --overwrite"
            )
        return
    try:
        stored = cls.stored_attrs(path)
    except (OSError, ValueError, KeyError) as exc:
        # --overwrite removes it only when inference's state folder says it is ours (remove_outputs).
        hint = (
            "rerun with --overwrite to map it again"
            if state_dir(out, section).is_dir()
            else "it is not a volume this output folder's inference wrote: move it away or choose another --out"
        )
        raise InputError(f"{path}: cannot read the output volume ({exc}); {hint}") from None
    differ = diff_keys(stored.get("settings", {}), spec)
    if differ:
        raise InputError(
            f"{path} was written with other settings ({', '.join(differ[:8])} differ); "
            "use another infer.out_dir or rerun with --overwrite"
        )


def open_volume(out: Path, grid: Grid, spec: dict[str, Any], attrs: dict[str, Any]) -> Volume:
    """Create the section's volume if it does not exist (exactly once among concurrent workers), else open it
    after checking that it was made with the same settings (``spec``, part of ``attrs``)."""
    fmt = spec["format"]
    path = volume_path(out, grid.section, fmt)
    cls: type[ZarrVolume] | type[HDF5Volume] = ZarrVolume if fmt == "ome-zarr" else HDF5Volume
    with exclusive_lock(state_dir(out, grid.section) / "create.lock"):
        if not path.exists():
            cls.create(path, grid, spec, attrs)
    check_existing(out, grid.section, spec)
    return cls(path, grid, spec)


def _is_inference_volume(path: Path, fmt: str) -> bool:
    """Whether ``path`` holds the settings attribute cytonet infer writes into every output volume."""
    cls: type[ZarrVolume] | type[HDF5Volume] = ZarrVolume if fmt == "ome-zarr" else HDF5Volume
    try:
        return isinstance(cls.stored_attrs(path).get("settings"), dict)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # not JSON, not an HDF5 file, ...
        return False


def remove_outputs(out: Path, sections: list[str], fmt: str) -> None:
    """Remove the sections' outputs in format ``fmt`` and their markers (``--overwrite``). Every volume is
    checked first to be one that ``cytonet infer`` wrote (its settings attribute): anything else at a volume's
    path (a section store, when ``--out`` names a folder of them) is refused, and nothing is removed."""
    paths = [volume_path(out, section, fmt) for section in sections]
    # A volume cytonet wrote but cannot read any more (a writer killed mid-flush) is still ours when inference's
    # state folder for its section exists: only infer makes that.
    foreign = [
        p
        for section, p in zip(sections, paths)
        if p.exists() and not _is_inference_volume(p, fmt) and not state_dir(out, section).is_dir()
    ]
    if foreign:
        raise OutputExistsError(
            f"{foreign[0]} is not a readable cytonet inference volume (no settings attribute), so --overwrite "
            f"does not remove it{f' (nor {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; choose another "
            "infer.out_dir (--out), or move it away (or delete it, if it is a damaged output)"
        )
    for section, p in zip(sections, paths):
        remove_path(p)
        shutil.rmtree(state_dir(out, section), ignore_errors=True)
