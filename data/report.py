"""The packing report: run the real loader (task encoder, packing, worker processes) over one epoch.

    python -m data.report DATASET --max-seq-length N --patch-size P --temporal-patch-size PT \\
        --context-parallel-size CP [--tensor-model-parallel-size TP --sequence-parallel] [--json]

Any training flag (``--packing-buffer-size``, ``--num-workers``, ``--text-embed-dim``,
``--no-packing``, ...) applies with its training default. It prints samples read and skipped by
kind, the writers recognised (this recipe's format, NeMo DiT, DFM DiT, Wan, Flux) and what was
normalised to read them, with counts, packs built, ``packing_efficiency`` = real tokens /
(packs x max-seq-length), the padding added for CP/SP alignment, the histogram of sample lengths and
the loader's tokens/s; then the same samples packed the way NeMo/DFM do it (each padded to a multiple
of 64; and padded to max-seq-length without packing), simulated over the same packing-buffer windows of the stream as
read (each worker's read order, not the packs' order), and with DFM's default buffer of 40 samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.loader.packing import first_fit_decreasing, padded_length
from data.loader.peer_formats import NORMALISATIONS
from dit.errors import ConfigError, TrainingStopped
from dit.training.run_config import RunConfig

DFM_MULTIPLE = 64  # NeMo's / DFM's per-sample padding
DFM_BUFFER = 40  # DFM's recipe default packing buffer


Read = tuple[int, int, int]  # (loader worker, place in that worker's read order, real tokens)


def simulated_efficiency(reads: Sequence[Read], *, multiple: int, buffer_size: int, max_seq_length: int) -> float:
    """Real tokens / pack capacity when the samples read are padded to ``multiple`` and packed
    first-fit-decreasing in the windows energon's packing buffer takes: per worker, places
    ``[k * buffer_size, (k + 1) * buffer_size)`` of its read order (a skipped sample holds its place)."""
    windows: dict[tuple[int, int], list[int]] = defaultdict(list)
    for worker, place, length in reads:
        windows[worker, place // buffer_size].append(length)
    real, packs = 0, 0
    for lengths in windows.values():
        fits = [n for n in lengths if padded_length(n, multiple) <= max_seq_length]
        real += sum(fits)
        packs += len(first_fit_decreasing([padded_length(n, multiple) for n in fits], max_seq_length))
    return real / (packs * max_seq_length) if packs else 0.0


def read_order(read_indices: Sequence[int], lengths: Sequence[int], num_workers: int) -> list[Read]:
    """(worker, place, length) of samples from energon's read indices (place * workers + worker)."""
    workers = max(num_workers, 1)
    return [(i % workers, i // workers, n) for i, n in zip(read_indices, lengths)]


def histogram(lengths: Sequence[int], max_seq_length: int, bins: int = 6) -> dict[str, int]:
    """Counts of sample lengths in power-of-two buckets ending at ``max_seq_length``."""
    edges = [0] + [max_seq_length >> i for i in reversed(range(bins))]
    return {f"{lo + 1}-{hi}": sum(lo < n <= hi for n in lengths) for lo, hi in zip(edges[:-1], edges[1:])}


def measure(run: RunConfig, data_path: str) -> dict[str, Any]:
    """One pass over the dataset through the real loader; the report as a dict."""
    from data.loader.bad_data import DataStats  # the loader's imports take seconds: after the flags are checked
    from data.loader.dataloader import build_task_encoder, energon_loader, iterate_packs
    from data.loader.rank_split import RankPlace

    config, data = run.model, run.data
    layout = RankPlace(
        cp_size=config.context_parallel_size,
        tp_size=config.tensor_model_parallel_size,
        sequence_parallel=config.sequence_parallel,
        fp8_recipe=config.active_fp8_recipe,
    )
    encoder = build_task_encoder(config, data, layout.pad_multiple)
    loader = energon_loader(
        data_path,
        encoder,
        layout,
        num_workers=data.num_workers,
        seed=run.training.seed,
        packing_buffer_size=data.packing_buffer_size,
        micro_batch_size=run.training.micro_batch_size,
        repeat=False,
    )
    stats, lengths, reads, padded, rows = DataStats(), [], [], 0, 0
    start = time.perf_counter()  # everything counts: worker start-up, every buffer fill, the epoch's tail
    for item in iterate_packs(loader):
        stats.add(item.stats)
        if item.batch is None:
            continue
        pack_lengths = item.batch.cu_seqlens.diff().tolist()  # in pack order (sorted by the packer)
        lengths += pack_lengths
        reads += read_order(item.read_indices, pack_lengths, data.num_workers)  # in read order: the stream
        padded += int(item.batch.cu_seqlens_padded[-1])
        rows += 1 if data.packing else item.batch.num_samples
    end = time.perf_counter()
    real = sum(lengths)
    shard_bytes = sum(f.stat().st_size for f in Path(data_path).glob("**/*.tar"))
    sim = dict(buffer_size=data.packing_buffer_size, max_seq_length=data.max_seq_length)
    return {
        "dataset": str(data_path),
        "layout": {
            "cp": layout.cp_size,
            "tp": layout.tp_size,
            "sequence_parallel": layout.sequence_parallel,
            "pad_multiple": layout.pad_multiple,
            "packing": data.packing,
        },
        "max_seq_length": data.max_seq_length,
        "packing_buffer_size": data.packing_buffer_size,
        "samples_read": stats.read,
        "samples_trained": stats.trained,
        "samples_skipped": dict(sorted(stats.skipped.items())),
        "skipped_examples": [f"{e.kind} {e.key}: {e.detail}" for e in stats.examples],
        "formats": dict(sorted(stats.formats.items())),
        "normalised": dict(sorted(stats.normalised.items())),
        "normalised_first": dict(sorted(stats.notes.items())),
        "packs": rows if data.packing else None,
        "micro_batches_without_packing": None if data.packing else rows,
        "real_tokens": real,
        "padded_tokens": padded,
        "packing_efficiency": real / (rows * data.max_seq_length) if rows else 0.0,
        "alignment_padding_fraction": (padded - real) / padded if padded else 0.0,
        "length_histogram": histogram(lengths, data.max_seq_length),
        "packing_buffer_mb": shard_bytes / max(stats.read, 1) * data.packing_buffer_size / 2**20,
        "num_workers": data.num_workers,
        "loader_tokens_per_s": real / (end - start),
        "loader_wall_s": end - start,
        "load_average_1m": os.getloadavg()[0],
        "comparison": {
            "this_recipe_simulated": simulated_efficiency(reads, multiple=layout.pad_multiple, **sim),
            "nemo_dfm_pad64_packed": simulated_efficiency(reads, multiple=DFM_MULTIPLE, **sim),
            "dfm_pad64_buffer40": simulated_efficiency(
                reads, multiple=DFM_MULTIPLE, buffer_size=DFM_BUFFER, max_seq_length=data.max_seq_length
            ),
            "nemo_pad_to_max_unpacked": real / (len(lengths) * data.max_seq_length) if lengths else 0.0,
        },
    }


def format_text(r: dict[str, Any]) -> str:
    lay = r["layout"]
    lines = [
        f"dataset {r['dataset']}: cp={lay['cp']} tp={lay['tp']} sp={lay['sequence_parallel']} -> samples padded to "
        f"multiples of {lay['pad_multiple']}; max-seq-length {r['max_seq_length']}, buffer {r['packing_buffer_size']}",
        f"samples read {r['samples_read']}, trained {r['samples_trained']}, skipped {r['samples_skipped'] or 'none'}",
        *(f"  {e}" for e in r["skipped_examples"]),
        "formats recognised: " + (", ".join(f"{name} ({n} samples)" for name, n in r["formats"].items()) or "none"),
        *(
            f"normalised {name} in {n} samples: {NORMALISATIONS[name]} (first: {r['normalised_first'][name]})"
            for name, n in r["normalised"].items()
        ),
        f"packs {r['packs'] if lay['packing'] else r['micro_batches_without_packing']} "
        f"({'packed' if lay['packing'] else 'micro-batches, unpacked'})",
        f"packing_efficiency {r['packing_efficiency']:.4f} (real tokens / pack capacity)",
        f"alignment padding {r['alignment_padding_fraction']:.4%} of padded tokens "
        f"({r['padded_tokens'] - r['real_tokens']} tokens)",
        "sample lengths (tokens): " + ", ".join(f"{k}: {v}" for k, v in r["length_histogram"].items()),
        f"loader {r['loader_tokens_per_s']:,.0f} real tokens/s with {r['num_workers']} workers "
        f"(wall {r['loader_wall_s']:.1f} s, load average {r['load_average_1m']:.1f}); "
        f"packing buffer ~{r['packing_buffer_mb']:.0f} MB",
        "same samples, simulated: " + ", ".join(f"{k} {v:.4f}" for k, v in r["comparison"].items()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from dit.runtime.console import quiet_library_warnings
    from dit.training.arguments import ArgumentParser, loader_run_config, parse_args
    from dit.training.dataset_folder import check_energon_dataset

    quiet_library_warnings()
    p = ArgumentParser(
        prog="data.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other flags: see `python pretrain_dit.py --help` (data, model, parallelism).",
    )
    p.add_argument("dataset", metavar="DATASET", help="An energon dataset folder (prepared as CrudeWebdataset).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    try:
        known, rest = p.parse_known_args(argv)
        check_energon_dataset(known.dataset, "DATASET")
        run = loader_run_config(parse_args(rest, prog="data.report"))
    except ConfigError as e:  # one line naming the flag and the fix, as pretrain_dit.py does
        print(f"data.report: error: {e}", file=sys.stderr)
        return 2
    try:
        report = measure(run, known.dataset)
    except TrainingStopped as e:  # a loader worker that died
        print(f"data.report: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report) if known.json else format_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
