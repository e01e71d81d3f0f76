"""Every flag of ``pretrain_dit.py --help``, given an out-of-range value (or a use whose need is unmet),
stops the launch check with one line naming it.

A flag new to the parser fails :func:`test_every_flag_is_walked` until it gets a line in
:data:`INVALID` or, when no value of it can be wrong, in :data:`NO_INVALID_VALUE` with the reason.
"""

import pytest

from data.loader.launch_check import check_launch
from dit.errors import ConfigError
from dit.training.arguments import build_parser, load_run_config
from tests.tiny_data import DEBUG_LAUNCH

# a launch that passes every check on the tiny dataset ({dataset} stands for its folder)
BASE = [*DEBUG_LAUNCH, "--data-path", "{dataset}"]
SHARD = "{dataset}/shard_000000.tar"  # an existing file that is not a dataset or a directory

INVALID: dict[str, list[str]] = {
    "--config": ["--config", "/nonexistent/recipe.yaml"],
    # parallelism
    "--tensor-model-parallel-size": ["--tensor-model-parallel-size", "0"],
    "--pipeline-model-parallel-size": ["--pipeline-model-parallel-size", "0"],
    "--context-parallel-size": ["--context-parallel-size", "0"],
    "--sequence-parallel": ["--sequence-parallel"],  # needs tp > 1
    "--distributed-timeout-minutes": ["--distributed-timeout-minutes", "0"],
    "--use-megatron-fsdp": [
        "--use-megatron-fsdp",
        "--validate-only",
        "--world-size",
        "2",
        "--pipeline-model-parallel-size",
        "2",
    ],  # no PP with it (0.16: none)
    # model
    "--model-size": ["--model-size", "DiT-XXL"],
    "--num-layers": ["--num-layers", "0"],
    "--hidden-size": ["--hidden-size", "50"],  # not divisible by 4 heads
    "--num-attention-heads": ["--num-attention-heads", "0"],
    "--latent-channels": ["--latent-channels", "0"],
    "--patch-size": ["--patch-size", "0"],
    "--temporal-patch-size": ["--temporal-patch-size", "0"],
    "--text-embed-dim": ["--text-embed-dim", "-8"],
    "--max-seq-length": ["--max-seq-length", "0"],
    "--max-latent-grid": ["--max-latent-grid", "0", "8", "8"],
    "--conditioning": ["--conditioning", "image"],
    "--num-classes": ["--num-classes", "0"],
    "--position-embedding": ["--position-embedding", "learned"],
    "--adaln-lora-rank": ["--adaln-lora-rank", "-1"],
    "--timestep-freq-shift": ["--timestep-freq-shift", "-1"],
    "--transformer-impl": ["--transformer-impl", "apex"],
    "--recompute-granularity": ["--recompute-granularity", "some"],
    "--recompute-method": ["--recompute-method", "all"],
    "--recompute-num-layers": ["--recompute-num-layers", "0"],
    # precision
    "--fp8-format": ["--fp8-format", "e5m2"],
    "--fp8-recipe": ["--fp8-recipe", "auto"],
    # training
    "--micro-batch-size": ["--micro-batch-size", "0"],
    "--global-batch-size": ["--global-batch-size", "0"],
    "--train-iters": ["--train-iters", "0"],
    "--max-skipped-steps": ["--max-skipped-steps", "0"],
    "--seed": ["--seed", "-1"],
    # optimizer
    "--lr": ["--lr", "nan"],
    "--min-lr": ["--min-lr", "-1"],
    "--lr-warmup-iters": ["--lr-warmup-iters", "1000"],  # as long as training
    "--lr-decay-style": ["--lr-decay-style", "step"],
    "--lr-decay-iters": ["--lr-decay-iters", "0"],
    "--weight-decay": ["--weight-decay", "-0.1"],
    "--adam-beta1": ["--adam-beta1", "1"],
    "--adam-beta2": ["--adam-beta2", "-0.5"],
    "--adam-eps": ["--adam-eps", "0"],
    "--clip-grad": ["--clip-grad", "-1"],
    # diffusion
    "--objective": ["--objective", "ddpm"],
    "--edm-p-mean": ["--edm-p-mean", "inf"],
    "--edm-p-std": ["--edm-p-std", "0"],
    "--sigma-data": ["--sigma-data", "-0.5"],
    "--flow-logit-mean": ["--flow-logit-mean", "nan"],
    "--flow-logit-std": ["--flow-logit-std", "0"],
    "--flow-shift": ["--flow-shift", "0"],
    "--text-drop-prob": ["--text-drop-prob", "1.5"],
    # EMA and validation
    "--ema-decay": ["--ema-decay", "1"],
    "--eval-interval": ["--eval-interval", "0"],
    "--eval-iters": ["--eval-iters", "0"],
    "--valid-data-path": ["--valid-data-path", "/nonexistent/val"],
    # checkpointing and exit
    "--save": ["--save", SHARD],
    "--save-interval": ["--save-interval", "0"],
    "--save-retain": ["--save-retain", "0"],
    "--async-save": ["--async-save"],  # needs --save
    "--load": ["--load", "/nonexistent/ckpt"],
    "--ckpt-step": ["--ckpt-step", "-1"],
    "--finetune": ["--finetune"],  # needs a checkpoint to load
    "--exit-interval": ["--exit-interval", "0"],
    "--exit-duration-in-mins": ["--exit-duration-in-mins", "0"],
    # logging
    "--log-interval": ["--log-interval", "0"],
    "--peak-tflops": ["--peak-tflops", "-1"],
    "--wandb-exp-name": ["--wandb-exp-name", "run1"],  # needs --wandb-project
    # checkpoints, validation, logging (the ones the training issues added)
    "--dist-ckpt-optim-fully-reshardable": ["--dist-ckpt-optim-fully-reshardable"],  # no distributed optimizer
    "--skip-train": ["--skip-train"],  # no checkpoint to validate
    "--sample-log": ["--sample-log", SHARD],  # a file
    # data
    "--data-path": ["--data-path", SHARD],
    "--num-workers": ["--num-workers", "-1"],
    "--packing-buffer-size": ["--packing-buffer-size", "0"],
    "--max-bad-sample-fraction": ["--max-bad-sample-fraction", "2"],
    "--no-packing": [
        "--no-packing",
        "--validate-only",
        "--world-size",
        "2",
        "--context-parallel-size",
        "2",
        "--max-seq-length",
        "30",
    ],  # every sample padded to 30 tokens: not 2*cp chunks
    "--max-text-length": ["--max-text-length", "0"],
    "--oversize-policy": ["--oversize-policy", "warn"],
    "--text-padding": ["--text-padding", "zeros"],
    # launch check
    "--world-size": ["--validate-only", "--world-size", "0"],
}
NAMED_INSTEAD = {"--no-packing": "--max-seq-length"}  # uses whose line names the flag to change
NO_INVALID_VALUE = {
    "--help": "prints the help",
    "--use-distributed-optimizer": "a switch valid in every layout",
    "--qk-layernorm": "a switch",
    "--fps-conditioning": "a switch (the samples' fps are checked by the cooker)",
    "--bf16": "a switch (its need under transformer_engine is walked with --transformer-impl)",
    "--overlap-grad-reduce": "a switch",
    "--ema-warmup": "a switch",
    "--no-ema": "a switch",
    "--no-load-optim": "a switch; without a checkpoint it has nothing to skip",
    "--no-load-rng": "a switch; without a checkpoint it has nothing to skip",
    "--exit-signal-handler": "a switch",
    "--tensorboard-dir": "any path; it needs the tensorboard package, which depends on the machine",
    "--wandb-project": "any name; it needs the wandb package, which depends on the machine",
    "--validate-only": "a switch",
    "--text-embedding-key": "any key: read only from .pickle members that hold a dict (a dict without it is a counted "
    "skip, and the launch check names the flag when no probed sample has it)",
}


