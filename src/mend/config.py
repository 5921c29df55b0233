"""Configuration schema (dataclasses) and loading (YAML files + dotlist overrides).

The schema below is the one place default values live: the command line (``configs/default.yaml``
sets none of them) and the library's entry points (``Editor.untrained``, ``Editor.load``) all start from
it. ``configs/<group>/*.yaml`` are named choices that override some keys. A typo or a wrong type in a
file or an override fails at start-up with the offending key.

Loading order: the schema defaults, then ``configs/default.yaml``, then for each group
(``model``, ``data``, ``editor``, ``train``, ``eval``) selected by name (``model=smollm2-135m``) the file
``configs/<group>/<name>.yaml``, then the remaining dotlist overrides (``train.max_steps=200``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .bootstrap import DEFAULT_CONFIDENCE
from .stages import check_stages
from .bootstrap import DEFAULT_SAMPLES as DEFAULT_BOOTSTRAP_SAMPLES
from .wild import DEFAULT_MAX_NEW_TOKENS as DEFAULT_WILD_MAX_NEW_TOKENS
from .wild import DEFAULT_TEMPLATE as DEFAULT_WILD_TEMPLATE
from .wild import PLACEHOLDER as WILD_PLACEHOLDER

GROUPS = ("model", "data", "editor", "train", "eval")


class TransformedFactors(str, Enum):
    """Which factor of the rank-1 gradient the editor network transforms (MEND ablations)."""

    both = "both"  # u and delta (the method)
    u_only = "u_only"  # only the layer inputs; delta passes through
    delta_only = "delta_only"  # only the output gradients; u passes through


class PrefixCacheMode(str, Enum):
    """Where meta-training keeps the hidden states entering the lowest edited block (`mend.prefix_cache`)."""

    auto = "auto"  # in memory when they fit in half of the available memory, else memory-mapped from disk
    memory = "memory"  # in memory; a run that would not fit is refused before it starts
    disk = "disk"  # memory-mapped from the cache file
    none = "none"  # no cache: every step runs the full model


class Aggregation(str, Enum):
    """How the facts of one edit become one update per matrix (`mend.aggregate`)."""

    ridge = "ridge"  # one ridge least-squares solve over every fact's keys and value shifts (MALMEN)
    sum = "sum"  # the MEND paper: the sum of every fact's rank-1 updates


class Modulation(str, Enum):
    """Where each residual block of an editor network applies its per-matrix scale and shift."""

    bottleneck = "bottleneck"  # on the low-rank hidden units, before the ReLU: h + B relu(s_m * (A h) + o_m)
    output = "output"  # on the block's full-width output, as in the MEND paper's eq. 3: h + s_m * B relu(A h) + o_m


class MemorySolve(str, Enum):
    """How a lifelong editor's next solve uses the edits it remembers (`mend.memory`)."""

    # recursive least squares: the edits so far and the new one are fitted together, as if all had been
    # one `edit_many`; the new update is the change of that joint fit (the default)
    refit = "refit"
    # the new update is pushed to leave the outputs at earlier edits' raw inputs unchanged (a penalty)
    hold = "hold"


class SolveKeys(str, Enum):
    """Which captured positions a ridge solve fits (`mend.aggregate`) and a lifelong editor remembers."""

    all = "all"  # every position with a gradient: each fact's update is reproduced at all its positions
    predictions = "predictions"  # only the positions that predict a target token (the loss positions)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # "smollm2-135m" (embedded), a hub id or a local directory
    dtype: str = "float32"
    device: str = "auto"  # "cpu", "cuda", "cuda:1" or "auto" (cuda when available)
    edit_params: Optional[List[str]] = None  # explicit parameter names; null = MLP of last blocks
    edit_last_n_blocks: int = 3  # used when edit_params is null (Llama: gate/up/down of each block)
    max_length: int = 96  # longest prompt + target, in tokens


