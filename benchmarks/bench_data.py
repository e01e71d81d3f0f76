"""The data path's throughput and packing efficiency on the synthetic mixed image + video dataset.

    python benchmarks/bench_data.py                                  # 1000 samples, 30% video, about a minute
    python benchmarks/bench_data.py --samples 2400 --rounds 3        # the packing report's dataset size
    python benchmarks/bench_data.py --data /tmp/dit_synthetic        # an existing dataset (written there if absent)
    python benchmarks/bench_data.py --context-parallel-size 4 --packing-buffer-size 40   # any training flag

It writes the dataset with ``data.synthetic`` (into a temporary folder unless ``--data``), then runs
``data.report.measure`` ``--rounds`` times: one epoch through the real training loader (energon's savable
loader, worker processes, the cooker, the packing task encoder's first-fit-decreasing packs, patchify and
pack assembly; worker start-up and every buffer fill counted) -> samples/s and real latent tokens/s of wall
time. Packing efficiency is real tokens / (packs x --max-seq-length). The report packs the same samples,
over the same buffer windows of the stream as read, the way NVIDIA NeMo and NVIDIA-NeMo/DFM do: each padded
to a multiple of 64 at our buffer and at DFM's default buffer of 40, and NeMo without packing (every sample
padded to --max-seq-length). ``efficiency_ratio`` = ours / theirs: the real tokens a model step of the same
pack capacity trains, so the training throughput gained at equal step time.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dit.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the recipe's flags this benchmark sets (the packing report's layout); the command line overrides them
DATA_FLAGS = [
    "--max-seq-length",
    "8192",
    "--patch-size",
    "2",
    "--temporal-patch-size",
    "1",
    "--context-parallel-size",
    "2",
    "--packing-buffer-size",
    "200",
    "--num-workers",
    "2",
]

BASELINES = {  # data.report's comparison keys: what each packs like
    "nemo_dfm_pad64_packed": "NeMo/DFM: each sample padded to 64, FFD, our buffer",
    "dfm_pad64_buffer40": "DFM's default: padded to 64, FFD, buffer 40",
    "nemo_pad_to_max_unpacked": "NeMo without packing: each sample padded to max-seq-length",
}


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    """(this benchmark's flags, the recipe's run config)."""
    from dit.training.arguments import loader_run_config, parse_args

    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # the recipe's flags pass through whole
        epilog="Other flags: pretrain_dit.py's data flags, defaults " + " ".join(DATA_FLAGS),
    )
    p.add_argument("--samples", type=int, default=1000, help="Samples of the synthetic dataset written.")
    p.add_argument("--video-fraction", type=float, default=0.3, help="Fraction of videos among them.")
    p.add_argument("--data-seed", type=int, default=0, help="Seed of the synthetic dataset's shapes and values.")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="Dataset folder: used as it is when energon indexed it already, else written there and kept.",
    )
    p.add_argument("--rounds", type=int, default=1, help="Epochs through the loader (throughput: their median).")
    a, rest = p.parse_known_args(argv)
    return a, loader_run_config(parse_args(DATA_FLAGS + rest, prog="bench_data.py"))


def dataset(a: argparse.Namespace, tmp: str) -> tuple[Path, float | None]:
    """The dataset folder and the seconds spent writing it (None: it was there)."""
    from data.synthetic import write_synthetic

    path = a.data or Path(tmp) / "synthetic"
    if (path / ".nv-meta").is_dir():
        return path, None
    start = time.perf_counter()
    write_synthetic(path, a.samples, a.video_fraction, a.data_seed)
    return path, time.perf_counter() - start


def summarize(a: argparse.Namespace, reports: list[dict], write_s: float | None) -> dict:
    import torch

    from benchmarks.throughput import machine

    first = reports[0]  # the packs and efficiencies are the same every round
    walls = [r["loader_wall_s"] for r in reports]
    ours = first["packing_efficiency"]
    baselines = {name: first["comparison"][name] for name in BASELINES}
    return {
        "benchmark": "bench_data",
        "dataset": first["dataset"],
        "written_s": write_s,
        "synthetic": None
        if write_s is None
        else {"samples": a.samples, "video_fraction": a.video_fraction, "seed": a.data_seed},
        "layout": first["layout"],
        "max_seq_length": first["max_seq_length"],
        "packing_buffer_size": first["packing_buffer_size"],
        "num_workers": first["num_workers"],
        "rounds": len(reports),
        "samples_read": first["samples_read"],
        "samples_trained": first["samples_trained"],
        "samples_skipped": first["samples_skipped"],
        "packs": first["packs"],
        "real_tokens": first["real_tokens"],
        "loader_samples_per_s": first["samples_trained"] / statistics.median(walls),
        "loader_tokens_per_s": first["real_tokens"] / statistics.median(walls),
        "loader_tokens_per_s_rounds": [r["loader_tokens_per_s"] for r in reports],
        "loader_wall_s_rounds": walls,
        "packing_efficiency": ours,
        "baselines": baselines,
        "efficiency_ratio": {name: ours / value if value else None for name, value in baselines.items()},
        "length_histogram": first["length_histogram"],
        "packing_buffer_mb": first["packing_buffer_mb"],
        "load_average_1m": os.getloadavg()[0],
        "machine": machine(torch.device("cpu")),
    }


def table(r: dict) -> str:
    lay, cap = r["layout"], r["max_seq_length"]
    what = (
        f"{r['synthetic']['samples']} synthetic samples ({r['synthetic']['video_fraction']:.0%} video), "
        f"written in {r['written_s']:.0f} s"
        if r["synthetic"]
        else r["dataset"]
    )
    lines = [
        f"bench_data: {what}; cp={lay['cp']} tp={lay['tp']} -> samples padded to multiples of {lay['pad_multiple']}; "
        f"max-seq-length {cap}, packing buffer {r['packing_buffer_size']}, {r['num_workers']} loader workers",
        f"{r['samples_trained']} samples trained of {r['samples_read']} read, {r['packs']} packs, "
        f"{r['real_tokens']:,} real tokens",
        "",
        "| packing | real tokens / pack capacity | ours / it |",
        "|---|---|---|",
        f"| this recipe (FFD, buffer {r['packing_buffer_size']}, padded to {lay['pad_multiple']}), measured "
        f"| {r['packing_efficiency']:.4f} | 1.000 |",
        *(
            f"| {label} | {r['baselines'][name]:.4f} | {r['efficiency_ratio'][name]:.3f} |"
            for name, label in BASELINES.items()
        ),
        "",
        "| loader epoch (energon, task encoder, packing) | samples/s | real tokens/s | wall (s) |",
        "|---|---|---|---|",
        *(
            f"| round {i} | {r['samples_trained'] / wall:,.0f} | {tokens:,.0f} | {wall:.1f} |"
            for i, (tokens, wall) in enumerate(zip(r["loader_tokens_per_s_rounds"], r["loader_wall_s_rounds"]))
        ),
        f"| median | {r['loader_samples_per_s']:,.0f} | {r['loader_tokens_per_s']:,.0f} | "
        f"{statistics.median(r['loader_wall_s_rounds']):.1f} |",
        "",
        f"{r['machine']}, load average {r['load_average_1m']:.1f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dit.errors import ConfigError
    from dit.runtime.console import quiet_library_warnings

    quiet_library_warnings()
    try:
        a, run = parse(argv)
    except ConfigError as e:
        print(f"bench_data.py: error: {e}", file=sys.stderr)
        return 2
    from data.report import measure

    with tempfile.TemporaryDirectory() as tmp:
        path, write_s = dataset(a, tmp)
        reports = [measure(run, str(path)) for _ in range(a.rounds)]
    result = summarize(a, reports, write_s)
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
