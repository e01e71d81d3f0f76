"""The launch check: flags, recipe, model, parallel layout and the dataset itself, before any process group.

:func:`check_launch` is what ``pretrain_dit.py`` runs first on every rank, and all that
``--validate-only`` runs (one plain process, for a launch of ``--world-size`` processes). It reads
only what every rank reads alike, so every rank finds the same mistake (``dit.runtime.console``).

The dataset is probed: the first :data:`PROBE_PER_SHARD` samples of up to :data:`PROBE_SHARDS`
shards spread over it go through the real cooker. When none of them could train, the mistake is
almost always a flag, and the line says which and to what ("the latents of DS have 1 channels:
pass --latent-channels 1"); a few broken samples among good ones are the loader's business
(counted skips). A metadataset ``.yaml`` is not probed: energon resolves it when the run opens it.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron.energon.epathlib import EPath
from megatron.energon.flavors.webdataset.config import split_name_re
from megatron.energon.flavors.webdataset.metadata import get_dataset_info

from data.loader.bad_data import BadSample, SkipKind
from data.loader.dataloader import build_task_encoder
from data.loader.rank_split import pad_multiple
from data.loader.shard_reads import READ_ERRORS, TOO_LARGE, declared_size_error
from data.loader.task_encoder import DiTTaskEncoder
from dit.errors import ConfigError, one_line
from dit.training.dataset_folder import has_split
from dit.training.run_config import RunConfig

PROBE_SHARDS = 8
PROBE_PER_SHARD = 4

# what to tell the user when no probed sample fits, by the flag the samples contradict; {values}: what
# they have instead ({s}: its plural ending), {least} / {most}: its extremes, {detail}: the first sample's defect
FIXES = {
    "--latent-channels": "the latents of {path} have {values} channel{s}: pass --latent-channels {least}",
    "--text-embed-dim": "the text embeddings of {path} are {values} wide: pass --text-embed-dim {least}",
    "--max-seq-length": "none of the {n} samples probed in {path} fits: they take {least} to {most} tokens in this "
    "layout; pass --max-seq-length {most} (at least {least})",
    "--max-text-length": "the text embeddings of the {n} samples probed in {path} have {least} to {most} rows: "
    "pass --max-text-length {most}",
    "--patch-size": "the latents of {path} do not divide into patches ({detail}): pass a --patch-size that "
    "divides their height and width",
    "--temporal-patch-size": "the latents of {path} do not divide into patches ({detail}): pass a "
    "--temporal-patch-size that divides their frame count",
    "--conditioning": "the samples of {path} have no 'label' in their .json: pass --conditioning text, or add labels",
    "--num-classes": "the labels of {path} need --num-classes {most} (or more)",
    "--fps-conditioning": "the videos of {path} have no 'fps' in their .json, which --fps-conditioning conditions "
    "on: drop --fps-conditioning, or add fps to the metadata",
    "--text-embedding-key": "the .pickle members of {path} hold dicts without the text embedding's key ({detail}): "
    "pass --text-embedding-key with the key that holds it",
}


@dataclass(frozen=True)
class Launch:
    """A launch that passed every check."""

    run: RunConfig
    summary: str  # one line for --validate-only


def check_launch(run: RunConfig) -> Launch:
    """Every check a checked run (``dit.training.arguments.run_config``) can still make before it starts: its layout
    against the sequence length, and the datasets themselves; raises :class:`ConfigError` on the first mistake."""
    config, world = run.model, run.world_size
    multiple = pad_multiple(
        config.context_parallel_size,
        config.tensor_model_parallel_size,
        config.sequence_parallel,
        config.active_fp8_recipe,
    )
    check_layout(run, multiple)
    encoder = build_task_encoder(config, run.data, multiple)
    probes = [check_dataset(run.data.data_path, "--data-path", encoder)]
    if run.data.valid_data_path is not None:
        probes.append(check_dataset(run.data.valid_data_path, "--valid-data-path", encoder))
    tp, pp, cp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size
    summary = (
        f"{world} processes as tp={tp} pp={pp} cp={cp} dp={world // (tp * pp * cp)}; "
        f"{config.num_layers} layers of width {config.hidden_size}; " + "; ".join(probes)
    )
    return Launch(run, summary)


def check_layout(run: RunConfig, multiple: int) -> None:
    """``--max-seq-length`` against the padding the parallel layout gives every sample."""
    config, length = run.model, run.data.max_seq_length
    layout = (
        f"cp={config.context_parallel_size}"
        + (f", tp={config.tensor_model_parallel_size} with sequence parallel" if config.sequence_parallel else "")
        + (", fp8" if config.fp8 else "")
    )
    if length < multiple:
        raise ConfigError(
            "--max-seq-length",
            f"{length} is shorter than one patch padded for this "
            f"layout ({layout}: {multiple} tokens); use at least {multiple}",
        )
    if not run.data.packing and length % multiple:
        raise ConfigError(
            "--max-seq-length",
            f"--no-packing pads every sample to {length} tokens, "
            f"which must split into multiples of {multiple} for this layout "
            f"({layout}); use {length // multiple * multiple}",
        )


def _probe_shards(root: Path) -> list[str]:
    shards = list(get_dataset_info(EPath(root))["shard_counts"])
    step = max(1, len(shards) // PROBE_SHARDS)
    return shards[::step][:PROBE_SHARDS]


def _first_samples(root: Path, shard: str, count: int) -> Iterator[dict]:
    """The first ``count`` samples of a shard as crude samples (members as raw bytes), like energon's."""
    sample: dict = {}
    size = (root / shard).stat().st_size
    with tarfile.open(root / shard) as tar:
        for member in tar:
            match = split_name_re.match(member.name)
            if not member.isfile() or match is None:
                continue
            name, ext = match.groups()
            if sample and sample["__key__"] != name:
                yield sample
                count -= 1
                if count == 0:
                    return
                sample = {}
            sample = sample or {"__key__": name, "__shard__": shard, "__restore_key__": (), "__sources__": ()}
            too_large = declared_size_error(member, size)
            if too_large:
                sample[TOO_LARGE] = f"{shard} {too_large}"
            else:
                data = tar.extractfile(member)
                assert data is not None  # a regular file (isfile above)
                sample[ext] = data.read()
    if sample:
        yield sample


