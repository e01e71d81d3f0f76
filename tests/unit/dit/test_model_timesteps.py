"""Each sample of a pack is conditioned on its own timestep: changing only sample i's timestep changes only
sample i's output, for every i (a model that broadcast one timestep per pack would fail this)."""

import pytest
import torch

from dit.model.model import DiTModel
from tests.model_setup import make_microbatch, randomize, tiny_config


@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_changing_one_timestep_changes_only_that_sample(single_process, conditioning):  # noqa: F811
    model = DiTModel(tiny_config(conditioning=conditioning))
    randomize(model, seed=1)
    mb = make_microbatch(2, [(1, 4, 4), (2, 4, 4), (1, 2, 6), (1, 4, 4)])
    cu, cu_padded = mb.batch.cu_seqlens.tolist(), mb.batch.cu_seqlens_padded.tolist()
    rows = [slice(cu_padded[i], cu_padded[i] + cu[i + 1] - cu[i]) for i in range(mb.batch.num_samples)]
    with torch.no_grad():
        base = model(mb.batch.tokens, mb.timesteps, mb.batch)
        for i in range(mb.batch.num_samples):
            timesteps = mb.timesteps.clone()
            timesteps[i] += 0.5
            out = model(mb.batch.tokens, timesteps, mb.batch)
            for j, r in enumerate(rows):
                change = (out[r] - base[r]).abs().max().item()
                if j == i:
                    assert change > 1e-3, f"sample {i}'s output ignores its own timestep"
                else:
                    assert change == 0.0, f"sample {j} changed when only sample {i}'s timestep did"
