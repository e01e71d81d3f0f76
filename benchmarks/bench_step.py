"""The training step's overhead: the recipe's full step against a bare PyTorch step of the same model.

The recipe's step is the loop's own code (dit/training): the energon loader, the per-sample draws, the
step's sample count, Megatron's DDP, forward-backward schedule and optimizer (grad norm, clipping, AdamW),
the loss reduction and the log. The bare step runs the same DiTModel on one pack already in memory:
forward, MSE over real tokens, backward, torch.optim.AdamW. Both run in this process, alternating
round by round, so that the machine's load affects them alike; ``overhead_ratio`` is the median of the
per-round ratios of mean step times.

Each step's rates (``benchmarks/throughput.py``): real tokens/s, model TFLOP/s of the pack from its
cu_seqlens (``dit.training.flops``) and, on a GPU, MFU against its dense peak (fp8's under --fp8-format).
Every pack holds as many same-sized images (256 tokens each), so both steps do the FLOPs of the first pack.
``host_syncs_per_step``: host reads of device tensors (device-to-host syncs on a GPU) in a recipe step, counted by
``dit.training.host_syncs`` over a few untimed steps (on the CPU as if on a GPU), with the site of each and those
inside the DiT layers apart; on a GPU also ``cuda_sync_warnings_per_step``, CUDA's count under
``set_sync_debug_mode("warn")``.

    python benchmarks/bench_step.py                      # DiT-S, packs of up to 4096 tokens, CPU
    python benchmarks/bench_step.py --device cuda --model-size DiT-XL --max-seq-length 8192 --bf16
    python benchmarks/bench_step.py --device cuda --model-size DiT-XL --max-seq-length 8192 --bf16 --fp8-format hybrid

On CUDA the layers are Transformer Engine's where it imports (as pretrain_dit.py picks them), else the local
spec; FP8 is Megatron-Core's own ``fp8`` / ``fp8_recipe`` config fields (TE only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dit.model.config import DiTConfig
    from dit.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SYNC_STEPS = 2  # recipe steps counted for host_syncs_per_step (dit.training.host_syncs)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="DiT-S")
    p.add_argument("--num-layers", type=int, default=None, help="Override the size's layers (smoke tests).")
    p.add_argument("--max-seq-length", type=int, default=4096)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--transformer-impl",
        default=None,
        help="transformer_engine or local (default: local on CPU; on CUDA transformer_engine where it "
        "imports, as pretrain_dit.py picks).",
    )
    p.add_argument("--fp8-format", default=None, help="e4m3 or hybrid: FP8 through TE (needs --bf16, TE, a GPU).")
    p.add_argument("--fp8-recipe", default="delayed", help="FP8 scaling recipe (pretrain_dit.py's choices).")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=1, help="Loader worker processes of the recipe's step.")
    p.add_argument("--samples", type=int, default=160, help="Images in the synthetic dataset (256 px latents).")
    return p.parse_args()


def write_images(root: Path, samples: int) -> None:
    """Same-sized images (latents [16, 32, 32]: 256 tokens at patch 2), so that every pack of the recipe's
    stream holds as many tokens as the bare step's pack and both steps do the same work."""
    import numpy as np
    import torch

    from data.shards import ShardSample, encode_sample, write_dataset

    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    stream = (
        (
            f"image_{i:05d}",
            encode_sample(
                ShardSample(
                    torch.randn(16, 32, 32, generator=g).to(torch.bfloat16),
                    rng.standard_normal((64, 1024)).astype(np.float16),
                    {"caption": f"image {i}"},
                )
            ),
        )
        for i in range(samples)
    )
    write_dataset(root, stream, samples_per_shard=40)


def recipe_run(a: argparse.Namespace, data: str) -> RunConfig:
    from dit.training.arguments import load_run_config

    flags = [
        "--model-size",
        a.model_size,
        "--data-path",
        data,
        "--max-seq-length",
        str(a.max_seq_length),
        "--packing-buffer-size",
        "32",
        "--num-workers",
        str(a.num_workers),
        "--train-iters",
        "100000",
        "--log-interval",
        "10",
        "--lr",
        "1e-4",
    ]
    impl = a.transformer_impl or ("local" if a.device == "cpu" else None)  # None: pretrain_dit.py's own choice
    flags += ["--transformer-impl", impl] if impl else []
    flags += ["--num-layers", str(a.num_layers)] if a.num_layers else []
    flags += ["--bf16"] if a.bf16 else []
    flags += ["--fp8-format", a.fp8_format, "--fp8-recipe", a.fp8_recipe] if a.fp8_format else []
    return load_run_config(flags, 1)


class Recipe:
    """The training loop's own iteration (dit.training.pretrain.TrainingLoop.iterate), one at a time."""

    def __init__(self, run: RunConfig):
        import pretrain_dit
        from dit.training.ema import EMA
        from dit.training.pretrain import TrainingLoop, setup_training
        from dit.training.state import TrainState

        self.setup = setup_training(run, pretrain_dit.HOOKS)
        self.loader = pretrain_dit.train_data_provider(run)
        ema = EMA(self.setup, run.evaluation.ema_decay, run.evaluation.ema_warmup)
        self.loop = TrainingLoop(self.setup, self.loader, pretrain_dit.forward_step, TrainState(), ema)

    def step(self) -> None:
        self.loop.iterate()


