"""Our DiT-S/2 against diffusers' DiTTransformer2DModel, forward + backward, and our attention's memory.

    python benchmarks/bench_model.py [--rounds 20] [--threads 2]

Both models are class-conditioned DiT-S/2 with the paper's settings (12 layers, hidden 384, 6 heads, patch 2,
4 latent channels, learned sigma, 2D sin-cos positions, no QK-norm) and the SAME weights: diffusers' random
model is imported into ours with ``dit.convert`` and the two outputs are checked equal first. Data: 8
latents of 32 x 32 (8 x 256 tokens), one process, ``--threads`` intra-op threads. Each round times one step
(forward, mean-square loss, backward) of each model, in alternating order; ``ratio`` is the median over
rounds of ours / diffusers' within the round, which cancels most of a shared machine's load drift.

Memory: peak bytes allocated during our attention's forward (autograd on) for one sample of 2k, 4k and 8k
tokens at DiT-S's 6 heads x 64, from torch.profiler's allocation events (``profile_memory``: every CPU
allocation and free, summed in time order).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

SEQUENCE_LENGTHS = (2048, 4096, 8192)


def _allocations(events):
    for event in events:
        yield event
        yield from _allocations(event.children)


def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes allocated (CPU, net of frees) while ``fn()`` runs, from torch.profiler's events."""
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = sorted((e.start_time_ns, e.extra_fields.alloc_size)
                   for e in _allocations(prof.profiler.kineto_results.experimental_event_tree())
                   if e.tag == _EventType.Allocation)
    current = peak = 0
    for _, size in sizes:
        current += size
        peak = max(peak, current)
    return peak


def attention_peak_bytes(length: int, heads: int, head_dim: int) -> int:
    """Peak allocation of one PackedAttention forward over one sample of ``length`` tokens (single process)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from dit.attention import PackedAttention, attention_params
    from dit.config import DiTConfig

    config = DiTConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, transformer_impl="local")
    attention = PackedAttention(config, 1, AttnMaskType.no_mask, "self",
                                pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    cu = torch.tensor([0, length], dtype=torch.int32)
    params = attention_params(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                              cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu), cp=1, cp_rank=0)
    qkv = torch.randn(length, 3, heads, head_dim, requires_grad=True)
    q, k, v = qkv.unbind(1)  # [L, np, hn] each, as Megatron's linear_qkv split hands them over
    return peak_allocated_bytes(lambda: attention(q, k, v, None, packed_seq_params=params))


def _models():
    """diffusers' DiT-S/2 (random weights) and ours with the same weights."""
    from diffusers import DiTTransformer2DModel

    from dit import convert
    from dit.model import DiTModel

    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                   num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():  # diffusers zero-initialises adaLN; random weights make every layer work
        for param in theirs.parameters():
            param.normal_(0.0, 0.02)
        first = theirs.transformer_blocks[0].norm1.emb.state_dict()
        for block in theirs.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    config = convert.config_from_diffusers(dict(theirs.config), use_cpu_initialization=True,
                                           transformer_impl="local")
    ours = DiTModel(config)
    convert.load_parameters(ours, convert.state_dict_from_diffusers(theirs.state_dict(), config))
    return theirs.eval(), ours  # eval: diffusers' label dropout (ours is the data path's) off; no other dropout


def _steps(theirs, ours):
    """One training step of each model on the same 8 x 256 tokens."""
    from dit.packed import PackedBatch
    from dit.patchify import patchify

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(8, 4, 32, 32, generator=g)
    timesteps, labels = torch.randint(0, 1000, (8,), generator=g).float(), torch.randint(0, 1000, (8,), generator=g)
    tokens, positions = zip(*(patchify(x, 2) for x in latents))  # the data path's work, not timed
    cu = torch.arange(9, dtype=torch.int32) * 256
    batch = PackedBatch(tokens=torch.cat(tokens), positions=torch.cat(positions), loss_mask=None, cu_seqlens=cu,
                        cu_seqlens_padded=cu, text=torch.zeros(0, 1), cu_seqlens_text=torch.zeros_like(cu),
                        grid_sizes=torch.tensor([[1, 16, 16]] * 8), labels=labels)
    with torch.no_grad():
        mine = torch.stack([x.squeeze(1) for x in ours.unpatchify(ours(batch.tokens, timesteps, batch), batch)])
        torch.testing.assert_close(mine, theirs(latents, timesteps, labels).sample, rtol=1e-4, atol=1e-4)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(batch.tokens, timesteps, batch).square().mean().backward()

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        theirs(latents, timesteps, labels).sample.square().mean().backward()

    return step_ours, step_theirs


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dit import runtime

    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout())
    runtime.set_random_seed(0, per_data_parallel_rank=False)
    step_ours, step_theirs = _steps(*_models())
    for step in (step_ours, step_theirs, step_ours, step_theirs):  # warm-up
        step()
    ours, theirs = [], []
    for r in range(args.rounds):
        first, second = (step_ours, step_theirs) if r % 2 == 0 else (step_theirs, step_ours)
        a, b = _timed(first), _timed(second)
        ours.append(a if r % 2 == 0 else b)
        theirs.append(b if r % 2 == 0 else a)
    ratios = [o / t for o, t in zip(ours, theirs)]
    memory = {n: attention_peak_bytes(n, heads=6, head_dim=64) for n in SEQUENCE_LENGTHS}
    runtime.destroy()

    print(f"DiT-S/2 forward+backward, 8 x 256 tokens, {args.threads} threads, {args.rounds} alternating rounds")
    print("| model | median step (s) |\n|---|---|")
    print(f"| ours (Megatron-Core, local backend) | {statistics.median(ours):.3f} |")
    print(f"| diffusers DiTTransformer2DModel | {statistics.median(theirs):.3f} |")
    print(f"| ratio ours / diffusers (median of rounds) | {statistics.median(ratios):.3f} |")
    print("\nPackedAttention forward, one sample, 6 heads x 64, peak allocated")
    print("| tokens | MiB |\n|---|---|")
    for n, peak in memory.items():
        print(f"| {n} | {peak / 2**20:.1f} |")
    print(json.dumps({"ratio": round(statistics.median(ratios), 4), "ours_s": round(statistics.median(ours), 4),
                      "diffusers_s": round(statistics.median(theirs), 4), "rounds": args.rounds,
                      "threads": args.threads, "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
                      "attention_peak_mib": {n: round(p / 2**20, 2) for n, p in memory.items()}}))


if __name__ == "__main__":
    main()
