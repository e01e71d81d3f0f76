"""Per-sample draws: a function of (seed, iteration, key) only, the same on every TP/CP rank of a replica
(CP ranks holding their rows of one whole-sample noise), distinct across DP; guidance dropout per sample."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from data.loader.dataloader import build_train_loader
from dit.diffusion.draws import draw, drop_conditioning
from dit.model.packed import thd_partition_indices
from dit.runtime import distributed as runtime
from dit.training.arguments import load_run_config
from tests.distributed import run_distributed
from tests.model_setup import make_microbatch
from tests.tiny_data import TINY_RUN, payloads, write_dataset


def test_draws_depend_on_seed_iteration_and_key_only():
    pack = make_microbatch(0, [(1, 2, 4), (2, 4, 4), (1, 4, 2)]).batch
    a, b = (draw(pack, seed=3, iteration=5, drop_prob=0.5) for _ in range(2))
    assert torch.equal(a.z, b.z) and torch.equal(a.dropped, b.dropped) and torch.equal(a.noise, b.noise)
    later = draw(pack, seed=3, iteration=6, drop_prob=0.5)
    other_seed = draw(pack, seed=4, iteration=5, drop_prob=0.5)
    assert not torch.equal(a.z, later.z) and not torch.equal(a.z, other_seed.z)
    # one level per sample, never one per pack
    assert len(set(a.z.tolist())) == pack.num_samples
    # a sample's draws do not depend on its pack-mates: the same key alone in a pack draws the same
    alone = make_microbatch(0, [(2, 4, 4)]).batch
    alone.keys = [pack.keys[1]]
    single = draw(alone, seed=3, iteration=5, drop_prob=0.5)
    start, length = int(pack.cu_seqlens_padded[1]), int(pack.cu_seqlens[2] - pack.cu_seqlens[1])
    assert single.z.item() == a.z[1].item()
    assert torch.equal(single.noise[:length], a.noise[start : start + length])
    # pad rows get no noise (the loss never sees them)
    assert not a.noise[~pack.loss_mask].any()


def test_guidance_dropout_rate_and_null_conditioning():
    pack = make_microbatch(1, [(1, 2, 2)] * 400).batch
    drawn = draw(pack, seed=0, iteration=1, drop_prob=0.1)
    n = int(drawn.dropped.sum())
    assert abs(n - 40) < 4 * (400 * 0.1 * 0.9) ** 0.5  # binomial(400, 0.1): 4 standard deviations
    dropped = drop_conditioning(pack, drawn.dropped, null_class=10)
    assert torch.equal(dropped.labels, torch.where(drawn.dropped, 10, pack.labels))
    for i in range(pack.num_samples):
        rows = slice(int(pack.cu_seqlens_text[i]), int(pack.cu_seqlens_text[i + 1]))
        expected = torch.zeros_like(pack.text[rows]) if drawn.dropped[i] else pack.text[rows]
        assert torch.equal(dropped.text[rows], expected)
    assert drop_conditioning(pack, torch.zeros(400, dtype=torch.bool), 10) is pack


def _rank_draws(data_path: str, tp: int, cp: int) -> dict:
    run = load_run_config(
        TINY_RUN
        + [
            "--max-seq-length",
            "64",
            "--packing-buffer-size",
            "16",
            "--tensor-model-parallel-size",
            str(tp),
            "--context-parallel-size",
            str(cp),
            "--data-path",
            data_path,
        ],
        dist.get_world_size(),
    )
    runtime.initialize_model_parallel(runtime.ParallelLayout(tensor=tp, context=cp))
    loader = build_train_loader(run)
    pack = next(loader)
    loader.close()
    drawn = draw(pack, seed=9, iteration=3, drop_prob=0.5, cp_size=cp, cp_rank=ps.get_context_parallel_rank())
    return {
        "dp": ps.get_data_parallel_rank(),
        "cp": ps.get_context_parallel_rank(),
        "keys": pack.keys,
        "z": drawn.z,
        "dropped": drawn.dropped,
        "noise": drawn.noise,
        "cu_padded": pack.cu_seqlens_padded,
        "cu_seqlens": pack.cu_seqlens,
    }


@pytest.mark.dist
@pytest.mark.slow
def test_draws_across_the_ranks_of_tp2_cp2_dp2(tmp_path):
    shapes = [(4, 4, 4), (4, 2, 4, 4), (4, 8, 8), (4, 4, 8)]  # token counts multiples of 2*cp
    data = str(write_dataset(tmp_path / "ds", [(f"s_{i:03d}", payloads(shapes[i % 4], seed=i)) for i in range(32)]))
    ranks = run_distributed(_rank_draws, 8, data, 2, 2)
    for dp in (0, 1):
        replica = [r for r in ranks if r["dp"] == dp]
        first = replica[0]
        for r in replica:  # TP and CP ranks of one replica: the same samples and the same draws
            assert r["keys"] == first["keys"] and torch.equal(r["z"], first["z"])
            assert torch.equal(r["dropped"], first["dropped"])
        # the CP ranks' noise rows put back together are the whole samples' noise, drawn at CP=1
        whole = torch.zeros(int(first["cu_padded"][-1]), first["noise"].shape[1])
        for r in replica:
            whole[thd_partition_indices(r["cu_padded"], 2, r["cp"])] = r["noise"]
        expected = draw(_whole_pack_like(first), seed=9, iteration=3, drop_prob=0.5).noise
        assert torch.equal(whole, expected)
    zero, one = (next(r for r in ranks if r["dp"] == dp) for dp in (0, 1))
    assert not set(zero["keys"]) & set(one["keys"])  # replicas read different samples...
    assert not set(zero["z"].tolist()) & set(one["z"].tolist())  # ...and draw different levels


def _whole_pack_like(rank: dict):
    """A whole pack (CP=1) with the rank's keys and lengths: draws need nothing else."""
    base = make_microbatch(0, [(1, 2, 2)]).batch
    total, width = int(rank["cu_padded"][-1]), rank["noise"].shape[1]
    return replace(
        base,
        tokens=torch.zeros(total, width),
        cu_seqlens_padded=rank["cu_padded"],
        cu_seqlens=rank["cu_seqlens"],
        keys=rank["keys"],
    )
