"""How alike are the single-fact updates of unrelated facts? Pairwise cosine of 8 val facts' updates per
matrix and the share of their sum in its top singular direction. Usage: python scripts/update_overlap.py EDITOR_DIR"""
import sys, torch
from mend.editor import Editor
from mend.data.loaders import load_records
ed = Editor.load(sys.argv[1], device="cpu", settings=None)
recs = load_records("../shared/data/counterfact/val.json")[100:108]
ups = [ed.compute_updates([(r.prompt, r.target)])[0] for r in recs]
for name in list(ups[0])[::3] + [list(ups[0])[-1]]:
    M = torch.stack([u[name].flatten() for u in ups]); M = M / M.norm(dim=1, keepdim=True)
    c = M @ M.t(); off = c[~torch.eye(len(c), dtype=bool)]
    # shared rank-1 part: top singular direction fraction
    W = torch.stack([u[name] for u in ups])
    U, S, Vh = torch.linalg.svd(W.sum(0))
    print(name, "mean cos %.3f min %.3f" % (off.mean(), off.min()), "sum-norm/sum-of-norms %.3f" % (W.sum(0).norm() / W.flatten(1).norm(dim=1).sum()), "top sv share %.3f" % (S[0]**2 / (S**2).sum()))
    # per-update: key-side direction overlap (row space) top right singular vectors
    tops = [torch.linalg.svd(u[name])[2][0] for u in ups]
    tops_l = [torch.linalg.svd(u[name])[0][:, 0] for u in ups]
    T = torch.stack(tops); L = torch.stack(tops_l)
    print("   |cos| of top input dirs", ((T @ T.t()).abs()[~torch.eye(len(T), dtype=bool)]).mean().item(), " top output dirs", ((L @ L.t()).abs()[~torch.eye(len(L), dtype=bool)]).mean().item())
