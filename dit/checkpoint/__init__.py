"""Checkpoints on disk, for every reader: the file layout (``files``) and the model's weights (``weights``).

Training adds the rest of a run's state (``dit.training.checkpointing``); sampling and export read only
these two, so they import nothing from training.
"""
