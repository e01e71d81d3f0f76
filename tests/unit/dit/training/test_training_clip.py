"""``--clip-grad``: the step's update uses the gradient scaled down to the clip when its norm is above it, and
the gradient as it is below it; read back from Adam's first moment after one step, m = (1 - beta1) g."""

import pytest
import torch

from dit.model.model import DiTModel
from dit.training.arguments import load_run_config
from dit.training.optimizer import build_optimizer, wrap_model
from dit.training.step import apply_gradients
from tests.model_setup import tiny_config


@pytest.mark.parametrize("norm", [10.0, 0.5], ids=["above", "below"])
def test_clip_grad_bounds_the_norm_and_leaves_small_gradients_alone(single_process, norm):
    clip, beta1 = 1.0, 0.9
    config = tiny_config()
    run = load_run_config(["--clip-grad", str(clip), "--adam-beta1", str(beta1), "--lr", "1e-3"], need_data=False)
    ddp = wrap_model(DiTModel(config), config, run.optimizer)
    optimizer = build_optimizer(run.optimizer, [ddp])
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    scale = norm / torch.cat([x.flatten() for x in grads]).norm()
    grads = [x * scale for x in grads]  # the whole gradient's norm is `norm`
    for p, x in zip(params, grads):
        p.main_grad.copy_(x)
    updated, grad_norm = apply_gradients(optimizer, loss=1.0, clip_grad=clip)
    assert updated and grad_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping is what is logged
    used = min(1.0, clip / norm)  # Megatron's coefficient clip / (norm + 1e-6): 1e-7 relative off clip / norm
    adam = optimizer.chained_optimizers[0].optimizer
    for p, x in zip(params, grads):
        assert torch.allclose(adam.state[p]["exp_avg"], (1 - beta1) * used * x, rtol=1e-5, atol=1e-12)
