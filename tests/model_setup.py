"""Shared pieces of the model tests: a tiny DiT, packed micro-batches, and the reference comparison.

The reference is the single-process model (TP=PP=CP=1) with random weights, run in the test process;
each parallel rank loads the same weights (sharded explicitly, not re-drawn from a seed), runs Megatron's
forward-backward schedule with DDP and ``finalize_model_grads``, and returns its loss and its gradients
gathered to full tensors under their global names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from dit.model.config import DiTConfig
from dit.model.model import DiTModel
from dit.model.packed import PackedBatch, thd_partition_indices
from dit.model.patchify import patchify
from dit.model.sizes import MODEL_SIZES
from dit.runtime import distributed as runtime

TINY = dict(
    **MODEL_SIZES["DiT-debug"]._asdict(),
    latent_channels=4,
    patch_size=2,
    text_embed_dim=16,
    num_classes=10,
    use_cpu_initialization=True,
    transformer_impl="local",
)

# fp32 on both sides; the parallel run differs only in summation order (split matmuls, all-reduces,
# per-rank partial sums), which moves results by a few ulps (~1e-7 relative) per operation.
RTOL = 1e-5

# The optimizer runs take one Adam step (the only optimizer Megatron's distributed optimizer takes) with an
# epsilon far above every gradient, so the step is lr * g / (|g| + eps) = STEP * g * (1 - |g|/eps): a plain
# gradient step to ~1e-8 relative. STEP is large so that the gradient read back from it,
# (before - after) / STEP, keeps its digits next to weights of size ~0.1.
STEP, ADAM_EPS = 1e4, 1e8


def tiny_config(**fields) -> DiTConfig:
    return DiTConfig(**{**TINY, **fields})


@dataclass
class MicroBatch:
    batch: PackedBatch  # tokens double as the noisy model input
    timesteps: torch.Tensor  # [N]
    target: torch.Tensor  # [S, width]


def make_microbatch(
    seed: int,
    grids: list[tuple[int, int, int]],
    *,
    pad_multiple: int = 8,
    channels: int = 4,
    patch: int = 2,
    temporal_patch: int = 1,
    text_dim: int = 16,
    text_lengths: list[int] | None = None,
) -> MicroBatch:
    """A pack of samples with latent shapes ``grids`` (T, H, W), each padded to ``pad_multiple`` tokens, and
    text embeddings of ``text_lengths`` rows (3 to 6 by default)."""
    g = torch.Generator().manual_seed(seed)
    tokens, positions, masks, lengths, padded, grid_sizes = [], [], [], [], [], []
    for t, h, w in grids:
        tok, pos = patchify(torch.randn(channels, t, h, w, generator=g), patch, temporal_patch)
        n = tok.shape[0]
        pad = -n % pad_multiple
        tokens.append(torch.cat([tok, torch.randn(pad, tok.shape[1], generator=g)]))  # pad rows hold junk
        positions.append(torch.cat([pos, torch.zeros(pad, 3, dtype=torch.long)]))
        masks.append(torch.arange(n + pad) < n)
        lengths.append(n)
        padded.append(n + pad)
        grid_sizes.append((t // temporal_patch, h // patch, w // patch))
    text_lengths = text_lengths or [3 + (seed + i) % 4 for i in range(len(grids))]
    cum = lambda xs: torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    batch = PackedBatch(
        tokens=torch.cat(tokens),
        positions=torch.cat(positions),
        loss_mask=torch.cat(masks),
        cu_seqlens=cum(lengths),
        cu_seqlens_padded=cum(padded),
        text=torch.randn(sum(text_lengths), text_dim, generator=g),
        cu_seqlens_text=cum(text_lengths),
        grid_sizes=torch.tensor(grid_sizes),
        keys=[f"s{seed}_{i}" for i in range(len(grids))],
        fps=torch.rand(len(grids), generator=g) * 30,
        labels=torch.randint(0, 11, (len(grids),), generator=g),
    )
    return MicroBatch(batch, torch.rand(len(grids), generator=g), torch.randn(batch.tokens.shape, generator=g))


def cp_share(mb: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """What CP rank ``rank`` receives: its load-balanced chunks of every sample, the whole text."""
    rows = thd_partition_indices(mb.batch.cu_seqlens_padded, cp, rank)
    b = mb.batch
    return MicroBatch(
        replace(b, tokens=b.tokens[rows], positions=b.positions[rows], loss_mask=b.loss_mask[rows]),
        mb.timesteps,
        mb.target[rows],
    )


def hand_loss(prediction: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Per-sample MSE over real tokens of a whole pack, written out sample by sample ``[N]``."""
    cu, cu_padded = mb.batch.cu_seqlens.tolist(), mb.batch.cu_seqlens_padded.tolist()
    return torch.stack(
        [
            (prediction[s : s + cu[i + 1] - cu[i]] - mb.target[s : s + cu[i + 1] - cu[i]]).square().mean()
            for i, s in enumerate(cu_padded[:-1])
        ]
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: adaLN-Zero starts at zero, which would make most gradients zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))


