"""`cytonet features` and `cytonet analyze` as the CLI and the demo run them: features, then the steps of
:mod:`cytonet.analysis.steps`, then the report.

Entry points::

    compute_features(cfg, out=None, *, splits=None, dense=False, encoder_path=None, overwrite=False,
                     env=None) -> list[Path]
        `cytonet features`: feature stores of patch-store splits (features/<split>.zarr) and, with dense=True,
        of the dense grid over ``analysis.dense_sections`` (features/dense-<section>.zarr). An existing store
        with the same settings is reused; one with other settings is replaced only with overwrite.

    run_analysis(cfg, env=None, out=None, *, encoder_path=None, overwrite=False, metrics_rows=(),
                 overlays=(), title="cytonet analysis") -> AnalysisResult
        `cytonet analyze`: computes (or reuses) the features, then writes into ``out`` (default
        ``analysis.out_dir`` below ``run.root_dir``) the figures (PNG), tables (CSV), ``analysis.json``
        (settings, agreement metrics, the file list) and ``report.html``, which also shows ``metrics_rows``
        (dicts with equal keys, e.g. the demo's model / dataset / F1 / top-1 / top-3 table) and the inference
        ``overlays`` (PNG paths), embedded. ``AnalysisResult.report`` is the report's path.

The encoder is ``encoder.pt`` of ``analysis.encoder_from`` (the pretraining run folder) unless
``encoder_path`` names another file. The analysis runs in one process (rank 0 of ``env`` when given; its
device is ``cuda:local_rank`` when CUDA is available, the CPU otherwise).

Outputs (patch features of ``analysis.splits``):
    clusters.csv, cluster-brains.csv   Ward clusters: most frequent areas / brains with percentages (seed 002)
    tsne.png                           t-SNE coloured by cluster, area and brain (seed 002 Fig. 3)
    umap.png                           UMAP of a 1-in-``umap_subsample`` subset by area and brain (seed 004)
    agreement.csv                      ARI / NMI of Ward and mixture clusters with the areas, and the ARI
                                       against shuffled areas (chance level)
    nmf-scores.csv, nmf-selection.csv  coverage, leakage and total score per (factor, area); the greedy picks
    nmf-areas.png, nmf-scores.png      mean NMF coefficient and total score per factor and area, picks outlined
    gmm-clusters.csv                   Gaussian-mixture clusters of the factors: most frequent areas
    patches.csv                        per patch: id, split, area, brain, cluster, mixture cluster, t-SNE x/y
Outputs per dense section S (``analysis.dense``):
    section-S-areas.png                the section's area labels on the grid (ground truth, for comparison)
    section-S-factors.png              heatmaps of the selected NMF factors (seed 000 Fig. 2C)
    section-S-rgb.png                  three factors selected across the cortical layers (depth bands of
                                       ``analysis.layer_borders``) as R, G, B on the cortex (seed 000 Fig. 2B1)
    section-S-gmm.png                  mixture clusters of the cortex samples (seed 000 Fig. 2A2)
    section-S-umap1.png                the first UMAP dimension painted onto the section (seed 004)
    section-S-maps.npz                 the maps above as arrays on the grid (area, depth, gmm, factors, umap1)
    section-nmf-selection.csv          the greedy picks over the section's regions (white matter and areas)
    section-nmf-layer-selection.csv    the greedy picks over the cortical layers (Fig. 2B1's factors first)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytonet.analysis import factors, steps
from cytonet.analysis.features import (
    FeatureSet,
    dense_section_features,
    load_encoder,
    patch_features,
    read_features,
    stored_settings,
    write_features,
)
from cytonet.analysis.report import write_report
from cytonet.analysis.steps import AnalysisResult
from cytonet.config import Config, config_to_dict, diff_keys, lookup, save_config
from cytonet.data.patches import (
    DONE_MARKER,
    MANIFEST,
    STARTED_MARKER,
    STEP_LOCK,
    PatchStore,
    file_sha256,
    reading_store,
    require_folder,
)
from cytonet.distributed import DistEnv
from cytonet.errors import ConfigError, InputError, OutputExistsError, not_found, some_of

log = logging.getLogger(__name__)

RESULT_FILE = "analysis.json"
REPORT_FILE = "report.html"


# ----------------------------------------------------------------------------------------------------------
# Features


def resolve_encoder(cfg: Config, encoder_path: str | Path | None) -> Path:
    """``encoder_path``, or ``encoder.pt`` in ``analysis.encoder_from``; raises when the file is missing."""
    from cytonet.train.loop import ENCODER_FILE

    path = Path(encoder_path) if encoder_path else cfg.resolve_path(cfg.analysis.encoder_from) / ENCODER_FILE
    if not path.is_file():
        hint = "" if encoder_path else " (analysis.encoder_from; run `cytonet pretrain` first, or pass --encoder)"
        raise InputError(not_found(path, "encoder file") + hint)
    return path


def _step_traces() -> frozenset[str]:
    """What another cytonet step leaves in its folder: a training run's lock (kept for good) and DONE, a patch
    store's manifest, an inference's state and config, synth's markers, the demo's results. Not
    ``config.resolved.yaml``, which an analysis writes too (an analysis whose features were removed keeps it)."""
    from cytonet.infer.run import CONFIG_FILE
    from cytonet.infer.writers import STATE_DIR
    from cytonet.pipeline import DEMO_OWN_FILES
    from cytonet.train.loop import DONE_FILE

    demo = set(DEMO_OWN_FILES) - {"config.resolved.yaml", "config.resolved.yaml.tmp"}
    return frozenset({DONE_FILE, MANIFEST, STATE_DIR, CONFIG_FILE, STEP_LOCK, DONE_MARKER, STARTED_MARKER, *demo})


def _check_folder(out: Path, overwrite: bool, what: str) -> None:
    """Refuse a non-empty folder that holds no analysis: features and analysis write their config and results
    there, which must not land in, or replace files of, another step's run folder (``--out runs/probe``).
    ``overwrite`` writes into a folder of other files anyway, but never into another step's."""
    require_folder(out, what)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or {"features", RESULT_FILE} & set(entries):
        return
    traces = sorted(_step_traces().intersection(entries))
    if traces:
        raise OutputExistsError(
            f"{out} holds {some_of(traces)}, another cytonet step's, but no analysis (no features/ or "
            "analysis.json); choose another --out (--overwrite does not write into another step's folder)"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{out} holds {some_of(entries)} but no analysis "
            "(no features/ or analysis.json); choose another --out, or pass --overwrite to write into it anyway"
        )


