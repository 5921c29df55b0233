"""Meta-training MEND editor networks (the outer loop).

Run from the command line with ``python scripts/train.py [overrides]`` or ``mend train``. For
data-parallel training start one process per device with ``accelerate launch scripts/train.py ...``
(GPUs) or ``python -m torch.distributed.run --nproc_per_node N scripts/train.py ...`` (CPU processes
over gloo; accelerate 1.x launches several CPU processes only through MPI). Each process edits its
own records, editor gradients are all-reduced, and only the main process logs and writes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .averaging import WeightAverage
from .config import MendConfig
from .editor import Editor
from . import stages
from .meta_batch import build_meta_batch
from .models import load_base_model, resolve_device
from .networks import MendNetworks, merge_across_processes
from .objective import meta_objective
from .targets import resolve_targets
from .train_state import Progress, load_train_state, save_train_state
from .training_log import JsonlLog, plot_training_curves

METRICS = ("loss", "edit_loss", "loc_loss", "pre_edit_loss", "edit_acc", "equiv_acc", "loc_agree", "update_size")


def all_reduce_gradients(networks, world: int) -> None:
    """Average the editor's gradients over processes (one flat all-reduce)."""
    import torch.distributed as dist

    params = [p for p in networks.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


# keys that may change between a run and its resumption; any other change is a different run
RESUMABLE_CHANGES = {"train.max_steps", "train.patience", "train.progress", "train.val_every", "train.log_every",
                     "model.device", "train.prefix_cache", "train.prefix_cache_dir", "train.max_minutes"}


def check_resumable(state_dir: Path, cfg) -> None:
    """Refuse to resume a run whose saved config differs from ``cfg`` beyond `RESUMABLE_CHANGES`."""
    from .checkpoint import CheckpointError

    from .checkpoint import recover_dir

    saved_file = recover_dir(state_dir) / "config.yaml"
    if not saved_file.is_file():
        raise CheckpointError(f"no training state to resume from at {state_dir} (missing config.yaml)")
    # the saved config on today's schema: a setting added since (with its default) is no change
    try:
        saved = OmegaConf.merge(OmegaConf.structured(MendConfig), OmegaConf.load(saved_file))
    except OmegaConfBaseException:  # it holds a setting since removed: compare it as written
        saved = OmegaConf.load(saved_file)
    saved = OmegaConf.to_container(saved, enum_to_str=True)
    current = OmegaConf.to_container(cfg, enum_to_str=True)
    differences = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if f"{section}.{key}" not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value
    ]
    if differences:
        raise ValueError(f"cannot resume {state_dir}: the config changed ({'; '.join(differences)}); "
                         f"start a new run (train.out_dir) or undo the change")


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path
    progress: Progress
    seconds: float
    examples_per_second: float
    networks: MendNetworks | None = None  # the trained editor networks, live weights (this process's copy;
    # with train.ema_decay, best/ holds the average instead)


def make_optimizer(networks: MendNetworks, cfg) -> torch.optim.Adam:
    """Adam on the editor networks (``train.lr``) and on the log step sizes and log ridge regularisers
    (``train.lr_lr``)."""
    network_params = [p for n, p in networks.named_parameters() if n not in ("log_lrs", "log_ridges")]
    return torch.optim.Adam(
        [{"params": network_params, "lr": cfg.train.lr},
         {"params": [networks.log_lrs, networks.log_ridges], "lr": cfg.train.lr_lr}]
    )


def learning_rate_factor(step: int, cfg, minutes: float = 0.0) -> float:
    """The multiplier of both learning rates at ``step`` (0-based): linear warm-up over
    ``train.warmup_steps``, then constant or a cosine decay to 0 at ``train.max_steps`` (or after
    ``train.schedule_minutes`` of the run's ``minutes`` of training); with ``train.stages``, the same
    within each stage (`mend.stages`)."""
    return stages.learning_rate_factor(step, cfg.train, minutes)


def set_learning_rates(optimizer, cfg, step: int, minutes: float = 0.0) -> None:
    """Set each optimizer group's rate for ``step`` (and ``minutes`` of training, for a schedule in time)
    from its configured base rate (stateless, so a resumed run follows the same schedule); a stage's
    ``lr_scale`` scales the networks' group only."""
    factor = learning_rate_factor(step, cfg, minutes)
    network_scale = stages.segment_at(step, cfg.train).lr_scale
    for group, base in zip(optimizer.param_groups, (cfg.train.lr * network_scale, cfg.train.lr_lr)):
        group["lr"] = base * factor


