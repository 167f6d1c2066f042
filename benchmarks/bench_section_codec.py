"""Codecs for the image arrays of section stores: size, write speed and the read speed inference sees.

Inference reads every section pixel once, plus its blocks' context, and on a GPU node the readers' decoding
is what has to keep up with the model (``cytonet.infer.run.io_threads``). This compares blosc settings for
the uint8 image arrays on the synthetic section that ``bench_infer`` maps (4 um, 64 x 48 mm; generated once,
or kept in ``--work``): the full resolution and the x4 level are re-encoded with each codec, then read back
box by box through :mod:`cytonet.data.chunks` (the readers' path), in boxes of the size the inference blocks of
the paper encoder (9257 px at full resolution) and of the demo encoder (1144 px at x4) read (tiling the array,
without the blocks' overlap: the cost per byte is what differs between codecs). Interleaved, best
of --repeats, no chunk cache, files in the page cache (decode cost, not disk bandwidth). Prints, per codec,
the compression ratio, the write (encode + file) speed, the read speed and its ratio to the codec cytonet
writes (:data:`cytonet.data.sections.IMAGE_BLOSC`).

    python benchmarks/bench_section_codec.py [--work /tmp/bench-infer] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cytonet.config import load_config
from cytonet.data.chunks import ChunkedArray, open_chunked
from cytonet.data.sections import IMAGE_BLOSC, level_name
from cytonet.data.synth import generate_section

#: (label, blosc cname, clevel, shuffle) of the candidates; "none" stores raw chunks.
CANDIDATES = [
    ("zstd-3-bitshuffle", "zstd", 3, "bitshuffle"),
    ("zstd-3-noshuffle", "zstd", 3, "noshuffle"),
    ("zstd-1-noshuffle", "zstd", 1, "noshuffle"),
    ("lz4-5-bitshuffle", "lz4", 5, "bitshuffle"),
    ("none", "", 0, ""),
]
#: (case, image level factor, read box edge in px at that level): the blocks bench_infer's cases read.
CASES = [("paper", 1, 9257), ("demo", 4, 1144)]


def section(work: Path) -> Path:
    """bench_infer's synthetic section (its default size and store settings)."""
    path = work / "sections" / "B00_s0000.zarr"
    if not path.exists():
        cfg = load_config(None, ["synth.pixel_size_um=4", "synth.brain_width_mm=64", "synth.brain_height_mm=48"])
        t0 = time.perf_counter()
        generate_section(cfg.synth, 0, 0, path, chunk_px=cfg.sections.chunk_px, image_levels=cfg.sections.image_levels)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s")
    return path


def recode(src: ChunkedArray, dst: Path, cname: str, clevel: int, shuffle: str) -> float:
    """Write ``src``'s data to a new array at ``dst`` with the codec; returns the seconds spent writing."""
    import zarr
    from zarr.codecs import BloscCodec

    codec = BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle) if cname else None
    zarr.create_array(
        str(dst), shape=src.shape, chunks=src.chunks, dtype="uint8", fill_value=0, compressors=codec, zarr_format=3
    )
    out = open_chunked(dst)
    assert out is not None
    rows = src.chunks[0]
    spent = 0.0
    for y in range(0, src.shape[0], rows):
        band = src.read((y, min(y + rows, src.shape[0])))
        t0 = time.perf_counter()
        out.write((y, 0), band)
        spent += time.perf_counter() - t0
    return spent


def boxes(shape: tuple[int, ...], edge: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Read boxes of ``edge`` px tiling the array (clipped at its edge), as inference blocks do."""
    step = edge
    return [
        ((y, min(y + edge, shape[0])), (x, min(x + edge, shape[1])))
        for y, x in itertools.product(range(0, shape[0], step), range(0, shape[1], step))
    ]


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("c/**/*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="folder holding (or to hold) bench_infer's section; kept")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-codec-"))
    store = section(work)
    current = "{}-{}-{}".format(*IMAGE_BLOSC)
    tmp = Path(tempfile.mkdtemp(prefix="codecs-", dir=work))
    try:
        for case, factor, edge in CASES:
            name = "image" if factor == 1 else level_name(factor)
            src = open_chunked(store / name)
            assert src is not None, f"{store / name} is not a plain chunked zarr array"
            mbytes = np.prod(src.shape) / 1e6
            print(f"\n== {case}: {name} {src.shape[0]}x{src.shape[1]} px ({mbytes:.0f} MB), read boxes of {edge} px")
            arrays, wrote, size = {}, {}, {}
            for label, cname, clevel, shuffle in CANDIDATES:
                dst = tmp / f"{case}-{label}"
                wrote[label] = recode(src, dst, cname, clevel, shuffle)
                size[label] = disk_bytes(dst)
                arrays[label] = open_chunked(dst)
            read = {label: float("inf") for label in arrays}
            for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every codec alike
                for label, arr in arrays.items():
                    t0 = time.perf_counter()
                    for box in boxes(arr.shape, edge):
                        arr.read(*box)
                    read[label] = min(read[label], time.perf_counter() - t0)
            base = read.get(current)
            for label in arrays:
                rel = f"{base / read[label]:5.2f}x" if base else "  -  "
                mark = " (cytonet's)" if label == current else ""
                print(
                    f"   {label:18s} ratio {mbytes * 1e6 / size[label]:5.2f}  write {mbytes / wrote[label]:6.0f} MB/s  "
                    f"read {mbytes / read[label]:6.0f} MB/s ({rel} cytonet's){mark}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(section in {work})")


if __name__ == "__main__":
    main()
