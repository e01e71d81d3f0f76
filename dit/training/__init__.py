"""Training: the loop and its components (optimizer set-up, step, log, FLOPs), one file each."""