def _inputs(cfg: Config, encoder_path: str | Path | None) -> tuple[Path, PatchStore]:
    """The encoder file and the patch store, checked to belong together (the encoder trained on this store)."""
    from cytonet.train.loop import check_encoder_store, load_encoder_file

    enc = resolve_encoder(cfg, encoder_path)
    store = PatchStore(cfg.resolve_path(cfg.extract.out_dir))
    if store.geometry.crop_px != cfg.model.patch_size_px:
        raise ConfigError(
            f"model.patch_size_px={cfg.model.patch_size_px} differs from the patch store's crop "
            f"{store.geometry.crop_px} px ({store.path}); analyse with the settings the store was extracted for"
        )
    check_encoder_store(enc, load_encoder_file(enc), store)
    return enc, store


def _ensure(path: Path, settings: dict[str, Any], overwrite: bool, make: Any) -> FeatureSet:
    """Reuse the feature store at ``path`` when it holds ``settings``; else compute it with ``make()``."""
    found = stored_settings(path)
    if found is not None and found == json.loads(json.dumps(settings)) and not overwrite:
        log.info("features: reusing %s", path)
        return read_features(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} holds features of other settings (encoder, store or analysis keys changed); "
            "pass --overwrite to recompute them"
        )
    started = time.perf_counter()
    fs: FeatureSet = make()
    fs.attrs["settings"] = settings
    write_features(path, fs, overwrite=True)
    log.info("features: %d x %d written to %s in %.1f s", *fs.features.shape, path, time.perf_counter() - started)
    return fs


