"""Configuration: every YAML in configs/ loads; typos, wrong types and unknown names fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from mend import ConfigError, load_config
from mend.config import GROUPS, MendConfig, TransformedFactors, default_config_dir, editor_config

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAMLS = sorted(REPO_CONFIGS.glob("**/*.yaml"))


# ---------------------------------------------------------------- the repository's configs
@pytest.mark.parametrize("path", ALL_YAMLS, ids=[str(p.relative_to(REPO_CONFIGS)) for p in ALL_YAMLS])
def test_every_yaml_in_configs_loads(path):
    """default.yaml is loaded first anyway; configs/<group>/<name>.yaml is selected with
    ``group=name``; any other YAML is a whole config passed as ``file``."""
    relative = path.relative_to(REPO_CONFIGS)
    raw = yaml.safe_load(path.read_text()) or {}
    if relative == Path("default.yaml"):
        cfg = load_config(config_dir=REPO_CONFIGS)
        sections = raw
    elif len(relative.parts) == 2 and relative.parts[0] in GROUPS:
        group = relative.parts[0]
        cfg = load_config([f"{group}={path.stem}"], config_dir=REPO_CONFIGS)
        sections = {group: raw}
    else:
        cfg = load_config(config_dir=REPO_CONFIGS, file=path)
        sections = raw
    assert isinstance(cfg, DictConfig)
    # every value in the file made it into the config, under the section it belongs to
    for section, values in sections.items():
        for key, value in (values or {}).items():
            got = cfg[section][key]
            got = got.value if isinstance(got, TransformedFactors) else got
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == value, f"{relative}: {section}.{key} is {got!r}, the file says {value!r}"


def test_the_schema_is_the_one_place_for_defaults():
    """configs/default.yaml sets no value, so a run with no options, `Editor.untrained` and
    `Editor.load` (which start from the schema) all get the same defaults."""
    assert not (yaml.safe_load((REPO_CONFIGS / "default.yaml").read_text()) or {})
    assert load_config(config_dir=REPO_CONFIGS) == OmegaConf.structured(MendConfig)
    schema = OmegaConf.structured(MendConfig)
    assert (schema.editor.rank, schema.editor.init_lr, schema.model.max_length) == (512, 0.05, 96)


def test_the_default_config_dir_is_the_repositorys(monkeypatch):
    monkeypatch.delenv("MEND_CONFIG_DIR", raising=False)
    assert default_config_dir() == REPO_CONFIGS
    monkeypatch.setenv("MEND_CONFIG_DIR", "/somewhere/else")
    assert default_config_dir() == Path("/somewhere/else")


# ---------------------------------------------------------------- schema defaults and overrides
@pytest.fixture
def config_dir(tmp_path):
    """A config directory of our own: a default.yaml and two editor choices."""
    (tmp_path / "default.yaml").write_text("editor:\n  rank: 64\ntrain:\n  max_steps: 7\n")
    (tmp_path / "editor").mkdir()
    (tmp_path / "editor" / "tiny.yaml").write_text("rank: 4\nn_blocks: 1\n")
    (tmp_path / "editor" / "ablation.yaml").write_text("transform: u_only\nshare: false\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "local.yaml").write_text("name: ./my-model\nmax_length: 32\n")
    return tmp_path


def test_no_files_gives_the_schema_defaults(tmp_path):
    cfg = load_config(config_dir=tmp_path)
    assert cfg == OmegaConf.structured(MendConfig)
    assert cfg.editor.transform == TransformedFactors.both and cfg.model.edit_params is None


def test_default_yaml_then_group_files_then_overrides(config_dir):
    cfg = load_config(config_dir=config_dir)
    assert (cfg.editor.rank, cfg.train.max_steps) == (64, 7)
    cfg = load_config(["editor=tiny", "model=local"], config_dir=config_dir)
    assert (cfg.editor.rank, cfg.editor.n_blocks, cfg.train.max_steps) == (4, 1, 7)
    assert (cfg.model.name, cfg.model.max_length) == ("./my-model", 32)
    cfg = load_config(["editor=tiny", "editor.rank=9", "train.max_steps=3"], config_dir=config_dir)
    assert (cfg.editor.rank, cfg.editor.n_blocks, cfg.train.max_steps) == (9, 1, 3)
    cfg = load_config(["editor=ablation"], config_dir=config_dir)
    assert (cfg.editor.transform, cfg.editor.share, cfg.editor.rank) == (TransformedFactors.u_only, False, 64)


def test_an_extra_file_sits_between_defaults_and_overrides(config_dir, tmp_path):
    extra = tmp_path / "experiment.yaml"
    extra.write_text("editor:\n  rank: 16\n  init_lr: 0.5\n")
    cfg = load_config(["editor.init_lr=0.25"], config_dir=config_dir, file=extra)
    assert (cfg.editor.rank, cfg.editor.init_lr, cfg.train.max_steps) == (16, 0.25, 7)


def test_override_values_are_typed(tmp_path):
    cfg = load_config(
        ["model.edit_params=[a.weight,b.weight]", "editor.init_lr=1e-3", "train.bf16=false", "eval.max_records=null"],
        config_dir=tmp_path,
    )
    assert list(cfg.model.edit_params) == ["a.weight", "b.weight"]
    assert cfg.editor.init_lr == 1e-3 and cfg.train.bf16 is False and cfg.eval.max_records is None


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "override, match",
    [
        ("editor.rnak=3", "rnak"),  # typo'd key
        ("trian.max_steps=3", "trian"),  # typo'd section
        ("editor.rank=wide", "editor.rank"),  # wrong type
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.bf16=maybe", "train.bf16"),
        ("editor.transform=sideways", "sideways"),  # not one of the enum's values
        ("editor.rank=0", "editor.rank must be >= 1, got 0"),
        ("editor.init_lr=-1", "editor.init_lr must be > 0"),
        ("model.max_length=1", "model.max_length"),
        ("train.n_edits=0", "train.n_edits"),
        ("train.loc_same_answer=1", r"train.loc_same_answer must be between 0 and train.loc_probes - 1 \(0\), got 1"),
        ("train.loc_same_answer=-1", "train.loc_same_answer must be between 0"),
        ("train.loc_prompt_weight=-1", r"train.loc_prompt_weight must be >= 0, got -1"),
        ("train.preserve_answer_weight=-1", "train.preserve_answer_weight must be >= 0"),
        ("train.preserve_answer_weight=1", "train.preserve_answer_weight needs train.preserve_records > 0"),
        ("train.edit_answer_weight=-0.5", "train.edit_answer_weight must be >= 0"),
        ("train.edit_answer_weight=1", "train.edit_answer_weight needs train.preserve_records > 0"),
        ("train.keep=final", r"train.keep must be best or last, got 'final'"),
        ("data.format=csv", "data.format"),
        ("eval.mode=parallel", "eval.mode"),
        ("eval.wild_template=no-placeholder", "eval.wild_template must contain {prompt}"),
        ("eval.wild_max_new_tokens=-1", "eval.wild_max_new_tokens"),
        ("eval.bootstrap_samples=-1", "eval.bootstrap_samples"),
        ("eval.bootstrap_confidence=1.5", "eval.bootstrap_confidence"),
        ("editor.rank", "key=value"),  # no value at all
        ("editor.rank=[1,2", "editor.rank"),  # unparsable value
        ("editor.rank=${oops", "editor.rank"),  # unparsable interpolation
    ],
)
def test_bad_overrides_raise_config_error(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([override], config_dir=tmp_path)


@pytest.mark.parametrize(
    "where, text, match",
    [
        ("default.yaml", "editor:\n  rnak: 4\n", "rnak"),
        ("default.yaml", "model:\n  max_length: long\n", "max_length"),
        ("editor/bad.yaml", "rank: 4\nshare: perhaps\n", "share"),
        ("editor/bad.yaml", "n_blcoks: 1\n", "n_blcoks"),
        ("default.yaml", "editor:\n  rank: [4\n", "default.yaml"),  # not even YAML
        ("editor/bad.yaml", "rank: 4\n  n_blocks: 1\n", "bad.yaml"),
    ],
)
def test_bad_files_raise_config_error_naming_the_file(tmp_path, where, text, match):
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text(text)
    overrides = ["editor=bad"] if where.startswith("editor/") else []
    with pytest.raises(ConfigError, match=match) as info:
        load_config(overrides, config_dir=tmp_path)
    assert Path(where).name in str(info.value)


def test_an_unknown_group_choice_lists_the_options(config_dir):
    with pytest.raises(ConfigError, match=r"no editor config named 'huge'; choose one of \['ablation', 'tiny'\]"):
        load_config(["editor=huge"], config_dir=config_dir)
    with pytest.raises(ConfigError, match="no train config named 'quick'"):
        load_config(["train=quick"], config_dir=config_dir)  # a group without any files


def test_a_missing_extra_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_dir=tmp_path, file=tmp_path / "absent.yaml")


def test_editor_config_validates_plain_dicts():
    assert editor_config() == OmegaConf.structured(MendConfig).editor
    assert editor_config({"rank": 8, "transform": "delta_only"}).transform == TransformedFactors.delta_only
    with pytest.raises(ConfigError, match="rnak"):
        editor_config({"rnak": 8})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_default_yaml_keeps_the_schemas_wild_and_bootstrap_settings():
    """configs/default.yaml spells out the evaluation defaults; they are the schema's (one definition)."""
    cfg, schema = load_config(), OmegaConf.structured(MendConfig)
    for key in ("wild_template", "wild_max_new_tokens", "bootstrap_samples", "bootstrap_seed", "bootstrap_confidence"):
        assert cfg.eval[key] == schema.eval[key], key


def test_the_counterfact_recipe_composes_its_per_matrix_editor_answer_moment_last_weights_and_margin():
    cfg = load_config(["data=counterfact", "train=counterfact-quality", "editor=per-matrix"])
    assert cfg.editor.share is False  # one network per edited matrix (docs/quality.md)
    assert cfg.train.edit_answer_weight == 0.75
    assert cfg.train.keep == "last"  # the cosine's annealed end, not the top validation
    assert cfg.editor.edit_margin == 8.0 and cfg.editor.edit_max_scale == 1.0  # edits shrunk to a margin of 8
    assert load_config(["editor=cpu"]).editor.share is True  # the shared editor stays the default elsewhere
