"""The evaluation harness: run edit methods over records in one of three modes and score every edit.

    methods = build_methods(["none", "mend", "ft", "ft-l"], editor, model, tokenizer, cfg.eval)
    report = evaluate(methods, records, model, tokenizer, mode="single", out_dir="runs/eval",
                      meta={"data": path, "editor_checkpoint": ckpt})

Modes:

* ``single``: for each record, apply its edit, measure it, revert.
* ``batch``: apply ``batch_size`` records' edits together (one ``apply`` call), measure each, revert.
* ``sequential``: apply every record's edit one after another without reverting; every
  ``curve_every`` edits, measure the edits applied so far (or the fixed sample of ``curve_sample``
  records among them) for the curve; after the last edit measure them all; revert at the end.

The unedited model's predictions on every record are computed once, before any method runs, and
serve as the locality reference and its ceiling, and as the measurements of a method that never
changes the model (``changes_model`` False: ``none``).

Each method's summary holds the mean of every metric (`mend.eval_metrics`) and its bootstrap
confidence interval over records (`mend.bootstrap`); so does each point of a sequential curve.
Portability and locality are also reported per probe kind when the records' probes of that role
come in two or more kinds (KnowEdit's Reasoning / Subject_Aliasing, our facts' neighborhood /
unrelated); with one kind, the role's own metrics are that kind's.

Methods run one after another on the same model, each reverting its edits before the next starts
(also when it fails). An edit the method refuses (`mend.EditFailedError`: its update was NaN or inf
and the model was left unchanged) is recorded, not fatal: its records are measured on the model as it
is (``refused: true`` in their rows, ``n_refused`` in the summary and each curve point) and the run
goes on. ``ms_per_edit`` is the mean wall time of ``apply`` per edit (a batch's time divided by its
size).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .bootstrap import Bootstrap, summarize
from .data.records import EditRecord
from .editor import EditFailedError
from .eval_metrics import Predictions, Probes, metric_names, predict, probe_kinds, score
from .report import EvalReport, write_report
from .wild import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPLATE, check_template

MODES = ("single", "batch", "sequential")


def _method_dict(methods) -> dict:
    if isinstance(methods, dict):
        items = list(methods.items())
    else:
        items = [(m.name, m) for m in methods]
    if not items:
        raise ValueError("no edit methods given")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"two edit methods share a name: {names}")
    for name, method in items:
        if not all(hasattr(method, a) for a in ("apply", "revert")):
            raise TypeError(f"edit method {name!r} ({type(method).__name__}) lacks apply/revert")
    return dict(items)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One method's run over the records: timed applies and measurements against the pre-edit reference."""

    def __init__(self, name, method, records, probes, pre, model, tokenizer, mode, measure_kwargs, split, bar):
        self.name, self.method, self.records, self.probes, self.pre = name, method, records, probes, pre
        self.model, self.tokenizer, self.mode, self.bar = model, tokenizer, mode, bar
        self.measure_kwargs, self.split = measure_kwargs, split
        self.device = next(model.parameters()).device
        self.apply_seconds = 0.0
        self.n_edits = 0
        self.refused: set[int] = set()  # the records whose edit the method refused
        self.scales: dict[int, float] = {}  # record -> the multiple of the step its calibrated edit applied
        # the matrices the method edits, with their unedited values: the size of the change it made
        params = dict(model.named_parameters())
        names = [t.name for t in getattr(method, "targets", None) or getattr(getattr(method, "editor", None), "targets", [])]
        self.original = {name: params[name].detach().clone() for name in names if name in params}

    def relative_update(self) -> float | None:
        """max over the edited matrices of ||W - W0||_F / ||W0||_F, the model as it is now; None when
        the method names no matrices."""
        if not self.original:
            return None
        params = dict(self.model.named_parameters())
        return max(float((params[name].detach() - w0).float().norm() / w0.float().norm().clamp(min=1e-12))
                   for name, w0 in self.original.items())

    def apply(self, indices: list[int]) -> float:
        """Apply the edits of records ``indices`` together; returns ms per edit. A refused edit
        (`EditFailedError`, the model unchanged) is remembered for the records' rows."""
        pairs = [(self.records[i].prompt, self.records[i].target) for i in indices]
        _sync(self.device)
        start = time.perf_counter()
        try:
            self.method.apply(pairs)
        except EditFailedError:
            self.refused.update(indices)
        else:
            scale = getattr(self.method, "calibrated_scale", None)  # editor.edit_margin's choice, if any
            if scale is not None:
                self.scales.update(dict.fromkeys(indices, scale))
        _sync(self.device)
        seconds = time.perf_counter() - start
        self.apply_seconds += seconds
        self.n_edits += len(indices)
        return 1000 * seconds / len(indices)

    def measure(self, i: int, ms_per_edit: float | None, **extra) -> dict:
        """Score record i on the model as it is now; one row of ``edits.jsonl``. A method that never
        changes the model (``changes_model`` False, e.g. ``none``) is scored on the pre-edit predictions."""
        if getattr(self.method, "changes_model", True):
            post: Predictions = predict(self.model, self.tokenizer, self.probes[i], **self.measure_kwargs)
        else:
            post = self.pre[i]
        size = self.relative_update()
        update = {} if size is None else {"relative_update": size}
        if i in self.scales:
            update["calibrated_scale"] = self.scales[i]
        record = self.records[i]
        return {"method": self.name, "mode": self.mode, "index": i, "case_id": record.case_id,
                "prompt": record.prompt, "target": record.target, "generated": post.texts[0],
                "wild_answer": post.wild_texts[0] if post.wild_texts else None, **extra, "ms_per_edit": ms_per_edit,
                "refused": i in self.refused,
                **score(self.probes[i], post, self.pre[i], self.split), **update}


