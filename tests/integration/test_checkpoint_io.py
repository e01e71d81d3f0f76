"""Megatron's dist checkpointing over gloo: save sharded at TP=2, load at TP=1 and TP=2."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from dit.runtime import distributed as runtime
from tests.distributed import run_distributed

pytestmark = pytest.mark.dist

IN, OUT = 6, 8


def _linear(tp: int, seed: int) -> ColumnParallelLinear:
    runtime.initialize_model_parallel(runtime.ParallelLayout(tensor=tp))
    runtime.set_random_seed(seed, per_data_parallel_rank=False)
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)
    return ColumnParallelLinear(IN, OUT, config=cfg, init_method=torch.nn.init.normal_, bias=True, gather_output=True)


def _save(ckpt_dir: str) -> dict:
    layer = _linear(2, seed=1)
    dist_checkpointing.save(layer.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None)), ckpt_dir)
    full = torch.empty(OUT, IN)
    torch.distributed.all_gather_into_tensor(
        full, layer.weight.detach().contiguous(), group=ps.get_tensor_model_parallel_group()
    )
    return {"weight": full, "tp_rank": ps.get_tensor_model_parallel_rank()}


def _load(ckpt_dir: str, tp: int) -> torch.Tensor:
    layer = _linear(tp, seed=2)  # different init: everything must come from the checkpoint
    layer.load_state_dict(
        dist_checkpointing.load(layer.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None)), ckpt_dir)
    )
    full = torch.empty(OUT, IN)
    torch.distributed.all_gather_into_tensor(
        full, layer.weight.detach().contiguous(), group=ps.get_tensor_model_parallel_group()
    )
    return full


def test_dist_checkpoint_save_tp2_load_tp1_and_tp2(tmp_path):
    (tmp_path / "ckpt").mkdir()
    ckpt = str(tmp_path / "ckpt")
    saved = run_distributed(_save, 2, ckpt)
    assert torch.equal(saved[0]["weight"], saved[1]["weight"])
    # the TP=2 shards are the rows of the TP=1 master weight drawn from the same seed
    reference = torch.empty(OUT, IN)
    torch.manual_seed(1)
    torch.nn.init.normal_(reference)
    assert torch.equal(saved[0]["weight"], reference)
    assert torch.equal(run_distributed(_load, 1, ckpt, 1)[0], reference)
    assert all(torch.equal(w, reference) for w in run_distributed(_load, 2, ckpt, 2))
