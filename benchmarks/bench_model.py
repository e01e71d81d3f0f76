"""Our DiT/2 against diffusers' DiTTransformer2DModel, forward + backward, and our attention's memory.

    python benchmarks/bench_model.py [--rounds 20] [--threads 2]                      # DiT-S, 8 x 256 tokens, CPU
    python benchmarks/bench_model.py --device cuda --model-size DiT-XL --max-seq-length 8192 --bf16 \\
        [--fp8-format hybrid]

Both models are class-conditioned DiT/2 with the paper's settings (``--model-size``: DiT-S is 12 layers, hidden
384, 6 heads; patch 2, 4 latent channels, learned sigma, 2D sin-cos positions, no QK-norm) and the SAME weights:
diffusers' random model is imported into ours with ``dit.convert`` and the two fp32 outputs are checked equal
first. Data: ``--max-seq-length / 256`` latents of 32 x 32 (256 tokens each; 8 x 256 by default), one process,
``--threads`` intra-op threads. Each round times one step (forward, mean-square loss, backward) of each model,
in alternating order; ``ratio`` is the median over rounds of ours / diffusers' within the round, which cancels
most of a shared machine's load drift.

On a GPU: ``--bf16`` runs both models in bf16 (ours through Megatron-Core's ``bf16`` / ``params_dtype`` config
fields, diffusers' cast), each checked against the fp32 outputs (relative error printed). Our layers are
Transformer Engine's where it imports (the spec ``dit.model.layer_spec`` selects, as training does), else the local
spec. ``--fp8-format`` adds our model in FP8 (Megatron-Core's ``fp8`` / ``fp8_recipe`` fields, TE's layers),
timed in the same rounds. Rates (``benchmarks/throughput.py``): tokens/s, model TFLOP/s from
``dit.training.flops`` and MFU against the GPU's dense peak (fp8's for the FP8 model). TF32 is off, so fp32
means fp32. CUDA work is synchronised before each clock read.

Memory: peak bytes allocated during our attention's forward (autograd on) for one sample of 2k, 4k and 8k
tokens (``--attention-lengths``) at the size's heads x head dim (DiT-S: 6 x 64): on CPU from torch.profiler's
allocation events (``profile_memory``: every CPU allocation and free, summed in time order), on a GPU from
torch.cuda's peak-memory counter.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # dit/ and benchmarks/ from a checkout, installed or not

from dit.model.sizes import MODEL_SIZES  # noqa: E402  (no Megatron import)

SEQUENCE_LENGTHS = (2048, 4096, 8192)
LATENT_TOKENS = 256  # a 32 x 32 latent at patch 2
CPU = torch.device("cpu")

# A wrong weight or layout gives errors of order 1; rounding gives far less: bf16 keeps 8 bits (2^-8 relative
# per operation) and its errors grow with depth; FP8 (e4m3: 3 mantissa bits) in every block linear far more.
MAX_RELATIVE_ERROR = {"bf16": 0.1, "fp8": 0.3}  # DiT-S in bf16 on CPU: 0.01


def _allocations(events):
    for event in events:
        yield event
        yield from _allocations(event.children)


def peak_allocated_bytes(fn, device: torch.device = CPU) -> int:
    """Peak of the bytes allocated (net of frees) while ``fn()`` runs: torch.cuda's peak counter on a GPU,
    torch.profiler's CPU allocation events otherwise."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = sorted(
        (e.start_time_ns, e.extra_fields.alloc_size)
        for e in _allocations(prof.profiler.kineto_results.experimental_event_tree())
        if e.tag == _EventType.Allocation
    )
    current = peak = 0
    for _, size in sizes:
        current += size
        peak = max(peak, current)
    return peak