def _single(run: _Run, n: int, **_) -> tuple[list[dict], list[dict]]:
    rows = []
    for i in range(n):
        ms = run.apply([i])
        rows.append(run.measure(i, ms))
        run.method.revert()
        run.bar.update(1)
    return rows, []


def _batch(run: _Run, n: int, batch_size: int, **_) -> tuple[list[dict], list[dict]]:
    rows = []
    for b, start in enumerate(range(0, n, batch_size)):
        indices = list(range(start, min(n, start + batch_size)))
        ms = run.apply(indices)
        rows += [run.measure(i, ms, batch=b) for i in indices]
        run.method.revert()
        run.bar.update(len(indices))
    return rows, []


def curve_points(n: int, every: int) -> list[int]:
    """Edit counts at which the sequential curve is measured: every ``every`` edits, and the last."""
    points = list(range(every, n + 1, every))
    return points if points and points[-1] == n else points + [n]


def curve_sample_indices(n: int, sample: int | None) -> list[int]:
    """The records measured at each curve point: all, or ``sample`` of them evenly spread."""
    if sample is None or sample >= n:
        return list(range(n))
    return sorted({round(k * (n - 1) / max(1, sample - 1)) for k in range(sample)}) if sample > 1 else [0]


def _sequential(run: _Run, n: int, curve_every: int, curve_sample: int | None, bootstrap: Bootstrap,
                **_) -> tuple[list[dict], list[dict]]:
    points = set(curve_points(n, curve_every))
    sample = curve_sample_indices(n, curve_sample)
    ms = [0.0] * n
    curve, rows = [], []
    for i in range(n):
        ms[i] = run.apply([i])
        run.bar.update(1)
        if i + 1 not in points:
            continue
        measured = [j for j in sample if j <= i]
        if i + 1 == n:  # the final measurement covers every edit; the curve uses its sample
            rows = [run.measure(j, ms[j], n_applied=n) for j in range(n)]
            point_rows = [rows[j] for j in measured]
        else:
            point_rows = [run.measure(j, ms[j], n_applied=i + 1) for j in measured]
        means, intervals = summarize(point_rows, metric_names(point_rows), bootstrap)
        curve.append({"n_edits": i + 1, "n_measured": len(point_rows), "n_refused": sum(j <= i for j in run.refused),
                      **means, "intervals": intervals})
    run.method.revert()
    return rows, curve


def settings_from_config(eval_cfg) -> dict:
    """The keyword arguments of `evaluate` that the config's ``eval`` section sets."""
    return dict(mode=eval_cfg.mode, batch_size=eval_cfg.batch_size, curve_every=eval_cfg.curve_every,
                wild_template=eval_cfg.wild_template, wild_max_new_tokens=eval_cfg.wild_max_new_tokens,
                bootstrap=Bootstrap(eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed, eval_cfg.bootstrap_confidence))


