"""How a launch ends on a user's mistake: one line that reaches the terminal, under torchrun too.

Every rank validates identically (the same flags, layout and probed samples: ``data.loader.launch_check``),
so every rank finds the same mistake. Were each to exit at once, torchrun would stop the others as
soon as the first one is gone, rank 0 sometimes before it printed (about one launch in four). So
rank 0 prints the line, hands it to torchrun's error file (torchrun's failure summary, the last
thing on the terminal, then shows the line instead of "To enable traceback see ..."), and exits 2;
every other rank stays alive until torchrun stops it. Only a rank that is still running after
:data:`WAIT_S` prints its own line and exits: its mistake was its own (a file only its node has).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

WAIT_S = 60.0
"""How long a rank other than 0 waits to be stopped before it reports its mistake itself."""
LIBRARY_WARNINGS = (
    "Transformer Engine and Apex are not installed",  # Megatron-Core, four times per process; the backend line says it
    "'pin_memory' argument is set as true but no accelerator is found",  # energon's loader on a CPU machine
    "absl.logging is not installed",  # Megatron-Core 0.17+, which then logs through the standard logging
)
LIBRARY_LOGGERS = (
    "torch.utils.cpp_extension",  # a CUDA build of torch on a machine without CUDA: "No CUDA runtime is found"
)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain ``python`` process: the one that prints a job's lines."""
    return os.environ.get("RANK", "0") == "0"


def quiet_library_warnings() -> None:
    """Hide the libraries' warnings that ask nothing of the user (call it before importing them)."""
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def user_error(prog: str, error: Exception, status: int = 2) -> int:
    """Report a user's mistake (or a run that must stop) as ``prog: error: <error>`` and return ``status``."""
    if not is_main_process():
        time.sleep(WAIT_S)  # torchrun stops this rank once rank 0 has printed the same line and exited
    line = f"{prog}: error: {error}"
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's agent reads it when this rank fails (the format of torch's @record)
        with open(error_file, "w") as f:
            json.dump(
                {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}},
                f,
            )
    return status
