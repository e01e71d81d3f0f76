"""The energon data path: samples, task encoder, packing, rank matching and dataset tools.

Run from the repository root (``python -m data.prepare``); it is not installed into site-packages.
"""
