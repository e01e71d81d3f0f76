"""Runtime: process groups, the RNG contract, the CPU layer, and dist checkpointing on gloo."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from dit.diffusion.draws import sample_generator
from dit.runtime import cpu_backend
from dit.runtime import distributed as runtime
from tests.distributed import run_distributed


def _groups(tp, pp, cp):
    runtime.initialize_model_parallel(runtime.ParallelLayout(tensor=tp, pipeline=pp, context=cp))

    def ranks(group):
        return sorted(dist.get_process_group_ranks(group))

    return {
        "rank": dist.get_rank(),
        "tp": ranks(ps.get_tensor_model_parallel_group()),
        "pp": ranks(ps.get_pipeline_model_parallel_group()),
        "cp": ranks(ps.get_context_parallel_group()),
        "dp": ranks(ps.get_data_parallel_group()),
        "dp_size": ps.get_data_parallel_world_size(),
        "backend": dist.get_backend(),
        "cpu_layer": cpu_backend.is_active(),
    }


def _expected_groups(world, tp, pp, cp):
    """Megatron's default rank order is tp-cp-dp-pp (tp fastest): derive each group by hand."""
    dp = world // (tp * pp * cp)

    def coords(r):
        return r % tp, (r // tp) % cp, (r // (tp * cp)) % dp, r // (tp * cp * dp)

    def group(r, axis):
        return sorted(
            q for q in range(world) if all(a == b for i, (a, b) in enumerate(zip(coords(q), coords(r))) if i != axis)
        )

    return {r: {"tp": group(r, 0), "cp": group(r, 1), "dp": group(r, 2), "pp": group(r, 3)} for r in range(world)}


@pytest.mark.dist
def test_tp2_pp2_dp2_groups_over_gloo():
    results = run_distributed(_groups, 8, 2, 2, 1)
    expected = _expected_groups(8, 2, 2, 1)
    for res in results:
        assert res["backend"] == "gloo" and res["cpu_layer"]
        assert res["dp_size"] == 2
        for axis in ("tp", "pp", "cp", "dp"):
            assert res[axis] == expected[res["rank"]][axis], (res["rank"], axis)


@pytest.mark.dist
def test_tp2_cp2_groups_over_gloo():
    results = run_distributed(_groups, 4, 2, 1, 2)
    expected = _expected_groups(4, 2, 1, 2)
    for res in results:
        assert res["dp_size"] == 1
        assert res["cp"] == expected[res["rank"]]["cp"] and res["tp"] == expected[res["rank"]]["tp"]


def _rng_draws(seed):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    runtime.initialize_model_parallel(runtime.ParallelLayout(tensor=2))
    runtime.set_random_seed(seed, per_data_parallel_rank=False)
    init = torch.rand(4)
    runtime.set_random_seed(seed, per_data_parallel_rank=True)
    data = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        tp_region = torch.rand(4)
    after_fork = torch.rand(4)  # the fork must leave the default stream where it was
    sample = torch.rand(4, generator=sample_generator(seed, 7, "shard_0/sample_3"))
    return dict(
        tp=ps.get_tensor_model_parallel_rank(),
        dp=ps.get_data_parallel_rank(),
        init=init,
        data=data,
        tp_region=tp_region,
        after_fork=after_fork,
        sample=sample,
    )


@pytest.mark.dist
def test_rng_contract_tp2_dp2():
    r = run_distributed(_rng_draws, 4, 1234)
    by = {(x["tp"], x["dp"]): x for x in r}
    # model init: equal everywhere
    assert all(torch.equal(x["init"], r[0]["init"]) for x in r)
    # default stream: equal across TP inside a replica, distinct across DP
    assert torch.equal(by[0, 0]["data"], by[1, 0]["data"])
    assert not torch.equal(by[0, 0]["data"], by[0, 1]["data"])
    # tracked TP-region state (dropout inside TP layers): distinct on every rank
    regions = [x["tp_region"] for x in r]
    assert all(not torch.equal(a, b) for i, a in enumerate(regions) for b in regions[i + 1 :])
    # per-sample draws: identical on all ranks
    assert all(torch.equal(x["sample"], r[0]["sample"]) for x in r)
    # forking did not consume the default stream
    torch.manual_seed(1234)
    torch.rand(4)
    assert torch.equal(by[0, 0]["after_fork"], torch.rand(4))


def test_sample_generator_depends_on_key_and_iteration():
    a = torch.rand(3, generator=sample_generator(1, 0, "k"))
    assert torch.equal(a, torch.rand(3, generator=sample_generator(1, 0, "k")))
    assert not torch.equal(a, torch.rand(3, generator=sample_generator(1, 1, "k")))
    assert not torch.equal(a, torch.rand(3, generator=sample_generator(1, 0, "j")))
