"""Pipeline steps as the CLI runs them: each step writes into its own folder, saves the resolved config
there, and leaves a done marker holding the settings it ran with, so that a rerun (``cytonet demo`` twice,
or a requeued job) skips finished steps and refuses to mix outputs of different settings. A step records its
settings in a started marker before it writes anything: a rerun with the same settings after an interruption
(a killed process, a lost node) redoes the step in place, while other settings are still refused.

Entry points: :func:`run_synth`, :func:`run_demo`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from cytonet.config import Config, config_to_dict, save_config
from cytonet.data.extract import heldout_brains
from cytonet.data.patches import DONE_MARKER, STARTED_MARKER, STEP_LOCK, require_folder, step_lock
from cytonet.data.synth_geometry import brain_name
from cytonet.errors import CytonetError, OutputExistsError, some_of

log = logging.getLogger(__name__)

MARKERS = (DONE_MARKER, DONE_MARKER + ".tmp", STARTED_MARKER, STARTED_MARKER + ".tmp", STEP_LOCK)
#: The files ``run_synth`` writes into its folder beside the section stores (kept by ``synth --overwrite``).
SYNTH_OWN_FILES = (*MARKERS, "config.resolved.yaml", "config.resolved.yaml.tmp", "preview.png")
#: What ``run_demo`` itself writes into the run folder (beside the steps' folders).
DEMO_OWN_FILES = ("config.resolved.yaml", "config.resolved.yaml.tmp", "results.txt", "inference-overlay.png")
#: The demo's seed 002 ``distance`` baseline: the siamese distance task's pretraining, then scratch training
#: from its encoder, in these folders below ``run.root_dir`` (the config's pretrain and scratch settings
#: otherwise: the overrides the demo passes are exactly these).
DISTANCE_PRETRAIN_DIR, DISTANCE_DIR = "distance-pretrain", "distance"
DISTANCE_STEPS = (
    ("pretrain", ["loss.kind=siamese", f"pretrain.out_dir={DISTANCE_PRETRAIN_DIR}"]),
    ("scratch", [f"scratch.init_from={DISTANCE_PRETRAIN_DIR}", f"scratch.out_dir={DISTANCE_DIR}"]),
)

StepAction = Literal["skip", "run", "resume"]


def _marker_settings(out: Path, name: str) -> dict[str, Any] | None:
    marker = out / name
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _same(recorded: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
    return recorded == json.loads(json.dumps(settings))


def step_is_done(out: Path, settings: dict[str, Any]) -> bool:
    """True when ``out`` holds a finished step that ran with exactly ``settings``."""
    return _same(_marker_settings(out, DONE_MARKER), settings)


def step_was_started(out: Path, settings: dict[str, Any]) -> bool:
    """True when ``out`` holds an unfinished step (interrupted, or still running) started with ``settings``."""
    return _same(_marker_settings(out, STARTED_MARKER), settings)


def _write_marker(out: Path, name: str, settings: dict[str, Any]) -> None:
    tmp = out / (name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    tmp.replace(out / name)


def mark_done(out: Path, settings: dict[str, Any]) -> None:
    """Record that the step in ``out`` finished with ``settings`` (atomic replace); drops the started marker
    (after the done marker is in place: a kill between the two leaves a finished step)."""
    _write_marker(out, DONE_MARKER, settings)
    (out / STARTED_MARKER).unlink(missing_ok=True)


def prepare_step(out: Path, settings: dict[str, Any], overwrite: bool, what: str) -> StepAction:
    """Decide whether a step must run: ``"skip"`` when ``out`` already holds the same finished step, ``"resume"``
    when it holds an unfinished one started with the same ``settings`` (the step redoes its work in place),
    ``"run"`` otherwise (an empty or new folder, or any folder with ``overwrite``).

    Raises :class:`OutputExistsError` when ``out`` holds anything else and ``overwrite`` is not set, so that
    nothing existing is replaced by accident. Before returning "run" or "resume" it records ``settings`` in the
    started marker, before the step writes anything, and removes a done marker.
    """
    require_folder(out, what)
    if not overwrite and step_is_done(out, settings):
        log.info("%s: %s already holds a finished run with these settings; skipping", what, out)
        return "skip"
    action: StepAction = "run"
    if out.is_dir() and any(p.name not in MARKERS for p in out.iterdir()) and not overwrite:
        if not step_was_started(out, settings):
            raise OutputExistsError(
                f"{what}: output folder {out} is not empty and holds no finished run with these settings; "
                "pass --overwrite to replace it or choose another --out"
            )
        log.info("%s: %s holds an unfinished run with these settings; redoing it", what, out)
        action = "resume"
    out.mkdir(parents=True, exist_ok=True)
    # The started marker first: a process killed from here on leaves a folder that a rerun with these settings
    # may redo (a done marker of other settings beside it is stale: only --overwrite gets here past one).
    _write_marker(out, STARTED_MARKER, settings)
    (out / DONE_MARKER).unlink(missing_ok=True)  # the folder is about to change: no longer a finished run
    return action


def run_synth(cfg: Config, out: Path, *, overwrite: bool, preview: bool, workers: int = 1) -> list[Path]:
    """Generate the synthetic brains of ``cfg.synth`` into ``out`` (one store per section)."""
    from cytonet.data.synth import render_preview, stale_outputs

    resolved = config_to_dict(cfg)
    settings = {"step": "synth", "synth": resolved["synth"], "sections": resolved["sections"]}
    if out.is_dir():
        # Refuse a folder with foreign files before the step's lock file or prepare_step change it
        # (generate_dataset checks again and deletes the stale stores of an earlier config once the new ones
        # are written).
        stale_outputs(cfg.synth, out, cfg.sections.backend, SYNTH_OWN_FILES)
    with step_lock(out, "synth"):
        paths = _synth_step(cfg, out, settings, overwrite=overwrite, workers=workers)
    if preview and paths:
        png = out / "preview.png"
        render_preview(paths[0], png)
        log.info("synth: preview of %s written to %s", paths[0].name, png)
    return paths


def _synth_step(cfg: Config, out: Path, settings: dict[str, Any], *, overwrite: bool, workers: int) -> list[Path]:
    from cytonet.data.sections import list_sections
    from cytonet.data.synth import generate_dataset

    resolved = config_to_dict(cfg)
    action = prepare_step(out, settings, overwrite, "synth")
    if action != "skip":
        save_config(cfg, out)
        started = time.perf_counter()
        # A resumed run writes every store again, through generate_dataset's overwrite path: it refuses foreign
        # files, removes the .partial stores the killed run left, and replaces the stores it finished (the same
        # image bytes, as the generator is deterministic, but their attributes hold the whole resolved config,
        # whose keys outside `settings` may have changed), so the folder ends as an uninterrupted run leaves it.
        paths = generate_dataset(
            cfg.synth,
            out,
            backend=cfg.sections.backend,
            chunk_px=cfg.sections.chunk_px,
            compression=cfg.sections.compression,
            image_levels=cfg.sections.image_levels,
            overwrite=overwrite or action == "resume",
            workers=workers,
            extra_attrs={"config": resolved},
            own_files=SYNTH_OWN_FILES,
        )
        mark_done(out, settings)
        log.info("synth: wrote %d sections to %s in %.1f s", len(paths), out, time.perf_counter() - started)
    return list_sections(out)


def run_extract_step(cfg: Config, *, overwrite: bool, workers: int) -> Path:
    """Extract the patch store of ``cfg`` (skipped when it is complete)."""
    from cytonet.data.extract import run_extract

    out = cfg.resolve_path(cfg.extract.out_dir)
    run_extract(cfg, out, overwrite=overwrite, workers=workers)
    return out


def torchrun_command(config_path: Path, command: str, nproc: int, extra: list[str] | None = None) -> list[str]:
    """``python -m torch.distributed.run`` running ``cytonet <command> CONFIG`` on ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "cytonet.cli",
        command,
        str(config_path),
        *(extra or []),
    ]


