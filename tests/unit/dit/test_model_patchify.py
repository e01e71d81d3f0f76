"""Patchify / unpatchify round trip for images and video with temporal patch 1 and 2, and the model's
unpatchify of a whole pack; odd grids are rejected with a clear error."""

import pytest
import torch

from dit.model.model import DiTModel
from dit.model.patchify import patchify, unpatchify
from tests.model_setup import make_microbatch, tiny_config


@pytest.mark.parametrize(
    "shape, temporal_patch",
    [
        ((4, 6, 8), 1),  # image [C, H, W]
        ((4, 5, 6, 8), 1),  # video
        ((4, 6, 6, 4), 2),  # video, two frames per token
    ],
)
def test_round_trip(shape, temporal_patch):
    latent = torch.randn(shape)
    tokens, positions = patchify(latent, 2, temporal_patch)
    grid = (shape[1] // temporal_patch if len(shape) == 4 else 1, shape[-2] // 2, shape[-1] // 2)
    assert tokens.shape == (grid[0] * grid[1] * grid[2], temporal_patch * 4 * shape[0])
    assert positions.max(0).values.tolist() == [g - 1 for g in grid]
    back = unpatchify(tokens, grid, 2, temporal_patch)
    assert torch.equal(back, latent if len(shape) == 4 else latent.unsqueeze(1))


@pytest.mark.parametrize(
    "shape, temporal_patch, message",
    [
        ((4, 5, 8), 1, "height 5 is not divisible"),
        ((4, 3, 6, 7), 1, "width 7 is not divisible"),
        ((4, 3, 6, 8), 2, "frames 3 is not divisible"),
        ((4, 6, 8), 2, "frames 1 is not divisible"),  # an image cannot take a temporal patch of 2
    ],
)
def test_odd_grids_are_rejected(shape, temporal_patch, message):
    with pytest.raises(ValueError, match=message):
        patchify(torch.randn(shape), 2, temporal_patch)


def test_model_unpatchify_returns_each_sample(single_process):
    grids = [(2, 4, 6), (4, 2, 2)]
    mb = make_microbatch(31, grids, temporal_patch=2, pad_multiple=8)
    model = DiTModel(tiny_config(temporal_patch_size=2))
    latents = model.unpatchify(mb.batch.tokens, mb.batch)
    assert [tuple(x.shape) for x in latents] == [(4, *g) for g in grids]
    for latent, start in zip(latents, mb.batch.cu_seqlens_padded.tolist()):
        tokens, _ = patchify(latent, 2, 2)
        assert torch.equal(tokens, mb.batch.tokens[start : start + tokens.shape[0]])
    with pytest.raises(ValueError, match="whole pack"):
        model.unpatchify(mb.batch.tokens[:-4], mb.batch)
