"""The report as one page, results/report/index.html: the paper's figure first, then one section
per question with its figures, the ranking table, and links to the tables. Static HTML beside the
PNGs it shows (relative links): it opens from the folder, from DVC's outputs or from the report
run's artifacts in MLflow alike."""

from __future__ import annotations

import fnmatch
import html
from pathlib import Path

from .. import files
from .tables import ranking_table

# (heading, what the section answers, the figures it shows: file name patterns, in order)
SECTIONS = [
    (
        "Double descent",
        "Test error and the Lipschitz constant of the logits against width: its upper bound, "
        "its lower bound (the largest input-Jacobian norm on a training point) and the mean the "
        "paper reports. The dashed line is the interpolation threshold, the first width that "
        "fits every noisy training label; bands are 95% intervals over seeds.",
        ["double_descent.png", "lipschitz_vs_width.png"],
    ),
    (
        "Which measures track test error",
        "How each measure ranks the networks against their test error: Spearman's rho and "
        "Kendall's tau across widths, Jiang et al.'s granulated Psi, Dziugaite et al.'s robust "
        "sign error (lower is better), each with its 95% bootstrap interval.",
        ["correlation.png"],
    ),
    (
        "What explains the Lipschitz constant",
        "The factors the paper names: distance from initialisation and the loss curvature, "
        "beside the upper bound.",
        ["network_measures_vs_width*.png"],
    ),
    (
        "Off the training points",
        "The Lipschitz estimate between, around and away from the training points (probe sets).",
        ["smoothness_vs_width.png", "probe_measures_vs_width*.png"],
    ),
    (
        "The baselines",
        "The norm, margin and flatness measures of the generalisation literature (Jiang et al. "
        "2019), batch norm folded.",
        ["baseline_measures_vs_width*.png"],
    ),
    (
        "Per-sample statistics",
        "On the training points, over all of them and over the clean and corrupted ones.",
        ["sample_measures_vs_width*.png"],
    ),
    ("Over training", "The same measures against epoch, a curve per width.", ["*_vs_epoch*.png"]),
]


def sections(figures: list[str]) -> list[tuple[str, str, list[str]]]:
    """Each section with the figures of `figures` it shows; a figure no section names goes to a
    last one, so every figure is on the page once."""
    left, out = list(figures), []
    for heading, text, patterns in SECTIONS:
        shown = [f for p in patterns for f in sorted(fnmatch.filter(left, p))]
        shown = list(dict.fromkeys(shown))
        left = [f for f in left if f not in shown]
        if shown:
            out.append((heading, text, shown))
    if left:
        out.append(("Other figures", "", left))
    return out


def table_html(rows: list[list[str]]) -> str:
    head, *body = rows
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    lines = [f"<tr>{cells}</tr>"]
    lines += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;font-size:0.85em}
td,th{border-bottom:1px solid #ddd;padding:0.2em 0.6em;text-align:right}
td:first-child,th:first-child{text-align:left}p.note{color:#555}"""


def write_page(out: Path, title: str, written: list[Path], correlation: list[dict]) -> Path:
    """index.html in `out`, showing the PNGs among `written` and linking its CSVs."""
    figures = [p.name for p in written if p.suffix == ".png"]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, text, shown in sections(figures):
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            body.append(f'<p class="note">{html.escape(text)}</p>')
        body += [f'<img src="{html.escape(f)}" alt="{html.escape(f)}">' for f in shown]
        if "correlation.png" in shown:
            body.append(table_html(ranking_table(correlation)))
    tables = [p.name for p in written if p.suffix == ".csv"]
    body.append("<h2>Tables</h2><p>")
    body.append(" · ".join(f'<a href="{html.escape(t)}">{html.escape(t)}</a>' for t in tables))
    body.append("</p>")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return files.write_text(out / "index.html", page)
