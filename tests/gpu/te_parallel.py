"""Context parallel (CP=2) and tensor parallel with sequence parallelism (TP=2 + SP) against the same model on
one rank (CP=1, TP=1), same weights, same packs, on 2 ranks: one JSON line of relative output errors.

The packs are padded only after their last sample (one-sample packs among them), the case that Transformer
Engine up to 2.17 misjudged without ``pad_between_seqs``, dropping real keys under CP. On GPUs it runs TE's
layers in bf16 (``tests/gpu/test_gpu_te_parallel.py``, needs 2 GPUs); ``--transformer-impl local`` runs the
same wiring on the CPU over gloo.

    torchrun --nproc-per-node 2 tests/gpu/te_parallel.py [--transformer-impl local]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core import parallel_state as ps  # noqa: E402

from dit.model.model import DiTModel  # noqa: E402
from dit.model.packed import gather_cp_shares  # noqa: E402
from dit.runtime import distributed as runtime  # noqa: E402
from dit.runtime.distributed import ParallelLayout  # noqa: E402
from tests.gpu.gpu_setup import SMALL, relative_error  # noqa: E402
from tests.model_setup import MicroBatch, cp_share, make_microbatch, randomize, tiny_config, tp_slice  # noqa: E402

# padded to 8 tokens a sample (2*cp under CP=2, times tp=2 under SP), so the only padding is each pack's tail
PACKS = [[(1, 6, 10)], [(2, 6, 10)], [(1, 8, 8), (1, 6, 10)]]  # 15 -> 16; 30 -> 32; 16 + 15 -> 32 tokens
CHECKS = {"cp2_vs_cp1": (ParallelLayout(context=2), False), "tp2_sp_vs_tp1": (ParallelLayout(tensor=2), True)}


def _weights() -> dict[str, torch.Tensor]:
    """The reference's random weights, drawn on the CPU (the same on every rank)."""
    runtime.initialize_model_parallel(ParallelLayout())
    model = DiTModel(tiny_config(**SMALL))
    randomize(model, seed=7)
    ps.destroy_model_parallel()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _outputs(
    layout: ParallelLayout, sequence_parallel: bool, fields: dict, weights: dict, device: torch.device
) -> list[torch.Tensor]:
    """The model's output for each pack, put together in pack order ``[S, width]`` on every rank."""
    runtime.initialize_model_parallel(layout)
    runtime.set_random_seed(1, per_data_parallel_rank=False)
    config = tiny_config(
        **SMALL,
        **fields,
        use_cpu_initialization=device.type == "cpu",
        tensor_model_parallel_size=layout.tensor,
        context_parallel_size=layout.context,
        sequence_parallel=sequence_parallel,
    )
    model = DiTModel(config).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tp_slice(weights[name], p))
    cp, cp_rank = layout.context, ps.get_context_parallel_rank()
    outputs = []
    for seed, grids in enumerate(PACKS):
        mb = cp_share(make_microbatch(seed, grids, pad_multiple=8), cp, cp_rank)
        mb = MicroBatch(mb.batch.to(device), mb.timesteps.to(device), mb.target)
        with torch.no_grad():
            out = model(mb.batch.tokens, mb.timesteps, mb.batch).float()  # [S/cp, width]
        if cp > 1:
            out = gather_cp_shares(out, mb.batch.cu_seqlens_padded, ps.get_context_parallel_group())
        outputs.append(out[make_microbatch(seed, grids, pad_multiple=8).batch.loss_mask.to(out.device)])
    ps.destroy_model_parallel()
    return outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transformer-impl", default="transformer_engine", choices=["transformer_engine", "local"])
    args = p.parse_args()
    runtime.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    fields = (
        dict(bf16=True, params_dtype=torch.bfloat16, transformer_impl="transformer_engine")
        if args.transformer_impl == "transformer_engine"
        else dict(transformer_impl="local")
    )
    weights = _weights()
    reference = _outputs(ParallelLayout(), False, fields, weights, device)
    errors = {}
    for name, (layout, sp) in CHECKS.items():
        got = _outputs(layout, sp, fields, weights, device)
        errors[name] = max(relative_error(g, r) for g, r in zip(got, reference))
    if dist.get_rank() == 0:
        print(json.dumps({"te_parallel": errors, "transformer_impl": args.transformer_impl}), flush=True)
    runtime.destroy()


if __name__ == "__main__":
    main()
