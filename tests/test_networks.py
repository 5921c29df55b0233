"""MEND editor networks: identity at init, running statistics, the equation, and the ablations."""

from __future__ import annotations

import math

import pytest
import torch

from mend.config import TransformedFactors
from mend.networks import EditorNetwork, MendNetworks, RunningNorm, merge_moments
from mend.targets import EditTarget

# Three matrices: two of shape 4 -> 6 (sharing a network by default) and one 6 -> 4.
TARGETS = [
    EditTarget("blocks.1.fc_in.weight", "blocks.1.fc_in", 1, False, 4, 6),
    EditTarget("blocks.1.fc_out.weight", "blocks.1.fc_out", 1, False, 6, 4),
    EditTarget("blocks.2.fc_in.weight", "blocks.2.fc_in", 2, True, 4, 6),
]
CONFIGS = {
    "default": {},
    "u_only": {"transform": "u_only"},
    "delta_only": {"transform": "delta_only"},
    "unshared": {"share": False},
    "unnormalized": {"normalize": False},
    "no_blocks": {"n_blocks": 0},
    "output_modulation": {"modulation": "output"},
}


def factors(n: int = 7, scale: float = 3.0, offset: float = 2.0):
    """Rank-1 factors for every target: name -> (u (n, d_in), delta (n, d_out)), not standardised."""
    return {t.name: (torch.randn(n, t.d_in) * scale + offset, torch.randn(n, t.d_out) * scale - offset) for t in TARGETS}


def warm_up(networks: MendNetworks, batches: int = 3) -> None:
    """Feed a few batches in train mode so the running statistics are not trivial."""
    networks.train()
    for _ in range(batches):
        networks(factors())


def perturb(network: EditorNetwork, what: str = "up") -> None:
    """Make the residual blocks non-trivial (they are zero in ``up`` at initialisation)."""
    with torch.no_grad():
        for block in network.blocks:
            getattr(block, what).weight.normal_(0, 0.5)


def reference_transform(network: EditorNetwork, u, delta, mode):
    """x~ = x + std * (blocks(z) - z), z = [(u - mean_u) / std_u; (delta - mean_d) / std_d], each block
    h + B relu(scale_m * A h + shift_m) (bottleneck) or h + scale_m * B relu(A h) + shift_m (output),
    written out independently of the implementation."""
    u, delta = u.double(), delta.double()
    if network.normalize:
        mu, su = network.u_norm.mean, network.u_norm.std()
        md, sd = network.delta_norm.mean, network.delta_norm.std()
    else:
        mu, su, md, sd = 0.0, torch.ones(u.shape[1]).double(), 0.0, torch.ones(delta.shape[1]).double()
    z = torch.cat([(u - mu) / su, (delta - md) / sd], dim=-1)
    h = z
    for block in network.blocks:
        A, a = block.down.weight.double(), block.down.bias.double()
        B, b = block.up.weight.double(), block.up.bias.double()
        s, o = block.scale[mode].double(), block.shift[mode].double()
        if block.modulation == "output":
            h = h + (torch.relu(h @ A.t() + a) @ B.t() + b) * s + o
        else:
            h = h + torch.relu((h @ A.t() + a) * s + o) @ B.t() + b
    change = h - z
    u_out = u + change[:, : u.shape[1]] * su
    delta_out = delta + change[:, u.shape[1] :] * sd
    if network.transformed_factors == TransformedFactors.delta_only:
        u_out = u
    if network.transformed_factors == TransformedFactors.u_only:
        delta_out = delta
    return u_out.float(), delta_out.float()


# ---------------------------------------------------------------- identity at initialisation
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_an_untrained_editor_is_exactly_the_identity(config, mode):
    networks = MendNetworks(TARGETS, {"rank": 3, **config})
    warm_up(networks)  # non-trivial standardisation must not matter either
    networks.train(mode == "train")
    inputs = factors()
    for target in TARGETS:
        u, delta = inputs[target.name]
        u_t, delta_t = networks.run_network(target.name, u, delta)
        assert torch.equal(u_t, u) and torch.equal(delta_t, delta)
    lrs = networks.step_sizes()
    updates = networks(inputs)
    for target in TARGETS:
        u, delta = inputs[target.name]
        assert updates[target.name].shape == (target.d_out, target.d_in)
        assert torch.equal(updates[target.name], -lrs[target.name] * (delta.t() @ u))  # -lr * grad


