"""Read knowledge-editing benchmarks (CounterFact, zsRE, KnowEdit) into ``EditRecord``s.

    records = load_records("../shared/data/counterfact/train.json")          # format detected by fields
    records = load_records("data/facts/val.json", "knowedit", limit=100)
    train, val = split_records(records, val_fraction=0.1, seed=0)

Files are JSON lists (``.json``) or JSON lines (``.jsonl``), read into an Arrow table by Hugging Face
``datasets`` (``Dataset.from_json``, a private temporary cache, nothing fetched from the network). The
table's columns decide the format when ``format="auto"``; each row is then checked and mapped:

- counterfact: prompt -> target_new; rephrases (rephrase_prompt,); locality
  locality_prompt -> locality_ground_truth, kind "neighborhood".
- zsre: src -> alt, ground truth answers[0] (else pred); rephrases (rephrase,); locality
  loc without its "nq question: " prefix -> loc_ans, kind "nq".
- knowedit: prompt -> target_new; rephrase_prompt (optional; a string or a list); locality and
  portability {kind: [{prompt, ground_truth}]}, each probe keeping its kind; every answer
  (string, list, or list of alias lists) becomes its first alias.

A record whose required field is missing or empty raises ``DataError`` naming the file, the record's
0-based index and the field; ``on_invalid="skip"`` drops such records instead (with one warning).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from .records import EditRecord, Probe

log = logging.getLogger(__name__)

Format = Literal["auto", "counterfact", "zsre", "knowedit"]
OnInvalid = Literal["raise", "skip"]

ZSRE_LOC_PREFIX = "nq question: "
SUFFIXES = (".json", ".jsonl")

# Fields that identify each format, tried in this order by format="auto" (KnowEdit's pair is a
# subset of CounterFact's, so CounterFact must come first).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "zsre": ("src", "alt", "loc"),
    "counterfact": ("prompt", "target_new", "locality_prompt"),
    "knowedit": ("prompt", "target_new"),
}


class DataError(ValueError):
    """A data file that cannot be read as edit records; the message names file, record and field."""


# ----------------------------------------------------------------------------- field checks


class _Row:
    """One raw record plus where it came from, so every complaint names file, index and field."""

    def __init__(self, row: Mapping[str, Any], path: str, index: int):
        self.row, self.path, self.index = row, path, index

    def error(self, field: str, problem: str = "is missing or empty") -> DataError:
        return DataError(f"{self.path} record {self.index}: field '{field}' {problem}")

    def text(self, field: str, *, required: bool = True) -> str:
        """A string field; '' when optional and absent."""
        value = self.row.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise self.error(field)
            return ""
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__} {value!r:.60}")
        return value

    def answer(self, value: Any, field: str, *, required: bool = True) -> str:
        """An answer given as a string, a list of strings or a list of alias lists -> its first alias."""
        first = value
        while isinstance(first, list) and first:
            first = first[0]
        if first is None or first == [] or (isinstance(first, str) and not first.strip()):
            if required:
                raise self.error(field)
            return ""
        if not isinstance(first, str):
            raise self.error(field, f"must be a string or a list of strings, got {value!r:.60}")
        return first

    def case_id(self) -> str:
        value = self.row.get("case_id")
        return str(self.index) if value is None or value == "" else str(value)


# ----------------------------------------------------------------------------- one mapping per format


def _from_counterfact(r: _Row) -> EditRecord:
    return EditRecord(
        case_id=r.case_id(),
        prompt=r.text("prompt"),
        target=r.text("target_new"),
        ground_truth=r.text("ground_truth"),
        subject=r.text("subject"),
        rephrases=(r.text("rephrase_prompt"),),
        locality=(Probe(r.text("locality_prompt"), r.text("locality_ground_truth"), "neighborhood"),),
    )


def _from_zsre(r: _Row) -> EditRecord:
    answers = r.row.get("answers")
    if answers:
        ground_truth = r.answer(answers, "answers")
    else:
        ground_truth = r.text("pred", required=False)
        if not ground_truth:
            raise r.error("answers", "is missing or empty (and so is 'pred')")
    loc = r.text("loc")
    loc = loc[len(ZSRE_LOC_PREFIX) :] if loc.startswith(ZSRE_LOC_PREFIX) else loc
    if not loc.strip():
        raise r.error("loc", "holds only the 'nq question: ' prefix")
    return EditRecord(
        case_id=r.case_id(),
        prompt=r.text("src"),
        target=r.text("alt"),
        ground_truth=ground_truth,
        subject=r.text("subject"),
        rephrases=(r.text("rephrase"),),
        locality=(Probe(loc, r.text("loc_ans"), "nq"),),
    )


def _probes(r: _Row, field: str) -> tuple[Probe, ...]:
    """KnowEdit ``{kind: [{prompt, ground_truth}, ...]}`` -> Probes carrying their kind.

    Arrow unions struct fields over the whole file, so a kind absent from this record arrives as None.
    """
    groups = r.row.get(field)
    if groups is None:
        return ()
    if not isinstance(groups, Mapping):
        raise r.error(field, f"must map a probe kind to a list of {{prompt, ground_truth}}, got {groups!r:.60}")
    probes = []
    for kind, items in groups.items():
        if items is None:
            continue
        for j, item in enumerate([items] if isinstance(items, Mapping) else items):
            where = f"{field}.{kind}[{j}]"
            if not isinstance(item, Mapping):
                raise r.error(where, f"must be an object with prompt and ground_truth, got {item!r:.60}")
            prompt = item.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise r.error(f"{where}.prompt", "is missing, empty or not a string")
            probes.append(Probe(prompt, r.answer(item.get("ground_truth"), f"{where}.ground_truth"), str(kind)))
    return tuple(probes)


def _from_knowedit(r: _Row) -> EditRecord:
    rephrase = r.row.get("rephrase_prompt")
    if isinstance(rephrase, list):  # our own fact set keeps several paraphrases; upstream has one string
        rephrases = tuple(r.answer([p], f"rephrase_prompt[{j}]") for j, p in enumerate(rephrase))
    else:
        rephrases = tuple(p for p in (r.text("rephrase_prompt", required=False),) if p)
    return EditRecord(
        case_id=r.case_id(),
        prompt=r.text("prompt"),
        target=r.answer(r.row.get("target_new"), "target_new"),
        # optional: KnowEdit's recent-knowledge sets insert facts that had no earlier answer
        ground_truth=r.answer(r.row.get("ground_truth"), "ground_truth", required=False),
        subject=r.text("subject"),
        rephrases=rephrases,
        locality=_probes(r, "locality"),
        portability=_probes(r, "portability"),
    )


CONVERTERS: dict[str, Callable[[_Row], EditRecord]] = {
    "counterfact": _from_counterfact,
    "zsre": _from_zsre,
    "knowedit": _from_knowedit,
}


# ----------------------------------------------------------------------------- reading


@contextmanager
def _quiet_progress_bars():
    """Hide datasets' "Generating train split" bar for one read, then restore the caller's setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _diagnose(path: Path) -> str:
    """Why a file that datasets could not read is not a list of records (error path only)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return "the file is empty"
    try:
        docs = [json.loads(text)]
    except json.JSONDecodeError as e:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            docs = [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            return f"not valid JSON or JSON lines: {e.msg} at line {e.lineno} column {e.colno}"
    if len(docs) == 1 and isinstance(docs[0], list):
        docs = docs[0]
    if not docs:
        return "it holds no records"
    bad = next((d for d in docs if not isinstance(d, dict)), None)
    if bad is not None:
        return f"records must be JSON objects, found {type(bad).__name__} {bad!r:.60}"
    return "datasets could not build a table from it"


def _read_table(path: Path, shown: str):
    """The file as a ``datasets.Dataset`` (raw columns), read offline through a throwaway cache."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="mend-data-") as cache, _quiet_progress_bars():
        try:
            return datasets.Dataset.from_json(str(path), cache_dir=cache, keep_in_memory=True)
        except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration, UnicodeDecodeError) as e:
            raise DataError(
                f"{shown} cannot be read as a JSON list or JSON lines of records: {_diagnose(path)}"
            ) from e