def check_dataset(path: str, flag: str, encoder: DiTTaskEncoder) -> str:
    """Probe a dataset folder with the run's cooker; a one-line summary when some sample could train."""
    root = Path(path)
    if root.is_file():
        return f"{flag} {path}: a metadataset, not probed"
    if not has_split(root, "train"):
        raise ConfigError(flag, f"{path} has no train split; run energon prepare with --split-ratio 1,0,0")
    shards = _probe_shards(root)
    failures: list[BadSample] = []
    unreadable: list[str] = []
    trainable = 0
    for shard in shards:
        try:
            samples = list(_first_samples(root, shard, PROBE_PER_SHARD))
        except READ_ERRORS as e:
            unreadable.append(f"{shard} ({one_line(e)})")
            continue
        for crude in samples:
            try:
                encoder.cooked(crude)
                trainable += 1
            except BadSample as e:
                failures.append(e)
            except Exception as e:  # noqa: BLE001 -- counted as the loader would count it
                failures.append(BadSample(SkipKind.SAMPLE_ERROR, one_line(e)))
    if shards and len(unreadable) == len(shards):
        raise ConfigError(
            flag,
            f"none of the {len(shards)} shards probed in {path} reads: {unreadable[0]}; "
            "re-copy the dataset or run energon prepare again",
        )
    if not trainable:
        raise _mismatch(flag, path, failures)
    labels = [p.value for f in failures for p in (f, *f.also) if p.flag == "--num-classes" and p.value is not None]
    if labels:  # the rest trains, but these labels would be skipped for the whole run
        raise ConfigError(
            "--num-classes",
            FIXES["--num-classes"].format(path=path, most=max(labels))
            + f" ({len(labels)} of the {trainable + len(failures)} samples probed have a label past the "
            "last class)",
        )
    kinds = Counter(f.kind.value for f in failures)
    skipped = f", skipped {dict(kinds)}" if kinds else ""
    lost = f", {len(unreadable)} shards unreadable" if unreadable else ""
    return f"{flag} {path}: {trainable} of {trainable + len(failures)} samples probed could train{skipped}{lost}"


def _mismatch(flag: str, path: str, failures: list[BadSample]) -> ConfigError:
    """The line for a dataset none of whose probed samples could train: the flag they contradict most, then
    every problem found (each sample's, not only its first), counted by kind, and the first sample's."""
    every = [problem for f in failures for problem in (f, *f.also)]
    kinds = ", ".join(f"{k}={n}" for k, n in Counter(p.kind.value for p in every).most_common())
    first = "; ".join(f"{p.kind.value}: {p.detail}" for p in (failures[0], *failures[0].also)) if failures else ""
    problems = f"{len(every)} problems in the {len(failures)} samples probed [{kinds}]; first sample: {first}"
    flagged = Counter(p.flag for p in every if p.flag is not None)
    if flagged:
        culprit = flagged.most_common(1)[0][0]
        if flag != "--data-path":  # the training data set the model's flags; this dataset must follow them
            return ConfigError(
                flag,
                f"{path} does not match the training data: none of its {len(failures)} "
                f"samples probed fits this run's {culprit} ({problems}); give validation "
                "data prepared like --data-path",
            )
        cases = [p for p in every if p.flag == culprit]
        values = sorted({p.value for p in cases if p.value is not None}) or [0]
        text = FIXES[culprit].format(
            path=path,
            n=len(failures),
            values=" or ".join(map(str, values[:4])),
            s="" if values == [1] else "s",
            least=values[0],
            most=values[-1],
            detail=cases[0].detail,
        )
        others = len(cases) < len(every)
        return ConfigError(culprit, text + (f" ({problems})" if others else ""))
    return ConfigError(
        flag,
        f"none of the {len(failures)} samples probed in {path} could train: {problems}; "
        f"python -m data.report {path} lists them",
    )
