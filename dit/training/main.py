"""The command line of training: every check first (a mistake is one line, exit 2, also under torchrun),
then ``pretrain``; a run that must stop is one line too (exit 1). Any other exception is a bug and keeps
its traceback."""

from __future__ import annotations

from dit.errors import ConfigError, TrainingStopped, flag_error
from dit.runtime.console import is_main_process, user_error
from dit.training.arguments import parse_args, run_config, world_size
from dit.training.hooks import Hooks


def main(hooks: Hooks, argv: list[str] | None = None, prog: str = "pretrain_dit.py") -> int:
    try:
        args = parse_args(argv)  # --help and flag syntax answer before the heavy imports
        run = run_config(args, world_size(args))  # the one conversion; every flag checked
        launch = hooks.launch_check(run)  # model, layout, dataset: before any process group exists
    except ConfigError as e:
        return user_error(prog, flag_error(e))
    if args.validate_only:
        print(f"{prog}: ok: {launch.summary}")
        return 0
    from dit.runtime import distributed as runtime
    from dit.training.pretrain import pretrain

    try:
        result = pretrain(run, hooks)
    except ConfigError as e:  # found once the run is up: a checkpoint that does not fit, a loader that stalls
        return user_error(prog, flag_error(e))
    except TrainingStopped as e:
        return user_error(prog, e, status=1)
    finally:
        runtime.destroy()
    if is_main_process():
        state = result.state
        stopped = f"; stopped early: {result.exit_reason}" if result.exit_reason else ""
        print(
            f"{prog}: trained to iteration {state.iteration} ({state.consumed_samples} samples, "
            f"{state.skipped_steps} steps skipped){stopped}",
            flush=True,
        )
    return 0
