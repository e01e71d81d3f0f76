"""The command line of training: flags first (a mistake is one line and exit 2), then ``pretrain``."""

from __future__ import annotations

import sys

from dit.arguments import is_main_process, launched_world_size, parse_args, validate_args
from dit.errors import ConfigError, TrainingStopped
from dit.training.hooks import Hooks


def main(hooks: Hooks, argv: list[str] | None = None, prog: str = "pretrain_dit.py") -> int:
    """Parse and check the flags, train, and turn a stopped run into one line and exit 1."""
    try:
        args = validate_args(parse_args(argv), launched_world_size())
        from dit.config import config_from_args  # torch and Megatron only once the flags are good

        config_from_args(args)  # the model's own checks, before any process group exists
    except (ConfigError, ValueError) as e:
        if is_main_process():
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from dit import runtime
    from dit.training.pretrain import pretrain

    try:
        result = pretrain(args, hooks)
    except ConfigError as e:  # found once the run is up: a checkpoint that does not fit the flags
        if is_main_process():
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        runtime.destroy()
    if is_main_process():
        state = result.state
        stopped = f"; stopped early: {result.exit_reason}" if result.exit_reason else ""
        print(f"{prog}: trained to iteration {state.iteration} ({state.consumed_samples} samples, "
              f"{state.skipped_steps} steps skipped){stopped}", flush=True)
    return 0