def evaluate(methods, records, model, tokenizer, *, mode: str = "single", batch_size: int = 10,
             curve_every: int = 10, curve_sample: int | None = None, max_length: int = 128,
             wild_template: str = DEFAULT_TEMPLATE, wild_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             bootstrap: Bootstrap | None = None, out_dir=None, progress: bool = True,
             meta: dict | None = None) -> EvalReport:
    """Run each edit method over ``records`` and score every edit.

    Args:
        methods: {name: EditMethod} or a list of EditMethods (named by ``.name``), e.g. from
            `mend.baselines.build_methods`. Each must edit ``model`` in place and revert exactly.
        records: `EditRecord`s (any loader's output).
        mode: "single", "batch" or "sequential" (see the module docstring).
        batch_size: edits applied together in batch mode.
        curve_every: sequential mode: measure the curve every this many edits.
        curve_sample: sequential mode: measure only this many (evenly spread) records at each
            curve point; None = all applied so far.
        max_length: longest probe prompt + answer in tokens (the editor's ``max_length``).
        wild_template: the question-answering context of WILD answers (``{prompt}`` marks the probe).
        wild_max_new_tokens: the most tokens of a WILD answer; 0 leaves WILD answers out.
        bootstrap: how confidence intervals are drawn (default: 1000 resamples, seed 0, 95%).
        out_dir: when given, write the outputs there (`mend.report.write_report`).
        progress: show tqdm bars and print the table at the end.
        meta: provenance recorded in the summary: ``data`` (the data file), ``model``,
            ``editor_checkpoint``, and anything else; ``model`` defaults to the model's name_or_path and
            ``mend_version`` is always added.

    Returns:
        An `EvalReport` (per-edit rows, per-method means, intervals and ms/edit, sequential curves).
    """
    from . import __version__

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for what, value, least in (("batch_size", batch_size, 1), ("curve_every", curve_every, 1),
                               ("max_length", max_length, 1), ("wild_max_new_tokens", wild_max_new_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{what} must be an integer >= {least}, got {value!r}")
    if curve_sample is not None and (not isinstance(curve_sample, int) or curve_sample < 1):
        raise ValueError(f"curve_sample must be None or a positive integer, got {curve_sample!r}")
    check_template(wild_template)
    bootstrap = Bootstrap() if bootstrap is None else bootstrap
    methods = _method_dict(methods)
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    for i, record in enumerate(records):
        if not isinstance(record, EditRecord):
            raise TypeError(f"record #{i} is a {type(record).__name__}, not a mend.data.records.EditRecord")

    # 1. the probes, their kinds, and the unedited model's predictions (the locality reference)
    n = len(records)
    probes = [Probes.of(r) for r in records]
    kinds = probe_kinds(probes)
    split = {role: k for role, k in kinds.items() if len(k) >= 2}
    measure_kwargs = dict(max_length=max_length, wild_template=wild_template, wild_max_new_tokens=wild_max_new_tokens)
    pre = [predict(model, tokenizer, p, **measure_kwargs) for p in tqdm(probes, desc="pre-edit", disable=not progress)]
    # 2. each method in turn: edit, measure, revert (also when it fails)
    runner = {"single": _single, "batch": _batch, "sequential": _sequential}[mode]
    runs, all_rows, curves = {}, [], {}
    for name, method in methods.items():
        with tqdm(total=n, desc=f"{name} ({mode})", disable=not progress) as bar:
            run = _Run(name, method, records, probes, pre, model, tokenizer, mode, measure_kwargs, split, bar)
            try:
                rows, curve = runner(run, n, batch_size=batch_size, curve_every=curve_every,
                                     curve_sample=curve_sample, bootstrap=bootstrap)
            finally:
                method.revert()  # a no-op after a clean run; restores the model after a failure
        runs[name] = (run, rows)
        all_rows += rows
        if curve:
            curves[name] = curve
    # 3. per method: means and intervals of every metric, on one resampling of the records
    names = metric_names(all_rows)
    summary = {}
    for name, (run, rows) in runs.items():
        means, intervals = summarize(rows, names + ["ms_per_edit"], bootstrap)
        means.pop("ms_per_edit")  # the summary's ms_per_edit is total apply time / edits (the same mean)
        settings = methods[name].settings() if hasattr(methods[name], "settings") else {}
        summary[name] = {"n_edits": run.n_edits, "n_refused": len(run.refused), "ms_per_edit": 1000 * run.apply_seconds / max(1, run.n_edits),
                         "ms_per_edit_interval": intervals.pop("ms_per_edit"), "metrics": means,
                         "intervals": intervals, "settings": settings}
        # means over measurements of the largest relative change of an edited matrix, and of the multiple of
        # the step that calibrated edits applied (editor.edit_margin); absent where no row has one
        for key in ("relative_update", "calibrated_scale"):
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                summary[name][key] = sum(values) / len(values)

    meta = dict(meta or {})
    provenance = {"data": meta.pop("data", None),
                  "model": meta.pop("model", None) or str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__),
                  "editor_checkpoint": meta.pop("editor_checkpoint", None), "mend_version": __version__}
    if meta:
        provenance["extra"] = meta
    settings = {"n_records": n, "max_length": max_length, "probe_kinds": kinds,
                "wild": {"template": wild_template, "max_new_tokens": wild_max_new_tokens},
                "bootstrap": {"samples": bootstrap.samples, "seed": bootstrap.seed, "confidence": bootstrap.confidence,
                              "unit": "record"}}
    if mode == "batch":
        settings["batch_size"] = batch_size
    if mode == "sequential":
        settings.update(curve_every=curve_every, curve_sample=curve_sample)
    report = EvalReport(mode, settings, provenance, summary, all_rows, curves)
    if out_dir is not None:
        write_report(report, out_dir)
    if progress:
        print(report.table())
    return report
