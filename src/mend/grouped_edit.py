"""An edited forward pass in which each group of batch rows sees its own edit, in one batch.

A MEND update is low-rank: ``dW = -lr * D^T U`` with ``U`` (n, d_in) and ``D`` (n, d_out) the
transformed factors of the n captured positions. So the edited layer's output is

    x (W + dW)^T = x W^T - lr * (x U^T) D                                  x: (T, d_in)

and the correction costs two thin products instead of forming a (d_out, d_in) matrix. With a
forward hook adding that correction per row, rows of different groups can carry different edits in
the same forward pass: a batch of independent edits costs one forward, and no weight is modified.

An edit reaches the base model in exactly two ways, both computing the same ``W + dW``:

- here, for meta-training: the update stays in its low-rank factors and a forward hook adds
  ``-lr (x U^T) D`` to the edited modules' outputs, per row group, with gradients flowing into the
  editor; no weight is touched;
- `mend.editor.Editor`, for users: ``dW`` is formed once (`mend.networks.update_from`), checked to be
  finite and added to the weights in place; revert replays the stored factors exactly.

The tests check the first against a third, plain reference (``W + dW`` through
``torch.func.functional_call``, tests/test_grouped_edit.py).
"""

from __future__ import annotations

import contextlib

import torch

from .targets import EditTarget


def group_slots(groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, int]:
    """Where each row (N,) goes in `pad_by_group`'s layout: (its slot within its group (N,) long, keeping
    the rows' order within a group; the largest group's size)."""
    counts = torch.bincount(groups, minlength=n_groups)
    order = torch.argsort(groups, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(groups)
    slot[order] = torch.arange(groups.numel(), device=groups.device) - starts[groups[order]]
    return slot, int(counts.max()) if groups.numel() else 0


def pad_by_group(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Scatter rows (N, d) into a zero-padded (n_groups, n_max, d) tensor, keeping order within a group.
    ``padded[groups, group_slots(groups, n_groups)[0]]`` gives the rows back."""
    slot, n_max = group_slots(groups, n_groups)
    out = values.new_zeros(n_groups, max(n_max, 1), values.shape[-1])
    return out.index_put((groups, slot), values)


@contextlib.contextmanager
def edits_by_row_group(model, targets: list[EditTarget], edits: dict, row_groups: torch.Tensor):
    """Within the block, target modules add each row's group edit to their outputs.

    Args:
        edits: name -> (U (G, n, d_in), D (G, n, d_out), lr scalar), zero-padded per group.
        row_groups: (B,) the group of each batch row of the forward passes run inside the block.
    """
    modules = dict(model.named_modules())
    handles = []
    n_groups = next(iter(edits.values()))[0].shape[0] if edits else 0
    slot, rows_max = group_slots(row_groups, n_groups)
    rows_max = max(rows_max, 1)

    def make_hook(name):
        u_g, d_g, lr = edits[name]

        def hook(module, args, output):
            # Rows are laid out by group, so each group's factors are used once, not copied per row:
            # the cost grows with rows x positions, not rows x positions x facts in the group.
            x = args[0]  # (B, T, d_in)
            batch, length, d_in = x.shape
            x_g = x.new_zeros(n_groups, rows_max, length, d_in).index_put((row_groups, slot), x)
            x_g = x_g.view(n_groups, rows_max * length, d_in)  # (G, r_max * T, d_in)
            u_t, d_t = u_g.to(x.dtype), d_g.to(x.dtype)  # (G, n, d_in), (G, n, d_out)
            correction = torch.bmm(torch.bmm(x_g, u_t.transpose(1, 2)), d_t)  # (G, r_max * T, d_out)
            correction = correction.view(n_groups, rows_max, length, -1)[row_groups, slot]  # (B, T, d_out)
            return output - lr.to(x.dtype) * correction

        return hook

    try:
        for target in targets:
            handles.append(modules[target.module_name].register_forward_hook(make_hook(target.name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
