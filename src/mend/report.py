"""The result of an evaluation run and its outputs: per-edit JSONL, summary JSON, a printed table,
PNG plots.

Files written by `write_report` into ``out_dir`` (each atomically):

* ``edits.jsonl``: one line per (method, edit): method, mode, record index, case_id, prompt, target,
  the edited model's greedy continuation of the prompt, ms_per_edit, and every metric of
  `mend.eval_metrics.METRICS` (null where the record has no probe of that kind).
* ``summary.json``: what was run (mode, settings, data file, model, editor checkpoint, mend version,
  each method's hyperparameters) and per method the mean of every metric, ms_per_edit and n_edits;
  in sequential mode also the curve of each method.
* ``table.txt``: the printed table (metrics x methods, plus ms/edit).
* ``metrics.png``: bar charts of the metrics per method; ``sequential_curve.png``: the metrics
  against the number of edits applied (sequential mode). Plots need matplotlib (``pip install
  mend-editor[plot]``); without it they are skipped with a warning.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import atomic_write_file
from .eval_metrics import KINDS, METRICS, PROTOCOLS

EDITS_FILE = "edits.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.txt"
METRICS_PLOT = "metrics.png"
CURVE_PLOT = "sequential_curve.png"


@dataclass
class EvalReport:
    """Everything an evaluation run measured.

    Attributes:
        mode: "single", "batch" or "sequential".
        settings: how it was run (n_records, batch_size, curve_every, curve_sample, max_length).
        meta: provenance: data, model, editor_checkpoint, mend_version, plus the caller's items.
        methods: per method name: {"n_edits", "ms_per_edit", "metrics": {metric: mean or None},
            "settings": the method's hyperparameters}.
        rows: one dict per (method, edit), as written to ``edits.jsonl``.
        curves: sequential mode, per method: a list of {"n_edits", "n_measured", metric: mean, ...}.
        files: the files written, by kind ("edits", "summary", "table", "metrics_plot", "curve_plot").
    """

    mode: str
    settings: dict
    meta: dict
    methods: dict[str, dict]
    rows: list[dict]
    curves: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict:
        """The content of ``summary.json``."""
        out = {"mode": self.mode, **self.meta, "settings": self.settings, "methods": self.methods}
        if self.curves:
            out["curves"] = self.curves
        return out

    def table(self) -> str:
        return format_table(self)


def _cell(value, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def format_table(report: EvalReport) -> str:
    """A plain-text table: one row per metric (in %), one column per method, and ms/edit."""
    names = list(report.methods)
    metrics = [m for m in METRICS if any(report.methods[n]["metrics"].get(m) is not None for n in names)]
    header = ["metric (%)"] + names
    lines = [[m] + [_cell(report.methods[n]["metrics"].get(m)) for n in names] for m in metrics]
    lines.append(["ms/edit"] + [_cell(report.methods[n]["ms_per_edit"], percent=False) for n in names])
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    n_records = report.settings.get("n_records")
    title = f"mode={report.mode}  edits={n_records}  model={report.meta.get('model')}"
    rule = "-" * len(fmt(header))
    return "\n".join([title, fmt(header), rule] + [fmt(row) for row in lines])


def _write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_report(report: EvalReport, out_dir) -> dict[str, Path]:
    """Write the report's files into ``out_dir`` (created if needed); returns them by kind and also
    stores them in ``report.files``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"edits": out_dir / EDITS_FILE, "summary": out_dir / SUMMARY_FILE, "table": out_dir / TABLE_FILE}
    _write_text(files["edits"], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report.rows))
    _write_text(files["summary"], json.dumps(report.summary(), indent=2, ensure_ascii=False) + "\n")
    _write_text(files["table"], report.table() + "\n")
    files.update(write_plots(report, out_dir))
    report.files = files
    return files


def new_figure(ncols: int, width: float = 4.5, height: float = 3.6):
    """A matplotlib Figure with ``ncols`` axes, without pyplot (no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_png(fig, path: Path) -> None:
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_metrics(report: EvalReport, path) -> None:
    """One panel per protocol; grouped bars: probe kinds on the x axis, one bar per method."""
    names = list(report.methods)
    kinds = list(KINDS) + ["locality_gt"]
    fig, axes = new_figure(len(PROTOCOLS))
    width = 0.8 / max(1, len(names))
    for ax, protocol in zip(axes, PROTOCOLS):
        for j, name in enumerate(names):
            values = [report.methods[name]["metrics"].get(f"{k}_{protocol}") for k in kinds]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(kinds))]
            ax.bar(xs, [100 * v if v is not None else 0.0 for v in values], width, label=name)
        ax.set_xticks(range(len(kinds)), [k.replace("_", "\n") for k in kinds], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(protocol)
        ax.set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report.mode} mode, {report.settings.get('n_records')} edits")
    save_png(fig, Path(path))


def plot_curves(report: EvalReport, path) -> None:
    """One panel per probe kind: the metric against edits applied; solid tf_acc, dashed gen."""
    kinds = [k for k in list(KINDS) if any(p.get(f"{k}_tf_acc") is not None for c in report.curves.values() for p in c)]
    fig, axes = new_figure(max(1, len(kinds)))
    for ax, kind in zip(axes, kinds):
        for j, (name, points) in enumerate(report.curves.items()):
            color = f"C{j}"
            xs = [p["n_edits"] for p in points]
            for protocol, style in (("tf_acc", "-"), ("gen", "--")):
                ys = [100 * p[f"{kind}_{protocol}"] if p.get(f"{kind}_{protocol}") is not None else float("nan") for p in points]
                ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=f"{name} {protocol}")
        ax.set_title(kind)
        ax.set_xlabel("edits applied")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(-2, 102)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    save_png(fig, Path(path))


def write_plots(report: EvalReport, out_dir) -> dict[str, Path]:
    """Write the PNG plots; returns {} with one warning when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping plots (pip install 'mend-editor[plot]')", stacklevel=2)
        return {}
    out_dir = Path(out_dir)
    files = {"metrics_plot": out_dir / METRICS_PLOT}
    plot_metrics(report, files["metrics_plot"])
    if report.curves:
        files["curve_plot"] = out_dir / CURVE_PLOT
        plot_curves(report, files["curve_plot"])
    return files