def attention_peak_bytes(
    length: int, heads: int, head_dim: int, device: torch.device = CPU, dtype: torch.dtype = torch.float32
) -> int:
    """Peak allocation of one PackedAttention forward over one sample of ``length`` tokens (single process)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from dit.model.attention import PackedAttention, attention_params
    from dit.model.config import DiTConfig

    config = DiTConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, transformer_impl="local")
    attention = PackedAttention(
        config, 1, AttnMaskType.no_mask, "self", pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    cu = torch.tensor([0, length], dtype=torch.int32)  # built on the host, as the model does, then moved
    params = attention_params(
        PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu
        ),
        cp=1,
        cp_rank=0,
    )
    params = params.to(device)
    qkv = torch.randn(length, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(1)  # [L, np, hn] each, as Megatron's linear_qkv split hands them over
    return peak_allocated_bytes(lambda: attention(q, k, v, None, packed_seq_params=params), device)


def _diffusers_model(size: str, num_layers: int):
    """diffusers' DiT/2 of ``size`` with random weights (fp32, on the CPU)."""
    from diffusers import DiTTransformer2DModel

    heads, hidden = MODEL_SIZES[size].num_attention_heads, MODEL_SIZES[size].hidden_size
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    with torch.no_grad():  # diffusers zero-initialises adaLN; random weights make every layer work
        for param in theirs.parameters():
            param.normal_(0.0, 0.02)
        first = theirs.transformer_blocks[0].norm1.emb.state_dict()
        for block in theirs.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return theirs.eval()  # eval: diffusers' label dropout (ours is the data path's) off; no other dropout


def _ours_from(theirs, device: torch.device, **fields):
    """Our DiTModel on ``device`` with diffusers' weights; ``fields`` of the config: dtype, backend, FP8."""
    from dit import convert
    from dit.model.model import DiTModel

    # on a GPU the layers are built there (TE's too) and not initialised: every weight is loaded next
    placement = (
        dict(use_cpu_initialization=True)
        if device.type == "cpu"
        else dict(use_cpu_initialization=False, perform_initialization=False)
    )
    config = convert.config_from_diffusers(dict(theirs.config), **placement, **fields)
    ours = DiTModel(config).to(device)
    convert.load_parameters(ours, convert.state_dict_from_diffusers(theirs.state_dict(), config))
    return ours


@dataclass
class Inputs:
    latents: torch.Tensor  # [n, 4, 32, 32]
    timesteps: torch.Tensor  # [n]
    labels: torch.Tensor  # [n]
    batch: object  # dit.model.packed.PackedBatch of the n latents' tokens

    def to(self, device: torch.device) -> Inputs:
        return Inputs(self.latents.to(device), self.timesteps.to(device), self.labels.to(device), self.batch.to(device))


def _inputs(n: int) -> Inputs:
    """``n`` latents and the same tokens packed (the data path's work, not timed)."""
    from dit.model.packed import PackedBatch
    from dit.model.patchify import patchify

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, 4, 32, 32, generator=g)
    timesteps, labels = torch.randint(0, 1000, (n,), generator=g).float(), torch.randint(0, 1000, (n,), generator=g)
    tokens, positions = zip(*(patchify(x, 2) for x in latents))
    cu = torch.arange(n + 1, dtype=torch.int32) * LATENT_TOKENS
    batch = PackedBatch(
        tokens=torch.cat(tokens),
        positions=torch.cat(positions),
        loss_mask=None,
        cu_seqlens=cu,
        cu_seqlens_padded=cu,
        text=torch.zeros(0, 1),
        cu_seqlens_text=torch.zeros_like(cu),
        grid_sizes=torch.tensor([[1, 16, 16]] * n),
        labels=labels,
    )
    return Inputs(latents, timesteps, labels, batch)


def _predict_ours(ours, x: Inputs) -> torch.Tensor:
    out = ours(x.batch.tokens, x.timesteps, x.batch)
    return torch.stack([p.squeeze(1) for p in ours.unpatchify(out, x.batch)]).float()  # [n, 8, 32, 32]


def _predict_theirs(theirs, x: Inputs) -> torch.Tensor:
    return theirs(x.latents.to(theirs.dtype), x.timesteps, x.labels).sample.float()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _step(model, predict: Callable, x: Inputs) -> Callable[[], None]:
    """One training step: forward, mean-square loss, backward."""

    def step():
        model.zero_grad(set_to_none=True)
        predict(model, x).square().mean().backward()

    return step


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    fp8: bool = False
    relative_error: float | None = None  # its output against the fp32 models'


