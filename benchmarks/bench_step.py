"""The training step's overhead: the recipe's full step against a bare PyTorch step of the same model.

The recipe's step is the loop's own code (dit/training): the energon loader, the per-sample draws, the
step's sample count, Megatron's DDP, forward-backward schedule and optimizer (grad norm, clipping, AdamW),
the loss reduction and the log. The bare step runs the same DiTModel on one pack already in memory:
forward, MSE over real tokens, backward, torch.optim.AdamW. Both run in this process, alternating
round by round, so that the machine's load affects them alike; ``overhead_ratio`` is the median of the
per-round ratios of mean step times.

    python benchmarks/bench_step.py                      # DiT-S, packs of up to 4096 tokens, CPU
    python benchmarks/bench_step.py --device cuda --model-size DiT-XL --max-seq-length 8192 --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="DiT-S")
    p.add_argument("--num-layers", type=int, default=None, help="Override the size's layers (smoke tests).")
    p.add_argument("--max-seq-length", type=int, default=4096)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=1, help="Loader worker processes of the recipe's step.")
    p.add_argument("--samples", type=int, default=160, help="Images in the synthetic dataset (256 and 512 px).")
    return p.parse_args()


def recipe_args(a: argparse.Namespace, data: str) -> argparse.Namespace:
    from dit.arguments import parse_args, validate_args

    flags = ["--model-size", a.model_size, "--data-path", data, "--max-seq-length", str(a.max_seq_length),
             "--packing-buffer-size", "32", "--num-workers", str(a.num_workers), "--train-iters", "100000",
             "--log-interval", "10", "--lr", "1e-4", "--transformer-impl", "local"]
    flags += ["--num-layers", str(a.num_layers)] if a.num_layers else []
    flags += ["--bf16"] if a.bf16 else []
    return validate_args(parse_args(flags), 1)


class Recipe:
    """The loop body of dit.training.pretrain.train, one step at a time."""

    def __init__(self, args: argparse.Namespace):
        import pretrain_dit
        from dit.training.metrics import TrainingLogger
        from dit.training.pretrain import gather_data_stats, setup_training
        from dit.training.state import TrainState

        self.args, self.gather = args, gather_data_stats
        self.setup = setup_training(args, pretrain_dit.HOOKS)
        self.forward_step = pretrain_dit.forward_step
        self.loader = pretrain_dit.train_data_provider(args)
        self.state = TrainState()
        self.logger = TrainingLogger(args, world_size=1, peak_tflops=None, pack_capacity=args.max_seq_length,
                                     logging_rank=False, objective=self.setup.objective.name)

    def step(self) -> None:
        from dit.training.pretrain import _advance
        from dit.training.step import train_step

        start = time.monotonic()
        packs = [next(self.loader)]
        result = train_step(self.setup, self.forward_step, packs, self.state.iteration + 1)
        _advance(self.state, result, self.args.max_skipped_steps, None)
        self.logger.record(result, time.monotonic() - start)
        if self.state.iteration % self.args.log_interval == 0:
            self.logger.log(self.state, self.setup.optimizer.param_groups[0]["lr"], self.gather(self.loader.stats))


class Bare:
    """The same model on one pack in memory: forward, MSE over real tokens, backward, AdamW."""

    def __init__(self, args: argparse.Namespace, pack, device):
        import torch

        from dit.config import config_from_args
        from dit.model import DiTModel

        self.model = DiTModel(config_from_args(args)).to(device)
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


def timed(fn, steps: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    a = parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(a.threads)
    from data.synthetic import write_synthetic
    from dit import runtime

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), samples=a.samples, video_fraction=0.0)
        args = recipe_args(a, tmp)
        recipe = Recipe(args)
        device = recipe.setup.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        first = next(recipe.loader)
        bare = Bare(args, first, device)
        tokens = int(first.cu_seqlens[-1])
        for fn in (recipe.step, bare.step):  # warm-up: worker start, first buffer, allocator, first calls
            timed(fn, 2, sync)
        rounds = []
        for _ in range(a.rounds):
            rounds.append((timed(recipe.step, a.steps_per_round, sync), timed(bare.step, a.steps_per_round, sync)))
        recipe.loader.close()
        runtime.destroy()
    ratios = [r / b for r, b in rounds]
    result = {
        "benchmark": "bench_step", "model_size": a.model_size, "num_layers": args.num_layers, "device": a.device,
        "dtype": "bf16" if a.bf16 else "fp32", "max_seq_length": a.max_seq_length, "tokens_first_pack": tokens,
        "threads": a.threads, "rounds": a.rounds, "steps_per_round": a.steps_per_round,
        "recipe_step_s": statistics.median(r for r, _ in rounds), "bare_step_s": statistics.median(b for _, b in rounds),
        "overhead_ratio": statistics.median(ratios), "ratios": ratios,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
    }
    print(json.dumps(result))
    print(f"\n{'round':>5} | {'recipe step (s)':>15} | {'bare step (s)':>13} | ratio")
    for i, (r, b) in enumerate(rounds):
        print(f"{i:>5} | {r:>15.3f} | {b:>13.3f} | {r / b:.3f}")
    print(f"median overhead_ratio {result['overhead_ratio']:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