@dataclass
class EditorConfig:
    # Low-rank width of each residual block, capped at d_in + d_out. The MEND paper uses 1920
    # (editor=paper); 512 has about 4x fewer editor parameters and a cheaper step on CPU.
    rank: int = 512
    n_blocks: int = 2  # residual low-rank MLP blocks per editor network
    # Where a block's per-matrix scale and shift act: on its rank-wide hidden units (bottleneck) or on its
    # full-width output (output, the paper's eq. 3). Either way an untrained network is the identity.
    modulation: Modulation = Modulation.bottleneck
    # Initial per-matrix edit step size lr_l; an untrained editor's edit is one gradient step of this
    # size. SmolLM2-135M needs a step this large to move at all; the paper's 1e-4 barely changes it.
    init_lr: float = 0.05
    transform: TransformedFactors = TransformedFactors.both
    share: bool = True  # one network per weight shape (False: one per edited matrix)
    normalize: bool = True  # standardise u and delta by running statistics
    aggregation: Aggregation = Aggregation.ridge  # how the facts of one edit_many become one update per matrix
    # Which positions' keys the ridge solve fits: all captured positions, or only those that predict a
    # target token. `predictions` asks each fact's update to act only where its loss is (smaller, and
    # leaves the shared template tokens of many facts out of a batch's or a lifelong memory's solve).
    solve_keys: SolveKeys = SolveKeys.all
    ridge: float = 1.0e-3  # initial ridge regulariser of each matrix, relative to the mean squared key norm
    lifelong: bool = False  # remember edits across edit calls (`mend.memory`): statistics and key moments
    memory_weight: float = 1.0  # weight of earlier edits' keys in a lifelong solve (0: forget them)
    memory_solve: MemorySolve = MemorySolve.refit  # refit the remembered edits with the new one, or hold their outputs
    preserve_weight: float = 1000.0  # weight of the preserved-knowledge key moment (E[k k^T] of generic text)
    edit_chunk: int = 16  # facts per capture pass at edit time (bounds memory for hundreds of facts)
    # Multiplies every update at edit time (1: the trained step sizes). Below 1 a trained editor's edits
    # move the model less: less change to the neighbours, less margin on the edited fact.
    edit_scale: float = 1.0
    # Edit-time step calibration (`mend.calibration`, stateless editors): when set, each edit's update (the
    # trained step times edit_scale) is scaled to the least multiple, up to edit_max_scale, at which every
    # target token leads the next-best token by this many logits on the edited prompts, found in at most
    # edit_margin_passes tries (a forward pass each, per edit_chunk facts). None: the step as it is.
    edit_margin: Optional[float] = None
    edit_margin_passes: int = 4
    edit_max_scale: float = 1.0
    # Weight of each key of the facts an edit is asked to keep (`Editor.edit(..., keep=[...])`): every
    # position of every kept (prompt, answer) joins the solve's C with this weight.
    keep_weight: float = 1000.0


@dataclass
class DataConfig:
    format: str = "auto"  # auto | counterfact | zsre | knowedit
    train_path: str = "data/facts/train.json"
    val_path: str = "data/facts/val.json"
    max_train_records: Optional[int] = None
    max_val_records: Optional[int] = None
    on_invalid: str = "raise"  # raise | skip: what to do with a record whose required field is missing


