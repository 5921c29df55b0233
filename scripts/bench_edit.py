"""Time one MEND edit against three passes of the base model on the same (prompt, target) input.

    python scripts/bench_edit.py [--model smollm2-135m|gemma3-270m|DIR] [--editor DIR] [--repeats 30] [--device cpu|cuda]

Prints, per device, the median time of `Editor.edit` (forward, backward through the edited blocks,
editor pass, applying the update; reverting is not timed) and of three denominators:

* fine-tuning forward+backward: every parameter requires grad, full logits, loss on the target
  tokens, as one step of fine-tuning the whole model would do;
* edited-matrices forward+backward: only the edited matrices require grad and only the target
  positions' logits are computed, so the backward stops at the lowest edited block; the least work
  any method needs to get the gradient an edit starts from;
* inference forward: a bare forward without gradients, full logits;

and the edit's time as a ratio to each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mend
from mend.batching import encode_pairs
from mend.scoring import mean_nll, target_logits
from mend.data import load_records
from mend.allocator import keep_freed_memory


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device) -> float:
    for _ in range(3):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench(device: torch.device, model_name: str, editor_dir, repeats: int, data: str) -> dict:
    model, tokenizer = mend.load_base_model(model_name, device=device)
    editor = mend.Editor.load(editor_dir, model, tokenizer) if editor_dir else mend.Editor.untrained(model, tokenizer)
    records = load_records(data)[:repeats + 3]
    edit_times = []
    for record in records[:3]:
        editor.revert(editor.edit(record.prompt, record.target))
    for record in records[3 : 3 + repeats]:
        _sync(device)
        start = time.perf_counter()
        result = editor.edit(record.prompt, record.target)
        _sync(device)
        edit_times.append((time.perf_counter() - start) * 1000)
        editor.revert(result)
    edit_ms = statistics.median(edit_times)

    record = records[0]
    batch = encode_pairs(tokenizer, [record.prompt], [record.target]).to(device)
    labels = batch.input_ids.masked_fill(~batch.target_mask, -100)
    trainable = [p for p in model.parameters()]

    def fwd_bwd():
        for p in trainable:
            p.requires_grad_(True)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
        out.loss.backward()
        for p in trainable:
            p.grad = None
            p.requires_grad_(False)

    params = dict(model.named_parameters())
    edited = [params[t.name] for t in editor.targets]

    def edited_fwd_bwd():
        for p in edited:
            p.requires_grad_(True)
        mean_nll(target_logits(model, batch), batch.target_ids).backward()
        for p in edited:
            p.grad = None
            p.requires_grad_(False)

    def forward():
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    fwd_bwd_ms = median_ms(fwd_bwd, repeats, device)
    edited_fwd_bwd_ms = median_ms(edited_fwd_bwd, repeats, device)
    forward_ms = median_ms(forward, repeats, device)
    return {"device": str(device), "edit_ms": edit_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "edited_fwd_bwd_ms": edited_fwd_bwd_ms, "forward_ms": forward_ms,
            "ratio": edit_ms / fwd_bwd_ms, "ratio_edited": edit_ms / edited_fwd_bwd_ms,
            "ratio_forward": edit_ms / forward_ms, "threads": torch.get_num_threads()}


def main():
    keep_freed_memory()  # as the command line does (mend/allocator.py); MEND_MALLOC_TUNING=0 measures without it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base model: an embedded name, hub id or directory")
    parser.add_argument("--editor", help="a trained editor directory (default: an untrained editor; same cost)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--data", default="data/facts/val.json", help="prompts to edit with")
    args = parser.parse_args()
    devices = [torch.device("cpu")]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices = [torch.device("cuda")] if args.device == "cuda" else devices + [torch.device("cuda")]
    for device in devices:
        r = bench(device, args.model, args.editor, args.repeats, args.data)
        print(f"{r['device']} ({r['threads']} threads): edit {r['edit_ms']:.1f} ms\n"
              f"  fine-tuning forward+backward (all parameters, full logits) {r['fwd_bwd_ms']:.1f} ms: "
              f"edit / this = {r['ratio']:.2f}\n"
              f"  edited-matrices forward+backward (target logits only)      {r['edited_fwd_bwd_ms']:.1f} ms: "
              f"edit / this = {r['ratio_edited']:.2f}\n"
              f"  inference forward (no gradients, full logits)              {r['forward_ms']:.1f} ms: "
              f"edit / this = {r['ratio_forward']:.2f}")


if __name__ == "__main__":
    main()
