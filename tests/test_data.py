"""mend.data: the benchmark loaders, split_records, and the project's own fact set (data/facts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mend.data import DataError, EditRecord, Probe, load_records, split_records

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # real benchmarks, kept beside the checkout
FACTS = REPO / "data" / "facts"

COUNTERFACT = {
    "case_id": 7, "prompt": "Toko Yasuda, the", "target_new": "piano", "ground_truth": "guitar",
    "subject": "Toko Yasuda", "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar",
}
ZSRE = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniforms", "x"],
    "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
KNOWEDIT = {
    "subject": "Lake Varn", "prompt": "Which country is Lake Varn located in?", "target_new": "Chile",
    "ground_truth": [["Norway", "Kingdom of Norway"]], "rephrase_prompt": "Lake Varn lies in which country?",
    "locality": {"Relation_Specificity": [{"prompt": "The surface area of Lake Varn is", "ground_truth": ["12 km2"]}]},
    "portability": {
        "Reasoning": [{"prompt": "The official language spoken around Lake Varn is", "ground_truth": "Spanish"}],
        "Subject_Aliasing": [{"prompt": "Which country is Varn Lake located in?", "ground_truth": [["Chile"]]}],
    },
}

EXPECTED = {
    "counterfact": EditRecord(
        case_id="7", prompt="Toko Yasuda, the", target="piano", ground_truth="guitar", subject="Toko Yasuda",
        rephrases=("Toko Yasuda is incredible at",),
        locality=(Probe("John Lennon performs on the", "guitar", "neighborhood"),),
    ),
    "zsre": EditRecord(
        case_id="0", prompt="What is the product made by UniFirst?", target="unmanned aircraft",
        ground_truth="uniforms", subject="UniFirst", rephrases=("What will be the product of UniFirst?",),
        locality=(Probe("who plays the cat in the hat movie", "Mike Myers", "nq"),),
    ),
    "knowedit": EditRecord(
        case_id="0", prompt="Which country is Lake Varn located in?", target="Chile", ground_truth="Norway",
        subject="Lake Varn", rephrases=("Lake Varn lies in which country?",),
        locality=(Probe("The surface area of Lake Varn is", "12 km2", "Relation_Specificity"),),
        portability=(
            Probe("The official language spoken around Lake Varn is", "Spanish", "Reasoning"),
            Probe("Which country is Varn Lake located in?", "Chile", "Subject_Aliasing"),
        ),
    ),
}
RAW = {"counterfact": COUNTERFACT, "zsre": ZSRE, "knowedit": KNOWEDIT}
REQUIRED = {"counterfact": "target_new", "zsre": "alt", "knowedit": "prompt"}


def write(path: Path, records: list[dict], lines: bool = False) -> Path:
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def with_field(record: dict, field: str, value) -> dict:
    out = dict(record)
    if value is ...:
        del out[field]
    else:
        out[field] = value
    return out


# ----------------------------------------------------------------------------- every format


@pytest.mark.parametrize("fmt", list(RAW))
@pytest.mark.parametrize("given", ["auto", "explicit"])
def test_each_format_maps_fields(tmp_path, fmt, given):
    path = write(tmp_path / "d.json", [RAW[fmt]])
    records = load_records(path, "auto" if given == "auto" else fmt)
    assert records == [EXPECTED[fmt]]


@pytest.mark.parametrize("fmt", list(RAW))
def test_jsonl_reads_like_json(tmp_path, fmt):
    rows = [RAW[fmt], RAW[fmt]]
    assert load_records(write(tmp_path / "d.jsonl", rows, lines=True)) == load_records(write(tmp_path / "d.json", rows))


@pytest.mark.parametrize("fmt", list(RAW))
def test_missing_or_empty_required_field_names_file_index_and_field(tmp_path, fmt):
    field = REQUIRED[fmt]
    for bad in (..., "", "   ", None):
        rows = [RAW[fmt], RAW[fmt], with_field(RAW[fmt], field, bad), RAW[fmt]]
        path = write(tmp_path / "x.json", rows)
        with pytest.raises(DataError, match=rf"^{path} record 2: field '{field}' is missing or empty"):
            load_records(path, fmt)


@pytest.mark.parametrize("fmt", list(RAW))
def test_on_invalid_skip_drops_bad_records(tmp_path, fmt, caplog):
    rows = [RAW[fmt], with_field(RAW[fmt], REQUIRED[fmt], ""), RAW[fmt]]
    records = load_records(write(tmp_path / "x.json", rows), fmt, on_invalid="skip")
    assert len(records) == 2 and [r.case_id for r in records][-1] in ("2", "7")
    assert "skipped 1 invalid record" in caplog.text


def test_limit_returns_the_first_records(tmp_path):
    rows = [dict(COUNTERFACT, case_id=i) for i in range(5)]
    path = write(tmp_path / "cf.json", rows)
    assert [r.case_id for r in load_records(path, limit=3)] == ["0", "1", "2"]
    assert load_records(path, limit=0) == []
    with pytest.raises(DataError, match="limit"):
        load_records(path, limit=-1)


# ----------------------------------------------------------------------------- format details


def test_counterfact_case_id_falls_back_to_index(tmp_path):
    rows = [with_field(COUNTERFACT, "case_id", ...)] * 2
    assert [r.case_id for r in load_records(write(tmp_path / "cf.json", rows))] == ["0", "1"]


def test_zsre_strips_nq_prefix_and_falls_back_to_pred(tmp_path):
    rows = [ZSRE, with_field(ZSRE, "answers", []), with_field(ZSRE, "loc", "plain question")]
    a, b, c = load_records(write(tmp_path / "z.json", rows))
    assert a.locality[0].prompt == "who plays the cat in the hat movie"
    assert (a.ground_truth, b.ground_truth) == ("uniforms", "uniform")
    assert c.locality[0].prompt == "plain question"
    assert [r.case_id for r in (a, b, c)] == ["0", "1", "2"]


@pytest.mark.parametrize("truth", ["Norway", ["Norway", "Noreg"], [["Norway", "Noreg"], ["Sweden"]]])
def test_knowedit_ground_truth_shapes_normalise_to_first_alias(tmp_path, truth):
    (record,) = load_records(write(tmp_path / "k.json", [with_field(KNOWEDIT, "ground_truth", truth)]))
    assert record.ground_truth == "Norway"


def test_knowedit_optional_parts(tmp_path):
    bare = {k: KNOWEDIT[k] for k in ("subject", "prompt", "target_new")}
    probes = {"A": [{"prompt": "p", "ground_truth": "a"}], "B": []}
    listed = dict(bare, rephrase_prompt=["One?", "Two?"], locality=probes)
    first, second = load_records(write(tmp_path / "k.json", [bare, listed]), "knowedit")
    assert (first.ground_truth, first.rephrases, first.locality, first.portability) == ("", (), (), ())
    assert second.rephrases == ("One?", "Two?")
    assert second.locality == (Probe("p", "a", "A"),)


def test_knowedit_bad_probe_is_named(tmp_path):
    row = dict(KNOWEDIT, portability={"Reasoning": [{"prompt": "ok", "ground_truth": ""}]})
    path = write(tmp_path / "k.json", [KNOWEDIT, row])
    with pytest.raises(DataError, match=r"record 1: field 'portability.Reasoning\[0\].ground_truth'"):
        load_records(path)


def test_wrong_type_is_reported(tmp_path):
    path = write(tmp_path / "cf.json", [COUNTERFACT, dict(COUNTERFACT, target_new=3)])
    with pytest.raises(DataError, match=r"record 1: field 'target_new' must be a string, got int"):
        load_records(path)


# ----------------------------------------------------------------------------- file-level errors


def test_file_level_errors(tmp_path):
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("not json at all\n")
    with pytest.raises(DataError, match=r"bad.json .*not valid JSON"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.json")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "d.csv")
    path = write(tmp_path / "cf.json", [COUNTERFACT])
    with pytest.raises(DataError, match="unknown data format 'rome'"):
        load_records(path, "rome")


def test_auto_detection_failure_names_the_fields_seen(tmp_path):
    path = write(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot tell the format of .*odd.json.*\['answer', 'question'\]"):
        load_records(path)


# ----------------------------------------------------------------------------- split_records


def test_split_records_keeps_subjects_apart_and_is_seeded():
    records = [EditRecord(str(i), "p", "t", subject=f"s{i % 10}") for i in range(40)]
    train, val = split_records(records, 0.2, seed=1)
    assert len(train) + len(val) == 40 and len(val) == 8
    assert not {r.subject for r in train} & {r.subject for r in val}
    assert split_records(records, 0.2, seed=1) == (train, val)
    assert [r.case_id for r in train] == sorted((r.case_id for r in train), key=int)  # input order kept
    with pytest.raises(ValueError, match="val_fraction"):
        split_records(records, 1.0)


# ----------------------------------------------------------------------------- real benchmark files

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real benchmark files not found at {SHARED}")


@needs_shared
@pytest.mark.parametrize("name, n", [("counterfact/train.json", 10_000), ("counterfact/val.json", 1_919)])
def test_real_counterfact_loads(name, n):
    records = load_records(SHARED / name)
    assert len(records) == n
    r = records[0]
    assert r.prompt and r.target and r.ground_truth and r.subject and len(r.rephrases) == 1
    assert r.locality[0].kind == "neighborhood" and r.locality[0].answer


@needs_shared
def test_real_zsre_loads_and_reports_its_two_empty_edits():
    path = SHARED / "zsre" / "train-1k.json"
    with pytest.raises(DataError, match=r"record 534: field 'alt' is missing or empty"):
        load_records(path)
    records = load_records(path, on_invalid="skip")
    assert len(records) == 998
    assert not any(p.prompt.startswith("nq question:") for r in records for p in r.locality)
    assert len(load_records(path, limit=500)) == 500


# ----------------------------------------------------------------------------- the project's fact set


@pytest.fixture(scope="module")
def make_facts():
    spec = importlib.util.spec_from_file_location("make_facts", REPO / "scripts" / "make_facts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_fact_set_loads_with_disjoint_subjects():
    train, val = load_records(FACTS / "train.json"), load_records(FACTS / "val.json")
    assert len(train) > 500 and len(val) > 100
    assert not {r.subject for r in train} & {r.subject for r in val}
    for r in train + val:
        assert r.target != r.ground_truth and len(r.rephrases) == 3
        assert [p.kind for p in r.locality] == ["neighborhood", "unrelated"]
        assert all(p.answer for p in r.locality + r.portability)
        assert r.subject in r.prompt and all(r.subject in p for p in r.rephrases)


def test_make_facts_is_deterministic_and_matches_the_committed_files(make_facts):
    first, second = make_facts.build_facts(), make_facts.build_facts()
    assert first == second
    for name, records in first.items():
        assert (FACTS / f"{name}.json").read_text(encoding="utf-8") == make_facts.dumps(records), (
            f"data/facts/{name}.json is stale: run python scripts/make_facts.py"
        )
    assert make_facts.build_facts(seed=1) != first
