"""Random patch reads per second from each patch-store backend and codec, against reading from memory.

Builds one store per (backend, codec) from the same patches, then reads patches in a random order through
:class:`cytonet.data.patches.PatchStore` (the loader's path) and prints reads/s, the ratio to copying the same
patches out of a numpy array in memory, and bytes on disk per patch. The files were just written, so the page
cache is warm: this measures decode cost, not disk bandwidth (on a cluster file system, smaller files also cost
less I/O; weigh the printed size against the speed).

Patch content: a cell-like texture (light neuropil with fine noise, dark blobs of a few pixels), so that the
codecs see data of realistic entropy (random bytes would not compress, constant ones compress absurdly well),
or with ``--from-store PATH`` the patches of an existing store (e.g. extracted from the synthetic brains).

Usage: ``python benchmarks/bench_patch_reads.py [--edge 435 --n 512] [--paper] [--from-store PATH]`` (``--paper`` adds 1807 px
patches: the 1129 px crop at 2 um with its margin).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cytonet.data.patches import SPLITS, PatchGeometry, PatchStore, ShardWriter, finalize_store, shard_name

CODECS = [("hdf5", "none"), ("hdf5", "blosc-zstd"), ("zarr", "none"), ("zarr", "blosc-zstd")]


def texture_patches(n: int, edge: int, seed: int = 0) -> np.ndarray:
    """(n, edge, edge) uint8 cell-like texture: neuropil ~160 with fine noise, ~20% dark cell pixels."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = np.empty((n, edge, edge), dtype=np.uint8)
    for i in range(n):
        background = 160 + 12 * ndimage.gaussian_filter(rng.standard_normal((edge, edge)), 1.0)
        seeds = (rng.random((edge, edge)) < 0.012).astype(np.float32)
        cells = ndimage.gaussian_filter(seeds, 1.6) * 40
        img = background - 130 * np.clip(cells, 0, 1) + 6 * rng.standard_normal((edge, edge))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_store(path: Path, patches: np.ndarray, backend: str, codec: str, per_shard: int, n_areas: int = 8) -> Path:
    """A train-only patch store holding ``patches`` (areas assigned round-robin), written shard by shard."""
    n, edge, _ = patches.shape
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - start)
        name = shard_name(k, backend)
        cols = {
            "patch_id": np.arange(start, start + m),
            "area": 2 + np.arange(start, start + m) % n_areas,
            "brain": np.zeros(m),
            "section": np.zeros(m),
            "section_index": np.zeros(m),
            "y": np.zeros(m),
            "x": np.zeros(m),
            "depth": np.full(m, 0.5),
            "coords": np.zeros((m, 3)),
            "split": np.zeros(m),
        }
        with ShardWriter(path / name, m, edge, codec, {"split": "train"}) as w:
            for j in range(m):
                w.write(j, patches[start + j])
            w.close(cols)
        shards.append({"name": name, "split": SPLITS[0], "n": m, "first": start})
    geometry = PatchGeometry(crop_px=edge, stored_px=edge, pixel_size_um=8.0, max_shift_mm=0.2, pad_px=3)
    header = {
        "backend": backend,
        "compression": codec,
        "geometry": geometry.to_dict(),
        "extract": {"sampling": "benchmark"},
        "areas": {str(a): f"area{a}" for a in range(2, 2 + n_areas)},
        "brains": ["B00"],
        "sections": [],
    }
    finalize_store(path, header, shards)
    return path


def read_rate(store: PatchStore, order: np.ndarray, seconds: float = 2.0) -> float:
    """Random reads per second (at least one pass over ``order``, at most ~``seconds``)."""
    store.read(int(order[0]))
    start = time.perf_counter()
    done = 0
    while True:
        for i in order:
            store.read(int(i))
            done += 1
            if done % 64 == 0 and time.perf_counter() - start > seconds and done >= len(order) // 4:
                return done / (time.perf_counter() - start)
        if time.perf_counter() - start > seconds:
            return done / (time.perf_counter() - start)


def memory_rate(patches: np.ndarray, order: np.ndarray, seconds: float = 1.0) -> float:
    start = time.perf_counter()
    done = 0
    sink = 0
    while time.perf_counter() - start < seconds:
        for i in order:
            sink += int(patches[i].copy()[0, 0])
            done += 1
    return done / (time.perf_counter() - start)


def bench(edge: int, n: int, per_shard: int, root: Path, source_store: Path | None = None) -> None:
    if source_store is not None:
        src = PatchStore(source_store)
        step = max(1, len(src) // n)
        patches = np.stack([src.read(i) for i in range(0, len(src), step)][:n])
        n, edge = len(patches), patches.shape[1]
        source = f"patches of {source_store}"
        src.close()
    else:
        source = "cell-like texture"
        patches = texture_patches(n, edge)
    order = np.random.default_rng(1).permutation(n)
    mem = memory_rate(patches, order)
    raw = edge * edge
    print(f"\n{n} patches of {edge} x {edge} px ({raw / 1e3:.0f} kB raw), {source}; random order, warm page cache")
    print(f"{'store':<22}{'reads/s':>10}{'vs memory':>12}{'MB/s':>9}{'disk/patch':>12}{'ratio':>8}")
    print(f"{'memory (numpy copy)':<22}{mem:>10.0f}{1.0:>12.3f}{mem * raw / 1e6:>9.0f}{'-':>12}{'-':>8}")
    for backend, codec in CODECS:
        path = write_store(root / f"{backend}-{codec}-{edge}", patches, backend, codec, per_shard)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "shard-" in str(p))
        store = PatchStore(path)
        rate = read_rate(store, order)
        store.close()
        label = f"{backend} {codec}"
        print(
            f"{label:<22}{rate:>10.0f}{rate / mem:>12.3f}{rate * raw / 1e6:>9.0f}"
            f"{size / n / 1e3:>10.0f}kB{raw * n / size:>8.2f}"
        )
        shutil.rmtree(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edge", type=int, default=435, help="stored patch edge (demo: 435)")
    parser.add_argument("--n", type=int, default=512, help="patches per store")
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--paper", action="store_true", help="also 1807 px patches (paper crop 1129 px at 2 um)")
    parser.add_argument("--from-store", type=Path, help="take the patches from this patch store (e.g. the demo's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reads-") as tmp:
        bench(args.edge, args.n, args.per_shard, Path(tmp), args.from_store)
        if args.paper:
            bench(1807, 48, 16, Path(tmp))


if __name__ == "__main__":
    main()
