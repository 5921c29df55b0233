"""The result of an evaluation run and its outputs: per-edit JSONL, summary JSON, a printed table,
PNG plots.

Files written by `write_report` into ``out_dir`` (each atomically):

* ``edits.jsonl``: one line per (method, edit): method, mode, record index, case_id, prompt, target,
  the edited model's greedy continuation of the prompt and its WILD answer, ms_per_edit, and every
  metric of `mend.eval_metrics` (null where the record has no probe of that role or kind).
* ``summary.json``: what was run (mode, settings with the probe kinds, the WILD template and the
  bootstrap, data file, model, editor checkpoint, mend version, each method's hyperparameters) and
  per method the mean of every metric with its interval (``metrics``, ``intervals``), ms_per_edit
  with its interval and n_edits; in sequential mode also the curve of each method (each point with
  its intervals).
* ``table.txt``: the printed table: one row per metric grouped by protocol, one column per method,
  each value in % with its interval beside it, plus ms/edit.
* ``metrics.png``: bar charts of the metrics per method with interval error bars;
  ``sequential_curve.png``: the metrics against the number of edits applied, with interval bands
  (sequential mode). Plots need matplotlib (``pip install mend-editor[plot]``); without it they are
  skipped with a warning.

`mend.compare` reads two such directories back (`load_run`) to compare them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import atomic_write_file
from .eval_metrics import PROTOCOLS, ROLES, metric_key, parse_metric

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
        settings: how it was run (n_records, max_length, probe_kinds, wild, bootstrap, and
            batch_size or curve_every / curve_sample for those modes).
        meta: provenance: data, model, editor_checkpoint, mend_version, plus the caller's items.
        methods: per method name: {"n_edits", "ms_per_edit", "ms_per_edit_interval", "metrics":
            {metric: mean or None}, "intervals": {metric: [lo, hi] or None}, "settings": the
            method's hyperparameters}.
        rows: one dict per (method, edit), as written to ``edits.jsonl``.
        curves: sequential mode, per method: a list of {"n_edits", "n_measured", metric: mean, ...,
            "intervals": {metric: [lo, hi] or None}}.
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


PROTOCOL_TITLES = {
    "tf_acc": "teacher-forced token accuracy",
    "tf_em": "teacher-forced exact match",
    "gen": "greedy prefix: the model's own continuation starts with the answer",
    "wild_em": "WILD exact match: asked in a QA context, answer cut at its natural end",
    "wild_contains": "WILD contains: the cut answer contains the target",
}
COUNTERFACT_TITLE = "CounterFact scores: P(new) > P(old) (neighborhood: P(true) > P(new)); magnitudes: mean difference"
LOCALITY_NOTE = ("locality: agreement with the unedited model; locality_gt: edited model vs the true answers; "
                 "locality_ceiling: unedited model vs the true answers (what 100% agreement scores)")


def value_cell(value, interval=None, percent: bool = True, signed: bool = False) -> str:
    """"71.3 [65.0, 77.4]": the value and its interval, in % unless ``percent`` is False; with
    ``signed``, every number carries its sign ("+3.2 [+1.0, +5.1]", for differences)."""
    if value is None:
        return "-"
    scale = 100.0 if percent else 1.0
    spec = "+.1f" if signed else ".1f"
    text = f"{scale * value:{spec}}"
    if interval is not None:
        text += f" [{scale * interval[0]:{spec}}, {scale * interval[1]:{spec}}]"
    return text


def table_sections(names) -> list[tuple[str, list[str]]]:
    """(title, metric names) blocks of the table: one per protocol, then CounterFact's scores."""
    sections = {p: [] for p in PROTOCOLS}
    counterfact = []
    for name in sorted(names, key=lambda n: metric_key(n, by_protocol=True)):
        role, _, protocol = parse_metric(name)
        (counterfact if role == "counterfact" else sections[protocol]).append(name)
    blocks = [(PROTOCOL_TITLES[p], sections[p]) for p in PROTOCOLS if sections[p]]
    return blocks + ([(COUNTERFACT_TITLE, counterfact)] if counterfact else [])


def format_columns(header: list[str], blocks: list[tuple[str | None, list[list[str]]]]) -> list[str]:
    """Aligned text lines: the header, a rule, then each block's title line (when given) and rows."""
    rows = [r for _, block in blocks for r in block]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(header), "-" * len(fmt(header))]
    for title, block in blocks:
        if title:
            lines.append(f"-- {title}")
        lines += [fmt(row) for row in block]
    return lines


def format_table(report: EvalReport) -> str:
    """A plain-text table: one row per metric (in %, its interval beside it), one column per method,
    grouped by protocol, then CounterFact's scores and ms/edit."""
    names = list(report.methods)
    stats = report.methods
    present = {m for n in names for m, v in stats[n]["metrics"].items() if v is not None}
    blocks = []
    for title, metrics in table_sections(present):
        rows = [[m] + [value_cell(stats[n]["metrics"].get(m), stats[n].get("intervals", {}).get(m)) for n in names]
                for m in metrics]
        blocks.append((title, rows))
    blocks.append((None, [["ms/edit"] + [value_cell(stats[n]["ms_per_edit"], stats[n].get("ms_per_edit_interval"),
                                                percent=False) for n in names]]))
    if any(stats[n].get("relative_update") is not None for n in names):
        blocks.append((None, [["max ||dW||/||W|| (%)"] + [value_cell(stats[n].get("relative_update"), None) for n in names]]))
    if any(stats[n].get("calibrated_scale") is not None for n in names):  # editor.edit_margin's mean multiple
        blocks.append((None, [["calibrated scale (% of the step)"] + [value_cell(stats[n].get("calibrated_scale"), None)
                                                                      for n in names]]))
    if any(stats[n].get("n_refused") for n in names):  # edits refused as NaN/inf, the model left unchanged
        blocks.append((None, [["refused edits"] + [str(stats[n].get("n_refused", 0)) for n in names]]))
    settings = report.settings
    title = f"mode={report.mode}  edits={settings.get('n_records')}  model={report.meta.get('model')}"
    boot = settings.get("bootstrap") or {}
    if boot.get("samples"):
        title += (f"\nvalues in % with [{100 * boot['confidence']:g}% bootstrap interval] over records "
                  f"({boot['samples']} resamples, seed {boot['seed']})")
    kinds = "; ".join(f"{role}: {', '.join(k)}" for role, k in (settings.get("probe_kinds") or {}).items() if k)
    if kinds:
        title += f"\nprobe kinds: {kinds}"
    lines = format_columns(["metric"] + names, blocks)
    if any(parse_metric(m)[0].startswith("locality") for m in present if parse_metric(m)):
        lines.append(LOCALITY_NOTE)
    return "\n".join([title] + lines)


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


