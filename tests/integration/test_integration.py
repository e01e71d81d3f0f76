"""The data path feeds the model: a real energon dataset, the real loader, DiTModel and the loss.

The same first pack at CP=2 (2 gloo processes, each with its load-balanced share cut by the
data path) and at CP=1 must give the same loss and, summed over the CP ranks, the same gradients:
this checks that the data path and the model read the PackedBatch contract the same way.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from data.loader.dataloader import build_train_loader
from dit.diffusion.draws import sample_generator
from dit.diffusion.loss import per_sample_loss
from dit.model.model import DiTModel
from dit.runtime import distributed as runtime
from dit.training.arguments import load_run_config
from tests.distributed import run_distributed
from tests.tiny_data import TINY_RUN, payloads, write_dataset

pytestmark = pytest.mark.dist

FLAGS = TINY_RUN + ["--max-seq-length", "64", "--packing-buffer-size", "16", "--seed", "7"]


def _first_pack_loss_and_grads(data_path: str, cp: int) -> dict:
    run = load_run_config(FLAGS + ["--data-path", data_path, "--context-parallel-size", str(cp)], dist.get_world_size())
    runtime.initialize_model_parallel(runtime.ParallelLayout(context=cp))
    runtime.set_random_seed(run.training.seed, per_data_parallel_rank=False)
    model = DiTModel(run.model)
    loader = build_train_loader(run)
    batch = next(loader)
    loader.close()
    timesteps = torch.stack([torch.rand((), generator=sample_generator(run.training.seed, 0, k)) for k in batch.keys])
    target = batch.tokens.flip(-1)  # any target computed from the data alone
    loss = per_sample_loss(model(batch.tokens, timesteps, batch), target, batch, ps.get_context_parallel_group()).mean()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=ps.get_context_parallel_group())  # each CP rank holds its tokens' share
        grads[name] = g
    return {"loss": loss.item(), "keys": batch.keys, "tokens": int(batch.loss_mask.sum()), "grads": grads}


# images and videos whose token counts (patch 2) are multiples of 2*cp = 4, so that CP=1 and CP=2
# pad them alike and first-fit-decreasing builds the same packs
SHAPES = [(4, 4, 4), (4, 2, 4, 4), (4, 8, 8), (4, 3, 4, 4), (4, 4, 8), (4, 8, 4), (4, 2, 8, 4)]


def test_cp2_data_path_into_model_matches_cp1(tmp_path):
    entries = [(f"s_{i:03d}", payloads(SHAPES[i % len(SHAPES)], seed=i, text_len=1 + i % 5)) for i in range(24)]
    data = str(write_dataset(tmp_path / "ds", entries))
    reference = run_distributed(_first_pack_loss_and_grads, 1, data, 1)[0]
    shares = run_distributed(_first_pack_loss_and_grads, 2, data, 2)
    assert len(reference["keys"]) > 2  # a real pack of several samples
    assert sum(s["tokens"] for s in shares) == reference["tokens"]
    for share in shares:
        assert share["keys"] == reference["keys"]
        # fp32 on both sides; CP changes only the summation order (see tests/model_setup.py)
        assert abs(share["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"])
        for name, ref in reference["grads"].items():
            err = (share["grads"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err < 1e-5, (name, err.item())