def test_step_sizes_start_at_init_lr_one_per_matrix():
    networks = MendNetworks(TARGETS, {"init_lr": 0.03})
    assert networks.log_lrs.shape == (len(TARGETS),)
    assert set(networks.step_sizes()) == {t.name for t in TARGETS}
    for lr in networks.step_sizes().values():
        assert math.isclose(float(lr.detach()), 0.03, rel_tol=1e-6)


def test_an_editor_needs_targets():
    with pytest.raises(ValueError, match="at least one target"):
        MendNetworks([])


def test_updates_are_differentiable_in_the_editor_parameters():
    networks = MendNetworks(TARGETS, {"rank": 3})
    networks.train()
    sum(update.sum() for update in networks(factors()).values()).backward()
    assert networks.log_lrs.grad is not None and (networks.log_lrs.grad != 0).all()
    for network in networks.networks.values():
        assert network.blocks[-1].up.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the transform equation
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_perturbed_network_computes_the_mend_transform(config):
    networks = MendNetworks(TARGETS, {"rank": 3, **config})
    warm_up(networks)
    networks.eval()
    for network in networks.networks.values():
        perturb(network)
        with torch.no_grad():  # every member its own scale and shift, so their placement matters
            for block in network.blocks:
                block.scale.uniform_(0.5, 1.5)
                block.shift.normal_(0, 0.3)
    inputs = factors()
    for target in TARGETS:
        network = networks.networks[networks.network_of[target.name]]
        got = networks.run_network(target.name, *inputs[target.name])
        want = reference_transform(network, *inputs[target.name], networks.member_of[target.name])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_modulation_sets_the_width_of_each_members_scale_and_shift():
    """Bottleneck: one scale and shift per hidden unit (rank); output: per unit of z = [u; delta]."""
    for modulation, width in (("bottleneck", 3), ("output", 4 + 6)):
        networks = MendNetworks(TARGETS, {"rank": 3, "modulation": modulation})
        shared = networks.networks[networks.network_of[TARGETS[0].name]]  # two members of shape 4 -> 6
        for block in shared.blocks:
            assert block.scale.shape == block.shift.shape == (2, width)


def test_output_modulation_gives_each_member_its_own_shift_of_the_factors():
    """With output modulation, a member's shift moves its transformed factors by std * shift even where
    the low-rank path is still zero; the other member sharing the network is untouched."""
    networks = MendNetworks(TARGETS, {"rank": 3, "modulation": "output", "n_blocks": 1})
    warm_up(networks)
    networks.eval()
    shared = networks.networks[networks.network_of[TARGETS[0].name]]
    shift = torch.randn(4 + 6)
    with torch.no_grad():
        shared.blocks[0].shift[networks.member_of[TARGETS[2].name]] = shift
    u, delta = factors()[TARGETS[0].name]
    assert [torch.equal(a, b) for a, b in zip(networks.run_network(TARGETS[0].name, u, delta), (u, delta))] == [True, True]
    u_t, delta_t = networks.run_network(TARGETS[2].name, u, delta)
    torch.testing.assert_close(u_t - u, (shared.u_norm.std() * shift[:4].double()).float().expand_as(u))
    torch.testing.assert_close(delta_t - delta, (shared.delta_norm.std() * shift[4:].double()).float().expand_as(delta))


def test_modulation_is_checked():
    with pytest.raises(ValueError, match="modulation"):
        MendNetworks(TARGETS, {"modulation": "everywhere"})