def new_figure(ncols: int, width: float = 4.5, height: float = 3.6, nrows: int = 1):
    """A matplotlib Figure with ``nrows`` x ``ncols`` axes (a flat list), without pyplot (no global
    backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def save_png(fig, path: Path) -> None:
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


BAR_ROLES = ("reliability", "generality", "portability", "locality", "locality_gt")
COUNTERFACT_BARS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def _value_and_error(stats: dict, name: str) -> tuple[float, float, float]:
    """(value, lower error, upper error) in % of a metric; NaN value when it is missing."""
    value = stats["metrics"].get(name)
    if value is None:
        return float("nan"), 0.0, 0.0
    interval = (stats.get("intervals") or {}).get(name)
    if interval is None:
        return 100 * value, 0.0, 0.0
    return 100 * value, max(0.0, 100 * (value - interval[0])), max(0.0, 100 * (interval[1] - value))


def _bars(ax, report: EvalReport, names: list[str], labels: list[str]) -> None:
    """Grouped bars with confidence-interval error bars: one group per metric, one bar per method."""
    methods = list(report.methods)
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        values, low, high = zip(*(_value_and_error(report.methods[method], n) for n in names))
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, values, width, yerr=[low, high], capsize=2, error_kw={"elinewidth": 0.8}, label=method)
    ax.set_xticks(range(len(names)), [label.replace("_", "\n") for label in labels], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")


def plot_metrics(report: EvalReport, path) -> None:
    """One panel per protocol (probe roles on the x axis, one bar per method, the interval as an error
    bar, the unedited model's locality ceiling as a dashed line), and one of CounterFact's scores."""
    present = {m for stats in report.methods.values() for m, v in stats["metrics"].items() if v is not None}
    panels = [p for p in PROTOCOLS if any(f"{r}_{p}" in present for r in BAR_ROLES)]
    counterfact = [m for m in COUNTERFACT_BARS if m in present]
    n_panels = len(panels) + bool(counterfact)
    ncols = min(3, max(1, n_panels))
    fig, axes = new_figure(ncols, nrows=-(-max(1, n_panels) // ncols))
    for ax, protocol in zip(axes, panels):
        _bars(ax, report, [f"{r}_{protocol}" for r in BAR_ROLES], list(BAR_ROLES))
        ceilings = [s["metrics"].get(f"locality_ceiling_{protocol}") for s in report.methods.values()]
        ceiling = next((c for c in ceilings if c is not None), None)
        if ceiling is not None:
            x = BAR_ROLES.index("locality_gt")
            ax.hlines(100 * ceiling, x - 0.45, x + 0.45, colors="black", linestyles="dashed", label="unedited")
        ax.set_title(PROTOCOL_TITLES[protocol].split(":")[0], fontsize=9)
    if counterfact:
        ax = axes[len(panels)]
        _bars(ax, report, counterfact, counterfact)
        ax.set_title("CounterFact scores", fontsize=9)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    boot = report.settings.get("bootstrap") or {}
    note = f", {100 * boot['confidence']:g}% bootstrap intervals" if boot.get("samples") else ""
    fig.suptitle(f"{report.mode} mode, {report.settings.get('n_records')} edits{note}")
    save_png(fig, Path(path))


CURVE_PROTOCOLS = (("tf_acc", "-"), ("gen", "--"), ("wild_em", ":"))


def plot_curves(report: EvalReport, path) -> None:
    """One panel per probe role: the metric against edits applied (solid tf_acc, dashed gen, dotted
    wild_em), each with its confidence band."""
    points_all = [p for c in report.curves.values() for p in c]
    roles = [r for r in ROLES if any(p.get(f"{r}_tf_acc") is not None for p in points_all)]
    fig, axes = new_figure(max(1, len(roles)))
    for ax, role in zip(axes, roles):
        for j, (name, points) in enumerate(report.curves.items()):
            xs = [p["n_edits"] for p in points]
            for protocol, style in CURVE_PROTOCOLS:
                key = f"{role}_{protocol}"
                ys = [100 * p[key] if p.get(key) is not None else float("nan") for p in points]
                if all(y != y for y in ys):
                    continue
                ax.plot(xs, ys, style, color=f"C{j}", marker="o", markersize=3, label=f"{name} {protocol}")
                bands = [(p.get("intervals") or {}).get(key) for p in points]
                if any(b is not None for b in bands):
                    lo = [100 * b[0] if b else float("nan") for b in bands]
                    hi = [100 * b[1] if b else float("nan") for b in bands]
                    ax.fill_between(xs, lo, hi, color=f"C{j}", alpha=0.12, linewidth=0)
        ax.set_title(role)
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