def score_edits(model, networks, tokenizer, records, equivalents, localities, cfg, device, prefix_cache, moments,
                n_edits: int):
    """The meta-objective (`mend.objective.meta_objective`) of ``records`` edited ``n_edits`` facts at a
    time with these paraphrases and locality probes, batched and weighted as ``cfg.train`` says: what a
    training step and a validation chunk both score."""
    batch = build_meta_batch(tokenizer, records, equivalents, localities, max_length=cfg.model.max_length,
                             n_edits=n_edits, prefix_cache=prefix_cache,
                             whole_locality=cfg.train.loc_prompt_weight > 0).to(device)
    return meta_objective(model, networks, batch, c_edit=cfg.train.c_edit, c_loc=cfg.train.c_loc,
                          c_norm=cfg.train.c_norm, bf16=cfg.train.bf16, moments=moments,
                          loc_prompt_weight=cfg.train.loc_prompt_weight)


def training_step(model, tokenizer, networks, optimizer, sampler, step: int, cfg, device, world: int = 1,
                  prefix_cache=None, moments=None, minutes: float = 0.0):
    """One meta-training step; returns its `StepOutput` and whether the update was applied.

    With a `mend.prefix_cache.PrefixCache` the step runs only the blocks from the lowest edited one on;
    ``moments`` (name -> `mend.aggregate.MomentBasis`) is the preserved knowledge every solve keeps."""
    # 1. data: this step's records, one paraphrase and train.loc_probes locality probes each (and their cached states)
    chosen = sampler.records_for_step(step)
    equivalents, localities = sampler.choose(step, chosen, cfg.train.loc_probes, cfg.train.loc_same_answer)
    # 2. edit, score the edited model, backward into the editor; average gradients over processes
    n_edits = stages.segment_at(step, cfg.train).n_edits
    out = score_edits(model, networks, tokenizer, chosen, equivalents, localities, cfg, device, prefix_cache, moments,
                      n_edits)
    out.loss.backward()
    if world > 1:
        all_reduce_gradients(networks, world)
    # 3. clip; skip the step if any gradient is not finite (one sync for the whole check)
    total_norm = torch.nn.utils.clip_grad_norm_(networks.parameters(), cfg.train.grad_clip)
    finite = bool(torch.isfinite(total_norm))
    if finite:
        set_learning_rates(optimizer, cfg, step, minutes)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        merge_across_processes(networks)  # normalisation statistics of every process's rows
    return out, finite


def validation_score(metrics: dict) -> float:
    """What early stopping maximises: the mean of edit, paraphrase and locality accuracy."""
    return (metrics["edit_acc"] + metrics["equiv_acc"] + metrics["loc_agree"]) / 3


@torch.no_grad()
def validate(model, networks, tokenizer, records, cfg, device, prefix_cache=None, moments=None) -> dict:
    """Edit success, paraphrase success, locality agreement and losses over validation records
    (edits of n_edits facts, the last stage's with ``train.stages``, batch_size edits per forward), with
    the editor's statistics frozen."""
    was_training = networks.training
    networks.eval()
    sums = {k: 0.0 for k in METRICS}
    n_edits = stages.final_n_edits(cfg.train)
    n = n_edits * cfg.train.batch_size
    weights = 0
    chunks = [records[i : i + n] for i in range(0, len(records), n)]
    for chunk in chunks:
        equivalents = [r.equivalents[0] for r in chunk]
        localities = [r.locality[0] for r in chunk]
        out = score_edits(model, networks, tokenizer, chunk, equivalents, localities, cfg, device, prefix_cache, moments,
                          n_edits)
        for key in METRICS:  # weighted by records, so a short last chunk counts for what it holds
            sums[key] += float(out.metrics[key]) * len(chunk)
        weights += len(chunk)
    networks.train(was_training)
    metrics = {k: v / weights for k, v in sums.items()}
    metrics["score"] = validation_score(metrics)
    return metrics


def _load_data(cfg):
    from .data import load_records

    data = cfg.data
    train = load_records(data.train_path, data.format, limit=data.max_train_records, on_invalid=data.on_invalid)
    if Path(data.val_path).resolve() == Path(data.train_path).resolve():
        if data.max_train_records is None:
            raise ValueError("data.val_path is the training file: set data.max_train_records to hold records out")
        val = load_records(data.val_path, data.format, on_invalid=data.on_invalid)[data.max_train_records :]
    else:
        val = load_records(data.val_path, data.format, limit=data.max_val_records, on_invalid=data.on_invalid)
    val = [r for r in val if r.locality][: cfg.train.val_records]
    if not val:
        raise ValueError(f"no validation record with a locality probe in {cfg.data.val_path}")
    return train, val


