"""Tiny section stores with known geometry for the extraction, patch-store and loader tests.

Each section is a ring of cortex around a disc of white matter: depth runs 0 at the outer (pial) circle to 1
at the inner circle, areas are angular sectors of known size (the last one small, so that it is oversampled),
coordinates are (x, y, z) in mm, and the image is a hash-like pattern of the pixel position, so a stored patch
can be matched to the exact section pixels it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cytonet.data.sections import SectionMeta, create_section

PIXEL_UM = 8.0
SIZE = 160
R_IN, R_OUT = 35.0, 70.0
#: Area id -> (start, stop) angle in degrees.
SECTORS = {2: (0.0, 180.0), 3: (180.0, 270.0), 4: (270.0, 340.0), 5: (340.0, 360.0)}


def tiny_synth(pixel_size_um: float) -> list[str]:
    """Overrides of configs/demo.yaml for a tiny synthetic brain (8 x 6 mm, 3 areas, no image levels): at 64 um/px
    (125 x 94 px) a section takes a fraction of a second, at 32 um/px about 0.2 s."""
    return [
        f"synth.pixel_size_um={pixel_size_um:g}",
        "synth.n_areas=3",
        "synth.brain_width_mm=8",
        "synth.brain_height_mm=6",
        "synth.cortex_thickness_mm=[1.0,1.4]",
        "sections.chunk_px=64",
        "sections.image_levels=[]",
    ]


def image_pattern(y: np.ndarray, x: np.ndarray, index: int) -> np.ndarray:
    return ((y * 31 + x * 17 + index * 7) % 251).astype(np.uint8)


def ring_layers(index: int, size: int = SIZE) -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot(y - c, x - c)
    ang = np.degrees(np.arctan2(y - c, x - c)) % 360.0
    cortex = (r >= R_IN) & (r <= R_OUT)
    labels = np.zeros((size, size), np.uint16)
    labels[r < R_IN] = 1
    for area, (a0, a1) in SECTORS.items():
        labels[cortex & (ang >= a0) & (ang < a1)] = area
    depth = np.where(cortex, (R_OUT - r) / (R_OUT - R_IN), np.nan).astype(np.float32)
    mm = PIXEL_UM / 1000.0
    coords = np.stack([x * mm, y * mm, np.full(x.shape, index * 0.1)], axis=-1).astype(np.float32)
    return {"image": image_pattern(y, x, index), "labels": labels, "depth": depth, "coords": coords}


def make_sections(
    root: Path,
    brains: dict[str, int] | None = None,
    backend: str = "zarr",
    size: int = SIZE,
    image_levels: tuple[int, ...] = (),
) -> list[Path]:
    """Write ring sections: ``brains`` maps brain id -> number of sections (default B00: 3, B01: 3, B02: 1)."""
    brains = brains or {"B00": 3, "B01": 3, "B02": 1}
    table = {0: "background", 1: "white_matter", 2: "big", 3: "mid", 4: "small", 5: "tiny"}
    paths = []
    suffix = ".zarr" if backend == "zarr" else ".h5"
    for brain, n in brains.items():
        for index in range(n):
            meta = SectionMeta(
                brain=brain,
                section_index=index,
                z_mm=index * 0.1,
                pixel_size_um=PIXEL_UM,
                shape=(size, size),
                label_table=table,
            )
            path = root / brain / f"{brain}_s{index:04d}{suffix}"
            with create_section(path, meta, chunk_px=64, compression="none", image_levels=image_levels) as w:
                for layer, data in ring_layers(index, size).items():
                    w.write(layer, 0, 0, data)
            paths.append(path)
    return paths


def training_data(root: Path, name: str = "base.yaml", **sections: dict[str, Any]) -> Path:
    """Ring sections under ``root/sections``, a small training config ``root/<name>`` and its patch store
    ``root/patches`` (extracted here); returns the config's path.

    The config: 2-block encoder on 49 px patches, 16 (4) patches per area, 2 samples per class, no loader
    workers; each keyword is a config section whose keys are set on top (``pretrain={"epochs": 2}``)."""
    import yaml

    from cytonet.config import load_config
    from cytonet.data.extract import run_extract

    make_sections(root / "sections")
    cfg: dict[str, dict[str, Any]] = {
        "run": {"root_dir": str(root)},
        "extract": {"sections_dir": str(root / "sections"), "patches_per_area": 16, "eval_patches_per_area": 4},
        "model": {"n_blocks": 2, "patch_size_px": 49},
        "loader": {"workers": 0, "samples_per_class": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    run_extract(load_config(path), root / "patches")
    return path
