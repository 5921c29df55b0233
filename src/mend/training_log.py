"""Metric logging for training runs: a JSONL file of every logged metric and a PNG of the curves."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


class JsonlLog:
    """Appends one JSON object per line; on resume, drops lines past the resumed step."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(log_path, png_path) -> Path | None:
    """Plot train and validation curves from a training JSONL log. Returns None without matplotlib."""
    try:
        from .report import new_figure, save_png
    except ImportError:
        return None
    try:
        fig, axes = new_figure(2, width=5.5, height=4)
    except ImportError:
        warnings.warn("matplotlib is not installed: no training plot (pip install 'mend-editor[plot]')")
        return None
    records = read_jsonl(log_path)
    panels = [("loss", ["loss", "edit_loss", "loc_loss"]), ("accuracy", ["edit_acc", "equiv_acc", "loc_agree"])]
    for axis, (title, keys) in zip(axes, panels):
        for split, style in (("train", "-"), ("val", "o--")):
            rows = [r for r in records if r.get("split") == split]
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
                if points:
                    xs, ys = zip(*points)
                    axis.plot(xs, ys, style, label=f"{split} {key}", markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        if title == "loss":
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    png_path = Path(png_path)
    save_png(fig, png_path)
    return png_path