@dataclass
class StageConfig:
    """One stage of a staged run (`mend.stages`): from step ``at`` on, edits of ``n_edits`` facts."""

    at: int = 1
    n_edits: int = 1
    warmup_steps: int = 0  # the stage's own learning-rate warm-up
    lr_scale: float = 1.0  # multiplies train.lr (the networks' rate) in this stage; train.lr_lr is unscaled


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 10  # independent edits per step (scored together in one forward pass)
    n_edits: int = 1  # facts applied together in each of those edits
    # A curriculum of facts per edit (`mend.stages`): [{at: step, n_edits: n, warmup_steps: w}, ...]; each
    # stage restarts the learning-rate schedule, and validation edits at the last stage's size.
    stages: List[StageConfig] = field(default_factory=list)
    lr: float = 1e-4  # Adam learning rate of the editor networks
    lr_lr: float = 1e-3  # Adam learning rate of the per-matrix step sizes (in log space)
    c_edit: float = 1.0  # weight of the edit loss (edit + paraphrase NLL)
    c_loc: float = 1.0  # weight of the locality loss (KL to the pre-edit model)
    loc_probes: int = 1  # locality probes per edited fact: its own neighbour, then probes of other records
    # Of those other probes, how many expect the same answer as the record's neighbour (hard negatives:
    # in CounterFact, neighbours of the same relation with the edited fact's old answer); the rest are any.
    loc_same_answer: int = 0
    # Weight of the locality KL at every prompt position of the probes, next to their answer tokens (the
    # original MEND code takes every position); 0 = the answer tokens only, and no extra logits are computed.
    loc_prompt_weight: float = 0.0
    c_norm: float = 0.0  # weight of the update-size penalty: sum over matrices of ||dW||_F^2 / ||W||_F^2
    # Preserved knowledge in every meta-training solve (`mend.preserved`): the key second moment of the
    # locality probes of this many training records, weighted by editor.preserve_weight and saved with
    # the editor, which then solves with it at edit time too. 0 = none (the plain ridge solve).
    preserve_records: int = 0
    # Weight of the same probes' key moment at the positions that predict their answers, added to C
    # (`mend.memory.answer_key_moments`): the keys a same-relation neighbour reads its answer from.
    preserve_answer_weight: float = 0.0
    # The same answer moment added to the saved editor's preserved knowledge only, with this weight: the
    # edit-time solve guards the neighbours' answer keys more than meta-training did (docs/quality.md).
    edit_answer_weight: float = 0.0
    warmup_steps: int = 0  # linear warm-up of both learning rates over this many steps
    lr_decay: str = "none"  # none | cosine: decay both learning rates to 0 at max_steps
    # With lr_decay=cosine: the cosine reaches 0 after this many minutes of training instead of at max_steps
    # (the warm-up stays in steps). A recipe with a time budget then anneals fully on a slow machine and a
    # fast one alike; max_steps only caps the steps. null = the schedule runs in steps.
    schedule_minutes: Optional[float] = None
    max_minutes: Optional[float] = None  # stop (and validate) once training has run this long; null = no limit
    # Count max_minutes and schedule_minutes from the start of the run (loading the model, building the prefix
    # cache and the preserved knowledge included) instead of from its first step: a budget for the whole
    # command, so the cosine spans whatever time the setup left on this machine.
    budget_includes_setup: bool = False
    grad_clip: float = 100.0
    # Validate and save an exponential moving average of the editor networks' parameters with this decay
    # (`mend.averaging`; 0.99 averages over about the last 100 steps); the live weights go on training.
    # null = validate and save the live weights.
    ema_decay: Optional[float] = None
    val_every: int = 100
    val_records: int = 100
    patience: int = 5  # validations without improvement before stopping; 0 = never stop early
    # Which validated weights `best/` holds: "best" = the highest validation score so far; "last" = the latest
    # validation's (the run's end, where a cosine has annealed to 0). A 100-record validation is noisy enough
    # that the highest score can pick an earlier, less-annealed editor (docs/quality.md, "Two runs of the recipe").
    keep: str = "best"
    log_every: int = 10
    out_dir: str = "runs/default"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    progress: bool = True
    # run only the edited blocks, from the hidden states entering them, computed once per row (mend.prefix_cache):
    # auto (in memory when they fit in half the free memory, else memory-mapped) | memory | disk | none
    prefix_cache: PrefixCacheMode = PrefixCacheMode.auto
    prefix_cache_dtype: str = "float32"  # float32 | bfloat16 | float16: the lower two halve the cache, inexactly
    prefix_cache_dir: Optional[str] = None  # null: $MEND_CACHE_DIR/prefix, reused by every run with the same key (preserved knowledge too)


@dataclass
class EvalConfig:
    mode: str = "single"  # single | batch | sequential
    batch_size: int = 10  # edits applied together in batch mode
    curve_every: int = 10  # sequential mode: measure every M edits
    max_records: Optional[int] = 100
    methods: List[str] = field(default_factory=lambda: ["none", "mend", "ft", "ft-l"])
    ft_steps: int = 10
    ft_lr: float = 5e-4
    ftl_norm: float = 5e-4  # L-infinity radius of FT-L
    wild_template: str = DEFAULT_WILD_TEMPLATE  # QA context of WILD answers; {prompt} marks the probe's prompt
    wild_max_new_tokens: int = DEFAULT_WILD_MAX_NEW_TOKENS  # token cap of a WILD answer; 0 = no WILD answers
    bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES  # resamples of each confidence interval; 0 = none
    bootstrap_seed: int = 0
    bootstrap_confidence: float = DEFAULT_CONFIDENCE
    out_dir: str = "runs/eval"


@dataclass
class MendConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


def default_config_dir() -> Path:
    """The repository's ``configs/`` directory (or ``$MEND_CONFIG_DIR``)."""
    import os

    env = os.environ.get("MEND_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {error.msg if hasattr(error, 'msg') else error}") from None