def _device(env: DistEnv | None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank if env is not None else 0)
    return torch.device("cpu")


def split_features(
    cfg: Config, store: PatchStore, split: str, out: Path, encoder_path: Path, overwrite: bool, device: Any
) -> FeatureSet:
    acfg = cfg.analysis
    settings = {
        "kind": "patches",
        "split": split,
        "encoder_sha256": file_sha256(encoder_path),
        "store_manifest_sha256": store.manifest_sha256,
        "crop_px": cfg.model.patch_size_px,
        "max_patches_per_split": acfg.max_patches_per_split,
        "seed": acfg.seed,
    }

    def make() -> FeatureSet:
        encoder = load_encoder(cfg.model, encoder_path, device)
        return patch_features(
            encoder,
            store,
            split,
            crop_px=cfg.model.patch_size_px,
            max_patches=acfg.max_patches_per_split,
            batch_size=acfg.batch_size,
            seed=acfg.seed,
            device=device,
        )

    return _ensure(out / "features" / f"{split}.zarr", settings, overwrite, make)


def dense_sections(cfg: Config, store: PatchStore) -> list[tuple[str, Path]]:
    """(name, store path) of the sections mapped densely (see ``analysis.dense_sections``)."""
    from cytonet.data.sections import list_sections

    src = cfg.resolve_path(cfg.extract.sections_dir)
    by_name = {p.stem: p for p in list_sections(src)}
    names = list(cfg.analysis.dense_sections)
    if not names:
        listed = store.manifest.get("sections", [])
        for split in ("unseen", "test", "train"):
            names = [s["name"] for s in listed if s.get("split") == split][:1]
            if names:
                break
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(
            f"analysis.dense_sections names {missing}, not found below {src}; "
            f"sections there: {', '.join(sorted(by_name)[:8])}{', ...' if len(by_name) > 8 else ''}"
        )
    return [(n, by_name[n]) for n in names]


def section_features(
    cfg: Config,
    store: PatchStore,
    name: str,
    path: Path,
    section_id: int,
    out: Path,
    encoder_path: Path,
    overwrite: bool,
    device: Any,
) -> FeatureSet:
    from cytonet.data.sections import block_factor, open_section

    with open_section(path) as reader:
        native = reader.meta.pixel_size_um
    factor = block_factor(store.geometry.pixel_size_um, native)
    if factor is None:
        raise InputError(
            f"section {path} at {native} um/px cannot be block-averaged to the patches' "
            f"{store.geometry.pixel_size_um} um/px"
        )
    acfg = cfg.analysis
    settings = {
        "kind": "dense",
        "section": name,
        "encoder_sha256": file_sha256(encoder_path),
        "factor": factor,
        "patch_px": cfg.model.patch_size_px,
        "stride_px": acfg.dense_stride_px,
    }

    def make() -> FeatureSet:
        encoder = load_encoder(cfg.model, encoder_path, device)
        return dense_section_features(
            encoder,
            path,
            factor=factor,
            patch_px=cfg.model.patch_size_px,
            stride_px=acfg.dense_stride_px,
            section_id=section_id,
            batch_size=acfg.batch_size,
            device=device,
        )

    fs = _ensure(out / "features" / f"dense-{name}.zarr", settings, overwrite, make)
    fs.columns["section"] = np.full(len(fs), section_id, np.int32)
    return fs


