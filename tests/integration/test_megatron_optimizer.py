"""Megatron's DDP and distributed optimizer run over gloo through the CPU layer.

Two DP ranks each take half of a batch; one optimizer step must equal a single-process AdamW
step on the whole batch (DDP averages gradients over DP; the distributed optimizer shards the
Adam state and all-gathers the updated parameters).
"""

import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from dit.runtime import distributed as runtime
from tests.distributed import run_distributed

pytestmark = pytest.mark.dist

LR, BATCH, WIDTH = 0.1, 8, 6


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, 1, generator=g)


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _megatron_step(distributed_optimizer: bool):
    runtime.initialize_model_parallel(runtime.ParallelLayout())
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True),
        _net(3),
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=LR, weight_decay=0.01, use_distributed_optimizer=distributed_optimizer, clip_grad=0.0
        ),
        [ddp],
    )
    x, y = _data()
    half = BATCH // 2
    rank = ps.get_data_parallel_rank()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(ddp(x[rank * half : (rank + 1) * half]), y[rank * half : (rank + 1) * half])
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    return {k: v.detach().clone() for k, v in ddp.module.state_dict().items()}


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_megatron_ddp_step_matches_single_process_adamw(distributed_optimizer):
    results = run_distributed(_megatron_step, 2, distributed_optimizer)
    net = _net(3)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01)
    x, y = _data()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    for name, ref in net.state_dict().items():
        for rank_state in results:
            # fp32 throughout; only the order of the gradient sums differs, hence 1e-6
            torch.testing.assert_close(rank_state[name], ref, rtol=1e-6, atol=1e-6)
