"""Pretrain a DiT with Megatron-Core on energon data.

    torchrun --nproc-per-node 2 pretrain_dit.py --config examples/digits.yaml

Like Megatron-LM's pretrain_gpt.py this file holds only the hooks; the pieces live in dit/ and data/.
"""

from __future__ import annotations

import sys

import warnings

from dit.arguments import is_main_process, launched_world_size, parse_args, validate_args
from dit.errors import ConfigError

# Megatron-Core warns four times per process that TE and apex are absent; dit.te reports it once.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv: list[str] | None = None) -> int:
    try:
        args = validate_args(parse_args(argv), launched_world_size())
    except ConfigError as e:
        if is_main_process():
            print(f"pretrain_dit.py: error: {e}", file=sys.stderr)
        return 2
    from dit import runtime

    runtime.init_distributed()
    runtime.initialize_model_parallel(runtime.ParallelLayout(
        tensor=args.tensor_model_parallel_size, pipeline=args.pipeline_model_parallel_size,
        context=args.context_parallel_size, virtual_pipeline=args.virtual_pipeline_model_parallel_size))
    if is_main_process():
        print("pretrain_dit.py: the configuration is valid and the parallel groups are up; "
              "the training loop is not built yet (it is the next issue), so nothing was trained.")
    runtime.destroy()
    return 0


if __name__ == "__main__":  # spawn-safe: dist checkpointing's writer re-imports __main__
    sys.exit(main())