def compute_features(
    cfg: Config,
    out: Path | None = None,
    *,
    splits: Sequence[str] | None = None,
    dense: bool = False,
    encoder_path: str | Path | None = None,
    overwrite: bool = False,
    env: DistEnv | None = None,
) -> list[Path]:
    """`cytonet features`: write the feature stores; returns their paths."""
    out = out or cfg.resolve_path(cfg.analysis.out_dir)
    _check_folder(out, overwrite, "features")
    with reading_store(cfg.resolve_path(cfg.extract.out_dir), "features"):
        enc, store = _inputs(cfg, encoder_path)
        (out / "features").mkdir(parents=True, exist_ok=True)  # before the config: the folder is an analysis'
        save_config(cfg, out)
        device = _device(env)
        paths = []
        for split in splits or cfg.analysis.splits:
            split_features(cfg, store, split, out, enc, overwrite, device)
            paths.append(out / "features" / f"{split}.zarr")
        if dense:
            for i, (name, path) in enumerate(dense_sections(cfg, store)):
                section_features(cfg, store, name, path, i, out, enc, overwrite, device)
                paths.append(out / "features" / f"dense-{name}.zarr")
    return paths


# ----------------------------------------------------------------------------------------------------------
# Analysis


def _analysis_settings(cfg: Config, enc: Path, store: PatchStore) -> dict[str, Any]:
    plain = config_to_dict(cfg)
    return {
        "analysis": {k: v for k, v in plain["analysis"].items() if k not in ("out_dir", "encoder_from", "threads")},
        "model": plain["model"],
        "encoder_sha256": file_sha256(enc),
        "store_manifest_sha256": store.manifest_sha256,
    }


def _finished(out: Path, settings: dict[str, Any], overwrite: bool) -> AnalysisResult | None:
    """The stored result when ``out`` holds a finished analysis with ``settings``; raises when it holds one of
    other settings and ``overwrite`` is not set."""
    path = out / RESULT_FILE
    if overwrite or not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        done = {}
    wanted = json.loads(json.dumps(settings))
    stored = done.get("settings") if isinstance(done.get("settings"), dict) else {}
    if stored != wanted:
        differ = diff_keys(stored, wanted)
        if all(not lookup(stored, key)[0] for key in differ):
            # Only settings that the cytonet which wrote it did not have (analysis.layer_borders, ...): its
            # results are those of an older analysis, which is done again rather than refused.
            log.warning("%s holds an analysis of an older cytonet (without %s): analysing again", out, differ[:1])
            return None
        keys = ", ".join(differ[:4])
        raise OutputExistsError(
            f"{out} holds an analysis with other settings ({keys}); pass --overwrite to replace it or choose "
            "another --out"
        )
    result = AnalysisResult(
        out=out,
        figures={k: Path(v) for k, v in done["figures"].items()},
        tables={k: Path(v) for k, v in done["tables"].items()},
        maps={k: Path(v) for k, v in done.get("maps", {}).items()},
        metrics=dict(done["metrics"]),
        notes=list(done["notes"]),
    )
    if not all(p.is_file() for p in (*result.figures.values(), *result.tables.values(), *result.maps.values())):
        return None
    return result