def run_cache_dir(cfg) -> Path:
    """Where a run's prefix caches and preserved moments live: ``train.prefix_cache_dir``, or
    ``$MEND_CACHE_DIR/prefix``."""
    from .models import cache_dir

    return Path(cfg.train.prefix_cache_dir) if cfg.train.prefix_cache_dir else cache_dir() / "prefix"


def open_prefix_cache(model, tokenizer, targets, train_records, val_records, cfg, *, is_main=True, wait=None,
                      data_files=(), say=print):
    """The run's `PrefixCache` (built on the main process, loaded by all), or None when the run uses the
    full forward: ``train.prefix_cache=none``, or an edited matrix with no blocks below it to skip."""
    from .config import PrefixCacheMode
    from .prefix_cache import PrefixCache, file_hash, training_rows
    from .prefix_forward import lowest_edited_block

    if cfg.train.prefix_cache == "none":
        return None
    start = lowest_edited_block(targets)
    if start is None:
        say("prefix cache: not used (an edited matrix is in block 0 or outside the transformer blocks); "
            "every step runs the full model")
        return None
    cache = PrefixCache.build_or_load(
        model, tokenizer, training_rows(train_records, validation_records=val_records), start=start,
        max_length=cfg.model.max_length, dtype=cfg.train.prefix_cache_dtype, placement=PrefixCacheMode(cfg.train.prefix_cache).value,
        directory=run_cache_dir(cfg), data_hashes=[file_hash(f) for f in data_files if Path(f).is_file()],
        build_here=is_main, wait=wait,
    )
    say(f"{cache.info.describe()}; steps run block {start} and above only")
    return cache


def _from_main(value: float, world: int, device) -> float:
    """The main process's ``value`` on every process: what all processes must decide alike (when to
    stop, the learning rate of a schedule in time) comes from one clock."""
    if world == 1:
        return value
    import torch.distributed as dist

    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return float(shared.item())


def _out_of_time(start: float, max_minutes, world: int, device) -> bool:
    """Whether this run has trained for ``max_minutes`` (this process's clock; with several processes,
    the main process decides for all, so that they stop at the same step)."""
    if max_minutes is None:
        return False
    late = time.perf_counter() - start >= 60.0 * max_minutes
    return bool(_from_main(1.0 if late else 0.0, world, device))


def schedule_clock(trained_s: float, setup_s: float, schedule_minutes) -> float:
    """Minutes on the cosine's clock after ``trained_s`` seconds of training, when the run spent ``setup_s``
    seconds before its first step that count against ``schedule_minutes`` (train.budget_includes_setup):
    the cosine spans the ``schedule_minutes - setup`` left, so training time is stretched to fill it."""
    if not setup_s:
        return trained_s / 60.0
    left_s = 60.0 * schedule_minutes - setup_s
    return math.inf if left_s <= 0 else trained_s / 60.0 * (60.0 * schedule_minutes / left_s)


def _check_budget_left(setup_s: float, cfg) -> None:
    """Refuse to start training when the setup alone used a budget that includes it."""
    for key in ("max_minutes", "schedule_minutes"):
        limit = cfg.train.get(key)
        if limit is not None and setup_s >= 60.0 * limit:
            raise RuntimeError(
                f"train.budget_includes_setup: loading the model and building the caches took {setup_s / 60:.1f} "
                f"minutes, the whole of train.{key}={limit}; raise it, or build the caches first (they are "
                f"reused) and run again")


