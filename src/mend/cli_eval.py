"""``mend eval``: load an editor (or a bare model), a data file, run the harness, write the report;
or, with ``--compare RUN_A RUN_B``, compare two runs' outputs."""

from __future__ import annotations

from pathlib import Path

# command-line flag -> eval config key it overrides
FLAG_KEYS = {"mode": "mode", "methods": "methods", "limit": "max_records", "batch_size": "batch_size",
             "curve_every": "curve_every", "out": "out_dir", "wild_template": "wild_template",
             "wild_max_new_tokens": "wild_max_new_tokens", "bootstrap_samples": "bootstrap_samples"}


def edit_time_keys(overrides) -> set[str]:
    """The editor's edit-time settings (`mend.editor.EDIT_TIME_SETTINGS`) that ``editor.KEY=VALUE``
    overrides name."""
    from .editor import EDIT_TIME_SETTINGS

    named = {o.split("=", 1)[0][len("editor."):] for o in overrides if o.startswith("editor.") and "=" in o}
    return named & set(EDIT_TIME_SETTINGS)


def eval_config_from(args):
    """The config: configs/default.yaml, then the ``eval.*`` overrides, then the flags given."""
    from omegaconf import OmegaConf

    from .config import ConfigError, load_config
    from .editor import EDIT_TIME_SETTINGS

    settings = tuple(f"editor.{key}=" for key in edit_time_keys(args.overrides))
    not_eval = [o for o in args.overrides if not o.startswith(("eval.", *settings))]
    if not_eval:
        raise ConfigError(f"mend eval takes eval.* overrides and the editor's edit-time settings "
                          f"({', '.join('editor.' + k for k in EDIT_TIME_SETTINGS)}), got {not_eval}")
    cfg = load_config(args.overrides)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            if flag == "methods":
                value = [n.strip() for n in value.split(",") if n.strip()]
            if flag == "wild_template":  # a shell passes \n as two characters
                value = value.replace("\\n", "\n")
            OmegaConf.update(cfg, f"eval.{key}", value)
    return cfg


def run_compare(args, eval_cfg) -> int:
    from .bootstrap import Bootstrap
    from .compare import compare_runs, format_comparison

    bootstrap = Bootstrap(eval_cfg.bootstrap_samples, eval_cfg.bootstrap_seed, eval_cfg.bootstrap_confidence)
    print(format_comparison(compare_runs(args.compare[0], args.compare[1], bootstrap)))
    return 0


def run_eval(args) -> int:
    from .baselines import METHOD_NAMES, build_methods
    from .data import load_records
    from .editor import Editor
    from .evaluate import evaluate, settings_from_config
    from .models import DEFAULT_MODEL, load_base_model

    cfg = eval_config_from(args)
    eval_cfg = cfg.eval
    if args.compare:
        return run_compare(args, eval_cfg)
    if not args.data:
        raise ValueError("mend eval needs --data FILE (or --compare RUN_A RUN_B to compare two runs)")
    names = list(eval_cfg.methods)
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown edit method(s) {unknown or names}; valid methods are {', '.join(METHOD_NAMES)}")
    if args.skip < 0:
        raise ValueError(f"--skip must be >= 0, got {args.skip}")
    limit = None if eval_cfg.max_records is None else args.skip + eval_cfg.max_records
    records = load_records(args.data, args.format, limit=limit)[args.skip :]
    if not records:
        raise ValueError(f"no records left in {args.data} after skipping {args.skip}")
    if args.editor:
        model = tokenizer = None
        if args.model:  # evaluate the editor on this model (refused if it was trained for another)
            model, tokenizer = load_base_model(args.model, device=args.device)
        settings = {key: cfg.editor[key] for key in edit_time_keys(args.overrides)}
        editor = Editor.load(args.editor, model, tokenizer, device=args.device, settings=settings)
        model, tokenizer, max_length = editor.model, editor.tokenizer, editor.max_length
    else:
        if any(n.startswith("mend") for n in names):
            raise ValueError("the mend methods need --editor DIR (a trained editor); or drop them from --methods")
        editor = None
        model, tokenizer = load_base_model(args.model or DEFAULT_MODEL, device=args.device)
        max_length = cfg.model.max_length
    methods = build_methods(names, editor, model, tokenizer, eval_cfg, checkpoint=args.editor)
    report = evaluate(
        methods, records, model, tokenizer, **settings_from_config(eval_cfg), max_length=max_length,
        out_dir=Path(eval_cfg.out_dir), progress=True,
        meta={"data": str(args.data), "skipped_records": args.skip, "editor_checkpoint": args.editor},
    )
    print(f"wrote {', '.join(str(p) for p in report.files.values())}")
    return 0
