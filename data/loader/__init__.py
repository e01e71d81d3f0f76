"""The training-time data path: samples, the energon task encoder, packing, rank matching, bad-data
accounting, the loader and the launch check. The offline tools (prepare, report, datasets) live beside it."""
