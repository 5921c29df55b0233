"""Resident memory of a lifelong editor over 120 sequential CounterFact edits, with editor.commit()
every 20 edits or never. Usage: python scripts/lifelong_memory.py EDITOR_DIR COMMIT_EVERY (0 = never)"""
import resource
import sys

from mend.data import load_records
from mend.editor import Editor

editor_dir, commit_every = sys.argv[1], int(sys.argv[2])
ed = Editor.load(editor_dir, device="cpu")
recs = load_records("../shared/data/counterfact/val.json")[100:220]


def rss():
    return open("/proc/self/status").read().split("VmRSS:")[1].split("\n")[0].strip()


print("loaded", rss(), "peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MB", flush=True)
for i, r in enumerate(recs):
    ed.edit(r.prompt, r.target)
    if commit_every and (i + 1) % commit_every == 0:
        ed.commit()
    if (i + 1) % 20 == 0:
        print(i + 1, rss(), "peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MB", flush=True)
