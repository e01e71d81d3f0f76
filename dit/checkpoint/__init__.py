"""Checkpoints on disk, for every reader: the file layout (``files``), what a checkpoint says of its model
(``description``: architecture and objective) and the model's weights (``weights``).

Training adds the rest of a run's state (``dit.training.checkpointing``); sampling and export read only
these, so they import nothing from training.
"""
