"""One static HTML report: metrics, inference overlays, the cluster table and the analysis figures.

The file stands alone: images are embedded as base64 ``data:`` URIs and tables are inlined, so it can be
mailed or opened from any folder without a server. Nothing is fetched from the network (no scripts, fonts or
style sheets from elsewhere).

Entry point::

    write_report(
        path,                      # where report.html goes
        title="cytonet demo",
        metrics_rows=[{"model": "contrastive", "dataset": "held-out sections", "F1": 72.4, ...}, ...],
        overlays=[Path(".../overlay.png")],          # inference overlays (optional)
        cluster_table=Path(".../clusters.csv"),      # seed 002 Table 1 form (optional)
        figures=[("t-SNE (seed 002 Fig. 3)", Path(".../tsne.png")), ...],
        tables=[("NMF factor selection", Path(".../nmf-selection.csv"))],
        notes=["UMAP skipped: umap-learn is not installed"],
    ) -> Path

Rows of ``metrics_rows`` are dicts with the same keys (the first row's keys are the columns); floats are
printed with two decimals. Missing image files are listed as missing instead of failing the report.
"""

from __future__ import annotations

import base64
import csv
import html
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; }
p.note { color: #555; font-size: 0.9em; }
"""


def _img(path: Path) -> str:
    """An ``<img>`` with the PNG embedded, or a note when the file is missing."""
    if not path.is_file():
        return f'<p class="note">missing figure: {html.escape(str(path))}</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"<td>{value:.2f}</td>"
    if isinstance(value, int):
        return f"<td>{value}</td>"
    text = str(value)
    try:
        float(text)
        return f"<td>{html.escape(text)}</td>"
    except ValueError:
        return f'<td class="text">{html.escape(text)}</td>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _csv_table(path: Path) -> str:
    if not path.is_file():
        return f'<p class="note">missing table: {html.escape(str(path))}</p>'
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return f'<p class="note">empty table: {html.escape(path.name)}</p>'
    return _table(rows[0], rows[1:]) + f'<p class="note">{html.escape(path.name)}</p>'


def write_report(
    path: Path,
    *,
    title: str,
    metrics_rows: Sequence[Mapping[str, Any]] = (),
    overlays: Sequence[Path] = (),
    cluster_table: Path | None = None,
    figures: Sequence[tuple[str, Path]] = (),
    tables: Sequence[tuple[str, Path]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write the report to ``path`` (atomically: temp file, then rename) and return ``path``."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">written {time.strftime("%Y-%m-%d %H:%M:%S %Z")}</p>',
    ]
    if metrics_rows:
        header = list(metrics_rows[0].keys())
        parts += ["<h2>Metrics</h2>", _table(header, [[row.get(k, "") for k in header] for row in metrics_rows])]
    if overlays:
        parts.append("<h2>Inference</h2>")
        for p in overlays:
            parts.append(f"<figure>{_img(Path(p))}<figcaption>{html.escape(Path(p).name)}</figcaption></figure>")
    if cluster_table is not None:
        parts += [
            "<h2>Clusters (seed 002 Table 1)</h2>",
            '<p class="note">Percentage of the features in each Ward cluster that come from patches of each '
            "area; only the most common areas are listed.</p>",
            _csv_table(Path(cluster_table)),
        ]
    for caption, p in tables:
        parts += [f"<h2>{html.escape(caption)}</h2>", _csv_table(Path(p))]
    if figures:
        parts.append("<h2>Figures</h2>")
        for caption, p in figures:
            parts.append(f"<figure>{_img(Path(p))}<figcaption>{html.escape(caption)}</figcaption></figure>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
