"""The CP split against a brute-force reference, TE agreement, PP stages, and packs across real ranks."""

import pytest
import torch
import torch.distributed as dist

from data.loader.dataloader import build_task_encoder, build_train_loader, energon_loader
from data.loader.rank_split import RankPlace, shard_for_rank
from dit.model.packed import PackedBatch, thd_partition_indices
from dit.runtime import distributed as runtime
from dit.training.arguments import load_run_config
from tests.distributed import run_distributed
from tests.tiny_data import good_entries, write_dataset


def _brute_force_share(cu_seqlens_padded, cp, rank):
    """Token by token: which of the 2*cp chunks of its sample it lies in, and which rank owns that chunk."""
    bounds = cu_seqlens_padded.tolist()
    mine = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * cp)
        for p in range(start, end):
            c = (p - start) // chunk
            if min(c, 2 * cp - 1 - c) == rank:
                mine.append(p)
    return mine


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_split_matches_brute_force(cp):
    cu = torch.tensor([0, 8 * cp, 10 * cp, 16 * cp, 18 * cp], dtype=torch.int32)
    shares = [thd_partition_indices(cu, cp, r).tolist() for r in range(cp)]
    for r in range(cp):
        assert shares[r] == _brute_force_share(cu, cp, r)
    assert sorted(sum(shares, [])) == list(range(int(cu[-1])))  # disjoint, and nothing lost


def test_te_partition_agrees_with_ours():
    tex = pytest.importorskip("transformer_engine_torch", reason="Transformer Engine is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("TE's thd_get_partitioned_indices runs on a CUDA GPU; there is none here")
    cu = torch.tensor([0, 8, 24, 32, 96], dtype=torch.int32)
    for cp in (2, 4):
        for r in range(cp):
            te = tex.thd_get_partitioned_indices(cu.cuda(), int(cu[-1]), cp, r).long().cpu()
            assert torch.equal(te, thd_partition_indices(cu, cp, r))


def _pack(total=16):
    return PackedBatch(
        tokens=torch.arange(total * 2.0).reshape(total, 2),
        positions=torch.zeros(total, 3, dtype=torch.long),
        loss_mask=torch.ones(total, dtype=torch.bool),
        cu_seqlens=torch.tensor([0, 8, total], dtype=torch.int32),
        cu_seqlens_padded=torch.tensor([0, 8, total], dtype=torch.int32),
        text=torch.ones(3, 8),
        cu_seqlens_text=torch.tensor([0, 1, 3], dtype=torch.int32),
        grid_sizes=torch.ones(2, 3, dtype=torch.long),
        keys=["a", "b"],
    )


def test_pipeline_middle_stages_get_only_conditioning():
    pack = _pack()
    middle = shard_for_rank(pack, RankPlace(first_stage=False, last_stage=False))
    assert middle.tokens is None and middle.loss_mask is None
    assert middle.text is pack.text and middle.positions is pack.positions and middle.keys == pack.keys
    for first, last in ((True, False), (False, True)):
        assert shard_for_rank(pack, RankPlace(first_stage=first, last_stage=last)).tokens is pack.tokens
    cp_share = shard_for_rank(pack, RankPlace(cp_size=2, cp_rank=1))
    assert torch.equal(cp_share.tokens, pack.tokens[[2, 3, 4, 5, 10, 11, 12, 13]])
    assert torch.equal(cp_share.cu_seqlens_padded, pack.cu_seqlens_padded)  # the whole pack's, as TE expects


FLAGS = [
    "--patch-size",
    "2",
    "--latent-channels",
    "4",
    "--text-embed-dim",
    "8",
    "--max-seq-length",
    "32",
    "--packing-buffer-size",
    "6",
    "--num-workers",
    "0",
    "--seed",
    "7",
]
PACKS = 4


def _read_packs(data_path):
    """Body of one gloo rank: for TP2xCP2, then CP2xDP2, build the training loader from flags and
    Megatron's parallel state, and read a few packs (one process launch serves both layouts)."""
    from megatron.core import parallel_state as ps

    out = {}
    for tp, cp in ((2, 2), (1, 2)):
        runtime.initialize_model_parallel(runtime.ParallelLayout(tensor=tp, context=cp))
        run = load_run_config(
            FLAGS
            + ["--data-path", data_path, "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp)],
            dist.get_world_size(),
            need_data=False,
        )
        loader = build_train_loader(run)
        out[tp, cp] = {
            "tp": ps.get_tensor_model_parallel_rank(),
            "cp": ps.get_context_parallel_rank(),
            "dp": ps.get_data_parallel_rank(),
            "packs": [next(loader) for _ in range(PACKS)],
        }
        ps.destroy_model_parallel()
    return out


def _reference_packs(data_path, dp_rank, dp_size, cp):
    """The same stream read in this process, unsplit: what every rank of replica ``dp_rank`` must see."""
    run = load_run_config(FLAGS + ["--data-path", str(data_path)], need_data=False)
    layout = RankPlace(dp_rank=dp_rank, dp_size=dp_size)
    loader = energon_loader(
        data_path,
        build_task_encoder(run.model, run.data, 2 * cp),
        layout,
        num_workers=0,
        seed=7,
        packing_buffer_size=6,
        micro_batch_size=1,
    )
    return [item.batch for item, _ in zip(loader, range(PACKS))]


def _assert_shares_rebuild(reference, shares, cp):
    for i, ref in enumerate(reference):
        full = torch.zeros_like(ref.tokens)
        for r, share in enumerate(shares):
            p = share[i]
            assert p.keys == ref.keys and torch.equal(p.cu_seqlens_padded, ref.cu_seqlens_padded)
            assert torch.equal(p.text, ref.text) and torch.equal(p.cu_seqlens, ref.cu_seqlens)
            full[thd_partition_indices(ref.cu_seqlens_padded, cp, r)] = p.tokens
        assert torch.equal(full, ref.tokens)


@pytest.fixture(scope="module")
def rank_packs(tmp_path_factory):
    dataset = write_dataset(tmp_path_factory.mktemp("ranks"), good_entries(48, seed=3), per_shard=8)
    return dataset, run_distributed(_read_packs, 4, str(dataset))


@pytest.mark.dist
def test_tp2_cp2_ranks_of_a_replica_read_identical_packs(rank_packs):
    dataset, results = rank_packs
    by_cp = {}
    for res in (r[2, 2] for r in results):  # both TP ranks of a CP rank hold exactly the same share
        prior = by_cp.setdefault(res["cp"], res["packs"])
        for a, b in zip(prior, res["packs"]):
            assert a.keys == b.keys and torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    _assert_shares_rebuild(_reference_packs(dataset, 0, 1, 2), [by_cp[0], by_cp[1]], 2)


@pytest.mark.dist
def test_cp2_dp2_replicas_read_different_packs(rank_packs):
    dataset, results = rank_packs
    results = [r[1, 2] for r in results]
    keys = {}
    for dp in (0, 1):
        shares = [next(r["packs"] for r in results if (r["dp"], r["cp"]) == (dp, cp)) for cp in (0, 1)]
        _assert_shares_rebuild(_reference_packs(dataset, dp, 2, 2), shares, 2)
        keys[dp] = {k for p in shares[0] for k in p.keys}
    assert not keys[0] & keys[1]
