"""The report page: one self-contained HTML file (figures embedded as base64 PNG, no external assets)."""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path

import pandas as pd

from nbglm.report.figures import axis_label
from nbglm.report.read import Sweep
from nbglm.sweep.params import Param


def _mean_std(row: pd.Series, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{mean:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}")


def _param_text(p: Param, value: str) -> str:
    """A sampled value as a person reads it: floats to 4 significant digits, the rest as written."""
    return f"{float(value):.4g}" if p.type == "float" and value else value


def _table(sweep: Sweep, top: int) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("rank", "trial", "params", *(axis_label(m) for m in sweep.metrics),
                                             "units ok"))
    rows = []
    for rank, (_, r) in enumerate(sweep.ranked().head(top).iterrows(), 1):
        params = "<br>".join(html.escape(f"{k} = {_param_text(p, r[k])}") for k, p in sweep.space.items())
        cells = [str(rank), html.escape(r["trial_id"]), params, *(_mean_std(r, m) for m in sweep.metrics),
                 f"{int(r['n_units_ok'])}/{int(r['n_units'])}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _final(sweep: Sweep) -> list[str]:
    """The refit configs' CV score beside their test score: how optimistic the selection was."""
    if sweep.final is None:
        return ["<p>No test score: the refit has not run yet, or the held-out perturbations have no ground truth."
                "</p>"]
    m = sweep.metric
    head = "".join(f"<th>{h}</th>" for h in ("trial", f"CV {m}", f"test {m}", "CV − test"))
    rows = []
    for c in sweep.final["configs"]:
        cv, test = c["cv"][m], c["test"][m]
        diff = "" if c.get("cv_minus_test") is None else f"{c['cv_minus_test']:+.4f}"
        cells = [html.escape(c["trial_id"] + (" (selected)" if c["trial_id"] == sweep.final["selected"] else "")),
                 _pm(cv["mean"], cv["std"]), _pm(test["mean"], test["std"]), diff]
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    return ["<h2>Refit on all training perturbations, scored once on the test set</h2>",
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"]


def _pm(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}tbody tr:first-child{background:#fff6d5}figure{margin:2em 0}img{max-width:100%}
figcaption{color:#555;font-size:14px}"""


def render_html(sweep: Sweep, figures: list[tuple[Path, str]], top: int, notes: list[str]) -> str:
    """The page: summary line, top-configs table, then each figure (embedded) with its caption."""
    n_failed = int((sweep.configs["status"] == "failed").sum())
    summary = (f"{len(sweep.configs)} configs ({len(sweep.ranked())} scored, {n_failed} failed) × "
               f"{sweep.n_folds} folds × seeds {sweep.seeds}; ranked by cross-validated {sweep.metric} ({sweep.mode}) "
               f"over the training perturbations. Sweep directory: {sweep.path}. "
               f"Written {datetime.now():%Y-%m-%d %H:%M}.")
    body = [f"<h1>Sweep report: {html.escape(sweep.name)}</h1>", f"<p>{html.escape(summary)}</p>",
            "<h2>Top configs (cross-validated: mean ± std over folds × seeds)</h2>", _table(sweep, top),
            *_final(sweep),
            *(f"<p>{html.escape(n)}</p>" for n in notes), "<h2>Figures</h2>",
            *(_img(path, caption) for path, caption in figures)]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Sweep report: '
            f"{html.escape(sweep.name)}</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")
