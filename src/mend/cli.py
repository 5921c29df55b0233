"""The ``mend`` command line: train, edit, eval, demo.

Errors are one line (``mend: error: ...``) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import sys

from . import allocator


def _train(args) -> int:
    from .config import load_config
    from .trainer import train

    cfg = load_config(args.overrides, file=args.config)
    result = train(cfg, resume=args.resume)
    p = result.progress
    print(
        f"trained {p.step} steps ({p.skipped_steps} skipped) in {result.seconds:.0f} s, "
        f"{result.examples_per_second:.2f} edit examples/s; best validation score {p.best_score:.3f} at step "
        f"{p.best_step}; kept editor (train.keep={cfg.train.keep}, step {p.kept_step(cfg.train.keep)}): {result.best_dir}"
    )
    return 0


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (the decoding the eval harness scores)."""
    from .generation import greedy_continuations

    ids = greedy_continuations(model, tokenizer, [prompt], [max_new_tokens])[0]
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())  # one line for display


def _edit(args) -> int:
    from .editor import Editor

    editor = Editor.load(args.editor, device=args.device)
    before = greedy_text(editor.model, editor.tokenizer, args.prompt, args.max_new_tokens)
    result = editor.edit(args.prompt, args.target)
    after = greedy_text(editor.model, editor.tokenizer, args.prompt, args.max_new_tokens)
    print(f"prompt: {args.prompt}")
    print(f"before: {before.strip()}")
    print(f"after:  {after.strip()}")
    print(f"edit took {result.seconds * 1000:.0f} ms; changed {len(result.changed)} matrices")
    return 0


def _eval(args) -> int:
    from .cli_eval import run_eval

    return run_eval(args)


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mend", description="MEND model editing: meta-train editors, apply and measure edits.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train an editor (config overrides as key=value)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data=counterfact train.max_steps=2000")
    p.add_argument("--config", help="an extra YAML file merged before the overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last state")
    p.set_defaults(func=_train)

    p = sub.add_parser("edit", help="apply one edit and show greedy continuations before and after")
    p.add_argument("--editor", required=True, help="editor checkpoint directory (from mend train)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("prompt")
    p.add_argument("target")
    p.set_defaults(func=_edit)

    p = sub.add_parser("eval", help="measure edits: reliability, generality, locality, portability",
                       description="Measures every edit teacher-forced, by greedy prefix and WILD-style (QA context, "
                                   "natural stop), with CounterFact's scores and bootstrap intervals; or compares two "
                                   "runs (--compare). Flags default to the eval section of the config "
                                   "(src/mend/config.py, then configs/default.yaml); any eval key can also be given "
                                   "as an override, e.g. eval.ft_steps=20 eval.ftl_norm=1e-3.")
    p.add_argument("--editor", help="editor checkpoint directory (needed for the mend method)")
    p.add_argument("--model", help="base model (default: the editor's, or smollm2-135m without --editor)")
    p.add_argument("--data", help="a CounterFact, zsRE or KnowEdit JSON file (needed unless --compare)")
    p.add_argument("--format", default="auto", choices=["auto", "counterfact", "zsre", "knowedit"])
    p.add_argument("--mode", choices=["single", "batch", "sequential"], help="default: eval.mode")
    p.add_argument("--methods", help="comma-separated from none, mend, mend-sum, mend-lifelong, ft, ft-l "
                                     "(default: eval.methods)")
    p.add_argument("--limit", type=int, help="records to evaluate (default: eval.max_records)")
    p.add_argument("--skip", type=int, default=0, help="skip this many records first (e.g. those used for validation)")
    p.add_argument("--batch-size", type=int, help="edits applied together in batch mode (default: eval.batch_size)")
    p.add_argument("--curve-every", type=int, help="sequential mode: measure every M edits (default: eval.curve_every)")
    p.add_argument("--out", help="output directory (default: eval.out_dir)")
    p.add_argument("--wild-template", help="context of WILD answers, {prompt} marks the probe and \\n is a "
                                           "newline (default: eval.wild_template)")
    p.add_argument("--wild-max-new-tokens", type=int, help="token cap of WILD answers (default: eval.wild_max_new_tokens)")
    p.add_argument("--bootstrap-samples", type=int, help="resamples per confidence interval, 0 = none "
                                                         "(default: eval.bootstrap_samples)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two output directories of mend eval: each metric's difference B - A with its "
                        "interval, n.s. where it is not significant (no edits are run)")
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="eval.* config overrides, and the editor's edit-time settings "
                   "(editor.preserve_weight, editor.memory_weight, editor.solve_keys, editor.edit_chunk)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="the main job: train an editor on the embedded model and show edits")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="meta-training steps (default: configs/train/quick.yaml)")
    p.add_argument("--retrain", action="store_true", help="train again even if the demo editor exists")
    p.add_argument("--wild", action="store_true", help="also measure WILD answers (a second greedy decode per probe; "
                   "about half the measuring time): mend eval measures them by default")
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    allocator.keep_freed_memory()  # large tensors reused from the heap, not re-faulted from the OS each step (mend/allocator.py)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mend: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line, unless --debug
        if args.debug:
            raise
        # some messages span lines (OmegaConf's key details, YAML parse errors): keep them on one
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"mend: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