def run_analysis(
    cfg: Config,
    env: DistEnv | None = None,
    out: Path | None = None,
    *,
    encoder_path: str | Path | None = None,
    overwrite: bool = False,
    metrics_rows: Sequence[Mapping[str, Any]] = (),
    overlays: Sequence[Path] = (),
    title: str = "cytonet analysis",
) -> AnalysisResult:
    """`cytonet analyze` (see the module docstring); returns the paths written and the agreement metrics.

    A rerun with the same settings (analysis keys, model, encoder file, patch store) reuses the finished
    analysis and only rewrites the report (its metrics rows and overlays may have changed); other settings
    are refused without ``overwrite``.
    """
    started = time.perf_counter()
    acfg = cfg.analysis
    out = out or cfg.resolve_path(acfg.out_dir)
    _check_folder(out, overwrite, "analyze")
    # The store's patches and manifest are read from here to the end of _analyse: no extraction may replace
    # them meanwhile (its labels would be paired with other pixels).
    with reading_store(cfg.resolve_path(cfg.extract.out_dir), "analyze"):
        enc, store = _inputs(cfg, encoder_path)
        settings = _analysis_settings(cfg, enc, store)
        result = _finished(out, settings, overwrite)
        if result is not None:
            log.info("analysis: %s already holds this analysis; rewriting the report only", out)
        else:
            (out / "features").mkdir(parents=True, exist_ok=True)  # before the config: the folder is an analysis'
            save_config(cfg, out)
            result = _analyse(cfg, env, out, enc, store, overwrite)
            summary = {
                "settings": settings,
                "metrics": result.metrics,
                "figures": {k: str(v) for k, v in result.figures.items()},
                "tables": {k: str(v) for k, v in result.tables.items()},
                "maps": {k: str(v) for k, v in result.maps.items()},
                "notes": result.notes,
            }
            tmp = out / (RESULT_FILE + ".tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            tmp.replace(out / RESULT_FILE)  # last: its presence marks a finished analysis
    result.report = _report(result, title, metrics_rows, overlays)
    log.info("analysis: report %s written after %.1f s", result.report, time.perf_counter() - started)
    return result


def _analyse(
    cfg: Config, env: DistEnv | None, out: Path, enc: Path, store: PatchStore, overwrite: bool
) -> AnalysisResult:
    acfg = cfg.analysis
    device = _device(env)
    result = AnalysisResult(out=out)
    available = [s for s in acfg.splits if s in store.splits]
    if not available:
        raise InputError(f"{store.path} holds none of analysis.splits={acfg.splits}; it has {store.splits}")
    for s in acfg.splits:
        if s not in available:
            result.notes.append(f"split {s!r} is empty in {store.path}; analysed {available}")
    # from the manifest's counts, before any patch is encoded
    cap = acfg.max_patches_per_split or store.n
    steps.check_patch_count(sum(min(int(store.manifest["splits"][s]["n"]), cap) for s in available), acfg)
    parts = [split_features(cfg, store, s, out, enc, overwrite, device) for s in available]
    fs = FeatureSet.concat(parts)
    factors.check_nonnegative(fs.features, f"features of {enc}")
    steps.analyse_patches(fs, cfg, out, result, fs.columns["split"])
    if acfg.dense:
        chosen = dense_sections(cfg, store)
        sets = [section_features(cfg, store, n, p, i, out, enc, overwrite, device) for i, (n, p) in enumerate(chosen)]
        steps.analyse_sections(sets, [p for _, p in chosen], cfg, out, result)
    agreement_rows = [
        {
            "clustering": name,
            "ARI vs areas": f"{result.metrics.get(f'{key}_ari', float('nan')):.3f}",
            "ARI vs shuffled areas": f"{result.metrics.get(f'{key}_ari_shuffled', float('nan')):.3f}",
            "NMI vs areas": f"{result.metrics.get(f'{key}_nmi', float('nan')):.3f}",
        }
        for name, key in (
            (f"Ward, {acfg.n_clusters} clusters", "ward"),
            (f"NMF factors + Gaussian mixture, {acfg.gmm_components} components", "gmm"),
        )
    ]
    result.tables["agreement"] = steps.write_csv(
        out / "agreement.csv", list(agreement_rows[0]), [list(r.values()) for r in agreement_rows]
    )
    return result


def _report(
    result: AnalysisResult,
    title: str,
    metrics_rows: Sequence[Mapping[str, Any]],
    overlays: Sequence[Path],
) -> Path:
    captions = [
        ("agreement", "Agreement of the clusterings with the areas (ARI against shuffled areas: chance level)"),
        ("cluster-brains", "Brains per Ward cluster"),
        ("nmf-selection", "NMF factor selection over the areas (patch features; seed 000)"),
        ("section-nmf-selection", "NMF factor selection over the section's regions (dense grid; seed 000)"),
        ("section-nmf-layer-selection", "NMF factor selection over the cortical layers (dense grid; seed 000)"),
        ("gmm-clusters", "Gaussian-mixture clusters of the NMF factors: most frequent areas"),
    ]
    return write_report(
        result.out / REPORT_FILE,
        title=title,
        metrics_rows=list(metrics_rows),
        overlays=list(overlays),
        cluster_table=result.tables["clusters"],
        figures=[(steps.caption(k), v) for k, v in result.figures.items()],
        tables=[(text, result.tables[key]) for key, text in captions if key in result.tables],
        notes=result.notes,
    )
