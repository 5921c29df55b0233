"""Trace sequential editing edit by edit: update norm, drift ||W - W0|| / ||W0||, own and first fact
reliability, locality on 20 records' neighbours. Usage: python scripts/sequential_trace.py EDITOR_DIR N LIFELONG(0|1) [SETTINGS_JSON]"""
import sys, json, torch
from mend.editor import Editor
from mend.data.loaders import load_records
from mend.eval_metrics import Probes, predict

editor_dir, n, lifelong = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
settings = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.manual_seed(0)
ed = Editor.load(editor_dir, device="cpu", lifelong=lifelong, settings=settings or None)
records = load_records("../shared/data/counterfact/val.json")[100:100 + n]
model, tok = ed.model, ed.tokenizer
params = dict(model.named_parameters())
w0 = {t.name: params[t.name].detach().clone() for t in ed.targets}

def acc(probes):
    p = predict(model, tok, probes, wild_max_new_tokens=0)
    return [sum(int(a == b) for a, b in zip(x, y)) / len(x) for x, y in zip(p.argmax, p.answer_ids)], p

loc_probes = [Probes.of(r) for r in records[:20]]
loc_only = [Probes(tuple(pp for pp, role in zip(p.prompts, p.roles) if role == "locality"),
                   tuple(a for a, role in zip(p.answers, p.roles) if role == "locality"),
                   tuple(r for r in p.roles if r == "locality")) for p in loc_probes]
pre_loc = [predict(model, tok, q, wild_max_new_tokens=0).argmax for q in loc_only]
def loc():
    agree = tot = 0
    for q, ref in zip(loc_only, pre_loc):
        post = predict(model, tok, q, wild_max_new_tokens=0).argmax
        for a, b in zip(post, ref):
            agree += sum(int(x == y) for x, y in zip(a, b)); tot += len(a)
    return agree / tot
first = Probes((records[0].prompt,), (records[0].target,), ("reliability",))
for i, r in enumerate(records):
    try:
        res = ed.edit(r.prompt, r.target)
    except Exception as e:
        print(f"edit {i+1}: {type(e).__name__}: {e}"); break
    rel = max(float((params[k] - w0[k]).norm() / w0[k].norm()) for k in w0)
    un = max(res.update_norms.values())
    own = acc(Probes((r.prompt,), (r.target,), ("reliability",)))[0][0]
    f = acc(first)[0][0]
    line = f"edit {i+1:4d} loss {res.loss:7.3f} upd {un:9.3g} relW {rel:8.3g} own {own:.2f} first {f:.2f}"
    if (i + 1) % 5 == 0 or i < 5:
        line += f" loc20 {loc():.3f}"
    print(line, flush=True)