# ---------------------------------------------------------------- running statistics
def test_running_norm_matches_mean_and_std_of_every_row_seen():
    norm = RunningNorm(5)
    seen = []
    for n in (1, 6, 17, 0, 3):  # uneven batches, a single row and an empty one
        rows = torch.randn(n, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + torch.tensor([100.0, -5.0, 0.0, 2.0, 1e3])
        norm.update(rows)
        seen.append(rows)
    everything = torch.cat(seen).double()
    assert float(norm.count) == everything.shape[0] == 27
    torch.testing.assert_close(norm.mean, everything.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(norm.std(), everything.std(0), rtol=1e-9, atol=1e-9)


def test_running_norm_merges_batches_like_one_batch():
    rows = torch.randn(40, 3) * 4 + 7
    whole, pieces = RunningNorm(3), RunningNorm(3)
    whole.update(rows)
    for chunk in rows.split([1, 2, 13, 24]):
        pieces.update(chunk)
    assert torch.equal(whole.count, pieces.count)
    torch.testing.assert_close(pieces.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pieces.m2, whole.m2, rtol=1e-10, atol=1e-10)


def test_running_norm_std_is_one_until_two_rows_are_seen():
    norm = RunningNorm(3)
    assert torch.equal(norm.std(), torch.ones(3, dtype=torch.float64))
    norm.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(norm.std(), torch.ones(3, dtype=torch.float64))
    norm.update(torch.tensor([[3.0, 2.0, 1.0]]))
    torch.testing.assert_close(norm.std(), torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64).sqrt().clamp(min=1e-12))


def test_statistics_update_in_train_mode_only():
    networks = MendNetworks(TARGETS, {"rank": 3})
    network = networks.networks[networks.network_of[TARGETS[1].name]]
    inputs = factors(n=5)
    networks.train()
    networks(inputs)
    assert float(network.u_norm.count) == float(network.delta_norm.count) == 5
    frozen = {k: v.clone() for k, v in networks.state_dict().items()}
    networks.eval()
    networks(factors(n=9))
    assert all(torch.equal(v, frozen[k]) for k, v in networks.state_dict().items())


def test_shared_networks_see_the_rows_of_every_matrix_of_their_shape():
    networks = MendNetworks(TARGETS, {"rank": 3})
    networks.train()
    inputs = factors(n=5)
    networks(inputs)
    shared = networks.networks[networks.network_of[TARGETS[0].name]]
    expected = torch.cat([inputs[TARGETS[0].name][0], inputs[TARGETS[2].name][0]]).double()
    assert float(shared.u_norm.count) == 10
    torch.testing.assert_close(shared.u_norm.mean, expected.mean(0))


def moments(rows: torch.Tensor):
    """(count, mean, M2) of ``rows`` (N, d), computed directly in float64."""
    rows = rows.double()
    mean = rows.mean(0) if len(rows) else torch.zeros(rows.shape[1], dtype=torch.float64)
    return torch.tensor(float(len(rows)), dtype=torch.float64), mean, ((rows - mean) ** 2).sum(0)


@pytest.mark.parametrize("n_a, n_b", [(5, 9), (1, 1), (0, 4), (4, 0), (0, 0)])
def test_merge_moments_of_two_sets_are_the_moments_of_their_union(n_a, n_b):
    a, b = torch.randn(n_a, 3) * 2 + 1, torch.randn(n_b, 3) * 0.5 - 3
    merged = merge_moments(*moments(a), *moments(b))
    for got, want in zip(merged, moments(torch.cat([a, b]))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fresh_statistics_count_the_rows_since_the_last_merge_and_are_not_saved():
    norm = RunningNorm(3)
    rows = torch.randn(6, 3)
    norm.update(rows)
    for got, want in zip((norm.fresh_count, norm.fresh_mean, norm.fresh_m2), moments(rows)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert sorted(norm.state_dict()) == ["count", "m2", "mean"]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_two_processes_merge_statistics_like_one_process_that_saw_all_rows(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    tests = Path(__file__).resolve().parent
    sys.path.insert(0, str(tests))
    from dist_stats_script import DIMS, STEPS, rows_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__import__("mend").__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(tests / "dist_stats_script.py"),
               str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # the same arithmetic on the same numbers in both processes
        assert torch.equal(rank0[key], rank1[key]), key
    for name, d in DIMS.items():
        everything = torch.cat([rows_for(step, rank, name) for step in range(STEPS) for rank in (0, 1)])
        alone = RunningNorm(d)
        alone.update(everything)
        for buffer, want in zip(("count", "mean", "m2"), moments(everything)):
            torch.testing.assert_close(rank0[f"{name}.{buffer}"], want, rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(rank0[f"{name}.{buffer}"], getattr(alone, buffer), rtol=1e-12, atol=1e-10)
        assert float(rank0[f"{name}.fresh_count"]) == 0 and not rank0[f"{name}.fresh_m2"].any()


def test_statistics_are_buffers_saved_in_the_state_dict():
    networks = MendNetworks(TARGETS, {"rank": 3})
    warm_up(networks)
    state = networks.state_dict()
    parameter_names = {name for name, _ in networks.named_parameters()}
    for key in networks.networks:
        for norm in ("u_norm", "delta_norm"):
            for buffer in ("count", "mean", "m2"):
                name = f"networks.{key}.{norm}.{buffer}"
                assert name in state and name not in parameter_names
    fresh = MendNetworks(TARGETS, {"rank": 3})
    fresh.load_state_dict(state)
    for key, network in fresh.networks.items():
        assert torch.equal(network.u_norm.std(), networks.networks[key].u_norm.std())
        assert float(network.delta_norm.count) == 3 * 7 * sum(1 for t in TARGETS if networks.network_of[t.name] == key)


# ---------------------------------------------------------------- ablation switches
@pytest.mark.parametrize("transform", ["both", "u_only", "delta_only"])
def test_transform_switch_chooses_which_factor_changes(transform):
    networks = MendNetworks(TARGETS, {"rank": 3, "transform": transform})
    for network in networks.networks.values():
        perturb(network)
    networks.eval()
    u, delta = factors()[TARGETS[0].name]
    u_t, delta_t = networks.run_network(TARGETS[0].name, u, delta)
    assert torch.equal(delta_t, delta) == (transform == "u_only")
    assert torch.equal(u_t, u) == (transform == "delta_only")


def test_shared_networks_one_per_shape_with_a_mode_per_matrix():
    networks = MendNetworks(TARGETS, {"rank": 3, "share": True})
    assert sorted(networks.networks.keys()) == ["4x6", "6x4"]
    assert networks.network_of[TARGETS[0].name] == networks.network_of[TARGETS[2].name] == "4x6"
    assert networks.member_of[TARGETS[0].name] != networks.member_of[TARGETS[2].name]
    assert networks.networks["4x6"].blocks[0].scale.shape == (2, 3)  # (n_members, rank)
    # per-matrix scale: changing mode 0's scale changes only the matrix with mode 0
    networks.eval()
    for network in networks.networks.values():
        perturb(network)
    inputs = factors()
    before = {t.name: networks.run_network(t.name, *inputs[t.name]) for t in TARGETS}
    with torch.no_grad():
        networks.networks["4x6"].blocks[0].scale[networks.member_of[TARGETS[0].name]].mul_(3.0)
    after = {t.name: networks.run_network(t.name, *inputs[t.name]) for t in TARGETS}
    assert not torch.equal(after[TARGETS[0].name][0], before[TARGETS[0].name][0])
    for target in TARGETS[1:]:
        assert all(torch.equal(a, b) for a, b in zip(after[target.name], before[target.name]))


def test_unshared_networks_one_per_matrix():
    networks = MendNetworks(TARGETS, {"rank": 3, "share": False})
    assert len(networks.networks) == len(TARGETS)
    assert len({networks.network_of[t.name] for t in TARGETS}) == len(TARGETS)
    networks.eval()
    inputs = factors()
    perturb(networks.networks[networks.network_of[TARGETS[2].name]])
    for target in TARGETS:
        u, delta = inputs[target.name]
        u_t, delta_t = networks.run_network(target.name, u, delta)
        assert (torch.equal(u_t, u) and torch.equal(delta_t, delta)) == (target is not TARGETS[2])


def test_normalize_off_keeps_no_statistics_and_uses_raw_factors():
    raw = MendNetworks(TARGETS, {"rank": 3, "normalize": False})
    for network in raw.networks.values():
        perturb(network)
    raw.train()
    raw(factors())
    for network in raw.networks.values():
        assert float(network.u_norm.count) == float(network.delta_norm.count) == 0
    normed = MendNetworks(TARGETS, {"rank": 3, "normalize": True})
    normed.load_state_dict(raw.state_dict())  # the same weights...
    warm_up(normed)  # ...plus running statistics
    raw.eval()
    normed.eval()
    inputs = factors()
    name = TARGETS[0].name
    got = raw.run_network(name, *inputs[name])
    want = reference_transform(raw.networks[raw.network_of[name]], *inputs[name], raw.member_of[name])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(normed.run_network(name, *inputs[name])[0], got[0])


def test_rank_is_capped_at_the_joint_width():
    network = EditorNetwork(4, 6, 1, rank=1920, n_blocks=2, transform="both", normalize=True)
    assert network.rank == 10
    assert network.blocks[0].down.weight.shape == (10, 10)
    assert len(EditorNetwork(4, 6, 1, rank=2, n_blocks=3, transform="both", normalize=True).blocks) == 3