def _load(path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got a {type(loaded).__name__}")
    return loaded


def load_config(overrides: Optional[List[str]] = None, *, config_dir=None, file=None) -> DictConfig:
    """Build a validated config.

    Args:
        overrides: dotlist strings; ``group=name`` selects ``configs/<group>/<name>.yaml``.
        config_dir: where the YAML files live (default: the repository's ``configs/``).
        file: an extra YAML file merged after the defaults and before the overrides.
    """
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not config_dir.is_dir():
        raise ConfigError(f"config directory {config_dir} does not exist: run from a source checkout of mend "
                          f"or set MEND_CONFIG_DIR to a copy of its configs/")
    cfg = OmegaConf.structured(MendConfig)
    default_file = config_dir / "default.yaml"
    if default_file.is_file():
        cfg = _merge(cfg, _load(default_file), str(default_file))
    if file is not None:
        if not Path(file).is_file():
            raise ConfigError(f"config file {file} does not exist")
        cfg = _merge(cfg, _load(file), str(file))
    dotlist = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key in GROUPS:
            group_file = config_dir / key / f"{value}.yaml"
            if not group_file.is_file():
                options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
                raise ConfigError(f"no {key} config named {value!r}; choose one of {options}")
            cfg = _merge(cfg, OmegaConf.create({key: _load(group_file)}), str(group_file))
        else:
            dotlist.append(item)
    source = "overrides " + " ".join(dotlist)
    try:
        parsed = OmegaConf.from_dotlist(dotlist)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{source}: cannot parse: {error}") from None
    cfg = _merge(cfg, parsed, source)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Check values the type system cannot; raise ConfigError naming the bad value."""
    validate_editor(cfg.editor)
    if cfg.model.edit_last_n_blocks < 1:
        raise ConfigError(f"model.edit_last_n_blocks must be >= 1, got {cfg.model.edit_last_n_blocks}")
    if cfg.model.max_length < 2:
        raise ConfigError(f"model.max_length must be >= 2, got {cfg.model.max_length}")
    for key in ("max_steps", "val_every", "log_every", "val_records"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {cfg.train[key]}")
    for key in ("lr", "lr_lr", "grad_clip"):
        if not cfg.train[key] >= 0:
            raise ConfigError(f"train.{key} must be >= 0, got {cfg.train[key]}")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must lie strictly between 0 and 1 (or be null), got {cfg.train.ema_decay}")
    if cfg.train.patience < 0:
        raise ConfigError(f"train.patience must be >= 0 (0 = never stop early), got {cfg.train.patience}")
    if cfg.eval.batch_size < 1 or cfg.eval.curve_every < 1:
        raise ConfigError(f"eval.batch_size and eval.curve_every must be >= 1, got {cfg.eval.batch_size}, "
                          f"{cfg.eval.curve_every}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if cfg.train.n_edits < 1:
        raise ConfigError(f"train.n_edits must be >= 1, got {cfg.train.n_edits}")
    try:
        check_stages(cfg.train)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.data.format not in ("auto", "counterfact", "zsre", "knowedit"):
        raise ConfigError(f"data.format must be auto, counterfact, zsre or knowedit, got {cfg.data.format!r}")
    if cfg.data.on_invalid not in ("raise", "skip"):
        raise ConfigError(f"data.on_invalid must be raise or skip, got {cfg.data.on_invalid!r}")
    if cfg.train.loc_probes < 1:
        raise ConfigError(f"train.loc_probes must be >= 1, got {cfg.train.loc_probes}")
    if not 0 <= cfg.train.loc_same_answer <= cfg.train.loc_probes - 1:
        raise ConfigError(f"train.loc_same_answer must be between 0 and train.loc_probes - 1 "
                          f"({cfg.train.loc_probes - 1}), got {cfg.train.loc_same_answer}")
    for key in ("c_norm", "c_edit", "c_loc", "loc_prompt_weight"):
        if not cfg.train[key] >= 0:
            raise ConfigError(f"train.{key} must be >= 0, got {cfg.train[key]}")
    for key in ("preserve_answer_weight", "edit_answer_weight"):
        if not cfg.train[key] >= 0:
            raise ConfigError(f"train.{key} must be >= 0, got {cfg.train[key]}")
        if cfg.train[key] > 0 and cfg.train.preserve_records == 0:
            raise ConfigError(f"train.{key} needs train.preserve_records > 0 (the probes whose answers it preserves)")
    if cfg.train.preserve_records < 0 or cfg.train.warmup_steps < 0:
        raise ConfigError(f"train.preserve_records and train.warmup_steps must be >= 0, got "
                          f"{cfg.train.preserve_records}, {cfg.train.warmup_steps}")
    if cfg.train.keep not in ("best", "last"):
        raise ConfigError(f"train.keep must be best or last, got {cfg.train.keep!r}")
    if cfg.train.lr_decay not in ("none", "cosine"):
        raise ConfigError(f"train.lr_decay must be none or cosine, got {cfg.train.lr_decay!r}")
    if cfg.train.schedule_minutes is not None:
        if not cfg.train.schedule_minutes > 0:
            raise ConfigError(f"train.schedule_minutes must be > 0 or null, got {cfg.train.schedule_minutes}")
        if cfg.train.lr_decay != "cosine":
            raise ConfigError(f"train.schedule_minutes times the cosine decay: it needs train.lr_decay=cosine, "
                              f"got {cfg.train.lr_decay!r}")
        if cfg.train.stages:
            raise ConfigError("train.schedule_minutes and train.stages cannot be combined: stages restart the "
                              "schedule at steps")
    if cfg.train.max_minutes is not None and not cfg.train.max_minutes > 0:
        raise ConfigError(f"train.max_minutes must be > 0 or null, got {cfg.train.max_minutes}")
    if cfg.train.prefix_cache_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"train.prefix_cache_dtype must be float32, bfloat16 or float16, "
                          f"got {cfg.train.prefix_cache_dtype!r}")
    if cfg.eval.mode not in ("single", "batch", "sequential"):
        raise ConfigError(f"eval.mode must be single, batch or sequential, got {cfg.eval.mode!r}")
    if cfg.eval.wild_template.count(WILD_PLACEHOLDER) != 1:
        raise ConfigError(f"eval.wild_template must contain {WILD_PLACEHOLDER} exactly once, got {cfg.eval.wild_template!r}")
    if cfg.eval.wild_max_new_tokens < 0:
        raise ConfigError(f"eval.wild_max_new_tokens must be >= 0 (0 = no WILD answers), got {cfg.eval.wild_max_new_tokens}")
    if cfg.eval.bootstrap_samples < 0:
        raise ConfigError(f"eval.bootstrap_samples must be >= 0 (0 = no intervals), got {cfg.eval.bootstrap_samples}")
    if not 0.0 < cfg.eval.bootstrap_confidence < 1.0:
        raise ConfigError(f"eval.bootstrap_confidence must lie strictly between 0 and 1, got "
                          f"{cfg.eval.bootstrap_confidence}")


def validate_editor(editor) -> None:
    """Check an editor section's values; raise ConfigError naming the bad value."""
    if editor.rank < 1:
        raise ConfigError(f"editor.rank must be >= 1, got {editor.rank}")
    if editor.n_blocks < 0:
        raise ConfigError(f"editor.n_blocks must be >= 0, got {editor.n_blocks}")
    if editor.init_lr <= 0:
        raise ConfigError(f"editor.init_lr must be > 0, got {editor.init_lr}")
    if not editor.ridge > 0:
        raise ConfigError(f"editor.ridge must be > 0, got {editor.ridge}")
    for key in ("memory_weight", "preserve_weight", "keep_weight"):
        if not editor[key] >= 0:
            raise ConfigError(f"editor.{key} must be >= 0, got {editor[key]}")
    if not editor.edit_scale > 0:
        raise ConfigError(f"editor.edit_scale must be > 0, got {editor.edit_scale}")
    if editor.edit_margin is not None and not 0 <= editor.edit_margin < math.inf:
        raise ConfigError(f"editor.edit_margin must be a finite number >= 0, or null, got {editor.edit_margin}")
    if editor.edit_margin_passes < 1:
        raise ConfigError(f"editor.edit_margin_passes must be >= 1, got {editor.edit_margin_passes}")
    if not 1 <= editor.edit_max_scale < math.inf:
        raise ConfigError(f"editor.edit_max_scale must be a finite number >= 1 (a multiple of the step), "
                          f"got {editor.edit_max_scale}")
    if editor.edit_chunk < 1:
        raise ConfigError(f"editor.edit_chunk must be >= 1, got {editor.edit_chunk}")
    if editor.lifelong and editor.aggregation != Aggregation.ridge:
        raise ConfigError("editor.lifelong needs editor.aggregation=ridge (a sum of rank-1 updates cannot "
                          f"take earlier edits into account), got aggregation={editor.aggregation.value}")


def editor_config(cfg=None) -> DictConfig:
    """A structured EditorConfig from a dict, DictConfig or None (defaults)."""
    base = OmegaConf.structured(EditorConfig)
    merged = base if cfg is None else _merge(base, cfg, "editor config")
    validate_editor(merged)
    return merged
