"""``mend eval``: load an editor (or a bare model), a data file, run the harness, write the report."""

from __future__ import annotations

from pathlib import Path


def run_eval(args) -> int:
    from .baselines import METHOD_NAMES, build_methods
    from .config import EvalConfig
    from .data import load_records
    from .editor import Editor
    from .evaluate import evaluate
    from .models import DEFAULT_MODEL, load_base_model

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown edit method(s) {unknown or names}; valid methods are {', '.join(METHOD_NAMES)}")
    records = load_records(args.data, args.format, limit=args.limit)
    if args.editor:
        model = tokenizer = None
        if args.model:  # evaluate the editor on this model (refused if it was trained for another)
            model, tokenizer = load_base_model(args.model, device=args.device)
        editor = Editor.load(args.editor, model, tokenizer, device=args.device)
        model, tokenizer, max_length = editor.model, editor.tokenizer, editor.max_length
    else:
        if "mend" in names:
            raise ValueError("the mend method needs --editor DIR (a trained editor); or drop it from --methods")
        editor = None
        model, tokenizer = load_base_model(args.model or DEFAULT_MODEL, device=args.device)
        max_length = 128
    eval_cfg = EvalConfig(mode=args.mode, batch_size=args.batch_size, curve_every=args.curve_every,
                          max_records=args.limit, methods=names, out_dir=args.out)
    methods = build_methods(names, editor, model, tokenizer, eval_cfg, checkpoint=args.editor)
    report = evaluate(
        methods, records, model, tokenizer, mode=args.mode, batch_size=args.batch_size,
        curve_every=args.curve_every, max_length=max_length, out_dir=Path(args.out), progress=True,
        meta={"data": str(args.data), "editor_checkpoint": args.editor},
    )
    print(f"wrote {', '.join(str(p) for p in report.files.values())}")
    return 0
