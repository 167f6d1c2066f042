"""The synthetic brain generator: determinism, chunk independence, anatomy invariants, cross-brain reference
coordinates, laminar profiles vs. brightness, brain-to-brain variability, pixel statistics and backends."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from ringdata import tiny_synth
from scipy import ndimage

from cytonet.config import SynthConfig
from cytonet.data.sections import BACKGROUND_ID, WHITE_MATTER_ID, open_section
from cytonet.data.synth import (
    SectionGenerator,
    area_profiles,
    brain_params,
    brain_pixel_of_reference,
    brain_to_reference,
    generate_dataset,
    generate_section,
    label_table,
    reference_to_brain,
    render_preview,
    section_z_mm,
)

#: A small brain at 16 um/px (750 x 562 px): sections 0.1 mm apart, so planes of different brains cross.
CFG = SynthConfig(
    n_brains=3,
    sections_per_brain=3,
    section_stride=5,
    pixel_size_um=16.0,
    n_areas=6,
    brain_width_mm=12.0,
    brain_height_mm=9.0,
    cortex_thickness_mm=(1.0, 1.4),
    seed=3,
)
LAYERS = ("image", "labels", "depth", "coords")


def read_all(path: Path) -> dict[str, np.ndarray]:
    with open_section(path) as r:
        return {k: r.read(k) for k in LAYERS}


def assert_same_arrays(a: Path, b: Path) -> None:
    la, lb = read_all(a), read_all(b)
    for k in LAYERS:
        assert la[k].dtype == lb[k].dtype
        assert la[k].tobytes() == lb[k].tobytes(), f"{k} differs between {a} and {b}"


def render_whole(cfg: SynthConfig, brain: int, section: int, rows: int = 256) -> dict[str, np.ndarray]:
    gen = SectionGenerator(cfg, brain, section)
    h, w = gen.shape
    parts = [gen.render(y, min(y + rows, h), 0, w) for y in range(0, h, rows)]
    return {k: np.concatenate([p[k] for p in parts]) for k in LAYERS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("synth")
    return generate_dataset(CFG, out, backend="zarr", chunk_px=256, compression="blosc-zstd", overwrite=False)


@pytest.fixture(scope="module")
def sections(dataset: list[Path]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    found = {}
    for p in dataset:
        with open_section(p) as r:
            found[(r.meta.brain, r.meta.section_index)] = {k: r.read(k) for k in LAYERS}
    return found


# ----------------------------------------------------------------------------------------------------------
# Layout, metadata, determinism


def test_label_table() -> None:
    table = label_table(8)
    assert table[BACKGROUND_ID] == "background" and table[WHITE_MATTER_ID] == "white_matter"
    assert [table[i] for i in range(2, 10)] == [f"A{i:02d}" for i in range(1, 9)]
    assert label_table(120)[121] == "A120" and label_table(120)[2] == "A001"


def test_dataset_layout_and_metadata(dataset: list[Path]) -> None:
    assert len(dataset) == CFG.n_brains * CFG.sections_per_brain
    for p in dataset:
        with open_section(p) as r:
            m = r.meta
            assert p.parent.name == m.brain and p.name == f"{m.brain}_s{m.section_index:04d}.zarr"
            assert m.shape == (562, 750) and m.pixel_size_um == 16.0
            assert m.z_mm == pytest.approx(section_z_mm(CFG, m.section_index))
            assert m.z_mm == pytest.approx(m.section_index * 0.1)
            assert m.label_table == label_table(CFG.n_areas) and m.seed == 3 and m.source == "synthetic"


def test_same_seed_same_bytes_and_seed_matters(dataset: list[Path], tmp_path: Path) -> None:
    again = generate_section(CFG, 1, 2, tmp_path / "again.zarr", chunk_px=256)
    assert_same_arrays(dataset[CFG.sections_per_brain + 2], again)
    other = generate_section(dataclasses.replace(CFG, seed=4), 1, 2, tmp_path / "other.zarr", chunk_px=256)
    a, b = read_all(again), read_all(other)
    assert not np.array_equal(a["image"], b["image"]) and not np.array_equal(a["labels"], b["labels"])


def test_chunk_size_does_not_change_the_bytes(dataset: list[Path], tmp_path: Path) -> None:
    # 64-px chunks: bands of 64 rows, so cells and blocks are cut at quite different places.
    small = generate_section(CFG, 0, 1, tmp_path / "c64.zarr", chunk_px=64, compression="none")
    assert_same_arrays(dataset[1], small)
    whole = render_whole(CFG, 0, 1, rows=1000)  # one block for the whole section
    ref = read_all(dataset[1])
    for k in LAYERS:
        assert whole[k].tobytes() == ref[k].tobytes(), k


def test_workers_do_not_change_the_bytes(dataset: list[Path], tmp_path: Path) -> None:
    cfg = dataclasses.replace(CFG, n_brains=1, sections_per_brain=2)
    paths = generate_dataset(
        cfg, tmp_path, backend="zarr", chunk_px=256, compression="none", overwrite=False, workers=2
    )
    for p, q in zip(paths, dataset[:2]):
        assert_same_arrays(p, q)


def test_backends_store_equal_arrays(dataset: list[Path], tmp_path: Path) -> None:
    h5 = generate_section(CFG, 2, 2, tmp_path / "B02_s0002.h5", chunk_px=256, extra_attrs={"note": "x"})
    assert_same_arrays(dataset[2 * CFG.sections_per_brain + 2], h5)
    with open_section(h5) as r:
        assert r.meta.extra == {"note": "x"} and r.meta.brain == "B02"


def test_existing_output_needs_overwrite(dataset: list[Path]) -> None:
    from cytonet.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        generate_section(CFG, 0, 0, dataset[0], chunk_px=256)


# ----------------------------------------------------------------------------------------------------------
# Anatomy


def test_labels_cover_the_ribbon_and_areas_are_contiguous(sections: dict) -> None:
    for key, s in sections.items():
        lab, dep = s["labels"], s["depth"]
        assert np.array_equal(np.isfinite(dep), lab >= 2), key
        assert lab.max() <= CFG.n_areas + 1
        assert np.nanmin(dep) >= 0 and np.nanmax(dep) <= 1
        present = [a for a in np.unique(lab) if a >= 2]
        assert len(present) == CFG.n_areas, key  # every area is present in every section
        for a in present:
            _, n = ndimage.label(lab == a)  # edge (4-) connectivity
            assert n == 1, f"{key}: area {a} has {n} components"
        for cls in (BACKGROUND_ID, WHITE_MATTER_ID):
            assert ndimage.label(lab == cls)[1] == 1, f"{key}: class {cls} is not one region"
        # White matter never touches the background: cortex lies between them.
        wm = lab == WHITE_MATTER_ID
        assert not np.any(ndimage.binary_dilation(wm) & (lab == BACKGROUND_ID)), key


def test_depth_runs_from_pial_surface_to_white_matter(sections: dict) -> None:
    s = sections[("B00", 2)]
    lab, dep = s["labels"], s["depth"]
    cortex = lab >= 2
    px_mm = CFG.pixel_size_um / 1000
    step = px_mm / CFG.cortex_thickness_mm[0]
    # Depth is ~0 next to the background and ~1 next to the white matter.
    pial = cortex & ndimage.binary_dilation(lab == BACKGROUND_ID)
    deep = cortex & ndimage.binary_dilation(lab == WHITE_MATTER_ID)
    assert np.nanmax(dep[pial]) < 2.5 * step
    assert np.nanmin(dep[deep]) > 1 - 2.5 * step
    # Depth grows with the distance from the pial surface (equidistant model, thickness varying smoothly).
    dist = ndimage.distance_transform_edt(lab != BACKGROUND_ID) * px_mm
    rho = np.corrcoef(np.argsort(np.argsort(dist[cortex])), np.argsort(np.argsort(dep[cortex])))[0, 1]
    assert rho > 0.97, rho
    # Following the depth gradient from just below the pial surface (a streamline of the laminar coordinate)
    # leads into the white matter by a short path: no ridges or pits inside the ribbon.
    filled = np.where(cortex, dep, np.nan)
    gy, gx = np.gradient(filled)
    rng = np.random.default_rng(0)
    starts = np.argwhere(cortex & (dep > 0.05) & (dep < 0.1) & np.isfinite(gy) & np.isfinite(gx))
    starts = starts[rng.choice(len(starts), 200, replace=False)]
    max_steps = int(2.0 * CFG.cortex_thickness_mm[1] * 1.15 / px_mm / 0.5)
    for y0, x0 in starts:
        py, px = float(y0), float(x0)
        values = []
        for _ in range(max_steps):
            iy, ix = round(py), round(px)
            if lab[iy, ix] < 2:
                break
            values.append(dep[iy, ix])
            g = np.array([gy[iy, ix], gx[iy, ix]])
            if not np.all(np.isfinite(g)):  # next to the white matter: one step further leaves the ribbon
                g = np.array(
                    [np.nanmean(gy[iy - 1 : iy + 2, ix - 1 : ix + 2]), np.nanmean(gx[iy - 1 : iy + 2, ix - 1 : ix + 2])]
                )
            py, px = py + 0.5 * g[0] / np.hypot(*g), px + 0.5 * g[1] / np.hypot(*g)
        assert lab[round(py), round(px)] == WHITE_MATTER_ID, (y0, x0, np.round(values[-5:], 3))
        assert np.all(np.diff(values) > -0.25 * step), (y0, x0)


def test_reference_transform_round_trip() -> None:
    p = brain_params(CFG, 1)
    rng = np.random.default_rng(1)
    xyz = rng.uniform([0, 0, 0], [12, 9, 0.3], (500, 3))
    back = reference_to_brain(p, brain_to_reference(p, xyz))
    assert np.abs(back - xyz).max() < 1e-9
    # The transform is a mild distortion: close to a rigid motion.
    ref = brain_to_reference(p, xyz)
    d_brain = np.linalg.norm(xyz[1:] - xyz[:-1], axis=1)
    d_ref = np.linalg.norm(ref[1:] - ref[:-1], axis=1)
    assert np.all(np.abs(d_ref / d_brain - 1) < 0.15)


def test_same_anatomical_point_has_the_same_reference_coordinate_in_every_brain(sections: dict) -> None:
    px_mm = CFG.pixel_size_um / 1000
    a = sections[("B00", 1)]
    ys, xs = np.nonzero(a["labels"] >= 2)
    pick = np.random.default_rng(0).choice(len(ys), 40000, replace=False)
    ys, xs = ys[pick], xs[pick]
    ref = a["coords"][ys, xs].astype(np.float64)
    matched = 0
    for brain in (1, 2):
        p = brain_params(CFG, brain)
        rowcol, z = brain_pixel_of_reference(CFG, p, ref)
        for j in range(CFG.sections_per_brain):
            hit = np.abs(z - section_z_mm(CFG, j)) < 0.003  # the point lies (nearly) on that section plane
            r = np.rint(rowcol[hit]).astype(int)
            inside = (r[:, 0] >= 0) & (r[:, 0] < 562) & (r[:, 1] >= 0) & (r[:, 1] < 750)
            if inside.sum() == 0:
                continue
            r = r[inside]
            b = sections[(f"B{brain:02d}", j)]
            got = b["coords"][r[:, 0], r[:, 1]]
            err = np.linalg.norm(got - ref[hit][inside], axis=1)
            # Nearest-pixel rounding (half a pixel diagonal, stretched by up to 15 %), the plane tolerance and the
            # rounding of the stored coordinates to steps of at most half a pixel.
            assert err.max() < 0.71 * 1.15 * px_mm + 0.003 + 0.87 * 0.5 * px_mm, (brain, j, err.max())
            # The same point also lies in the same area (where both brains have cortex there).
            la, lb = a["labels"][ys[hit][inside], xs[hit][inside]], b["labels"][r[:, 0], r[:, 1]]
            both = (la >= 2) & (lb >= 2)
            assert both.sum() > 5 and np.mean(la[both] == lb[both]) > 0.95
            matched += int(inside.sum())
    assert matched > 200


def test_areas_move_smoothly_between_sections(sections: dict) -> None:
    # Consecutive sections 0.1 mm apart share most of their area labels pixel by pixel.
    for j in range(CFG.sections_per_brain - 1):
        a, b = sections[("B00", j)]["labels"], sections[("B00", j + 1)]["labels"]
        both = (a >= 2) & (b >= 2)
        assert np.mean(a[both] == b[both]) > 0.9


# ----------------------------------------------------------------------------------------------------------
# Cytoarchitecture and appearance


def laminar_profiles(s: dict[str, np.ndarray], n_bins: int = 8) -> dict[int, np.ndarray]:
    img, lab, dep = s["image"].astype(np.float64), s["labels"], s["depth"]
    out = {}
    for a in range(2, CFG.n_areas + 2):
        m = lab == a
        bins = np.minimum((dep[m] * n_bins).astype(int), n_bins - 1)
        out[a] = np.bincount(bins, img[m], n_bins) / np.maximum(np.bincount(bins, minlength=n_bins), 1)
    return out


def test_area_profiles_differ_but_not_in_overall_darkness() -> None:
    prof = area_profiles(CFG)
    ink = prof.ink()
    assert np.allclose(ink, ink.mean(), rtol=1e-9)  # same stained cell content per unit of ribbon
    k = CFG.n_areas
    thick = np.diff(prof.bounds, axis=1)
    for i in range(k):
        for j in range(i + 1, k):
            diff = np.abs(thick[i] - thick[j]).max() + np.abs(np.log(prof.density[i] / prof.density[j])).max()
            assert diff > 0.05, (i, j)


def test_areas_differ_in_laminar_pattern_not_mean_brightness(sections: dict) -> None:
    ranges, means, profiles = [], [], []
    for j in range(CFG.sections_per_brain):
        s = sections[("B00", j)]
        prof = laminar_profiles(s)
        for a, v in prof.items():
            m = s["labels"] == a
            means.append((a, float(s["image"][m].mean())))
            ranges.append(float(v[1:].max() - v[1:].min()))  # layer I is pale everywhere; look below it
            profiles.append((a, v - v.mean()))
    contrast = float(np.mean(ranges))
    by_area = {a: np.mean([m for b, m in means if b == a]) for a in range(2, CFG.n_areas + 2)}
    spread = max(by_area.values()) - min(by_area.values())
    assert contrast > 12, contrast  # clear laminar pattern within each area
    assert spread < 0.4 * contrast, (spread, contrast)
    # Mean-centred laminar profiles: the same area agrees across sections better than different areas do.
    mean_prof = {a: np.mean([v for b, v in profiles if b == a], axis=0) for a in range(2, CFG.n_areas + 2)}
    same = np.mean([np.sqrt(np.mean((v - mean_prof[a]) ** 2)) for a, v in profiles])
    between = [np.sqrt(np.mean((mean_prof[a] - mean_prof[b]) ** 2)) for a in mean_prof for b in mean_prof if a < b]
    assert np.median(between) > 2 * same, (np.round(between, 2), same)
    assert min(between) > same, (np.round(between, 2), same)


def test_brains_differ_in_stain(sections: dict) -> None:
    stats = []
    for b in range(CFG.n_brains):
        s = sections[(f"B{b:02d}", 0)]
        img, lab = s["image"], s["labels"]
        stats.append(
            [np.median(img[lab == 0]), np.median(img[lab == 1]), np.median(img[lab >= 2]), img[lab >= 2].std()]
        )
    stats_a = np.array(stats)
    for i in range(len(stats_a)):
        for j in range(i + 1, len(stats_a)):
            assert np.abs(stats_a[i] - stats_a[j]).max() > 3, (i, j, stats_a)
    # Sections of one brain are closer to each other than to sections of other brains.
    per = {}
    for (brain, j), s in sections.items():
        img, lab = s["image"], s["labels"]
        per[brain, j] = np.array([np.median(img[lab == 1]), np.median(img[lab >= 2]), img[lab >= 2].std()])
    within = [np.abs(per[k1] - per[k2]).max() for k1 in per for k2 in per if k1 < k2 and k1[0] == k2[0]]
    between = [np.abs(per[k1] - per[k2]).max() for k1 in per for k2 in per if k1 < k2 and k1[0] != k2[0]]
    assert np.mean(between) > 2 * np.mean(within), (np.mean(between), np.mean(within))


def test_pixel_statistics_are_plausible(sections: dict) -> None:
    s = sections[("B01", 1)]
    img, lab = s["image"], s["labels"]
    assert 225 <= np.median(img[lab == BACKGROUND_ID]) <= 250
    assert 160 <= np.median(img[lab == WHITE_MATTER_ID]) <= 225
    assert 120 <= np.median(img[lab >= 2]) <= 200
    assert np.median(img[lab == WHITE_MATTER_ID]) > np.median(img[lab >= 2])


def test_cells_are_resolved_at_fine_pixel_sizes() -> None:
    # At 2 um/px, render one 256 x 256 px block (0.5 mm) in the middle of the cortex of a large brain.
    cfg = dataclasses.replace(CFG, pixel_size_um=2.0)
    gen = SectionGenerator(cfg, 0, 1)
    mid = gen.shape[1] // 2
    lab = gen.render(0, gen.shape[0], mid, mid + 1)["labels"][:, 0]  # one column, to find the cortex
    y0 = int(np.flatnonzero(lab >= 2)[0]) + 150
    out = gen.render(y0, y0 + 256, mid - 128, mid + 128)
    img, lab = out["image"], out["labels"]
    cortex = img[lab >= 2]
    assert cortex.size > 0.8 * img.size
    dark = np.mean(cortex < 90)
    assert 0.03 < dark < 0.4, dark  # cell bodies: a minority of dark pixels
    assert np.percentile(cortex, 1) < 60
    assert 145 <= np.median(cortex) <= 200  # neuropil
    # Cells are blobs of several pixels, not single-pixel noise.
    comp, n = ndimage.label(img < 90)
    sizes = np.bincount(comp.ravel())[1:]
    assert n > 20 and np.median(sizes) >= 6


def test_production_sized_sections_render_in_bounded_memory() -> None:
    # A 2 um/px section of 40 x 12 mm (6000 x 20000 px): rendering one block of the size generate_section
    # uses (512 rows x 4096 columns) never allocates anything near the whole section (a uint8 image alone
    # would be 120 MB, all four layers 2.3 GB).
    cfg = dataclasses.replace(CFG, pixel_size_um=2.0, brain_width_mm=40.0, brain_height_mm=12.0, n_areas=40)
    tracemalloc.start()
    try:
        gen = SectionGenerator(cfg, 0, 0)
        assert gen.shape == (6000, 20000)
        out = gen.render(1024, 1536, 8192, 8192 + 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["image"].shape == (512, 4096) and out["coords"].shape == (512, 4096, 3)
    assert (out["labels"] >= 2).any()
    assert peak < 500e6, peak


def test_preview(dataset: list[Path], tmp_path: Path) -> None:
    png = render_preview(dataset[0], tmp_path / "p.png", max_px=300)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------------
# `cytonet synth --overwrite`

#: A tiny brain at 64 um/px (125 x 94 px): a section in a fraction of a second.
TINY = ["synth.sections_per_brain=1", *tiny_synth(64)]


def test_overwrite_leaves_exactly_the_new_dataset_and_never_foreign_files(tmp_path: Path) -> None:
    from cytonet.config import load_config
    from cytonet.data.sections import create_section, list_sections
    from cytonet.errors import OutputExistsError
    from cytonet.pipeline import DONE_MARKER, run_synth

    out = tmp_path / "sections"

    def synth(*extra: str, overwrite: bool = True) -> list[Path]:
        return run_synth(load_config(None, [*TINY, *extra]), out, overwrite=overwrite, preview=False)

    synth("synth.n_brains=3", overwrite=False)
    # Fewer brains: the third brain's store goes (it would be the held-out brain of every extraction).
    assert [p.relative_to(out).as_posix() for p in synth("synth.n_brains=2")] == [
        "B00/B00_s0000.zarr",
        "B01/B01_s0000.zarr",
    ]
    assert not (out / "B02").exists()
    # Another backend: the zarr stores go, the HDF5 files come.
    synth("synth.n_brains=2", "sections.backend=hdf5")
    assert [p.relative_to(out).as_posix() for p in list_sections(out)] == ["B00/B00_s0000.h5", "B01/B01_s0000.h5"]
    assert (out / DONE_MARKER).is_file() and (out / "config.resolved.yaml").is_file()

    # Foreign entries (a note; a section store synth did not write): refused, and nothing changes.
    with open_section(out / "B00" / "B00_s0000.h5") as r:
        meta = dataclasses.replace(r.meta, source="/data/scan.tif", brain="B09")
    for foreign in (out / "B00" / "notes.txt", out / "B09" / "B09_s0000.zarr"):
        if foreign.suffix == ".zarr":
            with create_section(foreign, meta, layers=("image",), chunk_px=64) as w:
                w.write("image", 0, 0, np.zeros(meta.shape, np.uint8))
        else:
            foreign.write_text("mine")
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        marker = (out / DONE_MARKER).read_bytes()
        with pytest.raises(OutputExistsError, match=rf"{out} holds {foreign.relative_to(out)}, which synth did not"):
            synth("synth.n_brains=1")
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
        assert (out / DONE_MARKER).read_bytes() == marker
        if foreign.suffix == ".zarr":
            import shutil

            shutil.rmtree(foreign.parent)
        else:
            foreign.unlink()
    assert len(synth("synth.n_brains=1")) == 1