def _variants(a: argparse.Namespace, device: torch.device, x: Inputs) -> list[Variant]:
    """The timed models, each checked first against the fp32 pair, which is checked equal to fp32 tolerance."""
    theirs = _diffusers_model(a.model_size, a.num_layers).to(device)
    ours = _ours_from(theirs, device, transformer_impl="local")
    with torch.no_grad():
        reference = _predict_theirs(theirs, x)
        tolerance = 1e-4 if device.type == "cpu" else 1e-3  # a GPU's kernels sum in other orders, over more layers
        torch.testing.assert_close(_predict_ours(ours, x), reference, rtol=tolerance, atol=tolerance)
    if not a.bf16:
        return [Variant("ours", _step(ours, _predict_ours, x)), Variant("diffusers", _step(theirs, _predict_theirs, x))]
    bf16 = dict(bf16=True, params_dtype=torch.bfloat16)
    models = [("ours", _ours_from(theirs, device, transformer_impl=a.transformer_impl, **bf16), False)]
    if a.fp8_format:
        models.append(
            (
                "ours_fp8",
                _ours_from(
                    theirs,
                    device,
                    transformer_impl="transformer_engine",
                    fp8=a.fp8_format,
                    fp8_recipe=a.fp8_recipe,
                    **bf16,
                ),
                True,
            )
        )
    del ours
    variants = []
    with torch.no_grad():
        for name, model, fp8 in models:
            error = _relative_error(_predict_ours(model, x), reference)
            variants.append(Variant(name, _step(model, _predict_ours, x), fp8, error))
        theirs = theirs.to(torch.bfloat16)
        variants.append(
            Variant(
                "diffusers",
                _step(theirs, _predict_theirs, x),
                False,
                _relative_error(_predict_theirs(theirs, x), reference),
            )
        )
    for v in variants:
        limit = MAX_RELATIVE_ERROR["fp8" if v.fp8 else "bf16"]
        if not v.relative_error < limit:  # NaN fails too
            raise SystemExit(
                f"bench_model: {v.name} differs from the fp32 models by {v.relative_error:.3g} "
                f"(relative; at most {limit}): not the same model"
            )
    return variants


def _time_rounds(variants: list[Variant], rounds: int, sync) -> dict[str, list[float]]:
    """Each round times one step of every variant, the order rotating from round to round."""
    from benchmarks.throughput import timed

    for v in variants + variants:  # warm-up
        v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            times[v.name].append(timed(v.step, sync))
    return times


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-size", choices=list(MODEL_SIZES), default="DiT-S")
    p.add_argument("--num-layers", type=int, default=None, help="Override the size's layers (smoke tests).")
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=8 * LATENT_TOKENS,
        help=f"Tokens a step: max-seq-length / {LATENT_TOKENS} latents of 32 x 32.",
    )
    p.add_argument("--bf16", action="store_true", help="Both models in bf16 (checked against fp32 first).")
    p.add_argument(
        "--transformer-impl",
        choices=["transformer_engine", "local"],
        default=None,
        help="Our layers (default: local on CPU; on CUDA with --bf16 transformer_engine where it imports).",
    )
    p.add_argument(
        "--fp8-format",
        choices=["e4m3", "hybrid"],
        default=None,
        help="Also time our model in FP8 (needs --bf16, Transformer Engine and a GPU).",
    )
    p.add_argument("--fp8-recipe", default="delayed", help="FP8 scaling recipe (Megatron-Core's fp8_recipe).")
    p.add_argument(
        "--attention-lengths",
        type=int,
        nargs="+",
        default=list(SEQUENCE_LENGTHS),
        help="Sample lengths of the attention memory measurement.",
    )
    a = p.parse_args()
    a.num_layers = a.num_layers or MODEL_SIZES[a.model_size].num_layers
    if a.max_seq_length < LATENT_TOKENS or a.max_seq_length % LATENT_TOKENS:
        p.error(f"--max-seq-length must be a multiple of {LATENT_TOKENS}")
    if a.fp8_format and not a.bf16:
        p.error("--fp8-format needs --bf16 (TE runs FP8 GEMMs from bf16 weights)")
    return a


