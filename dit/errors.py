"""The two exceptions a user acts on, each printed by the entry points as one line without a traceback, and
the one-line form of any other exception."""


class ConfigError(ValueError):
    """A user's configuration mistake: names the flag and says how to fix it.

    Entry points print it as one line (``prog: error: --flag: message``) and exit 2, no traceback.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class TrainingStopped(RuntimeError):
    """A run that cannot go on for a reason the user must act on (too much bad data, steps that keep
    producing a non-finite loss); the message says what happened and what to do. Exit status 1."""


def one_line(error: BaseException) -> str:
    """An exception as one short line for the skip log: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


FIELD_FLAGS = {"fp8": "--fp8-format", "fully_reshardable_optimizer": "--dist-ckpt-optim-fully-reshardable"}
"""Config fields whose flag is not ``--`` + the field's name with dashes."""


def flag_error(error: ConfigError) -> ConfigError:
    """``error`` named after its flag: a config field's name (``hidden_size``) becomes ``--hidden-size``."""
    if error.flag.startswith("-") or error.flag in ("usage",):
        return error
    flag = FIELD_FLAGS.get(error.flag, "--" + error.flag.replace("_", "-"))
    return ConfigError(flag, str(error).split(": ", 1)[1])