def detect_format(fields: Iterable[str], path: str = "data") -> str:
    """The format whose identifying fields (``SIGNATURES``) are all among ``fields``."""
    present = set(fields)
    for name, needed in SIGNATURES.items():
        if present.issuperset(needed):
            return name
    expected = "; ".join(f"{name}: {', '.join(needed)}" for name, needed in SIGNATURES.items())
    raise DataError(
        f"cannot tell the format of {path}: its records have fields {sorted(present)}, "
        f"but each format needs these ({expected}). Fix the file or pass format= explicitly."
    )


def load_records(
    path: str | os.PathLike,
    format: Format = "auto",
    *,
    limit: int | None = None,
    on_invalid: OnInvalid = "raise",
) -> list[EditRecord]:
    """Read an editing benchmark file into ``EditRecord``s, in file order.

    Args:
        path: a ``.json`` file holding a list of records, or a ``.jsonl`` file with one per line.
        format: "counterfact", "zsre", "knowedit", or "auto" to decide from the fields present.
        limit: return at most this many records (the first ones); None for all.
        on_invalid: "raise" a ``DataError`` at the first record with a missing, empty or ill-typed
            required field, or "skip" such records (logging one warning with the count).

    Raises:
        DataError: missing file, unsupported suffix, unreadable JSON, unknown or undetectable format,
            or (on_invalid="raise") an invalid record; the message names file, record index and field.
    """
    shown = str(path)
    if format != "auto" and format not in CONVERTERS:
        raise DataError(f"unknown data format {format!r} for {shown}; use one of auto, {', '.join(CONVERTERS)}")
    if on_invalid not in ("raise", "skip"):
        raise DataError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {shown} does not exist (resolved to {file.resolve()}); check the path")
    if file.suffix.lower() not in SUFFIXES:
        raise DataError(f"{shown}: unsupported file type {file.suffix!r}; expected a .json list or .jsonl lines")
    if limit == 0:
        return []

    table = _read_table(file, shown)
    convert = CONVERTERS[detect_format(table.column_names, shown) if format == "auto" else format]
    records: list[EditRecord] = []
    skipped: list[str] = []
    for index, row in enumerate(table):
        try:
            records.append(convert(_Row(row, shown, index)))
        except DataError as e:
            if on_invalid == "raise":
                raise DataError(f"{e} (pass on_invalid='skip' to drop invalid records)") from None
            skipped.append(str(e))
        if limit is not None and len(records) >= limit:
            break
    if skipped:
        log.warning("skipped %d invalid record(s) in %s, first: %s", len(skipped), shown, skipped[0])
    return records


def split_records(
    records: Sequence[EditRecord], val_fraction: float, seed: int = 0
) -> tuple[list[EditRecord], list[EditRecord]]:
    """Split records into (train, val) with no subject on both sides; both keep the input order.

    Records are grouped by ``subject`` (by ``case_id`` when a record has none), the groups are
    shuffled with ``seed``, and whole groups go to val until it holds about ``val_fraction`` of the
    records (at least one group).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.subject or f"case:{r.case_id}", []).append(i)
    if len(groups) < 2:
        raise ValueError(f"cannot split {len(records)} record(s) with {len(groups)} subject(s) into train and val")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    want = max(1, round(val_fraction * len(records)))
    val_index: set[int] = set()
    for key in keys[:-1]:  # the last group always stays in train
        if len(val_index) >= want:
            break
        val_index.update(groups[key])
    train = [r for i, r in enumerate(records) if i not in val_index]
    val = [r for i, r in enumerate(records) if i in val_index]
    return train, val
