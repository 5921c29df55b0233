"""The ``mend`` command line: every command has help, errors are one line on stderr with exit code 1
(a traceback only with --debug), and train -> edit -> eval runs end to end on a tiny Llama saved in
Hugging Face format with a real fast tokenizer."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mend.checkpoint import CheckpointError
from mend.cli import main
from mend.data import DataError
from tiny_models import FACTS, save_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "edit", "eval", "demo"]


def knowedit_records(facts=FACTS) -> list[dict]:
    """KnowEdit-format JSON records for ``facts``, each with a paraphrase and one locality probe."""
    return [
        {"case_id": str(i), "subject": prompt.split()[-1], "prompt": prompt, "target_new": target,
         "rephrase_prompt": "Q: " + prompt,
         "locality": {"neighborhood": [{"prompt": f"Number {i} is", "ground_truth": "odd" if i % 2 else "even"}]}}
        for i, (prompt, target) in enumerate(facts)
    ]


def run_cli(*argv) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 1, no traceback, and the error as one ``mend: error: ...`` line at the end of stderr
    (after whatever progress bars transformers drew while loading), containing every fragment."""
    assert code == 1
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("mend: error: ") == 1, err
    line = err.splitlines()[-1]
    assert line.startswith("mend: error: "), f"the error is not one line:\n{err}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer, saved in Hugging Face format."""
    return save_tiny_hf_model(workdir / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def data_file(workdir) -> Path:
    path = workdir / "facts.json"
    path.write_text(json.dumps(knowedit_records()))
    return path


@pytest.fixture(scope="module")
def trained(workdir, model_dir, data_file):
    """``mend train`` on the tiny model: (exit code, stdout, run directory)."""
    out_dir = workdir / "run"
    code, out, _ = run_cli(
        "train", f"model.name={model_dir}", f"data.train_path={data_file}", f"data.val_path={data_file}",
        "data.max_train_records=6", "train.max_steps=4", "train.val_every=2", "train.val_records=4",
        "train.batch_size=2", "editor.rank=8", "model.device=cpu", "train.progress=false", f"train.out_dir={out_dir}",
        f"train.prefix_cache_dir={workdir / 'prefix'}",
    )
    return code, out, out_dir


# ----------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mend")
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: mend {command}" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: mend" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("mend") or str(Path(sys.executable).parent / "mend")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: mend" in done.stdout


def test_train_script_is_a_thin_wrapper_of_mend_train():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: mend train" in done.stdout


# ----------------------------------------------------------------------------- errors


def test_missing_data_file_is_one_line(model_dir):
    code, _, err = run_cli("eval", "--data", "/nonexistent.json", "--methods", "none", "--model", model_dir)
    assert_one_line_error(code, err, "DataError", "/nonexistent.json", "does not exist")


def test_unknown_data_format_is_one_line(tmp_path, model_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Who?", "answer": "Me"}]))
    code, _, err = run_cli("eval", "--data", bad, "--methods", "none", "--model", model_dir)
    assert_one_line_error(code, err, "cannot tell the format", "question")


def test_debug_shows_the_exception(model_dir):
    with pytest.raises(DataError, match="does not exist"):
        main(["--debug", "eval", "--data", "/nonexistent.json", "--methods", "none", "--model", str(model_dir)])


def test_bad_override_is_one_line(tmp_path):
    code, _, err = run_cli("train", "train.max_stepz=3", f"train.out_dir={tmp_path}")
    assert_one_line_error(code, err, "ConfigError", "max_stepz")


def test_edit_with_a_directory_that_is_not_a_checkpoint(tmp_path):
    code, _, err = run_cli("edit", "--editor", tmp_path, "The sky is", "green")
    assert_one_line_error(code, err, "CheckpointError", "editor.yaml")
    code, _, err = run_cli("edit", "--editor", tmp_path / "absent", "The sky is", "green")
    assert_one_line_error(code, err, "CheckpointError", "is not a directory")


def test_unknown_method_names_the_valid_ones(data_file, model_dir):
    code, _, err = run_cli("eval", "--data", data_file, "--methods", "none,rome", "--model", model_dir, "--limit", "1",
                           "--out", data_file.parent / "unused")
    line = assert_one_line_error(code, err, "'rome'")
    for valid in ("none", "mend", "ft", "ft-l"):
        assert valid in line


def test_mend_method_without_editor_is_one_line(data_file, model_dir):
    code, _, err = run_cli("eval", "--data", data_file, "--methods", "none,mend", "--model", model_dir)
    assert_one_line_error(code, err, "--editor")


# ----------------------------------------------------------------------------- train, edit, eval


def workdir_of(run_dir):
    return run_dir.parent


def test_train_writes_the_best_editor(trained):
    code, out, run_dir = trained
    assert code == 0
    first, rest = out.split("\n", 1)
    assert first.startswith("prefix cache: ") and str(workdir_of(run_dir) / "prefix") in first
    assert rest.startswith("trained 4 steps (0 skipped)")
    assert str(run_dir / "best") in out
    assert (run_dir / "best" / "editor.safetensors").is_file()
    assert (run_dir / "best" / "editor.yaml").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.jsonl").is_file()
    meta = yaml.safe_load((run_dir / "best" / "editor.yaml").read_text())
    assert meta["model"]["identity"]["name_or_path"] == str(trained[2].parent / "tiny-llama")
    assert meta["editor"]["rank"] == 8


def test_edit_prints_before_after_and_time(trained):
    _, _, run_dir = trained
    code, out, err = run_cli("edit", "--editor", run_dir / "best", "--max-new-tokens", "4", "The sky is", "green")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "prompt: The sky is"
    assert lines[1].startswith("before: ")
    assert lines[2].startswith("after:  ")
    assert lines[3].startswith("edit took ") and " ms; changed " in lines[3]
    assert lines[3].endswith("9 matrices")  # gate/up/down of the last 3 of 4 blocks


def test_eval_writes_summary_and_edits(trained, data_file):
    _, _, run_dir = trained
    out_dir = run_dir.parent / "eval"
    code, out, err = run_cli("eval", "--editor", run_dir / "best", "--data", data_file, "--methods", "none,mend,ft",
                             "--limit", "3", "--out", out_dir)
    assert code == 0, err
    assert "summary.json" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["mode"] == "single"
    assert summary["data"] == str(data_file)
    assert summary["editor_checkpoint"] == str(run_dir / "best")
    assert set(summary["methods"]) == {"none", "mend", "ft"}
    assert all(m["n_edits"] == 3 for m in summary["methods"].values())
    rows = [json.loads(line) for line in (out_dir / "edits.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3  # 3 records x 3 methods
    assert {row["method"] for row in rows} == {"none", "mend", "ft"}


def test_eval_on_knowedit_reports_every_measure_per_probe_kind_and_compares(workdir, model_dir):
    """KnowEdit end to end: portability and locality per probe kind, WILD, CounterFact's scores,
    the locality ceiling and intervals in one table; then --compare on two runs."""
    records = knowedit_records()
    for i, record in enumerate(records):
        record["ground_truth"] = ["blue", ["Lyon", "Lyons"]][i % 2]
        record["locality"]["unrelated"] = [{"prompt": "Water is", "ground_truth": "wet"}]
        record["portability"] = {"Reasoning": [{"prompt": "Its colour is", "ground_truth": record["target_new"]}],
                                 "Subject_Aliasing": [{"prompt": "Q: " + record["prompt"], "ground_truth": record["target_new"]}]}
    data = workdir / "knowedit.json"
    data.write_text(json.dumps(records))
    outs = [workdir / "ke-a", workdir / "ke-b"]
    for out, limit in zip(outs, ("3", "4")):
        code, stdout, err = run_cli("eval", "--data", data, "--methods", "none,ft", "--model", model_dir, "--limit", limit,
                                    "--out", out, "--bootstrap-samples", "50", "--wild-max-new-tokens", "4",
                                    "eval.ft_steps=2")
        assert code == 0, err
    for name in ("portability[Reasoning]_tf_acc", "portability[Subject_Aliasing]_wild_em", "locality[unrelated]_gen",
                 "locality_ceiling_tf_acc", "reliability_wild_contains", "efficacy_score", "neighborhood_magnitude"):
        assert f"\n{name} " in stdout, name
    assert "95% bootstrap interval" in stdout
    summary = json.loads((outs[1] / "summary.json").read_text())
    assert summary["settings"]["wild"]["max_new_tokens"] == 4 and summary["settings"]["bootstrap"]["samples"] == 50
    code, stdout, err = run_cli("eval", "--compare", *outs, "--bootstrap-samples", "50")
    assert code == 0, err
    assert stdout.startswith("B - A") and "none: unpaired" in stdout  # 3 vs 4 records
    assert "\nreliability_tf_acc " in stdout and "n.s." in stdout  # none vs none: no difference


def test_eval_without_data_or_compare_is_one_line():
    code, _, err = run_cli("eval", "--methods", "none")
    assert_one_line_error(code, err, "needs --data FILE")


def test_editor_for_another_model_is_refused(trained, workdir, tmp_path):
    """A checkpoint whose base model (by name) turns out to have other weights is refused, in one line."""
    _, _, run_dir = trained
    other = save_tiny_hf_model(workdir / "tiny-llama-other", "llama", seed=1)
    checkpoint = tmp_path / "moved"
    shutil.copytree(run_dir / "best", checkpoint)
    meta = yaml.safe_load((checkpoint / "editor.yaml").read_text())
    meta["model"]["identity"]["name_or_path"] = str(other)
    (checkpoint / "editor.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    code, _, err = run_cli("edit", "--editor", checkpoint, "The sky is", "green")
    assert_one_line_error(code, err, "CheckpointError", "trained for another base model")
    with pytest.raises(CheckpointError, match="weights differ"):
        main(["--debug", "edit", "--editor", str(checkpoint), "The sky is", "green"])


def test_eval_applies_the_editors_edit_time_settings_and_refuses_other_editor_keys(trained, data_file):
    _, _, run_dir = trained
    out_dir = run_dir.parent / "eval-settings"
    code, out, err = run_cli("eval", "--editor", run_dir / "best", "--data", data_file, "--methods", "mend",
                             "--limit", "1", "--out", out_dir, "editor.memory_weight=7.5", "editor.solve_keys=predictions")
    assert code == 0, err
    editor = json.loads((out_dir / "summary.json").read_text())["methods"]["mend"]["settings"]["editor"]
    assert editor["memory_weight"] == 7.5 and editor["solve_keys"] == "predictions"
    code, _, err = run_cli("eval", "--editor", run_dir / "best", "--data", data_file, "--methods", "mend",
                           "--limit", "1", "--out", out_dir, "editor.rank=8")
    assert_one_line_error(code, err, "editor.rank=8", "edit-time")


def test_demo_leaves_wild_answers_out_unless_asked():
    from mend.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).wild is False
    assert parser.parse_args(["demo", "--wild"]).wild is True