def reference_run(fields: dict, microbatches: list[MicroBatch], seed: int = 0):
    """Single-process model: (loss, {name: grad}, {name: weight}) for the mean loss over all samples."""
    model = DiTModel(tiny_config(**fields))
    randomize(model, seed)
    losses = torch.cat([hand_loss(model(mb.batch.tokens, mb.timesteps, mb.batch), mb) for mb in microbatches])
    loss = losses.mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), grads, state


def global_name(name: str, offset: int) -> str:
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(ps.get_tensor_model_parallel_world_size(), dim=param.partition_dim)[
        ps.get_tensor_model_parallel_rank()
    ]


def tp_gather(shard: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return shard
    parts = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def parallel_run(
    fields: dict,
    layout: runtime.ParallelLayout,
    microbatches: list[MicroBatch],
    state: dict,
    sequence_parallel: bool = False,
    set_config: dict | None = None,
    optimizer: dict | None = None,
):
    """On each rank: Megatron's forward-backward schedule over ``microbatches`` with ``state`` as weights.

    Each data-parallel rank takes every DP-th micro-batch. Returns (loss or None off the last stage,
    {global name: full gradient}). ``set_config`` overrides config attributes after construction (to
    switch off a mechanism and see the test fail). ``optimizer``: fields of Megatron's ``OptimizerConfig``
    (``use_distributed_optimizer`` also sets up DDP for it); Megatron's optimizer then takes one gradient
    step of ``STEP`` (see ``ADAM_EPS``), the gradients returned are the ones that step applied, read back
    from the updated weights, and a third item is the gradient norm the optimizer computed (for clipping).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from dit.diffusion.loss import microbatch_loss

    runtime.initialize_model_parallel(layout)
    runtime.set_random_seed(1234, per_data_parallel_rank=False)
    config = tiny_config(
        **fields,
        tensor_model_parallel_size=layout.tensor,
        context_parallel_size=layout.context,
        pipeline_model_parallel_size=layout.pipeline,
        sequence_parallel=sequence_parallel,
    )
    for key, value in (set_config or {}).items():
        setattr(config, key, value)
    model = DiTModel(config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    offset = get_transformer_layer_offset(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tp_slice(state[global_name(name, offset)], p))
    distributed_optimizer = bool((optimizer or {}).get("use_distributed_optimizer"))
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer), model
    )
    config.finalize_model_grads_func = finalize_model_grads
    opt = None
    if optimizer is not None:
        opt = get_megatron_optimizer(
            OptimizerConfig(
                **{
                    "optimizer": "adam",
                    "lr": STEP * ADAM_EPS,
                    "adam_eps": ADAM_EPS,
                    "weight_decay": 0.0,
                    "clip_grad": 1e30,
                    **optimizer,
                }
            ),
            [ddp],
        )  # clip_grad > 0 makes it compute the norm; 1e30 never clips

    cp, cp_group = layout.context, ps.get_context_parallel_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = [cp_share(mb, cp, ps.get_context_parallel_rank()) for mb in microbatches[dp_rank::dp]]
    # samples in the global batch / (micro-batches per rank x DP), as dit.diffusion.loss.microbatch_loss asks
    samples_per_microbatch = sum(mb.batch.num_samples for mb in microbatches) / len(microbatches)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb.batch.tokens, mb.timesteps, mb.batch)
        return out, partial(
            microbatch_loss,
            target=mb.target,
            batch=mb.batch,
            cp_group=cp_group,
            samples_per_microbatch=samples_per_microbatch,
        )

    logged = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mine),
        model=[ddp],
        num_microbatches=len(mine),
        seq_length=max(mb.batch.tokens.shape[0] for mb in mine),
        micro_batch_size=1,
    )
    loss = None
    if logged:
        total = torch.stack([x["loss"] for x in logged]).sum(0)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        loss = (total[0] / total[1]).item()
    # numpy arrays travel back to the test by value; torch tensors would be shared through file
    # descriptors that vanish when the worker exits
    if opt is None:
        grads = {global_name(n, offset): tp_gather(p.main_grad, p).numpy() for n, p in model.named_parameters()}
        return loss, grads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ok, grad_norm, _ = opt.step()
    assert ok
    grads = {
        global_name(n, offset): tp_gather((before[n] - p.detach()) / STEP, p).numpy()
        for n, p in model.named_parameters()
    }
    return loss, grads, grad_norm


def assert_matches_reference(results: list, ref_loss: float, ref_grads: dict) -> None:
    """Every rank's loss (where it has one) and every gradient copy equal the reference."""
    losses = [loss for loss, *_ in results if loss is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(ref_loss, rel=RTOL)
    seen = set()
    for _, grads, *_ in results:
        for name, grad in grads.items():
            grad, expected = torch.from_numpy(grad), ref_grads[name]
            error = (grad - expected).norm() / expected.norm()
            assert error < RTOL, f"{name}: relative gradient error {error:.2e}"
            seen.add(name)
    assert seen == set(ref_grads), f"parameters missing from the parallel model: {set(ref_grads) - seen}"


def full_weights(model: torch.nn.Module, config: DiTConfig) -> dict:
    """This rank's weights, TP-gathered to full tensors under their global (whole-model) names, as numpy."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config)
    return {global_name(n, offset): tp_gather(p.detach(), p).clone().numpy() for n, p in model.named_parameters()}


def fsdp_main_weights(fsdp: torch.nn.Module, config: DiTConfig) -> dict:
    """Megatron-FSDP's fp32 main weights (DTensors: each rank's chunk of a parameter), put together into full
    tensors: what its optimizer stepped (the model's own weights are freed after each layer's use)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset, raw = get_transformer_layer_offset(config), fsdp.module.raw_param  # raw: the model's parameters
    return {
        global_name(n, offset): _dtensor_to_full(p, raw[n]).numpy()
        for n, p in fsdp.module.param_and_grad_buffer.optimizer_named_parameters
    }


def _dtensor_to_full(dtensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Every rank's chunk at its offset (gloo's all_gather needs equal sizes: FSDP's chunks are uneven)."""
    import torch.distributed as dist
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import update_uneven_dtensor_chunk_metadata

    update_uneven_dtensor_chunk_metadata(dtensor)
    (chunk,) = dtensor.__create_chunk_list__()
    chunks = [None] * dist.get_world_size()
    dist.all_gather_object(chunks, (tuple(chunk.offsets), dtensor.to_local().detach().clone()))
    full = torch.zeros(dtensor.shape)
    for offsets, local in chunks:  # replicas (TP or CP peers) write the same values
        full[tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))] = local
    return tp_gather(full, param) if tuple(full.shape) == tuple(param.shape) else full
