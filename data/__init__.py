"""The energon data path: samples, task encoder, packing, rank matching and dataset tools.

Installed with `dit` (``python -m data.prepare``, ``python -m data.report``).
"""