def _flags() -> list[str]:
    return [
        next(o for o in a.option_strings if o.startswith("--")) for a in build_parser()._actions if a.option_strings
    ]


@pytest.fixture
def dataset(tiny_dataset: str) -> str:
    """The session's tiny dataset (tests/conftest.py): 16 samples, latents [4, ...], text width 8, up to 24 tokens."""
    return tiny_dataset


def _launch(argv: list[str], dataset: str):
    return check_launch(load_run_config([a.format(dataset=dataset) for a in argv]))


def test_every_flag_is_walked():
    flags = _flags()
    assert not sorted(set(flags) - INVALID.keys() - NO_INVALID_VALUE.keys()), (
        "add these flags to INVALID or NO_INVALID_VALUE"
    )
    assert not sorted((INVALID.keys() | NO_INVALID_VALUE.keys()) - set(flags)), "these flags are gone from --help"
    assert not INVALID.keys() & NO_INVALID_VALUE.keys()


def test_the_base_launch_passes(dataset):
    # 16 samples in 2 shards of 8 (write_dataset's default): the first 4 of each are probed
    assert "8 of 8 samples probed could train" in _launch(BASE, dataset).summary


@pytest.mark.parametrize("flag", sorted(INVALID))
def test_an_out_of_range_value_is_one_line_naming_the_flag(dataset, flag):
    with pytest.raises(ConfigError) as e:
        _launch(BASE + INVALID[flag], dataset)
    assert e.value.flag == NAMED_INSTEAD.get(flag, flag), str(e.value)
    assert "\n" not in str(e.value)