def main() -> None:
    args = parse()
    from benchmarks.throughput import format_rates, machine, rates, select_device, synchronizer

    select_device(args.device)
    torch.set_num_threads(args.threads)
    from dit.model.te import have_transformer_engine
    from dit.runtime import distributed as runtime
    from dit.training.flops import forward_flops

    if args.transformer_impl is None:
        te = args.device == "cuda" and args.bf16 and have_transformer_engine()
        args.transformer_impl = "transformer_engine" if te else "local"
    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout())
    runtime.set_random_seed(0, per_data_parallel_rank=False)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else CPU
    if device.type == "cuda":  # fp32 is fp32 (cuDNN's convolutions, diffusers' patch embedding, default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    n = args.max_seq_length // LATENT_TOKENS
    x = _inputs(n).to(device)
    variants = _variants(args, device, x)
    times = _time_rounds(variants, args.rounds, synchronizer(device))
    heads, hidden = MODEL_SIZES[args.model_size].num_attention_heads, MODEL_SIZES[args.model_size].hidden_size
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    memory = {
        length: attention_peak_bytes(length, heads, hidden // heads, device, dtype) for length in args.attention_lengths
    }
    runtime.destroy()

    from dit.model.config import DiTConfig

    config = DiTConfig(
        num_layers=args.num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        latent_channels=4,
        conditioning="class",
        transformer_impl="local",
    )
    tokens = n * LATENT_TOKENS
    flops = 3 * forward_flops(config, [LATENT_TOKENS] * n, tokens, [])
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: [o / t for o, t in zip(times[name], times["diffusers"])] for name in times if name != "diffusers"}
    by_name = {v.name: v for v in variants}
    step_rates = {name: rates(flops, tokens, median[name], device, by_name[name].fp8) for name in times}

    precision = "bf16" if args.bf16 else "fp32"
    print(
        f"{args.model_size}/2 forward+backward, {n} x {LATENT_TOKENS} tokens, {args.threads} threads, "
        f"{args.rounds} alternating rounds"
    )
    print(f"{device.type}, {precision}, our layers: {args.transformer_impl}; {machine(device)}")
    print("| model | median step (s) |\n|---|---|")
    print(f"| ours (Megatron-Core, {args.transformer_impl} backend) | {median['ours']:.3f} |")
    if "ours_fp8" in median:
        print(f"| ours, FP8 {args.fp8_format} ({args.fp8_recipe}) | {median['ours_fp8']:.3f} |")
    print(f"| diffusers DiTTransformer2DModel | {median['diffusers']:.3f} |")
    print(f"| ratio ours / diffusers (median of rounds) | {statistics.median(ratios['ours']):.3f} |")
    for name, r in step_rates.items():
        print(format_rates(name, r))
    print(f"\nPackedAttention forward, one sample, {heads} heads x {hidden // heads}, peak allocated")
    print("| tokens | MiB |\n|---|---|")
    for length, peak in memory.items():
        print(f"| {length} | {peak / 2**20:.1f} |")
    result = {
        "ratio": round(statistics.median(ratios["ours"]), 4),
        "ours_s": round(median["ours"], 4),
        "diffusers_s": round(median["diffusers"], 4),
        "rounds": args.rounds,
        "threads": args.threads,
        "ratio_min": round(min(ratios["ours"]), 4),
        "ratio_max": round(max(ratios["ours"]), 4),
        "attention_peak_mib": {n: round(p / 2**20, 2) for n, p in memory.items()},
        "benchmark": "bench_model",
        "model_size": args.model_size,
        "num_layers": args.num_layers,
        "device": device.type,
        "dtype": precision,
        "transformer_impl": args.transformer_impl,
        "tokens": tokens,
        "model_tflop_per_step": round(flops / 1e12, 6),
        "rates": step_rates,
        "relative_error_vs_fp32": {v.name: v.relative_error for v in variants if v.relative_error is not None},
        "machine": machine(device),
    }
    if "ours_fp8" in median:
        result.update(
            fp8=args.fp8_format,
            fp8_recipe=args.fp8_recipe,
            ours_fp8_s=round(median["ours_fp8"], 4),
            fp8_ratio=round(statistics.median(ratios["ours_fp8"]), 4),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