def open_preserved(model, tokenizer, targets, train_records, cfg, device, *, say=print, prefix_cache=None):
    """The preserved knowledge of a run with ``train.preserve_records`` > 0: (moments name -> C (d_in,
    d_in) the saved editor keeps for edit time, name -> `MomentBasis` of ``editor.preserve_weight * C``
    for the meta-training and validation solves); ({}, None) without.

    The solves' C is the locality probes' moment over every token plus ``train.preserve_answer_weight``
    times their moment at the answer-predicting positions. The saved C adds ``train.edit_answer_weight``
    times that answer moment on top: a setting of the trained editor's edit-time solve only.
    Computing them starts from the run's ``prefix_cache`` where it holds the probes (it holds every
    training record's)."""
    from .aggregate import MomentBasis
    from .memory import mix_moments
    from .preserved import answer_moments, locality_pairs, locality_texts, preserved_moments

    if cfg.train.preserve_records == 0:
        return {}, None
    texts = locality_texts(train_records, cfg.train.preserve_records)
    moments = preserved_moments(model, targets, tokenizer, texts, max_length=cfg.model.max_length,
                                directory=run_cache_dir(cfg), say=say, prefix_cache=prefix_cache)  # cached beside the prefix caches
    saved = moments
    in_training, at_edit = cfg.train.preserve_answer_weight, cfg.train.edit_answer_weight
    if in_training > 0 or at_edit > 0:
        answers = answer_moments(model, targets, tokenizer, locality_pairs(train_records, cfg.train.preserve_records),
                                 max_length=cfg.model.max_length, directory=run_cache_dir(cfg), say=say,
                                 prefix_cache=prefix_cache)
        saved = mix_moments(moments, answers, in_training + at_edit)
        moments = mix_moments(moments, answers, in_training)
    weight = cfg.editor.preserve_weight
    bases = {name: MomentBasis.of(weight * moment.double()).to(device) for name, moment in moments.items()} if weight > 0 else None
    return saved, bases


