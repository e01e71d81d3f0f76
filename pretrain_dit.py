"""Pretrain a DiT with Megatron-Core on energon data.

    torchrun --nproc-per-node 2 pretrain_dit.py --config examples/digits.yaml

Like Megatron-LM's pretrain_gpt.py this file holds only the hooks (model provider, data provider)
and a short main; the pieces live in dit/ and data/.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dit.arguments import is_main_process, parse_args
from dit.errors import ConfigError
from dit.launch import quiet_library_warnings, user_error

if TYPE_CHECKING:  # the heavy imports wait until the flags are known to be good
    from data.loader import DiTDataLoader
    from dit.config import DiTConfig
    from dit.model import DiTModel

quiet_library_warnings()


def model_provider(config: DiTConfig, pre_process: bool = True, post_process: bool = True) -> DiTModel:
    """This pipeline stage's DiTModel."""
    from dit.model import DiTModel

    return DiTModel(config, pre_process=pre_process, post_process=post_process)


def train_data_provider(args: argparse.Namespace) -> DiTDataLoader:
    """The energon loader of packed micro-batches, already cut to this rank."""
    from data.loader import build_train_loader

    return build_train_loader(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)  # --help and flag syntax answer before the heavy imports
        from data.preflight import check_launch

        launch = check_launch(args)  # flags, model, layout, dataset: before any process group exists
    except (ConfigError, ValueError) as e:
        return user_error("pretrain_dit.py", e)
    if args.validate_only:
        print(f"pretrain_dit.py: ok: {launch.summary}")
        return 0
    config = launch.config
    from megatron.core import parallel_state

    from dit import runtime

    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout(
        tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
        context=args.context_parallel_size, virtual_pipeline=args.virtual_pipeline_model_parallel_size))
    runtime.set_random_seed(args.seed, per_data_parallel_rank=False)
    model = model_provider(config, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    loader = train_data_provider(args)
    try:
        pack = next(loader)
    finally:
        loader.close()
    if is_main_process():
        params = sum(p.numel() for p in model.parameters())
        print(f"pretrain_dit.py: {args.transformer_impl} backend; {params:,} parameters on this rank; first pack: "
              f"{pack.num_samples} samples, {int(pack.cu_seqlens[-1])} real tokens of {args.max_seq_length}")
        print("pretrain_dit.py: the model and the data path are built; the training loop is not (it is the "
              "next issue), so nothing was trained and no checkpoint was written.")
    runtime.destroy()
    return 0


if __name__ == "__main__":  # spawn-safe: dist checkpointing's writer re-imports __main__
    sys.exit(main())
