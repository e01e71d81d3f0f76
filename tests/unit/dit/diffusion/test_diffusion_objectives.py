"""EDM and rectified flow against hand-computed values and the papers' own formulas."""

import math

import pytest
import torch

from dit.diffusion import build_objective
from dit.diffusion.flow import shift_time
from dit.model.embeddings import FREQUENCY_EMBEDDING_SIZE, sinusoid


def test_edm_preconditioning_and_weight_by_hand():
    edm = build_objective("edm", sigma_data=0.5)
    c = edm.preconditioning(torch.tensor([1.0, 2.0]))
    # sigma = 1: sigma^2 + sd^2 = 1.25; sigma = 2: 4.25 (Karras et al., Table 1)
    assert c.c_skip.tolist() == pytest.approx([0.25 / 1.25, 0.25 / 4.25])
    assert c.c_out.tolist() == pytest.approx([0.5 / math.sqrt(1.25), 1.0 / math.sqrt(4.25)])
    assert c.c_in.tolist() == pytest.approx([1 / math.sqrt(1.25), 1 / math.sqrt(4.25)])
    assert c.c_noise.tolist() == pytest.approx([0.0, math.log(2) / 4])
    assert edm.loss_weight(torch.tensor([1.0, 2.0])).tolist() == pytest.approx([1.25 / 0.25, 4.25 / 1.0])


def test_edm_level_is_log_normal():
    edm = build_objective("edm", edm_p_mean=-1.2, edm_p_std=1.2)
    assert edm.level(torch.tensor([0.0, 1.0, -1.0]), torch.ones(3)).tolist() == pytest.approx(
        [math.exp(-1.2), math.exp(0.0), math.exp(-2.4)]
    )


def test_edm_target_is_the_papers_loss_in_terms_of_the_network_output():
    """weight * |F - target|^2 == lambda(sigma) * |D(x; sigma) - x0|^2 with D = c_skip x + c_out F."""
    edm = build_objective("edm")
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.01, 0.3, 5.0], dtype=torch.float64)  # float64: the identity, not fp32 cancellation
    x0, noise, output = (torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    x = edm.noisy(x0, noise, sigma[:, None])
    assert torch.allclose(x, x0 + sigma[:, None] * noise)
    target, weight = edm.training_target(x0, noise, x, sigma[:, None], sigma)
    ours = weight[:, None] * (output - target).square()
    paper = edm.loss_weight(sigma)[:, None] * (edm.denoised(output, x, sigma[:, None]) - x0).square()
    assert torch.allclose(ours, paper, rtol=1e-10)
    assert weight.tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-5)  # EDM's weighting makes it 1
    assert torch.allclose(edm.network_input(x, sigma[:, None]), x / (sigma[:, None] ** 2 + 0.25).sqrt())
    assert torch.allclose(edm.timestep(sigma), sigma.log() / 4)


def test_flow_shift_by_hand():
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / (1 + 2 * 0.5)
    assert shift_time(torch.tensor([0.0, 1.0]), 7.0).tolist() == [0.0, 1.0]
    flow = build_objective("flow", flow_shift="auto")
    # SD3: s = sqrt(tokens / 256): 256 tokens -> 1 (no shift), 1024 -> 2, 4096 -> 4
    assert flow.resolution_shift(torch.tensor([256, 1024, 4096])).tolist() == pytest.approx([1.0, 2.0, 4.0])
    t = flow.level(torch.zeros(3), torch.tensor([256, 1024, 4096]))  # sigmoid(0) = 0.5, then shifted
    assert t.tolist() == pytest.approx([0.5, 2 * 0.5 / 1.5, 4 * 0.5 / 2.5])
    fixed = build_objective("flow", flow_shift=3.0, flow_logit_mean=0.5, flow_logit_std=2.0)
    expected = 3 * torch.sigmoid(torch.tensor(0.5 + 2.0 * 0.7)) / (1 + 2 * torch.sigmoid(torch.tensor(0.5 + 2.0 * 0.7)))
    assert fixed.level(torch.tensor([0.7]), torch.tensor([9999])).item() == pytest.approx(expected.item())


def test_flow_target_is_the_velocity_of_the_path():
    flow = build_objective("flow", flow_shift=1.0)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])
    x = flow.noisy(x0, noise, t[:, None])
    assert torch.allclose(x, (1 - t[:, None]) * x0 + t[:, None] * noise)
    h = 1e-3  # central difference of x_t in t
    velocity = (flow.noisy(x0, noise, t[:, None] + h) - flow.noisy(x0, noise, t[:, None] - h)) / (2 * h)
    target, weight = flow.training_target(x0, noise, x, t[:, None], t)
    assert torch.allclose(target, velocity, atol=1e-3) and torch.equal(weight, torch.ones(4))
    assert torch.equal(flow.network_input(x, t[:, None]), x)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_the_timestep_embedding_sees_a_well_spread_flow_time():
    """The embedder's sinusoid of t = 0.1 and t = 0.9 must differ clearly: 1000 t does, a raw t would not."""
    flow = build_objective("flow", flow_shift=1.0)
    fed = sinusoid(flow.timestep(torch.tensor([0.1, 0.9])), FREQUENCY_EMBEDDING_SIZE)
    raw = sinusoid(torch.tensor([0.1, 0.9]), FREQUENCY_EMBEDDING_SIZE)
    assert _cosine(fed[0], fed[1]) < 0.5
    assert _cosine(raw[0], raw[1]) > 0.98  # what feeding t itself would give: almost the same vector
