"""Pipeline steps as the CLI runs them: each step writes into its own folder, saves the resolved config
there, and leaves a done marker holding the settings it ran with, so that a rerun (``cytonet demo`` twice,
or a requeued job) skips finished steps and refuses to mix outputs of different settings.

Entry points: :func:`run_synth`, :func:`run_demo`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cytonet.config import Config, config_to_dict, save_config
from cytonet.errors import OutputExistsError

log = logging.getLogger(__name__)

DONE_MARKER = ".cytonet-done.json"


def _done_settings(out: Path) -> dict[str, Any] | None:
    marker = out / DONE_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def step_is_done(out: Path, settings: dict[str, Any]) -> bool:
    """True when ``out`` holds a finished step that ran with exactly ``settings``."""
    return _done_settings(out) == json.loads(json.dumps(settings))


def mark_done(out: Path, settings: dict[str, Any]) -> None:
    """Record that the step in ``out`` finished with ``settings`` (atomic replace)."""
    tmp = out / (DONE_MARKER + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    tmp.replace(out / DONE_MARKER)


def prepare_step(out: Path, settings: dict[str, Any], overwrite: bool, what: str) -> bool:
    """Decide whether a step must run. Returns False (skip) when ``out`` already holds the same finished step.

    Raises :class:`OutputExistsError` when ``out`` holds anything else and ``overwrite`` is not set, so that
    nothing existing is replaced by accident.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{what}: output {out} exists and is not a folder")
    if not overwrite and step_is_done(out, settings):
        log.info("%s: %s already holds a finished run with these settings; skipping", what, out)
        return False
    if out.is_dir() and any(p.name != DONE_MARKER for p in out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{what}: output folder {out} is not empty and holds no finished run with these settings; "
            "pass --overwrite to replace it or choose another --out"
        )
    marker = out / DONE_MARKER
    if marker.exists():
        marker.unlink()  # the step is about to change the folder: it is no longer a finished run
    out.mkdir(parents=True, exist_ok=True)
    return True


def run_synth(cfg: Config, out: Path, *, overwrite: bool, preview: bool, workers: int = 1) -> list[Path]:
    """Generate the synthetic brains of ``cfg.synth`` into ``out`` (one store per section)."""
    from cytonet.data.sections import list_sections
    from cytonet.data.synth import generate_dataset, render_preview

    settings = {"step": "synth", "synth": config_to_dict(cfg)["synth"], "sections": config_to_dict(cfg)["sections"]}
    if prepare_step(out, settings, overwrite, "synth"):
        save_config(cfg, out)
        started = time.perf_counter()
        paths = generate_dataset(
            cfg.synth,
            out,
            backend=cfg.sections.backend,
            chunk_px=cfg.sections.chunk_px,
            compression=cfg.sections.compression,
            overwrite=overwrite,
            workers=workers,
            extra_attrs={"config": config_to_dict(cfg)},
        )
        mark_done(out, settings)
        log.info("synth: wrote %d sections to %s in %.1f s", len(paths), out, time.perf_counter() - started)
    paths = list_sections(out)
    if preview and paths:
        png = out / "preview.png"
        render_preview(paths[0], png)
        log.info("synth: preview of %s written to %s", paths[0].name, png)
    return paths


def run_demo(cfg: Config, *, overwrite: bool, workers: int = 2) -> None:
    """The main job end to end on the built-in synthetic brains."""
    root = Path(cfg.run.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    started = time.perf_counter()
    sections = run_synth(cfg, cfg.resolve_path(cfg.synth.out_dir), overwrite=overwrite, preview=True, workers=workers)
    log.info("demo: %d sections in %s", len(sections), cfg.resolve_path(cfg.synth.out_dir))
    log.info("demo: finished in %.1f s; outputs in %s", time.perf_counter() - started, root)
