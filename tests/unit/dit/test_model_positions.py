"""3D positions reach the model: a bug shared by the single-process and the parallel model (an axis that
rotates nothing, positions that are ignored) passes every equivalence test, so these compare against
hand formulas and against the model's own output with one sample's positions permuted."""

from dataclasses import replace

import pytest
import torch

from dit.model.embeddings import rope3d_angles
from dit.model.model import DiTModel
from tests.model_setup import make_microbatch, randomize, tiny_config

THETA = 10000.0


def hand_angles(position: tuple[int, int, int], split: tuple[int, int, int]) -> list[float]:
    """RoPE angles of one token, written out: axis a rotates only its own `split[a]` pairs, pair j of
    an axis of n pairs by coordinate * theta^(-j/n); Megatron's layout repeats the half."""
    half = [coordinate * THETA ** (-j / pairs) for coordinate, pairs in zip(position, split) for j in range(pairs)]
    return half + half


@pytest.mark.parametrize("head_dim, split", [(12, (2, 2, 2)), (24, (4, 4, 4)), (28, (6, 4, 4)), (40, (8, 6, 6))])
def test_rope3d_angles_match_the_hand_formula_axis_by_axis(head_dim, split):
    positions = torch.tensor([[0, 0, 0], [3, 0, 0], [0, 5, 0], [0, 0, 7], [2, 9, 4]])
    angles = rope3d_angles(positions, head_dim)  # [S, 1, 1, head_dim]
    assert angles.shape == (5, 1, 1, head_dim)
    expected = torch.tensor([hand_angles(tuple(p), split) for p in positions.tolist()])
    torch.testing.assert_close(angles[:, 0, 0], expected, rtol=1e-6, atol=0)  # fp32 powers
    # a move along one axis turns only that axis' slice (in both halves)
    for axis, row in ((0, 1), (1, 2), (2, 3)):
        start = sum(split[:axis])
        moved = torch.zeros(head_dim // 2, dtype=torch.bool)
        moved[start : start + split[axis]] = True
        assert torch.equal(angles[row, 0, 0] != 0, torch.cat([moved, moved]))


def _rows(batch, i):
    start = int(batch.cu_seqlens_padded[i])
    return slice(start, start + int(batch.cu_seqlens[i + 1] - batch.cu_seqlens[i]))


@pytest.mark.parametrize("embedding", ["rope3d", "sincos3d"])
def test_permuting_one_samples_positions_changes_that_sample_only(single_process, embedding):
    mb = make_microbatch(31, [(1, 4, 6), (2, 4, 4), (1, 6, 2)])  # sample 1: a 2 x 2 x 2 patch grid
    model = DiTModel(tiny_config(position_embedding=embedding))
    randomize(model, seed=3)
    b = mb.batch
    rows = _rows(b, 1)
    with torch.no_grad():
        before = model(b.tokens, mb.timesteps, b)
        changes = {"rows permuted": b.positions[rows].flip(0)}
        for axis, name in enumerate("thw"):  # mirror one axis: relative distances change sign along it only
            mirrored = b.positions[rows].clone()
            mirrored[:, axis] = mirrored[:, axis].max() - mirrored[:, axis]
            changes[f"{name} mirrored"] = mirrored
        for change, new in changes.items():
            positions = b.positions.clone()
            positions[rows] = new
            after = model(b.tokens, mb.timesteps, replace(b, positions=positions))
            for other in (0, 2):
                torch.testing.assert_close(after[_rows(b, other)], before[_rows(b, other)])  # fp32: rounding only
            assert (after[rows] - before[rows]).abs().max() > 1e-3, f"{embedding}: {change} changed nothing"
