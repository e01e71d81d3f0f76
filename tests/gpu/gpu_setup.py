"""Shared pieces of the GPU tests: a small DiT, a pack on the device, one forward-backward, the comparisons.

Models are built with the model tests' helpers (``tests.model_setup``): CPU-initialised, random weights,
then moved to the device; a backend that builds on the GPU (TE) loads those weights.
"""

from __future__ import annotations

import torch

from dit.model.model import DiTModel
from tests.model_setup import MicroBatch, hand_loss, make_microbatch, randomize, tiny_config

# head dim 24: 3D RoPE gives t, h and w four pairs each; widths are multiples of 32, as MXFP8 GEMMs need
SMALL = dict(num_layers=2, hidden_size=96, num_attention_heads=4, fps_conditioning=True)
GRIDS = [(1, 8, 8), (2, 4, 6), (1, 4, 4)]  # 16, 12 and 4 tokens, each padded to ``pad_multiple``

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004); two small layers of bf16 matmuls against fp32
# stay within a few steps, relative to the outputs' scale (measured on CPU: 0.012 relative norm error, the
# largest element's error 1.2% of the largest output)
BF16_TOL = 3e-2
# a gradient is a product of the backward's bf16 matmuls through both layers: relative norm error per
# parameter (measured on CPU: at most 0.028, cross-attention's query projection)
GRAD_TOL = 8e-2


def device_pack(device: torch.device, seed: int = 61, pad_multiple: int = 8) -> MicroBatch:
    """A pack of three samples of different lengths (and pads), on ``device``."""
    mb = make_microbatch(seed, GRIDS, pad_multiple=pad_multiple, text_dim=16)
    return MicroBatch(mb.batch.to(device), mb.timesteps.to(device), mb.target.to(device))


def reference_model(device: torch.device, seed: int = 7, **fields) -> DiTModel:
    """The fp32 local-spec model with random weights, on ``device``."""
    model = DiTModel(tiny_config(**SMALL, **fields))
    randomize(model, seed)
    return model.to(device)


def model_like(reference: DiTModel, device: torch.device, **fields) -> DiTModel:
    """Another variant (dtype, backend, FP8) with the reference's weights, built on ``device``."""
    placement = dict(use_cpu_initialization=device.type == "cpu", perform_initialization=False)
    model = DiTModel(tiny_config(**SMALL, **placement, **fields)).to(device)
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return model


def forward_backward(model: DiTModel, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(output on real tokens, loss, {name: gradient}), all fp32: the mean per-sample MSE over real tokens."""
    model.zero_grad(set_to_none=True)
    out = model(mb.batch.tokens, mb.timesteps, mb.batch)  # [S, width]
    loss = hand_loss(out.float(), mb).mean()
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    return out[mb.batch.loss_mask].detach().float(), loss.detach(), grads


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def assert_matches_reference(got: tuple, expected: tuple) -> None:
    """A bf16 run against the fp32 reference: outputs (to BF16_TOL of their largest) and loss to bf16
    tolerance, every gradient to GRAD_TOL relative norm."""
    (out, loss, grads), (ref_out, ref_loss, ref_grads) = got, expected
    assert relative_error(out, ref_out) < BF16_TOL
    torch.testing.assert_close(out, ref_out, rtol=BF16_TOL, atol=BF16_TOL * float(ref_out.abs().max()))
    torch.testing.assert_close(loss, ref_loss, rtol=BF16_TOL, atol=0.0)
    assert grads.keys() == ref_grads.keys()
    errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
    assert max(errors.values()) < GRAD_TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