def run_torchrun(config_path: Path, command: str, nproc: int, extra: list[str] | None = None) -> None:
    """Run ``cytonet <command> CONFIG`` under torchrun with ``nproc`` local processes (gloo on CPU)."""
    cmd = torchrun_command(config_path, command, nproc, extra)
    log.info("demo: %s", " ".join(cmd[2:]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The steps' own stdout (the output path `cytonet infer` prints for scripts) goes into the demo's log as
    # such: the demo's stdout is its results. Their logs stream to stderr as they come.
    result = subprocess.run(cmd, env=env, check=False, stdout=subprocess.PIPE, text=True)
    for line in result.stdout.splitlines():
        log.info("demo: %s printed %s", command, line)
    if result.returncode != 0:
        raise CytonetError(f"`{' '.join(cmd[2:])}` failed with exit status {result.returncode}")


def fig2_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The metrics in the form of seed 002 Fig. 2: model, dataset, F1, top-1, top-3 (percent)."""
    names = {"test": "held-out sections", "unseen": "held-out brain"}
    lines = [f"{'model':<12} {'dataset':<18} {'F1':>6} {'top-1':>6} {'top-3':>6}"]
    for split in ("test", "unseen"):
        for model, metrics in results.items():
            m = metrics.get(split)
            if m is None:
                continue
            lines.append(f"{model:<12} {names[split]:<18} {m['f1']:6.2f} {m['top1']:6.2f} {m['top3']:6.2f}")
    return "\n".join(lines)


def infer_summary(cfg: Config, root: Path) -> str:
    """Pixel-wise accuracy of the inferred label maps against the synthetic truth, and the overlay PNG."""
    from cytonet.infer.evaluate import coverage, evaluate_outputs, pooled_accuracy, write_overlay

    out = cfg.resolve_path(cfg.infer.out_dir)
    scores = evaluate_outputs(cfg, out)
    names = cfg.infer.label_images
    lines = [
        f"inference on {len(scores)} held-out sections (stride {cfg.infer.stride_px} px, roi {cfg.infer.roi}, "
        f"{coverage(scores):.0f}% of the cortex): pixel accuracy"
    ]
    for name in names:
        label = "before clean-up" if name == "argmax" else f"after {cfg.infer.cleanup} clean-up"
        lines.append(f"  {label:<24} {pooled_accuracy(scores, name):6.2f} %")
    shown = [scores[0].section, scores[-1].section] if len(scores) > 1 else [scores[0].section]
    png = write_overlay(cfg, out, shown, root / "inference-overlay.png")
    lines.append(f"  overlay: {png}")
    return "\n".join(lines)


def run_demo_analysis(
    cfg: Config, root: Path, results: dict[str, dict[str, dict[str, float]]], *, overwrite: bool
) -> Path:
    """Clustering, embeddings, NMF factors and the static HTML report with the metrics table and the overlay."""
    from cytonet.analysis.run import run_analysis

    names = {"test": "held-out sections", "unseen": "held-out brain"}
    rows = [
        {"model": model, "dataset": names[split], "F1": m["f1"], "top-1": m["top1"], "top-3": m["top3"]}
        for split in ("test", "unseen")
        for model, per_split in results.items()
        if (m := per_split.get(split)) is not None
    ]
    overlay = root / "inference-overlay.png"
    analysis = run_analysis(
        cfg, None, overwrite=overwrite, metrics_rows=rows, overlays=[overlay] if overlay.is_file() else [],
        title="cytonet demo",
    )  # fmt: skip
    if analysis.report is None:
        raise CytonetError(f"the analysis in {analysis.out} wrote no report")
    return analysis.report


def demo_entries(cfg: Config) -> set[str]:
    """Names of the entries a demo writes directly into its run folder: its own files and the first part of
    every step folder that lies below ``run.root_dir``."""
    root = cfg.root_path
    # and what cytonet's launchers write below run.root_dir: sbatch logs and scripts, submitit's folder
    names = set(DEMO_OWN_FILES) | {DISTANCE_PRETRAIN_DIR, DISTANCE_DIR, "slurm", "submitit"}
    for path in (
        cfg.synth.out_dir,
        cfg.extract.sections_dir,
        cfg.extract.out_dir,
        cfg.pretrain.out_dir,
        cfg.probe.out_dir,
        cfg.scratch.out_dir,
        cfg.infer.out_dir,
        cfg.analysis.out_dir,
    ):
        resolved = cfg.resolve_path(path)
        if resolved.is_relative_to(root) and resolved != root:
            names.add(resolved.relative_to(root).parts[0])
    return names


def check_demo_root(cfg: Config, overwrite: bool) -> Path:
    """The demo's run folder, refused (without ``overwrite``) when it holds anything a demo does not write:
    the demo saves its config and results there, which must not land in (or replace files of) a folder of
    something else. A new or empty folder, or a demo's own (finished, interrupted, other settings: the steps
    judge those), passes."""
    root = cfg.root_path
    require_folder(root, "demo")
    if root.is_dir() and not overwrite:
        foreign = sorted(p.name for p in root.iterdir() if p.name not in demo_entries(cfg))
        if foreign:
            raise OutputExistsError(
                f"demo: output folder {root} holds {some_of(foreign)}, which the demo does not write; choose "
                "another --out (or pass --overwrite to run the demo in this folder anyway)"
            )
    return root


def run_demo(cfg: Config, *, overwrite: bool, workers: int = 2) -> None:
    """The main job end to end on the built-in synthetic brains: synth, extract, pretrain (torchrun, 2
    processes), scratch, the distance baseline (:data:`DISTANCE_STEPS`) and probe, the seed 002 Fig. 2 table, then whole-section inference on the held-out
    sections with its pixel accuracy before and after clean-up and an overlay PNG, and the analysis (clusters,
    embeddings, NMF factors) with a static HTML report whose path it prints. Finished steps are skipped on a rerun.

    The run folder's ``config.resolved.yaml`` is written at the end, once every step has accepted the settings
    (a step refuses a folder holding another run): a refused rerun leaves the one describing the outputs there.
    The torchrun steps read the config from a temporary file meanwhile.
    """
    root = check_demo_root(cfg, overwrite)
    # The brains to hold out, among those synth will make: refused now, not by extract after synth's minutes.
    heldout_brains([brain_name(i) for i in range(cfg.synth.n_brains)], cfg.extract)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cytonet-demo-") as tmp:
        _run_demo_steps(cfg, root, save_config(cfg, Path(tmp)), overwrite=overwrite, workers=workers)
    save_config(cfg, root)


def _run_demo_steps(cfg: Config, root: Path, config_path: Path, *, overwrite: bool, workers: int) -> None:
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log.info("demo: %s done in %.1f s", name, timings[name])

    t0 = time.perf_counter()
    sections_dir = cfg.resolve_path(cfg.synth.out_dir)
    run_synth(cfg, sections_dir, overwrite=overwrite, preview=True, workers=workers)
    timed("synth", t0)
    t0 = time.perf_counter()
    run_extract_step(cfg, overwrite=overwrite, workers=workers)
    timed("extract", t0)
    t0 = time.perf_counter()
    run_torchrun(config_path, "pretrain", 2, ["--overwrite"] if overwrite else [])
    timed("pretrain", t0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for kind, label in (("scratch", "scratch"), ("distance", "distance"), ("probe", "contrastive")):
        t0 = time.perf_counter()
        if kind == "distance":
            for command, overrides in DISTANCE_STEPS:
                run_torchrun(config_path, command, 2, (["--overwrite"] if overwrite else []) + overrides)
            out = cfg.resolve_path(DISTANCE_DIR)
        else:
            run_torchrun(config_path, kind, 2, ["--overwrite"] if overwrite else [])
            out = cfg.resolve_path(getattr(cfg, kind).out_dir)
        timed(kind, t0)
        results[label] = {
            split: json.loads((out / f"metrics-{split}.json").read_text())
            for split in ("test", "unseen")
            if (out / f"metrics-{split}.json").is_file()
        }
    table = fig2_table(results)
    t0 = time.perf_counter()
    run_torchrun(config_path, "infer", 2, ["--overwrite"] if overwrite else [])
    timed("infer", t0)
    table += "\n\n" + infer_summary(cfg, root)
    (root / "results.txt").write_text(table + "\n")
    print(table)
    t0 = time.perf_counter()
    report = run_demo_analysis(cfg, root, results, overwrite=overwrite)
    timed("analysis", t0)
    print(f"report: {report}")
    log.info(
        "demo: finished in %.1f s (%s); outputs in %s",
        time.perf_counter() - started,
        ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        root,
    )
