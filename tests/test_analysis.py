"""Analysis: seed 000's coverage/leakage selection by hand, Ward clusters against the known areas of synthetic
brains, NMF factors against their areas, the figures and the report, and `cytonet features` / `cytonet analyze`
end to end.

The integration tests share one small synthetic brain (1 brain, 3 sections at 16 um/px, 4 areas; patches
block-averaged to 32 um/px for a 2-block encoder of 49 px = 1.6 mm) and an encoder trained for a few seconds
as an area classifier (seed 000 uses exactly such a classifier as its feature extractor). Its test-split
features are clustered and compared with the areas through the adjusted Rand index, against the same index for
shuffled areas (chance level).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cytonet.analysis import cluster, embed, factors, figures
from cytonet.analysis.features import FeatureSet, read_features, write_features
from cytonet.analysis.report import write_report
from cytonet.config import config_to_dict, load_config
from cytonet.errors import ConfigError, InputError, OutputExistsError

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_AREAS = 4


# ----------------------------------------------------------------------------------------------------------
# Seed 000 selection, by hand


def test_greedy_selection_hand_worked_example() -> None:
    """Scores s_t = s_c - lambda s_l; the best pair first, then the best pair of an unused factor AND ROI.

    coverage  F0: [10, 9]   leakage all 0, lambda 0.5 -> scores = coverage
              F1: [ 4, 3]
              F2: [ 2, 8]
    Pick 1: (F0, R0) = 10. F0 and R0 are used up, so pick 2 is the best of (F1, R1) = 3 and (F2, R1) = 8:
    (F2, R1). Taking each ROI's best factor independently would have chosen F0 twice.
    """
    cov = np.array([[10.0, 9.0], [4.0, 3.0], [2.0, 8.0]])
    picks = factors.greedy_factor_selection(cov, np.zeros_like(cov), lam=0.5)
    assert [(p.factor, p.roi, p.score) for p in picks] == [(0, 0, 10.0), (2, 1, 8.0)]


def test_lambda_weighs_leakage() -> None:
    """F0 covers more of the ROI (10 vs 8) but leaks 10 points, F1 only 2: lambda 0 prefers F0, 0.5 prefers F1
    (10 - 0.5 * 10 = 5 < 8 - 0.5 * 2 = 7)."""
    cov = np.array([[10.0, 1.0], [8.0, 1.0]])
    leak = np.array([[10.0, 0.0], [2.0, 0.0]])
    assert factors.greedy_factor_selection(cov, leak, lam=0.0, p=1)[0].factor == 0
    pick = factors.greedy_factor_selection(cov, leak, lam=0.5, p=1)[0]
    assert (pick.factor, pick.roi, pick.score, pick.coverage, pick.leakage) == (1, 0, 7.0, 8.0, 2.0)
    with pytest.raises(ValueError, match="cannot select 3"):
        factors.greedy_factor_selection(cov, leak, 0.5, p=3)


def test_coverage_and_leakage_follow_the_sums_of_seed_000() -> None:
    """coverage = sum 1_A 1_{v_i > 0}, leakage = sum 1_{A^c} 1_{v_i > 0}, written as loops over samples."""
    rng = np.random.default_rng(0)
    v = np.where(rng.random((60, 5)) < 0.4, 0.0, rng.random((60, 5)))
    roi_of = rng.integers(0, 4, 60)
    rois = [0, 1, 3]  # ROI 2 is not scored: its samples lie outside every scored ROI
    cov, leak = factors.coverage_leakage(v, roi_of, rois)
    for i in range(5):
        for col, a in enumerate(rois):
            inside = sum(1 for n in range(60) if roi_of[n] == a and v[n, i] > 0)
            outside = sum(1 for n in range(60) if roi_of[n] != a and v[n, i] > 0)
            assert (cov[i, col], leak[i, col]) == (inside, outside)
    total = factors.total_scores(cov, leak, 0.5)
    np.testing.assert_array_equal(total, cov - 0.5 * leak)


def test_active_threshold_and_nonnegativity() -> None:
    v = np.array([[0.0, 1.0], [0.05, 0.5], [1.0, 0.2]])
    np.testing.assert_array_equal(factors.active_coefficients(v, 0.0), v)
    np.testing.assert_array_equal(factors.active_coefficients(v, 0.1), [[0.0, 1.0], [0.0, 0.5], [1.0, 0.2]])
    with pytest.raises(InputError, match="negative entries"):
        factors.check_nonnegative(np.array([[0.1, -0.2]]))
    with pytest.raises(InputError, match="NaN"):
        factors.check_nonnegative(np.array([[np.nan]]))


def test_nmf_recovers_localised_factors() -> None:
    """Three groups of samples built from three disjoint non-negative parts: each picked factor covers its group."""
    rng = np.random.default_rng(1)
    parts = np.zeros((3, 12))
    for j in range(3):
        parts[j, 4 * j : 4 * j + 4] = 1.0
    group = np.repeat(np.arange(3), 40)
    x = parts[group] * rng.uniform(0.5, 1.5, (120, 1)) + 0.01 * rng.random((120, 12))
    res = factors.nmf(x, 3, seed=0)
    assert res.relative_error < 0.05
    v = factors.active_coefficients(res.coefficients, 0.2)
    cov, leak = factors.coverage_leakage(v, group, [0, 1, 2])
    picks = factors.greedy_factor_selection(cov, leak, 0.5)
    assert sorted(p.roi for p in picks) == [0, 1, 2]
    assert all(p.coverage == 40 and p.leakage == 0 for p in picks)


def test_ward_and_composition_table() -> None:
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 30)
    x = centres[truth] + rng.normal(0, 0.5, (90, 2))
    labels = cluster.ward_clusters(x, 3)
    assert sorted(np.unique(labels)) == [1, 2, 3]
    agree = cluster.agreement(labels, truth)
    assert agree["ari"] == pytest.approx(1.0) and abs(agree["ari_shuffled"]) < 0.05
    groups = np.array([5, 5, 5, 6, 7, 7, 5, 6])
    clusters = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    rows = cluster.composition_table(clusters, groups, {5: "A", 6: "B", 7: "C"}, top=2)
    assert rows == [
        {"cluster": 1, "n": 4, "top": [("A", 75.0), ("B", 25.0)]},
        {"cluster": 2, "n": 4, "top": [("C", 50.0), ("A", 25.0)]},
    ]


def test_subsample_and_neighbour_placement() -> None:
    idx = embed.every_nth_subsample(1000, 50, seed=0)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)  # seed 004: one in 50
    assert len(embed.every_nth_subsample(1000, 50, seed=0, min_keep=300)) == 300
    assert len(embed.every_nth_subsample(100, 50, seed=0, min_keep=300)) == 100
    rng = np.random.default_rng(4)
    x_fit = rng.normal(size=(50, 6)).astype(np.float32)
    emb = rng.normal(size=(50, 2)).astype(np.float32)
    np.testing.assert_allclose(embed.place_by_neighbours(x_fit, emb, x_fit[:7], k=1), emb[:7])
    placed = embed.place_by_neighbours(x_fit, emb, rng.normal(size=(9, 6)), k=5)
    assert placed.shape == (9, 2) and np.all(placed >= emb.min(axis=0)) and np.all(placed <= emb.max(axis=0))


# ----------------------------------------------------------------------------------------------------------
# Storage, figures, report


def test_feature_store_round_trip(tmp_path: Path) -> None:
    fs = FeatureSet(
        np.arange(12, dtype=np.float32).reshape(4, 3),
        {"area": np.array([2, 3, 2, 3], np.int32), "coords": np.zeros((4, 3), np.float32)},
        {"kind": "patches", "areas": {"2": "A01", "3": "A02"}},
    )
    path = write_features(tmp_path / "f.zarr", fs)
    back = read_features(path)
    np.testing.assert_array_equal(back.features, fs.features)
    np.testing.assert_array_equal(back.columns["coords"], fs.columns["coords"])
    assert back.attrs["areas"] == {"2": "A01", "3": "A02"}
    with pytest.raises(Exception, match="already exists"):
        write_features(path, fs)


def test_blank_png_is_detected_and_report_stands_alone(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blank = tmp_path / "blank.png"
    fig = plt.figure(figsize=(2, 2))
    fig.savefig(blank)
    plt.close(fig)
    assert figures.png_is_blank(blank)
    rng = np.random.default_rng(0)
    scatter = figures.scatter_panels(
        tmp_path / "s.png", rng.normal(size=(40, 2)), [("area", rng.integers(0, 3, 40), {0: "A", 1: "B"})], "t"
    )
    assert not figures.png_is_blank(scatter)
    table = tmp_path / "clusters.csv"
    cluster.write_composition_csv(table, [{"cluster": 1, "n": 4, "top": [("A<01>", 75.0)]}], top=1)
    report = write_report(
        tmp_path / "r" / "report.html",
        title="demo <report>",
        metrics_rows=[{"model": "contrastive", "dataset": "held-out sections", "F1": 72.416}],
        overlays=[scatter],
        cluster_table=table,
        figures=[("t-SNE", scatter), ("missing", tmp_path / "nope.png")],
        notes=["UMAP skipped"],
    )
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 2  # overlay + figure, both embedded
    assert 'src="http' not in text and "<script" not in text and "<link" not in text
    assert "72.42" in text and "A&lt;01&gt;" in text and "75.0" in text and "missing figure" in text
    assert "demo &lt;report&gt;" in text


def test_analysis_config_is_validated() -> None:
    cfg = load_config(None)
    assert (cfg.analysis.n_clusters, cfg.analysis.nmf_components, cfg.analysis.selection_lambda) == (10, 15, 0.5)
    with pytest.raises(ConfigError, match=r"analysis\.nmf_select"):
        load_config(None, ["analysis.nmf_select=16"])
    with pytest.raises(ConfigError, match=r"analysis\.splits"):
        load_config(None, ["analysis.splits=[valid]"])
    with pytest.raises(ConfigError, match=r"analysis\.gmm_factors"):
        load_config(None, ["analysis.gmm_factors=some"])
    for bad in ("[0.0, 0.5, 0.4, 1.0]", "[0.1, 0.5, 1.0]", "[0.0, 1.0]", "[0.0, 0.5, 0.9]"):
        with pytest.raises(ConfigError, match=r"analysis\.layer_borders"):
            load_config(None, [f"analysis.layer_borders={bad}"])


def test_layer_selection_picks_the_factor_of_each_layer() -> None:
    """Seed 000 Fig. 2B1's picks over the cortical layers: with factor j active in depth band (layer) 5 - j
    only, each layer gets its own factor; white matter and points without a depth take no part."""
    from cytonet.analysis.steps import _layer_selection

    cfg = load_config(None)
    borders = np.asarray(cfg.analysis.layer_borders)
    depth = np.concatenate([np.linspace(a, b, 20, endpoint=False) + 1e-3 for a, b in itertools.pairwise(borders)])
    layer = np.repeat(np.arange(6), 20)
    coeffs = np.zeros((len(depth), 8))
    coeffs[np.arange(len(depth)), 5 - layer] = 1.0
    coeffs[:, 7] = 0.5  # active everywhere: covers every layer and leaks into all the others
    label = np.full(len(depth), 3)
    depth_wm, label_wm = np.append(depth, [0.5, np.nan]), np.append(label, [1, 4])  # white matter; no depth
    coeffs_wm = np.vstack([coeffs, np.ones((2, 8))])
    sel, names = _layer_selection(coeffs_wm, depth_wm, label_wm, cfg)
    assert names == ["I", "II", "III", "IV", "V", "VI"]
    assert sorted((names[s.roi], s.factor) for s in sel) == [(n, 5 - i) for i, n in enumerate(names)]
    assert all(s.coverage == 20 and s.leakage == 0 for s in sel)
    # Too few cortex points with a depth (a section without a depth map): no picks.
    assert _layer_selection(coeffs[:3], np.full(3, np.nan), label[:3], cfg)[0] == []


def test_patch_analysis_without_umap_skips_it_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The patch steps in-process on three blobs of non-negative features standing for three areas, with
    umap-learn pretended missing: the UMAP figure is skipped with a note, everything else is written."""
    from cytonet.analysis import steps

    rng = np.random.default_rng(3)
    area = np.repeat(np.array([2, 3, 4], np.int32), 30)
    centres = rng.uniform(0, 1, (5, 16))
    x = np.abs(centres[area - 2] + rng.normal(0, 0.05, (90, 16))).astype(np.float32)
    fs = FeatureSet(
        x,
        {
            "area": area,
            "brain": np.tile(np.array([0, 1], np.int32), 45),
            "patch_id": np.arange(90),
            "split": np.ones(90, np.uint8),
        },
        {"areas": {"2": "A01", "3": "A02", "4": "A03"}, "brains": ["B00", "B01"]},
    )
    monkeypatch.setattr(steps.embed, "umap_available", lambda: False)
    result = steps.AnalysisResult(out=tmp_path)
    steps.analyse_patches(fs, load_config(None, ["analysis.nmf_components=5"]), tmp_path, result, fs.columns["split"])
    assert any("UMAP skipped" in n for n in result.notes)
    assert set(result.figures) == {"tsne", "nmf-areas", "nmf-scores"}
    assert result.metrics["ward_ari"] > 0.3 and result.metrics["gmm_ari"] > 0.3
    rows = cluster.read_composition_csv(result.tables["clusters"])
    assert len(rows) == 11 and all(float(r[3]) == 100.0 for r in rows[1:])  # clusters never mix the blobs
    assert len((tmp_path / "patches.csv").read_text().splitlines()) == 91