def train(cfg, *, resume: bool = False, model=None, tokenizer=None, records=None) -> TrainResult:
    """Meta-train editor networks as configured; return where the best editor was written.

    Args:
        cfg: a config from `mend.config.load_config`.
        resume: continue from ``<out_dir>/state`` (written at every validation).
        model, tokenizer: an already loaded base model (default: load ``cfg.model.name``).
        records: ``(train_records, val_records)`` (default: load ``cfg.data`` paths).
    """
    from accelerate import Accelerator

    entered = time.perf_counter()  # train.budget_includes_setup counts from here
    device = resolve_device(cfg.model.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    if accelerator.num_processes > 1:
        device = accelerator.device
    is_main = accelerator.is_main_process
    torch.manual_seed(cfg.train.seed)

    if model is None:
        model, tokenizer = load_base_model(cfg.model.name, dtype=cfg.model.dtype, device=device)
    else:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    train_records, val_records = records if records is not None else _load_data(cfg)

    targets = resolve_targets(model, cfg.model.edit_params, cfg.model.edit_last_n_blocks)
    data_files = (cfg.data.train_path, cfg.data.val_path) if records is None else ()
    prefix_cache = open_prefix_cache(model, tokenizer, targets, train_records, val_records, cfg, is_main=is_main,
                                     wait=accelerator.wait_for_everyone, data_files=data_files,
                                     say=(lambda text: print(text, flush=True)) if is_main else (lambda text: None))
    networks = MendNetworks(targets, cfg.editor).to(device)
    optimizer = make_optimizer(networks, cfg)
    preserved, moments = open_preserved(model, tokenizer, targets, train_records, cfg, device, prefix_cache=prefix_cache,
                                        say=(lambda text: print(text, flush=True)) if is_main else (lambda text: None))
    run_dir = Path(cfg.train.out_dir)
    state_dir, best_dir = run_dir / "state", run_dir / "best"
    config_yaml = OmegaConf.to_yaml(cfg)
    progress = Progress()
    average = WeightAverage(networks, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    if resume:
        check_resumable(state_dir, cfg)
        progress = load_train_state(state_dir, networks, optimizer, device, average)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    log = JsonlLog(run_dir / "log.jsonl", resume_step=progress.step if resume else None) if is_main else None

    sampler = stages.StagedSampler(train_records, cfg.train, accelerator.process_index, accelerator.num_processes)
    editor_view = Editor(model, tokenizer, networks, max_length=cfg.model.max_length, model_config=cfg.model)
    editor_view.preserved = preserved  # saved with every checkpoint: the editor solves with it at edit time too

    def judged():
        """The weights validation scores and `best/` keeps: the average where the run keeps one."""
        return average.applied(networks) if average is not None else nullcontext()

    def checkpoint(metrics):
        progress.trained_s = trained_before + time.perf_counter() - start
        improved = metrics["score"] > progress.best_score
        if improved:
            progress.best_score, progress.best_step, progress.bad_validations = metrics["score"], progress.step, 0
        else:
            progress.bad_validations += 1
        if (improved or cfg.train.keep == "last") and is_main:
            with judged():
                editor_view.save(best_dir)
        progress.history.append({"step": progress.step, **metrics})
        if is_main:
            save_train_state(state_dir, networks, optimizer, progress, config_yaml, average)
        accelerator.wait_for_everyone()

    bar = None
    if is_main and cfg.train.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=progress.step, desc="meta-training", dynamic_ncols=True)
    networks.train()
    running = {k: 0.0 for k in METRICS}
    running_count = 0
    start = time.perf_counter()
    trained_before = progress.trained_s  # a resumed run's schedule in time goes on from there
    timed = cfg.train.schedule_minutes is not None
    clock_start = start  # where train.max_minutes counts from (this process)
    if cfg.train.budget_includes_setup:
        clock_start = entered
        _check_budget_left(start - entered, cfg)
        if not resume:
            progress.setup_s = start - entered  # a resumed run's cosine keeps the first run's span
    examples = 0  # facts edited by this process's steps
    stage_starts = {segment.start for segment in stages.segments(cfg.train)[1:]}
    while progress.step < cfg.train.max_steps and not progress.stopped_early:
        examples += cfg.train.batch_size * stages.segment_at(progress.step, cfg.train).n_edits
        minutes = 0.0
        if timed:  # the main process's clock, so that every process steps at the same rate
            setup_s = progress.setup_s if cfg.train.budget_includes_setup else 0.0
            minutes = _from_main(schedule_clock(trained_before + time.perf_counter() - start, setup_s,
                                                cfg.train.schedule_minutes), accelerator.num_processes, device)
        out, finite = training_step(model, tokenizer, networks, optimizer, sampler, progress.step, cfg, device,
                                    accelerator.num_processes, prefix_cache, moments, minutes)
        if average is not None and progress.step in stage_starts:
            average.restart()  # a new stage's editor is averaged from its own steps only
        if not finite:
            progress.skipped_steps += 1
        elif average is not None:
            average.update(networks)
        progress.step += 1
        # 4. log
        for key in METRICS:
            running[key] += float(out.metrics[key])
        running_count += 1
        if progress.step % cfg.train.log_every == 0 or progress.step == cfg.train.max_steps:
            averaged = {k: v / running_count for k, v in running.items()}
            if log is not None:
                log.write({"split": "train", "step": progress.step, **averaged, "skipped": progress.skipped_steps,
                           "elapsed_s": round(time.perf_counter() - start, 2),
                           "lr_mean": float(networks.log_lrs.detach().exp().mean()),
                           "lr": float(optimizer.param_groups[0]["lr"])})
            if bar is not None:
                bar.set_postfix(loss=f"{averaged['loss']:.3f}", edit=f"{averaged['edit_acc']:.2f}", loc=f"{averaged['loc_agree']:.2f}")
            running = {k: 0.0 for k in METRICS}
            running_count = 0
        if bar is not None:
            bar.update(1)
        # 5. validate, keep the best, stop early when patience or train.max_minutes runs out
        out_of_time = _out_of_time(clock_start, cfg.train.max_minutes, accelerator.num_processes, device)
        if progress.step % cfg.train.val_every == 0 or progress.step == cfg.train.max_steps or out_of_time:
            with judged():
                metrics = validate(model, networks, tokenizer, val_records, cfg, device, prefix_cache, moments)
            checkpoint(metrics)
            if log is not None:
                log.write({"split": "val", "step": progress.step, **metrics})
            if bar is not None:
                bar.write(
                    f"step {progress.step}: val edit {metrics['edit_acc']:.3f} paraphrase {metrics['equiv_acc']:.3f} "
                    f"locality {metrics['loc_agree']:.3f} (best {progress.best_score:.3f} at {progress.best_step})"
                )
            if cfg.train.patience and progress.bad_validations >= cfg.train.patience:
                progress.stopped_early = True
                if is_main:
                    save_train_state(state_dir, networks, optimizer, progress, config_yaml, average)
            if out_of_time:
                if is_main:
                    print(f"train.max_minutes={cfg.train.max_minutes} reached at step {progress.step}; stopping "
                          f"(resume with a larger limit to go on)", flush=True)
                break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if is_main:
        plot_training_curves(run_dir / "log.jsonl", run_dir / "training_curves.png")
    examples *= accelerator.num_processes
    return TrainResult(run_dir, best_dir, progress, seconds, examples / seconds if seconds > 0 else math.nan, networks)