class Bare:
    """The same model on one pack in memory: forward, MSE over real tokens, backward, AdamW."""

    def __init__(self, config: DiTConfig, pack, device):
        import torch

        from dit.model.model import DiTModel

        self.model = DiTModel(config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.pack = pack.to(device)
        g = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(self.pack.tokens.shape, generator=g).to(device)
        self.target = torch.randn(self.pack.tokens.shape, generator=g).to(device)
        self.timesteps = torch.rand(self.pack.num_samples, generator=g).to(device) * 1000

    def step(self) -> None:
        out = self.model(self.inputs, self.timesteps, self.pack)
        mask = self.pack.loss_mask
        loss = (out[mask].float() - self.target[mask]).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def main() -> None:
    a = parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import warnings

    warnings.filterwarnings("ignore")
    from benchmarks.throughput import format_rates, machine, max_memory_gib, rates, select_device, synchronizer, timed

    select_device(a.device)
    import torch

    torch.set_num_threads(a.threads)
    from dit.runtime import distributed as runtime
    from dit.training.flops import pack_flops
    from dit.training.host_syncs import count_iterations

    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), a.samples)
        run = recipe_run(a, tmp)
        recipe = Recipe(run)
        device = recipe.setup.device
        sync = synchronizer(device)
        first = next(recipe.loader)
        bare = Bare(run.model, first, device)
        tokens = int(first.cu_seqlens[-1])
        flops = pack_flops(
            recipe.setup.config,
            first.cu_seqlens.tolist(),
            first.cu_seqlens_padded.tolist(),
            first.cu_seqlens_text.tolist(),
        )
        for fn in (recipe.step, bare.step):  # warm-up: worker start, first buffer, allocator, first calls
            timed(fn, sync, 2)
        rounds = []
        for _ in range(a.rounds):
            rounds.append((timed(recipe.step, sync, a.steps_per_round), timed(bare.step, sync, a.steps_per_round)))
        syncs = count_iterations(recipe.loop, SYNC_STEPS)  # untimed: the counter slows every torch call
        memory = max_memory_gib(device)
        recipe.loader.close()
        runtime.destroy()
    ratios = [r / b for r, b in rounds]
    recipe_s, bare_s = statistics.median(r for r, _ in rounds), statistics.median(b for _, b in rounds)
    fp8 = a.fp8_format is not None
    result = {
        "benchmark": "bench_step",
        "model_size": a.model_size,
        "num_layers": run.model.num_layers,
        "device": a.device,
        "dtype": "bf16" if a.bf16 else "fp32",
        "fp8": a.fp8_format,
        "fp8_recipe": a.fp8_recipe if fp8 else None,
        "transformer_impl": run.model.transformer_impl,
        "max_seq_length": a.max_seq_length,
        "tokens_per_pack": tokens,
        "threads": a.threads,
        "rounds": a.rounds,
        "steps_per_round": a.steps_per_round,
        "recipe_step_s": recipe_s,
        "bare_step_s": bare_s,
        "overhead_ratio": statistics.median(ratios),
        "ratios": ratios,
        "model_tflop_per_step": flops / 1e12,
        "recipe": rates(flops, tokens, recipe_s, device, fp8),
        "bare": rates(flops, tokens, bare_s, device, fp8),
        "max_memory_gib": memory,
        "machine": machine(device),
        "host_syncs_per_step": len(syncs.reads) / SYNC_STEPS,
        "host_syncs_in_layers_per_step": sum(syncs.by_site(inside=True).values()) / SYNC_STEPS,
        "host_sync_sites": {site: n / SYNC_STEPS for site, n in syncs.by_site().items()},
        "cuda_sync_warnings_per_step": (
            None if syncs.cuda_sync_warnings is None else syncs.cuda_sync_warnings / SYNC_STEPS
        ),  # GPU: CUDA's own count
    }
    print(json.dumps(result))
    print(f"\n{'round':>5} | {'recipe step (s)':>15} | {'bare step (s)':>13} | ratio")
    for i, (r, b) in enumerate(rounds):
        print(f"{i:>5} | {r:>15.3f} | {b:>13.3f} | {r / b:.3f}")
    print(f"median overhead_ratio {result['overhead_ratio']:.3f} (goal <= 1.10)")
    print(format_rates("recipe step", result["recipe"]))
    print(format_rates("bare step", result["bare"]))
    print(
        f"host syncs per recipe step {result['host_syncs_per_step']:g} "
        f"(in DiTLayer.forward/backward {result['host_syncs_in_layers_per_step']:g}):"
    )
    for site, n in result["host_sync_sites"].items():
        print(f"  {n:g} x {site}")


if __name__ == "__main__":
    main()