# ----------------------------------------------------------------------------------------------------------
# Synthetic brain, trained encoder, CLI end to end


def _train_classifier_encoder(cfg_path: Path, root: Path, steps: int = 60) -> Path:
    """A 2-block encoder trained as an area classifier on the train split; saved like pretraining's encoder.pt."""
    from cytonet.data.augment import center_crop
    from cytonet.data.patches import PatchStore
    from cytonet.models.build import build_classifier

    cfg = load_config(cfg_path)
    store = PatchStore(root / "patches")
    s0, s1 = store.split_range("train")
    x = center_crop(torch.from_numpy(np.stack([store.read(i) for i in range(s0, s1)])), cfg.model.patch_size_px)
    y = torch.from_numpy(store.class_index(store.metadata["area"][s0:s1]))
    torch.manual_seed(0)
    model = build_classifier(cfg.model, len(store.area_ids))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = root / "pretrain"
    out.mkdir()
    path = out / "encoder.pt"
    torch.save({"encoder": model.encoder.state_dict(), "config": config_to_dict(cfg)}, path)
    return path


@pytest.fixture(scope="module")
def brain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sections, patch store and trained encoder of one small synthetic brain; returns the folder with c.yaml."""
    from cytonet.data.extract import run_extract
    from cytonet.pipeline import run_synth

    root = tmp_path_factory.mktemp("analysis")
    data = {
        "run": {"root_dir": str(root)},
        "synth": {
            "n_brains": 1,
            "sections_per_brain": 3,
            "pixel_size_um": 16.0,
            "n_areas": N_AREAS,
            "brain_width_mm": 16.0,
            "brain_height_mm": 12.0,
            "cortex_thickness_mm": [1.5, 2.0],
            "seed": 1,
        },
        "sections": {"chunk_px": 256},
        "extract": {
            "pixel_size_um": 32.0,
            "patches_per_area": 48,
            "eval_patches_per_area": 48,
            "n_heldout_brains": 0,
            "test_fraction": 0.34,
            "patches_per_shard": 64,
            "candidate_stride_px": 2,
        },
        "model": {"n_blocks": 2, "patch_size_px": 49},
        "loader": {"workers": 0},
        "analysis": {"dense_stride_px": 8, "gmm_components": 4},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(root / "c.yaml")
    run_synth(cfg, root / "sections", overwrite=False, preview=False, workers=1)
    run_extract(cfg, root / "patches")
    _train_classifier_encoder(root / "c.yaml", root)
    return root


def dense_section(brain: Path) -> str:
    manifest = json.loads((brain / "patches" / "manifest.json").read_text())
    return str(next(s["name"] for s in manifest["sections"] if s["split"] == "test"))


@pytest.fixture(scope="module")
def analysed(brain: Path) -> Path:
    """`cytonet features` (explicit --encoder, dense grid too), then `cytonet analyze` reusing those features."""
    cfg = str(brain / "c.yaml")
    enc = str(brain / "pretrain" / "encoder.pt")
    r = subprocess.run(
        [str(BIN / "cytonet"), "features", cfg, "--encoder", enc, "--dense"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout.split()
    assert printed[0] == str(brain / "analysis" / "features" / "test.zarr")
    # the dense grid covers the first test section (no unseen brain here)
    assert len(printed) == 2 and Path(printed[1]).name == f"dense-{dense_section(brain)}.zarr"
    r = subprocess.run([str(BIN / "cytonet"), "analyze", cfg], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing" in r.stderr  # the features written above, not recomputed
    assert r.stdout.strip() == str(brain / "analysis" / "report.html")
    return brain / "analysis"


def test_features_are_chunked_zarr_with_metadata(analysed: Path) -> None:
    fs = read_features(analysed / "features" / "test.zarr")
    assert fs.features.dtype == np.float32 and fs.features.shape == (N_AREAS * 48, 32)
    assert fs.features.min() >= 0  # pooled ReLU output: non-negative, as NMF needs
    assert {"patch_id", "area", "brain", "section", "y", "x", "depth", "coords", "split"} <= set(fs.columns)
    assert set(np.unique(fs.columns["split"])) == {1}  # the test split
    dense = read_features(analysed / "features" / f"dense-{dense_section(analysed.parent)}.zarr")
    h, w = dense.attrs["grids"][0]["shape"]
    assert len(dense) == h * w and set(np.unique(dense.columns["area"])) >= {0, 1, 2}


def test_clustering_agrees_with_areas_well_above_chance(analysed: Path) -> None:
    fs = read_features(analysed / "features" / "test.zarr")
    labels = cluster.ward_clusters(fs.features, 10)
    agree = cluster.agreement(labels, fs.columns["area"], repeats=50)
    print(
        f"Ward ARI vs areas {agree['ari']:.3f}, shuffled {agree['ari_shuffled']:.4f} (max {agree['ari_shuffled_max']:.4f})"
    )
    assert agree["ari"] > 0.1
    assert agree["ari"] > agree["ari_shuffled_max"] + 0.08
    stored = json.loads((analysed / "analysis.json").read_text())["metrics"]
    assert stored["ward_ari"] == pytest.approx(agree["ari"])


def test_nmf_selection_picks_factors_covering_their_area(analysed: Path) -> None:
    """Seed 000 scores on the test-split features: the picked factors cover their area more than they leak
    (s_c > lambda s_l); on the dense grid the white matter gets a factor of its own."""
    fs = read_features(analysed / "features" / "test.zarr")
    res = factors.nmf(fs.features, 15, seed=0)
    rois = sorted(np.unique(fs.columns["area"]))
    cov, leak = factors.coverage_leakage(res.coefficients, fs.columns["area"], rois)
    picks = factors.greedy_factor_selection(cov, leak, 0.5)
    print("picks:", [(p.factor, p.roi, p.coverage, p.leakage) for p in picks])
    assert len(picks) == N_AREAS and len({p.factor for p in picks}) == N_AREAS
    # s_t = s_c - lambda s_l > 0: coverage exceeds the leakage score, for the first pick and half of them
    assert picks[0].score > 0 and sum(p.score > 0 for p in picks) >= N_AREAS // 2
    # and every pick is enriched in its area: its share of positive samples inside the area beats the area's
    # share of all samples (1 / N_AREAS), which is what a factor unrelated to the areas would give
    assert all(p.coverage / (p.coverage + p.leakage) > 1.0 / N_AREAS + 0.05 for p in picks)
    # Counting only a factor's clearly active coefficients (analysis.nmf_active_threshold) instead of every
    # positive one, each picked factor's coverage of its area exceeds its leakage outside it.
    cov, leak = factors.coverage_leakage(factors.active_coefficients(res.coefficients, 0.3), fs.columns["area"], rois)
    active = factors.greedy_factor_selection(cov, leak, 0.5)
    print("picks, active > 0.3 max:", [(p.factor, p.roi, p.coverage, p.leakage) for p in active])
    assert all(p.coverage > p.leakage for p in active)
    with open(analysed / "section-nmf-selection.csv") as fh:
        rows = [line.strip().split(",") for line in fh][1:]
    wm = [r for r in rows if r[2] == "white_matter"]
    assert wm and int(wm[0][3]) > 0.5 * int(wm[0][4])
    # Fig. 2B1: picks over the six cortical layers of the dense section; the first (an RGB channel) is enriched
    # in its layer: its share of positive points inside the layer beats the layer's share of the depth range.
    with open(analysed / "section-nmf-layer-selection.csv") as fh:
        layer_rows = [line.strip().split(",") for line in fh][1:]
    print("layer picks:", layer_rows)
    assert {r[2] for r in layer_rows} == {"I", "II", "III", "IV", "V", "VI"}
    borders = load_config(None).analysis.layer_borders
    first = layer_rows[0]
    width = dict(zip(["I", "II", "III", "IV", "V", "VI"], np.diff(borders)))[first[2]]
    assert int(first[3]) / (int(first[3]) + int(first[4])) > width


def synthetic_layers(brain: Path, area: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Layer 0..5 (I-VI) of cortex points from the generator's laminar profiles: the layer whose depth range
    (per area) holds the point's cortical depth."""
    from cytonet.data.synth import area_profiles

    bounds = area_profiles(load_config(brain / "c.yaml").synth).bounds  # (K, 7)
    k = area - 2
    return np.sum(depth[:, None] > bounds[k, 1:6], axis=1)


def test_mixture_of_cortex_factors_follows_the_layers(analysed: Path) -> None:
    """Seed 000's cortex experiment: Gaussian-mixture clusters of the NMF factors of cortex grid points
    reveal laminar divisions. Against the generator's known layers the ARI is well above shuffled layers."""
    sec = dense_section(analysed.parent)
    maps = np.load(analysed / f"section-{sec}-maps.npz")
    cortex = (maps["area"] >= 2) & np.isfinite(maps["depth"]) & (maps["gmm"] >= 0)
    layers = synthetic_layers(analysed.parent, maps["area"][cortex], maps["depth"][cortex])
    assert len(np.unique(layers)) == 6
    agree = cluster.agreement(maps["gmm"][cortex], layers, repeats=50)
    print(f"mixture ARI vs layers {agree['ari']:.3f}, shuffled max {agree['ari_shuffled_max']:.4f}")
    assert agree["ari"] > 0.05 and agree["ari"] > 5 * agree["ari_shuffled_max"]
    assert maps["factors"].shape[1:] == maps["area"].shape and np.isnan(maps["factors"][:, maps["area"] == 0]).all()


def test_every_figure_is_written_and_not_blank(analysed: Path) -> None:
    result = json.loads((analysed / "analysis.json").read_text())
    names = set(result["figures"])
    sec = dense_section(analysed.parent)
    expected = {"tsne", "nmf-areas", "nmf-scores"} | {
        f"section-{sec}-{kind}" for kind in ("areas", "factors", "rgb", "gmm")
    }
    if embed.umap_available():
        expected |= {"umap", f"section-{sec}-umap1"}
    assert expected <= names, f"missing figures: {expected - names}"
    for name, path in result["figures"].items():
        assert Path(path).is_file() and not figures.png_is_blank(Path(path)), name
    for path in result["tables"].values():
        assert Path(path).stat().st_size > 0
    header = (analysed / "clusters.csv").read_text().splitlines()[0]
    assert header.startswith("cluster,n_patches,area_1,percent_1")
    report = (analysed / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(names)


def test_analyze_rerun_is_skipped_and_other_settings_refused(analysed: Path, brain: Path) -> None:
    cfg = str(brain / "c.yaml")
    r = subprocess.run([str(BIN / "cytonet"), "analyze", cfg], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "rewriting the report only" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(
        [str(BIN / "cytonet"), "analyze", cfg, "analysis.n_clusters=5"], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 1 and "other settings (analysis.n_clusters)" in r.stderr and "--overwrite" in r.stderr
    # A finished analysis of an older cytonet, without a setting added since (analysis.layer_borders): done
    # again, not refused as "other settings" the user never changed.
    from cytonet.analysis.run import _finished

    result = json.loads((analysed / "analysis.json").read_text())
    settings = json.loads(json.dumps(result["settings"]))
    del result["settings"]["analysis"]["layer_borders"]
    (analysed / "analysis.json").write_text(json.dumps(result))
    try:
        assert _finished(analysed, settings, overwrite=False) is None
        result["settings"]["analysis"]["n_clusters"] = 5
        (analysed / "analysis.json").write_text(json.dumps(result))
        with pytest.raises(OutputExistsError, match=r"other settings \(analysis\.layer_borders, analysis\.n_clusters"):
            _finished(analysed, settings, overwrite=False)
    finally:
        result["settings"] = settings
        (analysed / "analysis.json").write_text(json.dumps(result))
    r = subprocess.run(
        [str(BIN / "cytonet"), "features", cfg, "analysis.encoder_from=nowhere"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "nowhere/encoder.pt does not exist" in r.stderr and "--encoder" in r.stderr


def test_features_and_analysis_refuse_another_steps_folder(analysed: Path, brain: Path) -> None:
    # `--out runs/probe` by mistake: nothing may be written there (not even config.resolved.yaml), also with
    # --overwrite.
    other = brain / "probe-like"
    other.mkdir()
    (other / "DONE").write_text("{}")
    (other / "config.resolved.yaml").write_text("# the probe's own config\n")
    for command, flags in itertools.product(("features", "analyze"), ((), ("--overwrite",))):
        r = subprocess.run(
            [str(BIN / "cytonet"), command, str(brain / "c.yaml"), "--out", str(other), *flags],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and "but no analysis" in r.stderr, r.stderr[-2000:]
        if flags:  # --overwrite writes into a folder of other files, but not into another step's
            assert "holds DONE, another cytonet step's" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in other.iterdir()) == ["DONE", "config.resolved.yaml"]
    assert (other / "config.resolved.yaml").read_text() == "# the probe's own config\n"
    # An analysis folder whose features and results were removed (to compute them again) keeps its config: it is
    # not taken for another step's, and --overwrite writes into it.
    from cytonet.analysis.run import _check_folder

    own = brain / "analysis-emptied"
    own.mkdir()
    (own / "config.resolved.yaml").write_text("# an analysis' config\n")
    (own / "report.html").write_text("<html></html>")
    with pytest.raises(OutputExistsError, match=r"but no analysis .*pass --overwrite to write into it anyway"):
        _check_folder(own, overwrite=False, what="analyze")
    _check_folder(own, overwrite=True, what="analyze")


def test_features_and_analysis_wait_for_no_extraction_of_their_store(analysed: Path, brain: Path) -> None:
    """While `extract --overwrite` rewrites the patch store (its readers' lock held exclusively), features and
    analyze are refused rather than pairing the old manifest's labels with new pixels (they take the lock shared,
    which keeps an extraction out while they read), and nothing in their folder changes."""
    from cytonet.data.patches import rewriting_store

    before = sorted(p.name for p in analysed.iterdir())
    with rewriting_store(brain / "patches", "extract --overwrite"):
        for command in ("features", "analyze"):
            r = subprocess.run(
                [str(BIN / "cytonet"), command, str(brain / "c.yaml"), "--overwrite"],
                env=ENV,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 1 and f"{command}: the patch store" in r.stderr, r.stderr[-2000:]
            assert "is being rewritten by an extraction" in r.stderr
    assert sorted(p.name for p in analysed.iterdir()) == before


def test_dense_grid_labels_and_depth_are_those_of_the_full_resolution(brain: Path) -> None:
    """The dense grid's areas and depths are read at the grid points only (from a sampled level where they are
    its pixel centres), and equal the full-resolution layers there."""
    from cytonet.analysis.features import _sample_layer
    from cytonet.data.sections import open_section

    section = next((brain / "sections").rglob("*.zarr"))
    with open_section(section) as reader:
        h, w = reader.shape
        for step, offset in ((2, 1), (8, 4), (5, 0)):
            ys, xs = np.arange(offset, h, step), np.arange(offset, w, step)
            for layer in ("labels", "depth"):
                full = reader.read(layer, 0, h, 0, w)[np.ix_(ys, xs)]
                np.testing.assert_array_equal(_sample_layer(reader, layer, ys, xs, np.nan), full)
        assert np.isnan(_sample_layer(reader, "no-such-layer", ys, xs, np.nan)).all()


def test_the_thumbnail_holds_a_band_of_the_section_not_all_of_it(tmp_path: Path) -> None:
    """The subsampled bands are copies: strided views kept every full-resolution band, so the whole section,
    alive until the end (as did synth's preview: 1.4 GB traced for a 18k x 24k section's)."""
    import tracemalloc

    from cytonet.analysis.figures import section_thumbnail
    from cytonet.data.sections import SectionMeta, create_section

    size = 6144
    meta = SectionMeta(brain="B00", section_index=0, z_mm=0.0, pixel_size_um=2.0, shape=(size, size))
    path = tmp_path / "B00_s0000.zarr"
    rows = np.tile(np.arange(size) % 251, (1024, 1)).astype(np.uint8)
    with create_section(path, meta, layers=("image",), chunk_px=1024, compression="none") as writer:
        for y0 in range(0, size, 1024):
            writer.write("image", y0, 0, rows)
    tracemalloc.start()
    thumb = section_thumbnail(path, max_px=400)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert thumb.shape == (384, 384) and (thumb[:, 1] == 16).all()
    assert peak < size * size / 2, f"{peak / 1e6:.0f} MB traced for a section of {size * size / 1e6:.0f} MB"


def test_more_clusters_than_patches_is_refused_before_any_patch_is_encoded(brain: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "cytonet"), "analyze", str(brain / "c.yaml"), "analysis.n_clusters=1000", "--out", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "need at least analysis.n_clusters=1000" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "features").iterdir())
